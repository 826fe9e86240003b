//! [`RedisStore`]: records shared by every process that talks to one Redis or Redis Cluster.
//!
//! # Connecting
//!
//! ```no_run
//! # async fn run() -> Result<(), tower_idempotency::StoreError> {
//! use tower_idempotency::{IdempotencyLayer, store::RedisStore};
//!
//! let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
//! let layer = IdempotencyLayer::new(store);
//! # Ok(()) }
//! ```
//!
//! The URL picks the deployment:
//!
//! | URL | Deployment |
//! |-----|------------|
//! | `redis://[user:password@]host[:port][/db]` | one Redis server |
//! | `rediss://...` | the same over TLS (add `#insecure` to skip certificate checks, for tests) |
//! | `redis+cluster://[user:password@]host:port[,host:port...]` | a Redis Cluster, from one or more seed nodes |
//! | `rediss+cluster://...` | a Redis Cluster over TLS |
//!
//! To try it locally, start a throw-away server with `redis-server --port 6380 --save ""
//! --appendonly no` and use `redis://127.0.0.1:6380`, or start a 3-master cluster on free ports
//! with the repository's `scripts/redis-cluster start`, which prints the `redis+cluster://` URL
//! to use (`scripts/redis-cluster stop` removes it). Standalone Redis 6 or later is needed for
//! notices (RESP3; on Redis 5 waiters fall back to polling), Redis 7 or later for a Cluster.
//!
//! Connections belong to the store, not to requests: one auto-reconnecting multiplexed
//! connection (a [`ConnectionManager`], or a cluster connection with one connection per node)
//! carries every command, and one more connection, opened the first time a request has to wait,
//! carries every subscription. Create one `RedisStore` per process, inside the tokio runtime
//! that uses it, and share it (clones are cheap and share both connections).
//!
//! # What it costs
//!
//! Every verb is one round trip: a Lua script run with `EVALSHA` (the scripts are loaded when
//! the store connects, and again by themselves if Redis forgets them). A new request costs two
//! commands, `begin` and `complete`, plus one `renew` every `lock_ttl / 3` while its handler
//! runs; a replay costs one. A waiting duplicate costs one subscription on the shared
//! subscriber connection (shared with every other waiter on the same key) and one round trip
//! to re-check the lease after subscribing. With
//! [`RedisStoreBuilder::with_replica_acks`], `begin` and `complete` each carry a `WAIT` in the
//! same round trip, on connections of their own (four more to each node), and take as long as
//! the replicas need to acknowledge: in the benchmark (a primary and one replica on one
//! machine) new keys ran at 0.5-0.7 times the throughput without, replays at 0.8-0.9.
//!
//! # Data layout
//!
//! Each record is one Redis string at `<prefix>{<64 hex digits of the storage key>}`
//! (default prefix `idempotency:`). Its first byte says what it is: `L` followed by the owner
//! token and the request fingerprint for a lease, `C` followed by the encoded record for a
//! completed request, so one read tells them apart. Completions, releases and renewals are
//! announced on the channel `<prefix>{<hex>}:n`. The `{...}` hash tag puts a record and its
//! channel in the same Redis Cluster slot. Expiry is by Redis's clock (`PX`): a lease lives
//! `lock_ttl` from its last grant or renewal, a completed record `ttl` from its completion; the
//! application's clock is never compared with a stored time.
//!
//! Owner tokens are random 128-bit values. `complete`, `release` and `renew` check the token
//! atomically inside their script, so an owner whose lease expired and passed to someone else
//! can never overwrite the new owner's outcome (fencing).
//!
//! # Waiting
//!
//! A duplicate that finds the request in flight waits for a notice instead of polling. The
//! store keeps a single subscriber connection (RESP3, so Redis 6 or later) and multiplexes
//! every waiter of every key over it: the first waiter on a key subscribes to its channel,
//! later ones share the subscription, the last one to leave unsubscribes. A waiter subscribes
//! *before* re-checking the lease, so a completion between the caller's `begin` and its `wait`
//! is never missed. Waits are capped by the lease's remaining lifetime (renewals push the new
//! lifetime to the waiters), so a lease whose owner died is taken over as soon as it expires.
//! When the subscriber connection is down, waiters fall back to a slow poll (every 500 ms by
//! default, see [`RedisStoreBuilder::with_poll_interval`]) until it is back.
//!
//! On a Redis Cluster the notices use sharded pub/sub (`SPUBLISH` / `SSUBSCRIBE`, Redis 7), so
//! a notice stays on the shard that owns the key instead of being broadcast to every node.
//!
//! A subscription can be lost or move: the subscriber connection drops, a slot moves to another
//! node (a failover, graceful or not, or a migration: the old node unsubscribes its clients),
//! or the client library subscribes again by itself on the node that now serves the slot.
//! Each of these wakes every waiter of the channels concerned (all of them when the connection
//! drops), and they look at the record again with `begin`, so a completion announced while
//! there was no subscription is not missed. For 10 s after such an event, while the cluster's
//! view of who replicates whom settles (a new master may not yet pass its notices on to a
//! subscription left on its old one), waiters also look again every poll interval.
//!
//! # Failures and restarts
//!
//! Errors and timeouts (default 2 s per step, see [`RedisStoreBuilder::with_timeout`]) are
//! [`StoreError::Unavailable`], which the layer answers with a 503 (or, with `fail_open`, runs
//! the request untracked); a completion or release that fails so is tried again in the
//! background until it lands or the lease has surely expired. On a Redis Cluster a command that
//! meets a failover (the node gone, `CLUSTERDOWN` while a replica is promoted, `MOVED`
//! afterwards) is retried by the client a few times within the step, after pauses of up to
//! about 100, 200 and 400 ms. A completion whose first attempt landed but whose answer was lost
//! finds its own record on the next attempt and succeeds.
//!
//! A value at a record's key that this store did not write (another tag, a lease of the wrong
//! size, a lease without an expiry, a value of another Redis type) is [`StoreError::Corrupt`],
//! which the layer answers with a 500 `record-corrupt` problem, never failing open. The
//! connections reconnect by themselves once Redis is back; the service does not need a
//! restart.
//!
//! What survives a Redis restart depends on Redis's persistence, which this store does not
//! configure:
//!
//! - **Without persistence** (`--save "" --appendonly no`), a restart forgets everything:
//!   completed records (a duplicate arriving later runs the handler again) and leases (a
//!   handler still running then finds its lease gone: its outcome is refused and counted as a
//!   lost lease, and a duplicate may run the handler again meanwhile).
//! - **With AOF** (`appendonly yes`, `appendfsync everysec`), records and leases survive, except
//!   writes from about the last second before a crash. Expiry times are absolute, so whatever
//!   expired while Redis was down is gone when it comes back.
//! - **With RDB snapshots only**, everything written since the last snapshot is lost.
//! - **Replicas** are asynchronous: a master that dies before its replica received a write
//!   loses it in the failover, even though the store had answered. A lost lease lets a
//!   duplicate run while the owner still works (the owner's completion is then refused and
//!   counted as a lost lease); a lost record lets a later retry run again. With
//!   [`RedisStoreBuilder::with_replica_acks`] a lease or record is acknowledged by replicas
//!   before the store answers, and a failover to one of them keeps it. Renewals and releases
//!   are not acknowledged: a lost renewal leaves the lease its earlier expiry, a lost release
//!   leaves the lease to expire.
//!
//! A failover takes the cluster's node timeout plus an election (a few seconds with
//! `cluster-node-timeout 2000`). A lease must outlive it: choose a `lock_ttl` well above node
//! timeout + election + `lock_ttl / 3` (the owner renews every third of the TTL, so its lease
//! may have only two thirds left when the master dies), or an owner's completion retried after
//! the promotion finds its lease expired, is refused, and the next attempt runs again.
//!
//! The promise is therefore the crate's: exactly once while Redis keeps its data, at least once
//! after a crash of the application (a lease expires and the next attempt runs again) or a loss
//! of Redis data. A handler that must never repeat an effect should also be idempotent in its
//! own database.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, ConnectionAddr, ConnectionInfo, ErrorKind, FromRedisValue, IntoConnectionInfo,
    ProtocolVersion, PushInfo, PushKind, RedisResult, Script, ScriptInvocation, ServerErrorKind,
    Value,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{BeginOutcome, LeaseToken, StorageKey, Store, StoreError};
use crate::fingerprint::Fingerprint;
use crate::metrics::{self, Event};

/// The key prefix used unless [`RedisStoreBuilder::with_prefix`] says otherwise.
pub(crate) const DEFAULT_PREFIX: &str = "idempotency:";

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
const DEFAULT_REPLICA_ACK_TIMEOUT: Duration = Duration::from_millis(250);
/// How long after subscriptions were lost, moved or re-made waiters also poll.
const SETTLE: Duration = Duration::from_secs(10);
/// Waiters wake this long after the lease's expiry, so that Redis has expired it by then.
const EXPIRY_SLACK: Duration = Duration::from_millis(2);
/// The longest expiry passed to Redis (100 years): `PX` must not overflow Redis's clock.
const MAX_PX: u64 = 100 * 365 * 24 * 3600 * 1000;

const TAG_LEASE: u8 = b'L';
const TAG_COMPLETED: u8 = b'C';
/// `begin`'s answer for a lease without an expiry.
const TAG_NO_EXPIRY: u8 = b'E';

/// A [`Store`] on Redis or Redis Cluster, shared by every process that uses the same server and
/// key prefix. See the [module documentation](self) for URLs, costs and guarantees.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    /// With replica acks: the connections that carry `begin` and `complete`, each followed by
    /// its `WAIT`.
    acked: Option<Acked>,
    cluster: bool,
    prefix: String,
    timeout: Duration,
    poll_interval: Duration,
    scripts: Scripts,
    registry: Arc<Registry>,
    ops: mpsc::UnboundedSender<Op>,
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

/// How many replicas must acknowledge a lease or a record, and for how long a write waits.
#[derive(Debug, Clone, Copy)]
struct ReplicaAcks {
    replicas: u32,
    timeout: Duration,
}

/// Connections (to each node) for writes followed by a `WAIT`, taken in turn. More let more
/// writes wait for their acknowledgements at once; in the benchmark 8 did no better than 4.
const ACKED_CONNECTIONS: usize = 4;

/// The connections for acknowledged writes. A `WAIT` holds back the commands behind it on its
/// connection until the replicas answer, so writes are spread over several connections: Redis
/// waits for the acknowledgements of all of them at once.
struct Acked {
    conns: Vec<Conn>,
    next: AtomicUsize,
    acks: ReplicaAcks,
}

impl Acked {
    fn conn(&self) -> &Conn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        &self.conns[i]
    }
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

    fn publish(&self) -> &'static str {
        if self.inner.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    async fn run<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let call = self.inner.conn.invoke(invocation);
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(result) => result.map_err(script_failed),
            Err(_) => Err(timed_out()),
        }
    }

    /// Runs a script's `EVALSHA` (`eval`), followed on the same connection by `WAIT` for the
    /// replicas: one round trip. Returns the script's answer and how many replicas acknowledged
    /// every write made so far on that connection (so the script's own write too).
    ///
    /// On a Redis Cluster the pipeline goes where its `EVALSHA` goes (the master of the key's
    /// slot, following MOVED and ASK): redis-rs routes a pipeline by its first command with a
    /// key, and a keyless `WAIT`, which sent alone it would fan out to every master, goes along.
    async fn run_acked(
        &self,
        acked: &Acked,
        script: &Script,
        eval: redis::Cmd,
    ) -> Result<(Value, u32), StoreError> {
        let (conn, acks) = (acked.conn(), &acked.acks);
        let mut pipe = redis::pipe();
        pipe.add_command(eval)
            .cmd("WAIT")
            .arg(acks.replicas)
            .arg(millis(acks.timeout));
        let call = async {
            match conn.pipeline::<(Value, u32)>(&pipe).await {
                // Redis forgot the script (a restart, SCRIPT FLUSH, a new master): load it and
                // try once more, as EVALSHA alone does.
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    conn.load(script).await?;
                    conn.pipeline(&pipe).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(result) => result.map_err(script_failed),
            Err(_) => Err(timed_out()),
        }
    }

    /// How long the live lease under `key` still lives, or `None` when there is none.
    async fn probe(&self, key: &StorageKey) -> Result<Option<Duration>, StoreError> {
        let mut inv = self.inner.scripts.probe.prepare_invoke();
        inv.key(self.record_key(key));
        let pttl: i64 = self.run(&inv).await?;
        if pttl == -1 {
            return Err(no_expiry());
        }
        Ok(u64::try_from(pttl)
            .ok()
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis))
    }

    /// Asks the shared subscriber for `channel` and waits for its answer.
    async fn subscribe(&self, channel: Vec<u8>, deadline: Instant) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.inner.ops.send(Op::Subscribe(channel, tx)).is_err() {
            return false;
        }
        let until = deadline.min(Instant::now() + self.inner.timeout);
        matches!(tokio::time::timeout_at(until, rx).await, Ok(Ok(true)))
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
    ///   [`NotReplicated`](crate::metrics::Event::NotReplicated) event.
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
        let registry = Arc::new(Registry::default());
        let timeout = self.timeout;
        let acks = (self.replica_acks > 0).then_some(ReplicaAcks {
            replicas: self.replica_acks,
            timeout: self.replica_ack_timeout,
        });
        let connecting = async {
            match target {
                Target::Single(info) => {
                    let info = *info;
                    let client = Client::open(info.clone()).map_err(unavailable)?;
                    let conn =
                        ConnectionManager::new_with_config(client.clone(), manager_config(timeout))
                            .await
                            .map_err(unavailable)?;
                    let acked = match acks {
                        Some(_) => {
                            futures_util::future::try_join_all((0..ACKED_CONNECTIONS).map(|_| {
                                ConnectionManager::new_with_config(
                                    client.clone(),
                                    manager_config(timeout),
                                )
                            }))
                            .await
                            .map_err(unavailable)?
                            .into_iter()
                            .map(Conn::Single)
                            .collect()
                        }
                        None => Vec::new(),
                    };
                    let settings = info
                        .redis_settings()
                        .clone()
                        .set_protocol(ProtocolVersion::RESP3);
                    let sub_client =
                        Client::open(info.set_redis_settings(settings)).map_err(unavailable)?;
                    let pushes = registry.clone();
                    let sub = ConnectionManager::new_lazy_with_config(
                        sub_client,
                        manager_config(timeout).set_push_sender(move |push: PushInfo| {
                            pushes.on_push(push);
                            Ok::<(), std::convert::Infallible>(())
                        }),
                    )
                    .map_err(unavailable)?;
                    Ok::<_, StoreError>((Conn::Single(conn), acked, Subscriber::Single(sub), false))
                }
                Target::Cluster(nodes) => {
                    let client = cluster_builder(nodes.clone(), timeout)
                        .build()
                        .map_err(unavailable)?;
                    let conn = client.get_async_connection().await.map_err(unavailable)?;
                    let acked = match acks {
                        Some(_) => futures_util::future::try_join_all(
                            (0..ACKED_CONNECTIONS).map(|_| client.get_async_connection()),
                        )
                        .await
                        .map_err(unavailable)?
                        .into_iter()
                        .map(Conn::Cluster)
                        .collect(),
                        None => Vec::new(),
                    };
                    let pushes = registry.clone();
                    let sub_client = cluster_builder(nodes, timeout)
                        .use_protocol(ProtocolVersion::RESP3)
                        .push_sender(move |push: PushInfo| {
                            pushes.on_push(push);
                            Ok::<(), std::convert::Infallible>(())
                        })
                        .build()
                        .map_err(unavailable)?;
                    let sub = Subscriber::Cluster {
                        client: Box::new(sub_client),
                        conn: None,
                    };
                    Ok((Conn::Cluster(conn), acked, sub, true))
                }
            }
        };
        // Connecting may retry; bound it by a few steps' worth of time.
        let (conn, acked, subscriber, cluster) = tokio::time::timeout(timeout * 3, connecting)
            .await
            .map_err(|_| timed_out())??;

        let scripts = Scripts::new();
        for script in scripts.all() {
            let load = conn.load(script);
            tokio::time::timeout(timeout, load)
                .await
                .map_err(|_| timed_out())?
                .map_err(unavailable)?;
        }

        let (ops, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_subscriber(subscriber, rx, registry.clone(), timeout));
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                acked: acks.map(|acks| Acked {
                    conns: acked,
                    next: AtomicUsize::new(0),
                    acks,
                }),
                cluster,
                prefix: self.prefix,
                timeout,
                poll_interval: self.poll_interval,
                scripts,
                registry,
                ops,
            }),
        })
    }
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    // Few, quick reconnection attempts: a request waits at most a few steps for Redis, then
    // gets a 503; the next request tries again.
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

fn cluster_builder(nodes: Vec<ConnectionInfo>, timeout: Duration) -> ClusterClientBuilder {
    // A command that meets a failover (a node gone, MOVED, CLUSTERDOWN while a replica is
    // promoted) is tried again after a short pause that doubles: up to about 100, 200 and 400
    // ms, within one step's timeout. The client's own default first pause is 1.28 s, which
    // would spend most of a step asleep. What outlasts the step is the layer's business: the
    // step fails as unavailable (503), and a failed completion is tried again in the background.
    ClusterClientBuilder::new(nodes)
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(500)
        .retry_wait_formula(100, 2)
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
        let mut lease = Vec::with_capacity(1 + 16 + 32);
        lease.extend_from_slice(&owner(token));
        lease.extend_from_slice(&fingerprint.0);
        let script = &self.inner.scripts.begin;
        let found = match &self.inner.acked {
            None => {
                let mut inv = script.prepare_invoke();
                inv.key(self.record_key(key))
                    .arg(lease)
                    .arg(millis(lease_ttl));
                self.run::<Value>(&inv).await?
            }
            Some(acked) => {
                let mut eval = redis::cmd("EVALSHA");
                eval.arg(script.get_hash())
                    .arg(1)
                    .arg(self.record_key(key))
                    .arg(lease)
                    .arg(millis(lease_ttl));
                let (found, acks) = self.run_acked(acked, script, eval).await?;
                if is_nil(&found) && acks < acked.acks.replicas {
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
                found
            }
        };
        match found {
            // Lua's false: nil in RESP2, and possibly a boolean for a RESP3 connection.
            ref v if is_nil(v) => Ok(BeginOutcome::Acquired(token)),
            Value::BulkString(found) => decode_found(found),
            other => Err(StoreError::Corrupt(format!(
                "unexpected reply to begin: {other:?}"
            ))),
        }
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut value = Vec::with_capacity(1 + record.len());
        value.push(TAG_COMPLETED);
        value.extend_from_slice(&record);
        let script = &self.inner.scripts.complete;
        let stored = match &self.inner.acked {
            None => {
                let mut inv = script.prepare_invoke();
                inv.key(self.record_key(key))
                    .key(self.channel(key))
                    .arg(&owner(token)[..])
                    .arg(value)
                    .arg(millis(ttl))
                    .arg(self.publish());
                self.run::<i64>(&inv).await?
            }
            Some(acked) => {
                let mut eval = redis::cmd("EVALSHA");
                eval.arg(script.get_hash())
                    .arg(2)
                    .arg(self.record_key(key))
                    .arg(self.channel(key))
                    .arg(&owner(token)[..])
                    .arg(value)
                    .arg(millis(ttl))
                    .arg(self.publish());
                let (stored, acks) = self.run_acked(acked, script, eval).await?;
                let stored = i64::from_redis_value(stored).map_err(|e| {
                    StoreError::Corrupt(format!("unexpected reply to complete: {e}"))
                })?;
                if stored != 0 && acks < acked.acks.replicas {
                    // Kept on the master all the same: the request ran, and this is its answer.
                    metrics::record(Event::NotReplicated);
                    tracing::warn!(
                        ?key,
                        acks,
                        required = acked.acks.replicas,
                        "a completed record was stored but not acknowledged by enough replicas; a failover now could lose it"
                    );
                }
                stored
            }
        };
        // 2: this very record was stored already, by an earlier attempt whose answer was lost.
        Ok(matches!(stored, 1 | 2))
    }

    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        let mut inv = self.inner.scripts.release.prepare_invoke();
        inv.key(self.record_key(key))
            .key(self.channel(key))
            .arg(&owner(token)[..])
            .arg(self.publish());
        Ok(self.run::<i64>(&inv).await? == 1)
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut inv = self.inner.scripts.renew.prepare_invoke();
        inv.key(self.record_key(key))
            .key(self.channel(key))
            .arg(&owner(token)[..])
            .arg(millis(lease_ttl))
            .arg(self.publish());
        Ok(self.run::<i64>(&inv).await? == 1)
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        if timeout.is_zero() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let channel = self.channel(key).into_bytes();
        // Registered before subscribing and before re-checking: any notice from here on reaches
        // this waiter.
        let mut registration = self.inner.registry.register(&channel, &self.inner.ops);
        let subscribed = self.subscribe(channel, deadline).await;
        let Some(remaining) = self.probe(key).await? else {
            return Ok(());
        };
        let mut lease_until = Instant::now() + remaining + EXPIRY_SLACK;
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
            .registry
            .unsettled()
            .then(|| Instant::now() + self.inner.poll_interval);
        loop {
            let until = deadline.min(lease_until);
            let until = poll.map_or(until, |poll| until.min(poll));
            match tokio::time::timeout_at(until, registration.rx.changed()).await {
                // The deadline, or the lease's expiry: the caller looks again.
                Err(_) | Ok(Err(_)) => return Ok(()),
                Ok(Ok(())) => {
                    let signal = *registration.rx.borrow_and_update();
                    if signal.changes != registration.base {
                        return Ok(());
                    }
                    // A renewal: keep waiting until the new expiry.
                    if let Some(until) = signal.lease_until {
                        lease_until = lease_until.max(until + EXPIRY_SLACK);
                    }
                }
            }
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let call = self.inner.conn.query::<Value>(redis::cmd("PING"));
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(result) => result.map(|_| ()).map_err(unavailable),
            Err(_) => Err(timed_out()),
        }
    }
}

/// Lua's `false`: nil in RESP2, and possibly a boolean for a RESP3 connection.
fn is_nil(v: &Value) -> bool {
    matches!(v, Value::Nil | Value::Boolean(false))
}

/// `L` and the owner token: the first 17 bytes of a lease's value.
fn owner(token: LeaseToken) -> [u8; 17] {
    let mut out = [0u8; 17];
    out[0] = TAG_LEASE;
    out[1..].copy_from_slice(&token.0.to_be_bytes());
    out
}

fn decode_found(found: Vec<u8>) -> Result<BeginOutcome, StoreError> {
    if found == [TAG_NO_EXPIRY] {
        return Err(no_expiry());
    }
    match found.first() {
        Some(&TAG_COMPLETED) => Ok(BeginOutcome::Completed(Bytes::from(found).slice(1..))),
        Some(&TAG_LEASE) => match <[u8; 32]>::try_from(&found[1..]) {
            Ok(fingerprint) => Ok(BeginOutcome::InFlight {
                fingerprint: Fingerprint(fingerprint),
            }),
            Err(_) => Err(StoreError::Corrupt(format!(
                "a lease of {} bytes",
                found.len()
            ))),
        },
        _ => Err(StoreError::Corrupt(
            "a value that is neither a lease nor a completed record".to_owned(),
        )),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_PX)
}

/// A script's error: [`StoreError::Corrupt`] when a record's key holds a value of another type
/// (another tool's data: not an outage, and the same on every retry), else unavailable.
fn script_failed(e: redis::RedisError) -> StoreError {
    // Redis 7 passes the code of a failed `redis.call` on; Redis 6 wraps it in an ERR message.
    let wrong_type = e.code() == Some("WRONGTYPE") || e.to_string().contains("WRONGTYPE");
    if wrong_type {
        return StoreError::Corrupt(format!("a record's key holds a value of another type: {e}"));
    }
    unavailable(e)
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

/// A lease that never expires: every lease this store writes has a TTL, so another tool wrote
/// it (or removed its expiry), and nobody would ever complete or release it. Waiting for it
/// would last until the caller's wait timeout, two round trips at a time.
fn no_expiry() -> StoreError {
    StoreError::Corrupt("a lease without an expiry, not written by this store".to_owned())
}

fn timed_out() -> StoreError {
    StoreError::Unavailable("Redis did not answer in time".into())
}

fn config_error(why: impl Into<String>) -> StoreError {
    StoreError::Unavailable(format!("invalid Redis store configuration: {}", why.into()).into())
}

/// Where the URL points.
enum Target {
    Single(Box<ConnectionInfo>),
    Cluster(Vec<ConnectionInfo>),
}

impl Target {
    fn parse(url: &str) -> Result<Self, StoreError> {
        let cluster_scheme = [
            ("redis+cluster://", "redis"),
            ("rediss+cluster://", "rediss"),
        ]
        .into_iter()
        .find(|(prefix, _)| {
            url.get(..prefix.len())
                .is_some_and(|s| s.eq_ignore_ascii_case(prefix))
        });
        let Some((prefix, scheme)) = cluster_scheme else {
            let info = url.into_connection_info().map_err(|e| {
                config_error(format!(
                    "{e}; expected redis://, rediss:// or redis+cluster://"
                ))
            })?;
            return Ok(Target::Single(Box::new(info)));
        };
        let rest = &url[prefix.len()..];
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (&authority[..=at], &authority[at + 1..]),
            None => ("", authority),
        };
        let nodes = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|host| {
                format!("{scheme}://{userinfo}{host}{tail}")
                    .into_connection_info()
                    .map_err(|e| config_error(format!("cluster node {host:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if nodes.is_empty() {
            return Err(config_error("a cluster URL needs at least one host:port"));
        }
        Ok(Target::Cluster(nodes))
    }

    fn uses_tls(&self) -> bool {
        let tls = |info: &ConnectionInfo| matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        match self {
            Target::Single(info) => tls(info),
            Target::Cluster(nodes) => nodes.iter().any(tls),
        }
    }
}

/// The command connection.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn invoke<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> RedisResult<T> {
        match self {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await,
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await,
        }
    }

    async fn query<T: FromRedisValue>(&self, cmd: redis::Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    async fn pipeline<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> RedisResult<T> {
        match self {
            Conn::Single(c) => pipe.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => pipe.query_async(&mut c.clone()).await,
        }
    }

    async fn load(&self, script: &Script) -> RedisResult<String> {
        match self {
            Conn::Single(c) => script.prepare_invoke().load_async(&mut c.clone()).await,
            Conn::Cluster(c) => script.prepare_invoke().load_async(&mut c.clone()).await,
        }
    }
}

struct Scripts {
    begin: Script,
    complete: Script,
    release: Script,
    renew: Script,
    probe: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            begin: Script::new(include_str!("begin.lua")),
            complete: Script::new(include_str!("complete.lua")),
            release: Script::new(include_str!("release.lua")),
            renew: Script::new(include_str!("renew.lua")),
            probe: Script::new(include_str!("probe.lua")),
        }
    }

    fn all(&self) -> [&Script; 5] {
        [
            &self.begin,
            &self.complete,
            &self.release,
            &self.renew,
            &self.probe,
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting: one subscriber connection, every waiter multiplexed over it.

/// What waiters on one channel have been told.
#[derive(Clone, Copy, Default)]
struct Signal {
    /// Completions, releases and lost subscriptions seen: any change wakes the waiters.
    changes: u64,
    /// The lease's expiry as of its last announced renewal.
    lease_until: Option<Instant>,
}

struct Channel {
    tx: watch::Sender<Signal>,
    waiters: usize,
}

/// The channels someone waits on, shared by the waiters and the push handler.
#[derive(Default)]
struct Registry {
    channels: Mutex<HashMap<Vec<u8>, Channel>>,
    /// Bumped whenever subscriptions may have been lost, so the subscriber re-subscribes.
    epoch: AtomicU64,
    /// Confirmations still to come of subscriptions the subscriber asked for itself; any other
    /// confirmation is a subscription re-made by the client library (after a reconnection or a
    /// change of topology).
    expected: Mutex<HashMap<Vec<u8>, usize>>,
    /// Until when waiters also poll: for a while after subscriptions were lost, moved or re-made.
    unsettled_until: Mutex<Option<Instant>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Channel>> {
        // Every critical section leaves the map consistent, so a poisoned lock is still usable.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The subscriber is about to subscribe to `channel`: its confirmation is not news.
    fn expect(&self, channel: &[u8]) {
        let mut expected = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        *expected.entry(channel.to_vec()).or_default() += 1;
    }

    /// Whether a confirmation of `channel` was expected (and is now no longer).
    fn confirmed(&self, channel: &[u8]) -> bool {
        let mut expected = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = expected.get_mut(channel) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            expected.remove(channel);
        }
        true
    }

    /// Subscriptions were lost, moved or re-made: for [`SETTLE`], waiters do not trust their
    /// subscription alone. A notice published while a subscription moves (on a new master that
    /// does not know yet that the old one is now its replica, say) may reach nobody.
    fn unsettle(&self) {
        let mut until = self
            .unsettled_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *until = Some(Instant::now() + SETTLE);
    }

    fn unsettled(&self) -> bool {
        let until = self
            .unsettled_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|until| Instant::now() < until)
    }

    /// Wakes every waiter on `channel`: they look at the record again.
    fn wake(&self, channel: &[u8]) -> bool {
        match self.lock().get(channel) {
            Some(entry) => {
                entry.tx.send_modify(|signal| signal.changes += 1);
                true
            }
            None => false,
        }
    }

    fn register(self: &Arc<Self>, channel: &[u8], ops: &mpsc::UnboundedSender<Op>) -> Registration {
        let mut channels = self.lock();
        let entry = channels.entry(channel.to_vec()).or_insert_with(|| Channel {
            tx: watch::Sender::new(Signal::default()),
            waiters: 0,
        });
        entry.waiters += 1;
        let rx = entry.tx.subscribe();
        let base = rx.borrow().changes;
        Registration {
            registry: self.clone(),
            ops: ops.clone(),
            channel: channel.to_vec(),
            rx,
            base,
        }
    }

    /// Called by the subscriber connection for every push; must not block.
    fn on_push(&self, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                    (data.next(), data.next())
                else {
                    return;
                };
                let now = Instant::now();
                if let Some(entry) = self.lock().get(&channel) {
                    entry.tx.send_modify(|signal| match payload.split_first() {
                        Some((b'n', ms)) => {
                            if let Some(ms) = std::str::from_utf8(ms)
                                .ok()
                                .and_then(|ms| ms.parse::<u64>().ok())
                            {
                                signal.lease_until = Some(now + Duration::from_millis(ms));
                            }
                        }
                        _ => signal.changes += 1,
                    });
                }
            }
            PushKind::Subscribe | PushKind::SSubscribe => {
                // Ours, or one the client library made again by itself after a reconnection or
                // a change of topology (on the node that now serves the slot). A notice may have
                // been published while there was none: wake the waiters to look again.
                let Some(Value::BulkString(channel)) = push.data.into_iter().next() else {
                    return;
                };
                if !self.confirmed(&channel) && self.wake(&channel) {
                    self.unsettle();
                }
            }
            PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                // Ours (the last waiter left) or the server's (a slot moved: failover,
                // migration). If someone still waits on the channel, its subscription is gone:
                // wake them and re-subscribe.
                let Some(Value::BulkString(channel)) = push.data.into_iter().next() else {
                    return;
                };
                if self.wake(&channel) {
                    self.epoch.fetch_add(1, Ordering::SeqCst);
                    self.unsettle();
                }
            }
            PushKind::Disconnection => {
                // Every subscription on that connection is gone: wake every waiter (they look
                // again and re-subscribe) and make the subscriber forget what it had.
                self.epoch.fetch_add(1, Ordering::SeqCst);
                self.unsettle();
                for entry in self.lock().values() {
                    entry.tx.send_modify(|signal| signal.changes += 1);
                }
            }
            _ => {}
        }
    }
}

/// One waiter's interest in a channel; the last one to go unsubscribes.
struct Registration {
    registry: Arc<Registry>,
    ops: mpsc::UnboundedSender<Op>,
    channel: Vec<u8>,
    rx: watch::Receiver<Signal>,
    base: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut channels = self.registry.lock();
        let Some(entry) = channels.get_mut(&self.channel) else {
            return;
        };
        entry.waiters = entry.waiters.saturating_sub(1);
        if entry.waiters == 0 {
            channels.remove(&self.channel);
            // Sent under the lock, so it is queued before any later waiter's subscription.
            let _ = self
                .ops
                .send(Op::Unsubscribe(std::mem::take(&mut self.channel)));
        }
    }
}

enum Op {
    /// Make sure the channel is subscribed; answers whether it is.
    Subscribe(Vec<u8>, oneshot::Sender<bool>),
    /// Nobody waits on the channel any more.
    Unsubscribe(Vec<u8>),
}

/// The subscriber connection.
enum Subscriber {
    Single(ConnectionManager),
    /// Connected on first use.
    Cluster {
        client: Box<ClusterClient>,
        conn: Option<ClusterConnection>,
    },
}

impl Subscriber {
    async fn subscribe(&mut self, channel: &[u8]) -> RedisResult<()> {
        match self {
            Subscriber::Single(c) => c.subscribe(channel).await,
            Subscriber::Cluster { client, conn } => {
                let conn = match conn {
                    Some(conn) => conn,
                    None => conn.insert(client.get_async_connection().await?),
                };
                conn.ssubscribe(channel).await
            }
        }
    }

    async fn unsubscribe(&mut self, channel: &[u8]) -> RedisResult<()> {
        match self {
            Subscriber::Single(c) => c.unsubscribe(channel).await,
            Subscriber::Cluster { conn, .. } => match conn {
                Some(conn) => conn.sunsubscribe(channel).await,
                None => Ok(()),
            },
        }
    }
}

/// Owns the subscriber connection and applies subscription changes one at a time, in the
/// order they were asked for, so an unsubscribe never overtakes a later subscribe.
async fn run_subscriber(
    mut subscriber: Subscriber,
    mut ops: mpsc::UnboundedReceiver<Op>,
    registry: Arc<Registry>,
    timeout: Duration,
) {
    let mut subscribed: HashSet<Vec<u8>> = HashSet::new();
    let mut epoch = registry.epoch.load(Ordering::SeqCst);
    while let Some(op) = ops.recv().await {
        let now = registry.epoch.load(Ordering::SeqCst);
        if now != epoch {
            subscribed.clear();
            epoch = now;
        }
        match op {
            Op::Subscribe(channel, reply) => {
                if reply.is_closed() {
                    continue;
                }
                let ok = subscribed.contains(&channel) || {
                    registry.expect(&channel);
                    match tokio::time::timeout(timeout, subscriber.subscribe(&channel)).await {
                        Ok(Ok(())) => {
                            subscribed.insert(channel);
                            true
                        }
                        Ok(Err(e)) => {
                            // Refused: no confirmation will come.
                            registry.confirmed(&channel);
                            tracing::debug!(error = %e, "could not subscribe; waiters poll");
                            false
                        }
                        Err(_) => {
                            tracing::debug!("subscribing timed out; waiters poll");
                            false
                        }
                    }
                };
                let _ = reply.send(ok);
            }
            Op::Unsubscribe(channel) => {
                if registry.lock().contains_key(&channel) {
                    // Someone started waiting again meanwhile.
                    continue;
                }
                if subscribed.remove(&channel) {
                    let _ = tokio::time::timeout(timeout, subscriber.unsubscribe(&channel)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_every_node() {
        let Ok(Target::Cluster(nodes)) =
            Target::parse("redis+cluster://u:p@127.0.0.1:7000,127.0.0.1:7001/?protocol=resp3")
        else {
            panic!("not a cluster")
        };
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[1].addr().to_string(), "127.0.0.1:7001");
        assert_eq!(nodes[1].redis_settings().password(), Some("p"));
        assert!(matches!(
            Target::parse("redis://127.0.0.1:6379/2"),
            Ok(Target::Single(_))
        ));
        assert!(matches!(
            Target::parse("rediss+cluster://h:1"),
            Ok(Target::Cluster(ref n)) if matches!(n[0].addr(), ConnectionAddr::TcpTls { .. })
        ));
        assert!(Target::parse("redis+cluster://").is_err());
        assert!(Target::parse("http://example.com").is_err());
    }

    #[test]
    fn values_are_tagged() {
        let fp = [9u8; 32];
        let mut lease = vec![TAG_LEASE];
        lease.extend_from_slice(&fp);
        assert!(matches!(
            decode_found(lease),
            Ok(BeginOutcome::InFlight { fingerprint }) if fingerprint.0 == fp
        ));
        assert!(matches!(
            decode_found(b"Cabc".to_vec()),
            Ok(BeginOutcome::Completed(b)) if &b[..] == b"abc"
        ));
        assert!(decode_found(b"Xabc".to_vec()).is_err());
        assert_eq!(owner(LeaseToken(1))[16], 1);
        assert_eq!(millis(Duration::ZERO), 1);
    }
}
