//! [`RedisStore`]: records shared by every process that talks to one Redis or Redis Cluster.

mod connection;
mod error;
mod notify;
mod operator;
mod scripts;
mod url;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::Value;
use tokio::time::Instant;

use self::connection::{AckedConnections, Connection, ReplicaAcks};
use self::error::{config_error, timed_out, unavailable};
use self::notify::{EXPIRY_SLACK, Notices, Subscriber};
use self::scripts::Scripts;
use self::url::Target;
use super::{
    BeginOutcome, Forgotten, InFlightPage, Inspected, LeaseToken, StorageKey, Store, StoreError,
};
use crate::fingerprint::Fingerprint;
use crate::metrics::{self, Event};

/// The key prefix used unless [`RedisStoreBuilder::with_prefix`] says otherwise.
pub(crate) const DEFAULT_PREFIX: &str = "idempotency:";

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
const DEFAULT_REPLICA_ACK_TIMEOUT: Duration = Duration::from_millis(250);

/// A [`Store`] on Redis or Redis Cluster, shared by every process that uses the same server and
/// key prefix.
///
/// # Connecting
///
/// ```no_run
/// # async fn run() -> Result<(), tower_idempotency::StoreError> {
/// use tower_idempotency::{IdempotencyLayer, RedisStore};
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let layer = IdempotencyLayer::new(store);
/// # Ok(()) }
/// ```
///
/// The URL picks the deployment:
///
/// | URL | Deployment |
/// |-----|------------|
/// | `redis://[user:password@]host[:port][/db]` | one Redis server |
/// | `rediss://...` | the same over TLS (add `#insecure` to skip certificate checks, for tests) |
/// | `redis+cluster://[user:password@]host:port[,host:port...]` | a Redis Cluster, from one or more seed nodes |
/// | `rediss+cluster://...` | a Redis Cluster over TLS |
///
/// To try it locally, start a throw-away server with `redis-server --port 6380 --save ""
/// --appendonly no` and use `redis://127.0.0.1:6380`, or start a 3-master cluster on free ports
/// with the repository's `scripts/redis-cluster start`, which prints the `redis+cluster://` URL
/// to use (`scripts/redis-cluster stop` removes it). Standalone Redis 6 or later is needed for
/// notices (RESP3; on Redis 5 waiters fall back to polling), Redis 7 or later for a Cluster.
///
/// Connections belong to the store, not to requests: one auto-reconnecting multiplexed
/// connection (a [`ConnectionManager`](redis::aio::ConnectionManager), or a cluster
/// connection with one connection per node) carries every command, and one more connection,
/// opened the first time a request has to wait, carries every subscription. Create one
/// `RedisStore` per process, inside the tokio runtime that uses it, and share it (clones are
/// cheap and share both connections).
///
/// # What it costs
///
/// Every verb is one round trip: a Lua script run with `EVALSHA` (the scripts are loaded when
/// the store connects, and again by themselves if Redis forgets them). A new request costs two
/// commands, `begin` and `complete`, plus one `renew` every `lock_ttl / 3` while its handler
/// runs; a replay costs one. On a Redis Cluster a new request also sends two commands apart
/// that it does not wait for, which file its lease in the index of leases and unfile it (see
/// below; a standalone server does this inside the scripts). A waiting duplicate costs one subscription on the shared
/// subscriber connection (shared with every other waiter on the same key) and one round trip
/// to re-check the lease after subscribing. With
/// [`RedisStoreBuilder::with_replica_acks`], `begin` and `complete` each carry a `WAIT` in the
/// same round trip, on connections of their own (four more to each node), and take as long as
/// the replicas need to acknowledge: in the benchmark (a primary and one replica on one
/// machine) new keys ran at 0.5-0.7 times the throughput without, replays at 0.8-0.9.
///
/// # Data layout
///
/// Each record is one Redis string at `<prefix>{<64 hex digits of the storage key>}`
/// (default prefix `idempotency:`). Its first byte says what it is: `L` followed by the owner
/// token, the request fingerprint and, in ASCII, `<granted ms>,<renewals>` for a lease (a renewal
/// rewrites it), `C` followed by the encoded record for a completed request, so one read tells
/// them apart.
///
/// The requests in flight are listed, for operators, from an index of leases: the sorted set
/// `<prefix>leases` of their record keys on a standalone server, kept by the scripts in the
/// same step (so a script there names two keys of different hash slots: a `redis://` endpoint
/// that enforces slots, such as a cluster proxy, refuses them; use `redis+cluster://` there),
/// or sixteen sets `<prefix>leases{0}` to `<prefix>leases{f}` on a Cluster, kept by commands of
/// their own. Completions, releases and renewals are
/// announced on the channel `<prefix>{<hex>}:n`. The `{...}` hash tag puts a record and its
/// channel in the same Redis Cluster slot. Expiry is by Redis's clock (`PX`): a lease lives
/// `lock_ttl` from its last grant or renewal, a completed record `ttl` from its completion; the
/// application's clock is never compared with a stored time.
///
/// Owner tokens are random 128-bit values. `complete`, `release` and `renew` check the token
/// atomically inside their script, so an owner whose lease expired and passed to someone else
/// can never overwrite the new owner's outcome (fencing).
///
/// # Waiting
///
/// A duplicate that finds the request in flight waits for a notice instead of polling. The
/// store keeps a single subscriber connection (RESP3, so Redis 6 or later) and multiplexes
/// every waiter of every key over it: the first waiter on a key subscribes to its channel,
/// later ones share the subscription, the last one to leave unsubscribes. A waiter subscribes
/// *before* re-checking the lease, so a completion between the caller's `begin` and its `wait`
/// is never missed. Waits are capped by the lease's remaining lifetime (renewals push the new
/// lifetime to the waiters), so a lease whose owner died is taken over as soon as it expires.
/// When the subscriber connection is down, waiters fall back to a slow poll (every 500 ms by
/// default, see [`RedisStoreBuilder::with_poll_interval`]) until it is back.
///
/// On a Redis Cluster the notices use sharded pub/sub (`SPUBLISH` / `SSUBSCRIBE`, Redis 7), so
/// a notice stays on the shard that owns the key instead of being broadcast to every node.
///
/// A subscription can be lost or move: the subscriber connection drops, a slot moves to another
/// node (a failover, graceful or not, or a migration: the old node unsubscribes its clients),
/// or the client library subscribes again by itself on the node that now serves the slot.
/// Each of these wakes every waiter of the channels concerned (all of them when the connection
/// drops), and they look at the record again with `begin`, so a completion announced while
/// there was no subscription is not missed. For 10 s after such an event, while the cluster's
/// view of who replicates whom settles (a new master may not yet pass its notices on to a
/// subscription left on its old one), waiters also look again every poll interval.
///
/// # Failures and restarts
///
/// Errors and timeouts (default 2 s per step, see [`RedisStoreBuilder::with_timeout`]) are
/// [`StoreError::Unavailable`], which the layer answers with a 503 (or, with `fail_open`, runs
/// the request untracked); a completion or release that fails so is tried again in the
/// background until it lands or the lease has surely expired. On a Redis Cluster a command that
/// meets a failover (the node gone, `CLUSTERDOWN` while a replica is promoted, `MOVED`
/// afterwards) is retried by the client a few times within the step, after pauses of up to
/// about 100, 200 and 400 ms. A completion whose first attempt landed but whose answer was lost
/// finds its own record on the next attempt and succeeds.
///
/// A value at a record's key that this store did not write (another tag, a lease of the wrong
/// size, a lease without an expiry, a value of another Redis type) is [`StoreError::Corrupt`],
/// which the layer answers with a 500 `record-corrupt` problem, never failing open. The
/// connections reconnect by themselves once Redis is back; the service does not need a
/// restart.
///
/// What survives a Redis restart depends on Redis's persistence, which this store does not
/// configure:
///
/// - **Without persistence** (`--save "" --appendonly no`), a restart forgets everything:
///   completed records (a duplicate arriving later runs the handler again) and leases (a
///   handler still running then finds its lease gone: its outcome is refused and counted as a
///   lost lease, and a duplicate may run the handler again meanwhile).
/// - **With AOF** (`appendonly yes`, `appendfsync everysec`), records and leases survive, except
///   writes from about the last second before a crash. Expiry times are absolute, so whatever
///   expired while Redis was down is gone when it comes back.
/// - **With RDB snapshots only**, everything written since the last snapshot is lost.
/// - **Replicas** are asynchronous: a master that dies before its replica received a write
///   loses it in the failover, even though the store had answered. A lost lease lets a
///   duplicate run while the owner still works (the owner's completion is then refused and
///   counted as a lost lease); a lost record lets a later retry run again. With
///   [`RedisStoreBuilder::with_replica_acks`] a lease or record is acknowledged by replicas
///   before the store answers, and a failover to one of them keeps it. Renewals and releases
///   are not acknowledged: a lost renewal leaves the lease its earlier expiry, a lost release
///   leaves the lease to expire.
///
/// A failover takes the cluster's node timeout plus an election (a few seconds with
/// `cluster-node-timeout 2000`). A lease must outlive it: choose a `lock_ttl` well above node
/// timeout + election + `lock_ttl / 3` (the owner renews every third of the TTL, so its lease
/// may have only two thirds left when the master dies), or an owner's completion retried after
/// the promotion finds its lease expired, is refused, and the next attempt runs again.
///
/// The promise is therefore the crate's: exactly once while Redis keeps its data, at least once
/// after a crash of the application (a lease expires and the next attempt runs again) or a loss
/// of Redis data. A handler that must never repeat an effect should also be idempotent in its
/// own database.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Carries every command, except `begin` and `complete` with replica acks.
    connection: Connection,
    /// With replica acks: the connections that carry `begin` and `complete`, each followed by
    /// its `WAIT`.
    acked: Option<AckedConnections>,
    cluster: bool,
    prefix: String,
    timeout: Duration,
    poll_interval: Duration,
    scripts: Scripts,
    notices: Notices,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.inner.cluster)
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("poll_interval", &self.inner.poll_interval)
            .field(
                "replica_acks",
                &self.inner.acked.as_ref().map(|acked| acked.acks),
            )
            .finish_non_exhaustive()
    }
}

/// Options for a [`RedisStore`], from [`RedisStore::builder`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    timeout: Duration,
    poll_interval: Duration,
    replica_acks: u32,
    replica_ack_timeout: Duration,
}

impl RedisStore {
    /// Connects to the Redis or Redis Cluster named by `url` with the default options.
    ///
    /// Fails with [`StoreError::Unavailable`] when the URL is malformed or Redis cannot be
    /// reached.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// A builder for a store on the Redis or Redis Cluster named by `url`.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            replica_acks: 0,
            replica_ack_timeout: DEFAULT_REPLICA_ACK_TIMEOUT,
        }
    }

    /// Whether the store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.cluster
    }

    /// The Redis key of a record, for tools and tests.
    pub fn record_key(&self, key: &StorageKey) -> String {
        self.tagged(key, "")
    }

    /// The channel on which completions, releases and renewals of a record are announced.
    pub fn channel(&self, key: &StorageKey) -> String {
        self.tagged(key, ":n")
    }

    /// `<prefix>{<key in hex>}<suffix>`: the key is the hash tag, so a record and its channel
    /// share a slot.
    fn tagged(&self, key: &StorageKey, suffix: &str) -> String {
        let prefix = &self.inner.prefix;
        let mut s = String::with_capacity(prefix.len() + 66 + suffix.len());
        s.push_str(prefix);
        s.push('{');
        key.push_hex(&mut s);
        s.push('}');
        s.push_str(suffix);
        s
    }

    /// How long the live lease under `key` still lives, or `None` when there is none.
    async fn probe(&self, key: &StorageKey) -> Result<Option<Duration>, StoreError> {
        let pttl = self
            .inner
            .scripts
            .probe(&self.record_key(key))
            .run(&self.inner.connection, self.inner.timeout)
            .await?;
        scripts::lease_remaining(pttl)
    }
}

impl RedisStoreBuilder {
    /// Prefixes every Redis key and channel (default `idempotency:`), so that several
    /// applications can share one Redis. It must not contain `{` or `}`, which would break the
    /// hash tags that keep a record and its channel in one cluster slot.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Bounds each step (connecting, each verb, each subscription) to `timeout` (default 2 s);
    /// past it the step fails with [`StoreError::Unavailable`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often a waiter re-checks the record while the subscriber connection is down
    /// (default 500 ms). With the subscription up, waiters are woken by notices instead.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Has each new lease (`begin`) and each completed record (`complete`) acknowledged by at
    /// least `replicas` replicas before the store answers (default 0: no acknowledgement, Redis
    /// replicates asynchronously). Each write is followed by `WAIT replicas timeout` on the same
    /// connection, in the same round trip, so a failover to an acknowledging replica keeps it.
    ///
    /// When fewer replicas acknowledge within [`with_replica_ack_timeout`](Self::with_replica_ack_timeout):
    ///
    /// - a **lease** is not durable: the store drops it again and `begin` fails with
    ///   [`StoreError::Unavailable`], so the request gets a 503 (or runs untracked with
    ///   `fail_open`) instead of running under a lease that a failover could forget;
    /// - a **record** stays stored (the request ran, and its answer is kept on the master):
    ///   `complete` succeeds, logs a warning and counts the
    ///   [`NotReplicated`](crate::Event::NotReplicated) event.
    ///
    /// Acknowledged writes travel on connections of their own (four more to each Redis node,
    /// taken in turn), because a `WAIT` holds back every later command on its connection until
    /// the replicas answer: renewals, releases and waiters never queue behind one, but new
    /// leases, completions and replays on the same connection do. A master that has lost its
    /// replicas therefore serves about four such steps per ack timeout until they are back;
    /// set `replicas` no higher than the replicas every master has.
    pub fn with_replica_acks(mut self, replicas: u32) -> Self {
        self.replica_acks = replicas;
        self
    }

    /// How long a write waits for [`with_replica_acks`](Self::with_replica_acks) (default
    /// 250 ms). Keep it well below [`with_timeout`](Self::with_timeout), which bounds the whole
    /// step.
    pub fn with_replica_ack_timeout(mut self, timeout: Duration) -> Self {
        self.replica_ack_timeout = timeout;
        self
    }

    /// Connects, loads the scripts, and returns the store.
    ///
    /// Fails with [`StoreError::Unavailable`] when the URL or the prefix is malformed or Redis
    /// cannot be reached.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        if self.prefix.contains(['{', '}']) {
            return Err(config_error("the key prefix must not contain '{' or '}'"));
        }
        let target = Target::parse(&self.url)?;
        if target.uses_tls() {
            // redis-rs leaves the choice of a rustls crypto provider to the application; use
            // ring unless the application installed one already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let cluster = target.is_cluster();
        let timeout = self.timeout;
        let acks = (self.replica_acks > 0).then_some(ReplicaAcks {
            replicas: self.replica_acks,
            timeout: self.replica_ack_timeout,
        });
        let connecting = async {
            let (connection, acked) = connection::open(&target, timeout, acks).await?;
            let subscriber = Subscriber::new(target, timeout)?;
            Ok::<_, StoreError>((connection, acked, subscriber))
        };
        // Connecting may retry; bound it by a few steps' worth of time.
        let (connection, acked, subscriber) = tokio::time::timeout(timeout * 3, connecting)
            .await
            .map_err(|_| timed_out())??;

        let scripts = Scripts::new(cluster);
        scripts.load(&connection, timeout).await?;

        Ok(RedisStore {
            inner: Arc::new(Inner {
                connection,
                acked,
                cluster,
                prefix: self.prefix,
                timeout,
                poll_interval: self.poll_interval,
                scripts,
                notices: subscriber.start(timeout),
            }),
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let token = LeaseToken::random();
        let index = self.script_index();
        let call = self.inner.scripts.begin(
            &self.record_key(key),
            index.as_deref(),
            token,
            fingerprint,
            lease_ttl,
        );
        let reply = match &self.inner.acked {
            None => {
                call.run::<Value>(&self.inner.connection, self.inner.timeout)
                    .await?
            }
            Some(acked) => {
                let (reply, acks) = call.run_acked(acked, self.inner.timeout).await?;
                if scripts::granted(&reply) && acks < acked.acks.replicas {
                    // Granted, but a failover now could forget it: do not run under it.
                    let _ = self.release(key, token).await;
                    return Err(StoreError::Unavailable(
                        format!(
                            "a new lease was acknowledged by {acks} of the {} replicas required",
                            acked.acks.replicas
                        )
                        .into(),
                    ));
                }
                reply
            }
        };
        let outcome = scripts::begin_outcome(reply, token)?;
        if matches!(outcome, BeginOutcome::Acquired(_)) {
            self.file_apart(key, true);
        }
        Ok(outcome)
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let index = self.script_index();
        let call = self.inner.scripts.complete(
            &self.record_key(key),
            &self.channel(key),
            index.as_deref(),
            token,
            &record,
            ttl,
        );
        let reply = match &self.inner.acked {
            None => {
                call.run::<i64>(&self.inner.connection, self.inner.timeout)
                    .await?
            }
            Some(acked) => {
                let (reply, acks) = call.run_acked(acked, self.inner.timeout).await?;
                let reply = scripts::complete_reply(reply)?;
                if reply != 0 && acks < acked.acks.replicas {
                    // Kept on the master all the same: the request ran, and this is its answer.
                    metrics::count(Event::NotReplicated);
                    tracing::warn!(
                        ?key,
                        acks,
                        required = acked.acks.replicas,
                        "a completed record was stored but not acknowledged by enough replicas; a failover now could lose it"
                    );
                }
                reply
            }
        };
        let completed = scripts::completed(reply);
        if completed {
            self.file_apart(key, false);
        }
        Ok(completed)
    }

    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        let index = self.script_index();
        let call = self.inner.scripts.release(
            &self.record_key(key),
            &self.channel(key),
            index.as_deref(),
            token,
        );
        let released: i64 = call.run(&self.inner.connection, self.inner.timeout).await?;
        if released == 1 {
            self.file_apart(key, false);
        }
        Ok(released == 1)
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        let index = self.script_index();
        let call = self.inner.scripts.renew(
            &self.record_key(key),
            &self.channel(key),
            index.as_deref(),
            token,
            lease_ttl,
        );
        let renewed: i64 = call.run(&self.inner.connection, self.inner.timeout).await?;
        if renewed == 1 {
            // On a Cluster, a lease whose entry went missing is filed again.
            self.file_apart(key, true);
        }
        Ok(renewed == 1)
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        if timeout.is_zero() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let channel = self.channel(key).into_bytes();
        // Registered before subscribing and before re-checking: any notice from here on reaches
        // this waiter.
        let mut waiter = self.inner.notices.register(&channel);
        let subscribed = self.inner.notices.subscribe(channel, deadline).await;
        let Some(remaining) = self.probe(key).await? else {
            return Ok(());
        };
        let lease_until = Instant::now() + remaining + EXPIRY_SLACK;
        if !subscribed {
            // The subscriber connection is down: come back after a slow poll interval, and the
            // caller looks again.
            let poll = Instant::now() + self.inner.poll_interval;
            tokio::time::sleep_until(deadline.min(lease_until).min(poll)).await;
            return Ok(());
        }
        // While subscriptions settle after a failover or a reconnection, a notice may be lost
        // between nodes: look again every poll interval as well.
        let poll = self
            .inner
            .notices
            .unsettled()
            .then(|| Instant::now() + self.inner.poll_interval);
        waiter.changed(deadline, lease_until, poll).await;
        Ok(())
    }

    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspected>, StoreError> {
        self.inspect_key(key).await
    }

    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten, StoreError> {
        self.forget_key(key, force).await
    }

    async fn in_flight(
        &self,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<InFlightPage, StoreError> {
        self.list_in_flight(after, limit).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let ping = redis::cmd("PING");
        let call = self.inner.connection.query::<Value>(&ping);
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(result) => result.map(|_| ()).map_err(unavailable),
            Err(_) => Err(timed_out()),
        }
    }
}
