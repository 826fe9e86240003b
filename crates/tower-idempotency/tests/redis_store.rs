//! `RedisStore` against real Redis processes started by the tests on free ports: the store
//! conformance suite on a standalone server and on a 3-master Redis Cluster, then what a shared
//! store must keep that can be checked in one process: the command budget, 500 waiters on one
//! subscriber connection, fencing through the layer, a Redis outage and restart, and TLS.

#![cfg(all(feature = "redis", feature = "conformance"))]
#![allow(clippy::unwrap_used)]

use idempotency_test_support::harness::{is_replay, post_orders};
use idempotency_test_support::process::{TempDir, free_port, path_arg};
use idempotency_test_support::recording::RecordingStore;
use idempotency_test_support::redis as servers;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::conformance;
use tower_idempotency::{BeginOutcome, LeaseToken, RedisStore, StorageKey, Store, StoreError};

use servers::RedisServer;

/// A store with a key prefix of its own, so tests sharing a server never see each other.
async fn store_on(url: &str) -> RedisStore {
    RedisStore::builder(url)
        .with_prefix(format!("t{:x}:", LeaseToken::random().0 as u64))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// The conformance suite against one standalone redis-server shared by these tests.
mod standalone {
    tower_idempotency::store_conformance!(async {
        crate::store_on(&crate::servers::shared_server().url()).await
    });

    /// The suite's operator tests pass a store that offers none of the verbs: this one must.
    #[tokio::test]
    async fn offers_the_operators_verbs() {
        let store = crate::store_on(&crate::servers::shared_server().url()).await;
        assert!(tower_idempotency::conformance::offers_operator_verbs(&store).await);
    }
}

/// The conformance suite against one 3-master Redis Cluster shared by these tests.
mod cluster {
    tower_idempotency::store_conformance!(async {
        crate::store_on(&crate::servers::shared_cluster().url()).await
    });

    /// The suite's operator tests pass a store that offers none of the verbs: this one must.
    #[tokio::test]
    async fn offers_the_operators_verbs() {
        let store = crate::store_on(&crate::servers::shared_cluster().url()).await;
        assert!(tower_idempotency::conformance::offers_operator_verbs(&store).await);
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

async fn send(app: &Router, key: &str) -> (StatusCode, HeaderMap, Bytes) {
    post_orders(app, Some(key), Body::empty()).await
}

/// The commands the store's client sent between two `INFO commandstats` snapshots. Redis counts
/// the commands a Lua script runs as well; those are reported apart, and `INFO` (the
/// measurement itself) is left out.
fn client_commands(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> (u64, BTreeMap<String, u64>, BTreeMap<String, u64>) {
    // `zadd` and `zrem` file a lease in the index of leases inside the scripts on a standalone
    // server; on a Redis Cluster (where the index lives in other slots) they are commands of
    // their own, sent beside the request's step, which the budget counts apart.
    const IN_SCRIPTS: [&str; 11] = [
        "get", "set", "getrange", "del", "pexpire", "pttl", "publish", "spublish", "time", "zadd",
        "zrem",
    ];
    let mut sent = BTreeMap::new();
    let mut scripted = BTreeMap::new();
    for (name, calls) in after {
        let delta = calls - before.get(name).copied().unwrap_or(0);
        if delta == 0 || name == "info" {
            continue;
        }
        if IN_SCRIPTS.contains(&name.as_str()) {
            scripted.insert(name.clone(), delta);
        } else {
            sent.insert(name.clone(), delta);
        }
    }
    (sent.values().sum(), sent, scripted)
}

/// Counts the layer's `lease_lost` events through the `metrics` facade.
mod lease_lost {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use metrics::{
        Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };

    pub(crate) static COUNT: AtomicU64 = AtomicU64::new(0);

    struct Count;

    impl CounterFn for Count {
        fn increment(&self, value: u64) {
            COUNT.fetch_add(value, Ordering::SeqCst);
        }
        fn absolute(&self, value: u64) {
            COUNT.fetch_max(value, Ordering::SeqCst);
        }
    }

    struct LeaseLost;

    impl Recorder for LeaseLost {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            let lost = key.name() == tower_idempotency::EVENTS_TOTAL
                && key
                    .labels()
                    .any(|l| l.key() == "event" && l.value() == "lease_lost");
            if lost {
                Counter::from_arc(Arc::new(Count))
            } else {
                Counter::noop()
            }
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    pub(crate) fn install() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let _ = metrics::set_global_recorder(LeaseLost);
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The command budget: one round trip per step

/// Through the layer, with a fast handler: a new request costs Redis two commands (begin and
/// complete), a replay one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_request_costs_two_commands_and_a_replay_one() {
    let server = RedisServer::start();
    command_budget(&server.url(), std::slice::from_ref(&server)).await;
}

/// The same budget on a Redis Cluster, counted over all its nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_request_costs_two_commands_on_a_cluster_too() {
    let cluster = servers::RedisCluster::start();
    command_budget(&cluster.url(), &cluster.nodes).await;
}

async fn command_budget(url: &str, nodes: &[RedisServer]) {
    let calls = || {
        let mut all = BTreeMap::new();
        for node in nodes {
            for (name, n) in node.command_calls() {
                *all.entry(name).or_insert(0) += n;
            }
        }
        all
    };
    let store = store_on(url).await;
    let app = Router::new()
        .route(
            "/orders",
            post(|| async { (StatusCode::CREATED, "order 1") }),
        )
        .layer(IdempotencyLayer::new(store));
    // Connections are open and scripts loaded before the measurement; warm up all the same.
    assert_eq!(send(&app, "warm-up").await.0, StatusCode::CREATED);

    let before = calls();
    let (status, headers, body) = send(&app, "budget").await;
    assert_eq!((status, is_replay(&headers)), (StatusCode::CREATED, false));
    let after_new = calls();
    let (status, headers, replay) = send(&app, "budget").await;
    assert_eq!((status, is_replay(&headers)), (StatusCode::CREATED, true));
    assert_eq!(replay, body);
    let after_replay = calls();

    let (new, new_sent, new_scripted) = client_commands(&before, &after_new);
    let (rep, rep_sent, rep_scripted) = client_commands(&after_new, &after_replay);
    println!("new request: {new} commands {new_sent:?}, inside scripts {new_scripted:?}");
    println!("replay:      {rep} commands {rep_sent:?}, inside scripts {rep_scripted:?}");
    assert_eq!(new, 2, "a new request: {new_sent:?}");
    assert_eq!(rep, 1, "a replay: {rep_sent:?}");
    // The new request's lease was filed once and unfiled once, and the replay touched the index
    // not at all: in its scripts on a standalone server, by two commands sent apart on a
    // Cluster (which may land after the answer, so they are waited for).
    let filed = |name: &str| {
        calls().get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
    };
    let give_up = Instant::now() + Duration::from_secs(10);
    while (filed("zadd"), filed("zrem")) != (1, 1) && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        (filed("zadd"), filed("zrem")),
        (1, 1),
        "the index of leases"
    );
}

// ---------------------------------------------------------------------------------------------
// Waiters share one subscriber connection, so a burst of duplicates cannot exhaust Redis

/// 500 duplicates waiting on one key in one process add at most two connections to Redis,
/// and every one of them is answered with the stored response once the owner completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_waiters_add_at_most_two_connections() {
    const WAITERS: usize = 500;
    let server = RedisServer::start();
    let store = Arc::new(RecordingStore::new(store_on(&server.url()).await));
    let gate = Arc::new(tokio::sync::Notify::new());
    let executions = Arc::new(AtomicUsize::new(0));
    let app = {
        let (gate, executions) = (gate.clone(), executions.clone());
        Router::new()
            .route(
                "/orders",
                post(move || async move {
                    executions.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    (StatusCode::CREATED, "order 1")
                }),
            )
            .layer(
                IdempotencyLayer::from_shared(store.clone())
                    .with_wait_timeout(Duration::from_secs(60)),
            )
    };
    let before = server.clients();

    let owner = {
        let app = app.clone();
        tokio::spawn(async move { send(&app, "crowd").await })
    };
    let give_up = Instant::now() + Duration::from_secs(10);
    while executions.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < give_up, "the owner never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, "crowd").await })
        })
        .collect();
    while store.waiting() < WAITERS {
        assert!(
            Instant::now() < give_up,
            "only {} waiters are waiting",
            store.waiting()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every waiter is inside wait(); give the subscriptions a moment to settle, then count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = server.clients();
    let added = during.saturating_sub(before);
    println!(
        "{WAITERS} waiters: {before} clients before (incl. redis-cli), {during} while waiting: +{added}"
    );

    let released = Instant::now();
    gate.notify_one();
    let (status, headers, first) = owner.await.unwrap();
    assert_eq!((status, is_replay(&headers)), (StatusCode::CREATED, false));
    let mut replays = 0;
    for w in waiters {
        let (status, headers, body) = tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("a waiter was never answered")
            .unwrap();
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(body, first);
        replays += usize::from(is_replay(&headers));
    }
    println!(
        "all {WAITERS} waiters answered {:?} after the owner completed",
        released.elapsed()
    );
    assert_eq!(replays, WAITERS);
    assert_eq!(executions.load(Ordering::SeqCst), 1);
    assert!(added <= 2, "{WAITERS} waiters added {added} connections");
}

// ---------------------------------------------------------------------------------------------
// Fencing through the layer: a lost lease's late completion never overwrites the new owner's

/// A handler slower than its lease, whose renewals are blocked, loses the lease to a new
/// owner; its late completion is refused and counted, and the new owner's response is the one
/// replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_owner_is_fenced_and_the_new_owners_response_is_replayed() {
    lease_lost::install();
    let lost_before = lease_lost::COUNT.load(Ordering::SeqCst);
    let store = Arc::new(RecordingStore::new(
        store_on(&servers::shared_server().url()).await,
    ));
    // As a network partition between the lease owner and Redis would.
    store.fail_always("renew");
    let executions = Arc::new(AtomicUsize::new(0));
    let app = {
        let executions = executions.clone();
        Router::new()
            .route(
                "/orders",
                post(move || async move {
                    if executions.fetch_add(1, Ordering::SeqCst) == 0 {
                        // Slower than its 400 ms lease, which it cannot renew.
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        (StatusCode::CREATED, "from the first owner")
                    } else {
                        (StatusCode::CREATED, "from the second owner")
                    }
                }),
            )
            .layer(
                IdempotencyLayer::from_shared(store.clone())
                    .with_lock_ttl(Duration::from_millis(400))
                    .with_wait_timeout(Duration::from_secs(10)),
            )
    };

    let first = {
        let app = app.clone();
        tokio::spawn(async move { send(&app, "fence").await })
    };
    let give_up = Instant::now() + Duration::from_secs(10);
    while executions.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < give_up, "the first owner never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A duplicate waits, sees the lease expire, takes it over and runs.
    let (status, headers, second) = send(&app, "fence").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!is_replay(&headers));
    assert_eq!(second, "from the second owner");

    // The first caller still gets its own handler's response...
    let (status, _, first) = first.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(first, "from the first owner");
    // ...but its completion was refused and counted.
    assert_eq!(store.refused("complete"), 1);
    assert!(lease_lost::COUNT.load(Ordering::SeqCst) > lost_before);

    // The new owner's response is the one replayed.
    let (status, headers, third) = send(&app, "fence").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(is_replay(&headers));
    assert_eq!(third, "from the second owner");
    assert_eq!(executions.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// Faults: an outage answers fast and cleanly, and the store recovers after a restart

/// Redis killed while requests are in flight: 503 problem+json when failing closed, an
/// untracked pass-through when failing open, never a panic or a hang past the wait timeout. A
/// duplicate waiting on an owner gets a 503 or the owner's response replayed, never a second
/// run of the handler. Redis restarted: the same store serves again within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_fails_closed_or_open_and_the_store_recovers() {
    let mut server = RedisServer::start();
    let store = store_on(&server.url()).await;
    let wait_timeout = Duration::from_secs(5);
    // The handler's runs, by idempotency key. Each response names its run, so that a replay of
    // the first run cannot pass for a second one.
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let runs_of = |key: &str| runs.lock().unwrap().get(key).copied().unwrap_or(0);
    let handler = {
        let runs = runs.clone();
        move |headers: HeaderMap| {
            let runs = runs.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let run = {
                    let mut runs = runs.lock().unwrap();
                    let n = runs.entry(key.clone()).or_default();
                    *n += 1;
                    *n
                };
                tokio::time::sleep(Duration::from_millis(500)).await;
                (StatusCode::CREATED, format!("ok: run {run} of {key}"))
            }
        }
    };
    let closed = Router::new()
        .route("/orders", post(handler.clone()))
        .layer(IdempotencyLayer::new(store.clone()).with_wait_timeout(wait_timeout));
    let open = Router::new()
        .route("/orders", post(handler))
        .layer(IdempotencyLayer::new(store.clone()).with_fail_open(true));
    assert_eq!(send(&closed, "before").await.0, StatusCode::CREATED);

    // An owner running its handler and a duplicate waiting for it, when Redis dies.
    let owner = {
        let app = closed.clone();
        tokio::spawn(async move { send(&app, "in-flight").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let duplicate = {
        let app = closed.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            (send(&app, "in-flight").await, start.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.kill();

    let start = Instant::now();
    let (status, headers, _) = send(&closed, "during").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/problem+json"
    );
    assert!(headers.contains_key("retry-after"));
    assert!(
        start.elapsed() < wait_timeout,
        "fail closed took {:?}",
        start.elapsed()
    );
    assert_eq!(runs_of("during"), 0, "the handler ran for a 503");
    let (status, headers, body) = send(&open, "during-open").await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::CREATED, &b"ok: run 1 of during-open"[..])
    );
    assert!(!is_replay(&headers));

    // The owner's caller still gets its handler's response; the duplicate gets an answer
    // within its wait timeout: a 503 once Redis is gone, or the owner's response replayed.
    // Either way the handler ran once for the key.
    let (status, _, owner_body) = owner.await.unwrap();
    assert_eq!(
        (status, &owner_body[..]),
        (StatusCode::CREATED, &b"ok: run 1 of in-flight"[..])
    );
    let ((status, headers, body), took) = duplicate.await.unwrap();
    println!("duplicate during the outage: {status} after {took:?}");
    assert!(took < wait_timeout + Duration::from_secs(2));
    match status {
        StatusCode::SERVICE_UNAVAILABLE => assert_eq!(
            headers.get("content-type").unwrap(),
            "application/problem+json"
        ),
        StatusCode::CREATED => {
            assert!(is_replay(&headers), "the duplicate's 201 is not a replay");
            assert_eq!(
                body, owner_body,
                "the duplicate's 201 is not the owner's response"
            );
        }
        other => panic!("duplicate got {other}"),
    }
    assert_eq!(
        runs_of("in-flight"),
        1,
        "the handler's runs for the key in flight"
    );

    // Redis comes back (empty: no persistence). The service recovers without a restart.
    server.restart();
    let back = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let (status, _, _) = send(&closed, &format!("after-{n}")).await;
        if status == StatusCode::CREATED {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "the store did not recover: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("recovered {:?} after Redis restarted", back.elapsed());
    let (status, headers, _) = send(&closed, &format!("after-{n}")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(is_replay(&headers));
    store.ping().await.expect("ping after the restart");
}

// ---------------------------------------------------------------------------------------------
// Details of the Redis layout

/// A record, its lease and its channel share a hash tag; the prefix is applied; the channel
/// gets the notices (on a Cluster, through sharded pub/sub on the key's shard).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_share_a_hash_tag_and_expire_by_redis() {
    let server = servers::shared_server();
    let store = store_on(&server.url()).await;
    let key = conformance::key();
    let record_key = store.record_key(&key);
    let channel = store.channel(&key);
    let tag = format!("{{{}}}", key.to_hex());
    assert!(record_key.starts_with('t') && record_key.ends_with(&tag));
    assert!(channel.contains(&tag));

    let BeginOutcome::Acquired(t) = store
        .begin(&key, &conformance::fp(1), Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("no lease")
    };
    // Expiry is Redis's: the lease carries a PX expiry.
    let pttl: i64 = server.cli(&["PTTL", &record_key]).trim().parse().unwrap();
    assert!(pttl > 25_000 && pttl <= 30_000, "PTTL {pttl}");
    assert!(
        store
            .complete(&key, t, Bytes::from_static(b"r"), Duration::from_secs(60))
            .await
            .unwrap()
    );
    let pttl: i64 = server.cli(&["PTTL", &record_key]).trim().parse().unwrap();
    assert!(pttl > 55_000 && pttl <= 60_000, "PTTL {pttl}");
    assert_eq!(server.cli(&["GET", &record_key]).trim(), "Cr");

    // Another prefix is another namespace.
    let other = store_on(&server.url()).await;
    assert!(matches!(
        other
            .begin(&key, &conformance::fp(1), Duration::from_secs(30))
            .await
            .unwrap(),
        BeginOutcome::Acquired(_)
    ));
    assert!(
        RedisStore::builder(server.url())
            .with_prefix("bad{prefix}")
            .connect()
            .await
            .is_err()
    );
}

/// A completion tried again after its first attempt landed (its answer was lost to a timeout
/// or a dropped connection) finds its own record and succeeds: it is not a lost lease. Another
/// record, or another token, is still refused, and the stored record is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_completion_that_landed_succeeds_and_changes_nothing() {
    for url in [
        servers::shared_server().url(),
        servers::shared_cluster().url(),
    ] {
        let store = store_on(&url).await;
        let key = conformance::key();
        let t = conformance::acquire(&store, &key, Duration::from_secs(30)).await;
        let ttl = Duration::from_secs(60);
        let record = Bytes::from_static(b"the answer");
        assert!(store.complete(&key, t, record.clone(), ttl).await.unwrap());
        assert!(
            store.complete(&key, t, record.clone(), ttl).await.unwrap(),
            "{url}: the same completion again"
        );
        assert!(
            !store
                .complete(&key, t, Bytes::from_static(b"another answer"), ttl)
                .await
                .unwrap(),
            "{url}: another record"
        );
        assert!(
            !store
                .complete(&key, LeaseToken::random(), Bytes::from_static(b"x"), ttl)
                .await
                .unwrap(),
            "{url}: another token"
        );
        assert_eq!(conformance::expect_completed(&store, &key).await, record);
    }
}

/// A lease that never expires (written by another tool: `SET key value` by hand, or a PERSIST)
/// is corrupt: `begin` and `wait` say so at once, instead of reporting it in flight and letting
/// waiters spin until their timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_without_an_expiry_is_corrupt() {
    let server = servers::shared_server();
    let store = store_on(&server.url()).await;
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for how in ["set by hand", "persisted"] {
        let key = conformance::key();
        let record_key = store.record_key(&key);
        if how == "set by hand" {
            let mut lease = vec![b'L'];
            lease.extend_from_slice(&[7; 16]);
            lease.extend_from_slice(&conformance::fp(1).0);
            let () = redis::cmd("SET")
                .arg(&record_key)
                .arg(lease)
                .query_async(&mut conn)
                .await
                .unwrap();
        } else {
            conformance::acquire(&store, &key, Duration::from_secs(30)).await;
            let persisted: i64 = redis::cmd("PERSIST")
                .arg(&record_key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(persisted, 1);
        }
        let begun = store
            .begin(&key, &conformance::fp(1), Duration::from_secs(30))
            .await;
        assert!(
            matches!(begun, Err(StoreError::Corrupt(_))),
            "{how}: begin gave {begun:?}"
        );
        let waited = store.wait(&key, Duration::from_secs(30)).await;
        assert!(
            matches!(waited, Err(StoreError::Corrupt(_))),
            "{how}: wait gave {waited:?}"
        );
        // Nothing was overwritten.
        let pttl: i64 = server.cli(&["PTTL", &record_key]).trim().parse().unwrap();
        assert_eq!(pttl, -1, "{how}");
    }
}

/// Waiters are woken by notices on the shared subscription, not by polling: with the slow
/// poll pushed out of reach, completions and releases still wake them at once. The channel is
/// subscribed once however many wait, and unsubscribed when the last one leaves.
async fn waiters_are_woken_by_notices(url: &str, nodes: &[RedisServer]) {
    let store = Arc::new(
        RedisStore::builder(url)
            .with_prefix(format!("t{:x}:", LeaseToken::random().0 as u64))
            .with_poll_interval(Duration::from_secs(3600))
            .connect()
            .await
            .unwrap(),
    );
    let subscribers = |channel: &str| -> u64 {
        nodes
            .iter()
            .map(|n| {
                let (cmd, sub) = if store.is_cluster() {
                    ("SHARDNUMSUB", "PUBSUB")
                } else {
                    ("NUMSUB", "PUBSUB")
                };
                let out = n.cli(&[sub, cmd, channel]);
                out.lines()
                    .nth(1)
                    .and_then(|l| l.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    };
    for finish in ["complete", "release"] {
        let key = conformance::key();
        let channel = store.channel(&key);
        let t = conformance::acquire(&*store, &key, Duration::from_secs(30)).await;
        let start = Instant::now();
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.wait(&key, Duration::from_secs(20)).await })
            })
            .collect();
        let give_up = Instant::now() + Duration::from_secs(5);
        while subscribers(&channel) == 0 {
            assert!(Instant::now() < give_up, "the channel was never subscribed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(subscribers(&channel), 1, "one subscription per channel");
        tokio::time::sleep(Duration::from_millis(100)).await;
        if finish == "complete" {
            assert!(
                store
                    .complete(&key, t, Bytes::from_static(b"r"), Duration::from_secs(60))
                    .await
                    .unwrap()
            );
        } else {
            assert!(store.release(&key, t).await.unwrap());
        }
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{finish}: waiters were not woken by the notice"
        );
        let give_up = Instant::now() + Duration::from_secs(5);
        while subscribers(&channel) != 0 {
            assert!(
                Instant::now() < give_up,
                "the channel was never unsubscribed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_waiters_are_woken_by_notices() {
    let server = servers::shared_server();
    waiters_are_woken_by_notices(&server.url(), std::slice::from_ref(server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_waiters_are_woken_by_sharded_notices() {
    let cluster = servers::shared_cluster();
    waiters_are_woken_by_notices(&cluster.url(), &cluster.nodes).await;
}

/// Waits as the layer does (begin, wait while in flight) until the record is completed.
async fn wait_for_completion(store: Arc<RedisStore>, key: StorageKey) -> Bytes {
    loop {
        match store
            .begin(&key, &conformance::fp(1), Duration::from_secs(30))
            .await
            .unwrap()
        {
            BeginOutcome::InFlight { .. } => {
                store.wait(&key, Duration::from_secs(20)).await.unwrap()
            }
            BeginOutcome::Completed(bytes) => return bytes,
            BeginOutcome::Acquired(_) => panic!("the lease was lost"),
        }
    }
}

/// When the subscriber connection is killed, waiters are woken, re-subscribe on a new
/// connection, and still get the completion by notice.
async fn subscriber_loss_is_survived(url: &str, nodes: &[RedisServer]) {
    let store = Arc::new(
        RedisStore::builder(url)
            .with_poll_interval(Duration::from_secs(3600))
            .connect()
            .await
            .unwrap(),
    );
    let key = conformance::key();
    let t = conformance::acquire(&*store, &key, Duration::from_secs(30)).await;
    let start = Instant::now();
    let waiters: Vec<_> = (0..10)
        .map(|_| tokio::spawn(wait_for_completion(store.clone(), key)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for node in nodes {
        node.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        store
            .complete(&key, t, Bytes::from_static(b"r"), Duration::from_secs(60))
            .await
            .unwrap()
    );
    for w in waiters {
        assert_eq!(&w.await.unwrap()[..], b"r");
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "waiters lost the completion with their subscription"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_subscriber_loss_is_survived() {
    let server = RedisServer::start();
    subscriber_loss_is_survived(&server.url(), std::slice::from_ref(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_subscriber_loss_is_survived() {
    let cluster = servers::RedisCluster::start();
    subscriber_loss_is_survived(&cluster.url(), &cluster.nodes).await;
}

/// With subscriptions refused (here by an ACL), waiters fall back to a slow poll and still see
/// the completion; once subscriptions work again, notices are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_poll_while_subscriptions_fail() {
    let server = RedisServer::start();
    server.cli(&["ACL", "SETUSER", "default", "-subscribe"]);
    let store = Arc::new(
        RedisStore::builder(server.url())
            .with_poll_interval(Duration::from_millis(200))
            .connect()
            .await
            .unwrap(),
    );
    let key = conformance::key();
    let t = conformance::acquire(&*store, &key, Duration::from_secs(30)).await;
    let start = Instant::now();
    let waiter = tokio::spawn(wait_for_completion(store.clone(), key));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        store
            .complete(
                &key,
                t,
                Bytes::from_static(b"polled"),
                Duration::from_secs(60)
            )
            .await
            .unwrap()
    );
    assert_eq!(&waiter.await.unwrap()[..], b"polled");
    assert!(start.elapsed() < Duration::from_secs(5));
    // A single wait with no subscription returns after about one poll interval.
    let key = conformance::key();
    conformance::acquire(&*store, &key, Duration::from_secs(30)).await;
    let start = Instant::now();
    store.wait(&key, Duration::from_secs(20)).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));

    server.cli(&["ACL", "SETUSER", "default", "+subscribe"]);
    waiters_are_woken_by_notices(&server.url(), std::slice::from_ref(&server)).await;
}

/// The cluster store keeps each record and its channel on the node that owns the key's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_records_live_on_the_slot_owner() {
    let cluster = servers::shared_cluster();
    let store = store_on(&cluster.url()).await;
    assert!(store.is_cluster());
    let mut owners = std::collections::HashSet::new();
    for _ in 0..30 {
        let key = conformance::key();
        let BeginOutcome::Acquired(_) = store
            .begin(&key, &conformance::fp(1), Duration::from_secs(30))
            .await
            .unwrap()
        else {
            panic!("no lease")
        };
        let record_key = store.record_key(&key);
        let holders: Vec<u16> = cluster
            .nodes
            .iter()
            .filter(|n| n.cli(&["EXISTS", &record_key]).trim() == "1")
            .map(|n| n.port)
            .collect();
        assert_eq!(holders.len(), 1, "{record_key} on {holders:?}");
        owners.insert(holders[0]);
        let node = &cluster.nodes[0];
        assert_eq!(
            node.cli(&["CLUSTER", "KEYSLOT", &record_key]),
            node.cli(&["CLUSTER", "KEYSLOT", &store.channel(&key)])
        );
    }
    // 30 random keys spread over the 3 masters.
    assert!(owners.len() > 1, "every key landed on one node");
}

/// `rediss://` connects over TLS (here to a server with a self-signed certificate, hence
/// `#insecure`) and the store works the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rediss_urls_connect_over_tls() {
    let dir = TempDir::new("tower-idempotency-tls");
    let dir = dir.path();
    // Without openssl the test cannot make its certificates: that fails the test, since a
    // skipped TLS test proves nothing (scripts/test installs openssl).
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl to make the test's certificates: {e}"));
    assert!(
        made.status.success(),
        "openssl could not make the test's certificates: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let tls_port = free_port();
    let cert = path_arg(dir, "cert.pem");
    let key = path_arg(dir, "key.pem");
    let server = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &cert,
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}/#insecure");
    let store = Arc::new(store_on(&url).await);
    conformance::complete_is_owner_checked(store.clone()).await;
    conformance::wait_wakes_every_waiter_when_the_owner_completes(store.clone()).await;
    store.ping().await.unwrap();
    // The plain port is not how the store got in: the TLS listener served it.
    let tls_clients = server
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains(&format!("laddr=127.0.0.1:{tls_port}")))
        .count();
    assert!(tls_clients >= 1, "no client on the TLS port");
    drop(server);
}

/// The index of leases keeps what died with its owner: a listing drops each entry whose lease is
/// gone, examines at most 1000 candidates per call, and a page cut short by that bound says
/// where to go on, so that every live lease is still listed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_listing_drops_dead_leases_from_the_index_a_bounded_number_per_call() {
    let server = servers::shared_server();
    let store = store_on(&server.url()).await;
    // 1 200 owners that died: leases of 50 ms, never completed or released.
    let dead: Vec<StorageKey> = (0..1200).map(|_| conformance::key()).collect();
    for key in &dead {
        conformance::acquire(&store, key, Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut live: Vec<StorageKey> = (0..2).map(|_| conformance::key()).collect();
    for key in &live {
        conformance::acquire(&store, key, Duration::from_secs(30)).await;
    }
    live.sort();
    let record_key = store.record_key(&live[0]);
    let index = format!(
        "{}leases",
        record_key
            .strip_suffix(&format!("{{{}}}", live[0].to_hex()))
            .unwrap()
    );
    let filed = || -> usize { server.cli(&["ZCARD", &index]).trim().parse().unwrap() };
    assert_eq!(filed(), 1202);

    let first = store.in_flight(None, 2).await.unwrap();
    assert!(
        first.next.is_some(),
        "a listing over 1202 candidates stops at 1000 and says where to go on: {first:?}"
    );
    let left = filed();
    assert!(
        (202..=204).contains(&left),
        "the dead leases examined are dropped from the index: {left} left"
    );
    let mut seen: Vec<StorageKey> = first.leases.iter().map(|l| l.key).collect();
    let mut after = first.next;
    while let Some(from) = after {
        let page = store.in_flight(Some(&from), 2).await.unwrap();
        seen.extend(page.leases.iter().map(|l| l.key));
        after = page.next;
    }
    assert_eq!(seen, live, "each live lease listed once, in key order");
    assert_eq!(filed(), 2, "only the live leases stay filed");
}
