//! A Redis Cluster master killed under load. Two layers, each behind its own axum server on
//! 127.0.0.1 and each with its own `RedisStore`, share a 3-master, 3-replica cluster (node
//! timeout 2 s) started by the test. Clients send keyed requests, every key twice at once (one
//! copy to each server), and retry with the same key on any 5xx, 409 or connection error until
//! they get a stored answer. Mid-load a master is killed with SIGKILL; its replica is promoted,
//! the load goes on, and the dead node is started again (it rejoins as a replica).
//!
//! Then every key is sent once more, and the test checks what the handler counted: every key
//! ran exactly once, both copies of a key got the same bytes, and the last request replayed
//! them. Completions that failed while the shard had no master must have landed later (the
//! layer tries a failed completion again); one given up would leave its lease to expire and
//! the last request would run the key a second time.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use idempotency_test_support::redis as servers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;
use tower_idempotency::Fingerprint;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::{BeginOutcome, LeaseToken, RedisStore, StorageKey, Store, StoreError};

use servers::{RedisCluster, RedisServer};

/// Well above the cluster's node timeout (2 s) plus the election plus a renewal period
/// (lock TTL / 3), as the README asks: a lease renewed just before the crash outlives the
/// promotion of the replica.
const LOCK_TTL: Duration = Duration::from_secs(12);
const NODE_TIMEOUT_MS: u64 = 2000;
/// Client tasks, each sending one key at a time, twice at once.
const CLIENTS: usize = 16;
/// No request is retried past this, whatever happens; a key unanswered by then fails the test.
const GIVE_UP: Duration = Duration::from_secs(50);

/// Executions per key, as the handler counted them.
#[derive(Default)]
struct Runs(Mutex<HashMap<String, u32>>);

impl Runs {
    fn run(&self, key: &str) -> u32 {
        let mut runs = self.0.lock().unwrap();
        let n = runs.entry(key.to_owned()).or_default();
        *n += 1;
        *n
    }
}

#[derive(Clone)]
struct App {
    name: &'static str,
    runs: Arc<Runs>,
}

async fn order(State(app): State<App>, headers: HeaderMap) -> (StatusCode, String) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let n = app.runs.run(&key);
    // Some work, so that requests are in flight when the master dies.
    let work = 10 + key.bytes().map(u64::from).sum::<u64>() % 50;
    tokio::time::sleep(Duration::from_millis(work)).await;
    (
        StatusCode::CREATED,
        format!("{key}: run {n} on {}", app.name),
    )
}

async fn server(name: &'static str, url: &str, acks: u32, runs: Arc<Runs>) -> String {
    let mut store = RedisStore::builder(url);
    if acks > 0 {
        store = store.with_replica_acks(acks);
    }
    let store = store.connect().await.unwrap();
    let layer = IdempotencyLayer::new(store)
        .with_lock_ttl(LOCK_TTL)
        .with_wait_timeout(Duration::from_secs(30));
    let app = Router::new()
        .route("/orders", post(order))
        .with_state(App { name, runs })
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/orders")
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// 5xx, 409 and connection errors that were retried.
    retried: AtomicUsize,
    /// Keys whose two copies never both got an answer before [`GIVE_UP`].
    unanswered: Mutex<Vec<String>>,
    /// Keys whose two copies got different bytes.
    different: Mutex<Vec<String>>,
    /// Every answered key and its answer.
    answers: Mutex<HashMap<String, Bytes>>,
}

/// Sends `key` until a stored answer comes back, starting with server `first` and switching
/// servers on each retry. `None` past `give_up`.
async fn until_answered(
    client: &reqwest::Client,
    servers: &[String; 2],
    key: &str,
    first: usize,
    give_up: Instant,
    seen: &Seen,
) -> Option<Bytes> {
    let mut at = first;
    while Instant::now() < give_up {
        let sent = client
            .post(&servers[at])
            .header("idempotency-key", key)
            .body("{}")
            .send()
            .await;
        match sent {
            Ok(res) if res.status() == StatusCode::CREATED => {
                if let Ok(body) = res.bytes().await {
                    return Some(body);
                }
            }
            Ok(res) => {
                let status = res.status();
                assert!(
                    status.is_server_error() || status == StatusCode::CONFLICT,
                    "{key}: unexpected {status}: {:?}",
                    res.text().await
                );
            }
            Err(_) => {}
        }
        seen.retried.fetch_add(1, Ordering::Relaxed);
        at = 1 - at;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn clients(
    servers: [String; 2],
    stop: Arc<AtomicBool>,
    next: Arc<AtomicUsize>,
    seen: Arc<Seen>,
    give_up: Instant,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .unwrap();
    while !stop.load(Ordering::Relaxed) {
        let key = format!("order-{}", next.fetch_add(1, Ordering::Relaxed));
        let (a, b) = tokio::join!(
            until_answered(&client, &servers, &key, 0, give_up, &seen),
            until_answered(&client, &servers, &key, 1, give_up, &seen),
        );
        match (a, b) {
            (Some(a), Some(b)) => {
                if a != b {
                    seen.different.lock().unwrap().push(key.clone());
                }
                seen.answers.lock().unwrap().insert(key, a);
            }
            _ => seen.unanswered.lock().unwrap().push(key),
        }
    }
}

async fn master_killed_under_load(acks: u32) {
    let start = Instant::now();
    let give_up = start + GIVE_UP;
    let mut cluster =
        tokio::task::spawn_blocking(|| RedisCluster::start_with(3, 1, NODE_TIMEOUT_MS))
            .await
            .unwrap();
    let url = cluster.url();
    let runs = Arc::new(Runs::default());
    let servers = [
        server("a", &url, acks, runs.clone()).await,
        server("b", &url, acks, runs.clone()).await,
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Seen::default());
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(clients(
                servers.clone(),
                stop.clone(),
                next.clone(),
                seen.clone(),
                give_up,
            ))
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_kill = next.load(Ordering::Relaxed);
    let victim = cluster.masters()[0];
    let heirs = cluster.replicas_of(victim);
    assert!(!heirs.is_empty(), "the master to kill has no replica");
    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.kill(victim);
        // The replica is promoted once the others have seen the master gone for the node
        // timeout, and won the election.
        let promoted = Instant::now() + Duration::from_secs(30);
        while !heirs
            .iter()
            .any(|&h| cluster.role(h).as_deref() == Some("master"))
        {
            assert!(Instant::now() < promoted, "no replica was promoted");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster.wait_until_healthy(Duration::from_secs(30));
        cluster
    })
    .await
    .unwrap();
    let at_promotion = next.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart(victim);
        cluster.wait_until_healthy(Duration::from_secs(30));
        cluster
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    // Every key once more: a replay of the same bytes, not a second run. A completion that was
    // given up would leave a lease that expires within LOCK_TTL, and this request would then
    // run the key again.
    let answers: Vec<(String, Bytes)> = seen
        .answers
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(40))
        .build()
        .unwrap();
    let mismatched: Vec<String> = futures_util::stream::iter(answers.iter())
        .map(|(key, answer)| {
            let client = &client;
            let servers = &servers;
            let seen = &seen;
            async move {
                let last = until_answered(client, servers, key, 0, give_up, seen).await;
                (last.as_ref() != Some(answer)).then(|| key.clone())
            }
        })
        .buffer_unordered(16)
        .filter_map(|m| async move { m })
        .collect()
        .await;

    let runs = runs.0.lock().unwrap().clone();
    let twice: Vec<(&String, &u32)> = runs.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "replica acks {acks}: {} keys ({before_kill} before the kill, {} while the shard had no \
         master, {} after), {} retried answers, {} keys run twice, in {:?}",
        answers.len(),
        at_promotion - before_kill,
        answers.len().saturating_sub(at_promotion),
        seen.retried.load(Ordering::Relaxed),
        twice.len(),
        start.elapsed(),
    );
    assert!(
        answers.len() > at_promotion,
        "the load went on after the failover"
    );
    assert!(twice.is_empty(), "keys run twice: {twice:?}");
    assert_eq!(
        *seen.unanswered.lock().unwrap(),
        Vec::<String>::new(),
        "keys never answered"
    );
    assert_eq!(
        *seen.different.lock().unwrap(),
        Vec::<String>::new(),
        "keys whose copies got different bytes"
    );
    assert_eq!(
        mismatched,
        Vec::<String>::new(),
        "keys not replayed as answered"
    );
    for (key, answer) in &answers {
        assert_eq!(runs.get(key), Some(&1), "{key} ran once");
        assert!(
            answer.starts_with(format!("{key}: run 1 on ").as_bytes()),
            "{key}: {answer:?}"
        );
    }
    drop(cluster);
}

/// The load tests start six Redis processes each and load them: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_load_runs_no_key_twice() {
    let _one = ONE_AT_A_TIME.lock().await;
    master_killed_under_load(0).await;
}

/// The same with every lease and record acknowledged by a replica. Until the killed node is
/// back as a replica, the promoted master has none: its new leases are refused (503, retried
/// by the clients) and its records are stored unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_load_with_replica_acks_runs_no_key_twice() {
    let _one = ONE_AT_A_TIME.lock().await;
    master_killed_under_load(1).await;
}

// ---------------------------------------------------------------------------------------------
// Replica acknowledgements on a primary and its replica

/// Counts the layer's `not_replicated` events.
#[derive(Default, Clone)]
struct NotReplicated(Arc<std::sync::atomic::AtomicU64>);

impl NotReplicated {
    fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

struct CountFn(Arc<std::sync::atomic::AtomicU64>);

impl metrics::CounterFn for CountFn {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::SeqCst);
    }
}

impl metrics::Recorder for NotReplicated {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let ours = key.name() == tower_idempotency::EVENTS_TOTAL
            && key
                .labels()
                .any(|l| l.key() == "event" && l.value() == "not_replicated");
        if ours {
            metrics::Counter::from_arc(Arc::new(CountFn(self.0.clone())))
        } else {
            metrics::Counter::noop()
        }
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

fn wait_calls(server: &RedisServer) -> u64 {
    server.command_calls().get("wait").copied().unwrap_or(0)
}

/// With replica acks, a new lease and a record are on the replica by the time the store
/// answers, each through one `WAIT` sent with its script. A lease that too few replicas
/// acknowledged is dropped again and refused as unavailable; a record that too few
/// acknowledged stays stored and is counted `not_replicated`; a replay needs no replica.
#[tokio::test(flavor = "current_thread")]
async fn replica_acks_hold_back_unreplicated_leases_and_count_unreplicated_records() {
    let _one = ONE_AT_A_TIME.lock().await;
    let events = NotReplicated::default();
    let _local = metrics::set_default_local_recorder(&events);
    let primary = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let mut replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let give_up = Instant::now() + Duration::from_secs(20);
    while !replica
        .cli(&["INFO", "replication"])
        .contains("master_link_status:up")
    {
        assert!(Instant::now() < give_up, "the replica never synced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let prefix = format!("r{:x}:", LeaseToken::random().0 as u64);
    // Generous: a busy machine must not make an acknowledgement late.
    let store = RedisStore::builder(primary.url())
        .with_prefix(&prefix)
        .with_timeout(Duration::from_secs(10))
        .with_replica_acks(1)
        .with_replica_ack_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    let ttl = Duration::from_secs(60);

    let key = StorageKey([1; 32]);
    let record_key = store.record_key(&key);
    let waits = wait_calls(&primary);
    let BeginOutcome::Acquired(t) = store.begin(&key, &Fingerprint([1; 32]), ttl).await.unwrap()
    else {
        panic!("no lease")
    };
    assert!(
        replica.cli(&["GET", &record_key]).starts_with('L'),
        "the lease is on the replica when begin answers"
    );
    assert!(
        store
            .complete(&key, t, Bytes::from_static(b"answer"), ttl)
            .await
            .unwrap()
    );
    assert_eq!(replica.cli(&["GET", &record_key]).trim(), "Canswer");
    assert_eq!(wait_calls(&primary) - waits, 2, "one WAIT per write");
    assert_eq!(events.get(), 0);

    // More replicas than there are: a new lease is refused, and not left behind.
    let strict = RedisStore::builder(primary.url())
        .with_prefix(&prefix)
        .with_replica_acks(2)
        .with_replica_ack_timeout(Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let other = StorageKey([2; 32]);
    let begun = strict.begin(&other, &Fingerprint([1; 32]), ttl).await;
    assert!(
        matches!(begun, Err(StoreError::Unavailable(_))),
        "an unacknowledged lease: {begun:?}"
    );
    assert_eq!(
        primary.cli(&["EXISTS", &strict.record_key(&other)]).trim(),
        "0"
    );
    // A replay writes nothing and needs no acknowledgement.
    assert!(matches!(
        strict.begin(&key, &Fingerprint([1; 32]), ttl).await,
        Ok(BeginOutcome::Completed(b)) if &b[..] == b"answer"
    ));

    // The replica gone: a record is kept on the primary all the same, and counted.
    let third = StorageKey([3; 32]);
    let BeginOutcome::Acquired(t) = store
        .begin(&third, &Fingerprint([1; 32]), ttl)
        .await
        .unwrap()
    else {
        panic!("no lease")
    };
    replica.kill();
    assert!(
        store
            .complete(&third, t, Bytes::from_static(b"kept"), ttl)
            .await
            .unwrap()
    );
    assert_eq!(events.get(), 1, "counted as not replicated");
    assert_eq!(
        primary.cli(&["GET", &store.record_key(&third)]).trim(),
        "Ckept"
    );
    assert!(matches!(
        store.begin(&third, &Fingerprint([1; 32]), ttl).await,
        Ok(BeginOutcome::Completed(b)) if &b[..] == b"kept"
    ));
    // And new leases are refused until a replica is back.
    let fourth = StorageKey([4; 32]);
    assert!(matches!(
        store.begin(&fourth, &Fingerprint([1; 32]), ttl).await,
        Err(StoreError::Unavailable(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Waiters across a failover

/// Waits as the layer does (begin, then wait while in flight) until the record is completed,
/// trying again after a store error as a client would after its 503.
async fn completion(store: Arc<RedisStore>, key: StorageKey) -> Bytes {
    loop {
        match store
            .begin(&key, &Fingerprint([1; 32]), Duration::from_secs(60))
            .await
        {
            Ok(BeginOutcome::InFlight { .. }) => {
                if store.wait(&key, Duration::from_secs(60)).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Ok(BeginOutcome::Completed(bytes)) => return bytes,
            Ok(BeginOutcome::Acquired(_)) => panic!("the lease was lost"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waiters on one process, the owner on another; the master of the key's shard fails over
/// (`graceful`: `CLUSTER FAILOVER` on its replica; else SIGKILL), then the owner completes.
/// The waiters' subscriptions were made on the old master: they must learn of the completion
/// (woken when their subscription moved or was made again, they look at the record again, and
/// poll while the subscriptions settle), not sleep until the lease's expiry a minute later.
/// A waiter whose subscription stands never polls, whatever its poll interval.
async fn waiters_follow_a_failover(graceful: bool) {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with(3, 1, NODE_TIMEOUT_MS))
        .await
        .unwrap();
    let url = cluster.url();
    let connect = |acks: u32| {
        let url = url.clone();
        async move {
            Arc::new(
                RedisStore::builder(url)
                    .with_poll_interval(Duration::from_millis(250))
                    .with_replica_acks(acks)
                    .with_replica_ack_timeout(Duration::from_secs(1))
                    .connect()
                    .await
                    .unwrap(),
            )
        }
    };
    // The owner's lease is acknowledged by the replica, so that the failover keeps it even
    // while a just-started replica is still catching up: what is tested is the waiters.
    let (owner, waiting) = (connect(1).await, connect(0).await);
    let key = StorageKey(
        LeaseToken::random()
            .0
            .to_be_bytes()
            .repeat(2)
            .try_into()
            .unwrap(),
    );
    // Until the replica has caught up, a lease it has not acknowledged is refused.
    let give_up = Instant::now() + Duration::from_secs(30);
    let t = loop {
        match owner
            .begin(&key, &Fingerprint([1; 32]), Duration::from_secs(60))
            .await
        {
            Ok(BeginOutcome::Acquired(t)) => break t,
            Ok(other) => panic!("no lease: {other:?}"),
            Err(e) => {
                assert!(Instant::now() < give_up, "no acknowledged lease: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let waiters: Vec<_> = (0..10)
        .map(|_| tokio::spawn(completion(waiting.clone(), key)))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let record_key = owner.record_key(&key);
    let cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        let master = cluster.master_of(&record_key);
        let heir = cluster.replicas_of(master)[0];
        if graceful {
            cluster.graceful_failover(heir);
        } else {
            cluster.kill(master);
            let give_up = Instant::now() + Duration::from_secs(30);
            while cluster.role(heir).as_deref() != Some("master") {
                assert!(Instant::now() < give_up, "the replica was not promoted");
                std::thread::sleep(Duration::from_millis(50));
            }
            cluster.wait_until_healthy(Duration::from_secs(30));
        }
        cluster
    })
    .await
    .unwrap();
    // The completion, tried until the new master takes it (as the layer does).
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        match owner
            .complete(
                &key,
                t,
                Bytes::from_static(b"done"),
                Duration::from_secs(60),
            )
            .await
        {
            Ok(stored) => {
                assert!(stored, "the lease survived the failover");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < give_up, "the completion never landed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Well before the lease (60 s) or the waiters' own timeout (60 s) would wake them.
    let woken = tokio::time::timeout(Duration::from_secs(20), async {
        for w in waiters {
            assert_eq!(&w.await.unwrap()[..], b"done");
        }
    })
    .await;
    assert!(woken.is_ok(), "waiters missed the completion notice");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_follow_a_graceful_failover() {
    let _one = ONE_AT_A_TIME.lock().await;
    waiters_follow_a_failover(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_follow_a_master_killed() {
    let _one = ONE_AT_A_TIME.lock().await;
    waiters_follow_a_failover(false).await;
}
