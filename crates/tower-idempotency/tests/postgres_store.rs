//! `PostgresStore` against real PostgreSQL servers started by the tests on free ports: the
//! store conformance suite, concurrent duplicates through two stores on one database, a
//! database crash and restart (records survive it), a corrupt row, the sweep, a lost listener,
//! and the errors a misconfiguration gets.

#![cfg(all(feature = "postgres", feature = "conformance"))]
#![allow(clippy::unwrap_used)]

use idempotency_test_support::events;
use idempotency_test_support::harness::{is_replay, post_orders};
use idempotency_test_support::postgres as pg_server;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;
use tower_idempotency::conformance;
use tower_idempotency::{
    BeginOutcome, Event, IdempotencyLayer, LeaseToken, PostgresStore, Store, StoreError,
};

use idempotency_test_support::postgres::PgServer;

/// A store on `url` with a table of its own, created.
async fn store_on(url: &str) -> PostgresStore {
    let table = format!("t{:x}", LeaseToken::random().0 as u64);
    let store = PostgresStore::builder()
        .with_table(table)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    store.migrate().await.unwrap();
    store
}

/// The conformance suite against one server shared by these tests, a table per test.
mod conformance_suite {
    tower_idempotency::store_conformance!(async {
        crate::store_on(&crate::pg_server::shared_server().url()).await
    });

    /// The suite's operator tests pass a store that offers none of the verbs: this one must.
    #[tokio::test]
    async fn offers_the_operators_verbs() {
        let store = crate::store_on(&crate::pg_server::shared_server().url()).await;
        assert!(tower_idempotency::conformance::offers_operator_verbs(&store).await);
    }
}

async fn send(app: &Router, key: &str) -> (StatusCode, HeaderMap, Bytes) {
    post_orders(app, Some(key), Body::empty()).await
}

/// A router whose handler counts its runs and takes `delay`.
fn counted_app(store: PostgresStore, runs: Arc<AtomicUsize>, delay: Duration) -> Router {
    Router::new()
        .route(
            "/orders",
            post(move || {
                let runs = runs.clone();
                async move {
                    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(delay).await;
                    (StatusCode::CREATED, format!("order of run {run}"))
                }
            }),
        )
        .layer(IdempotencyLayer::new(store))
}

/// Fifty concurrent duplicates, half through each of two stores (two pools, two listeners:
/// what two processes have) on one table: the handler runs once, and every caller gets its
/// response, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_duplicates_through_two_stores_run_once() {
    let url = pg_server::shared_server().url();
    let first = store_on(&url).await;
    let second = PostgresStore::builder()
        .with_table(first.table())
        .connect(&url)
        .await
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let apps = [
        counted_app(first, runs.clone(), Duration::from_millis(300)),
        counted_app(second, runs.clone(), Duration::from_millis(300)),
    ];
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let app = apps[i % 2].clone();
            tokio::spawn(async move { send(&app, "fifty").await })
        })
        .collect();
    let mut bodies = Vec::new();
    let mut replays = 0;
    for call in calls {
        let (status, headers, body) = call.await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body:?}");
        replays += usize::from(is_replay(&headers));
        bodies.push(body);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler's runs");
    assert_eq!(replays, 49, "every caller but the owner gets a replay");
    assert!(bodies.iter().all(|b| b == &b"order of run 1"[..]));
}

/// The database crashes (SIGKILL to every backend) while a request is in flight: new requests
/// get 503 problem+json at once when failing closed and run untracked when failing open. The
/// database comes back on the same data: the record completed before the crash is still
/// replayed, and the store serves again without being rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_crash_fails_closed_or_open_and_records_survive_the_restart() {
    let mut server = PgServer::start();
    let store = store_on(&server.url()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let closed = counted_app(store.clone(), runs.clone(), Duration::from_millis(10));
    let open = Router::new()
        .route(
            "/orders",
            post(|| async { (StatusCode::CREATED, "untracked") }),
        )
        .layer(IdempotencyLayer::new(store.clone()).with_fail_open(true));
    let (status, _, before) = send(&closed, "before").await;
    assert_eq!(status, StatusCode::CREATED);

    server.kill();
    let start = Instant::now();
    let (status, headers, _) = send(&closed, "during").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(headers.contains_key("retry-after"));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let (status, headers, body) = send(&open, "during-open").await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::CREATED, &b"untracked"[..])
    );
    assert!(!is_replay(&headers));
    assert!(store.ping().await.is_err());
    assert_eq!(runs.load(Ordering::SeqCst), 1, "a 503 ran the handler");

    server.restart();
    let back = Instant::now();
    loop {
        let (status, headers, body) = send(&closed, "before").await;
        if status == StatusCode::CREATED {
            assert!(is_replay(&headers), "the record did not survive the crash");
            assert_eq!(body, before);
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "the store did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("served again {:?} after the restart", back.elapsed());
    let (status, headers, _) = send(&closed, "after").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!is_replay(&headers));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    store.ping().await.unwrap();
}

/// A row whose record is not one this store wrote: a 500 `record-corrupt` problem, counted,
/// never a replay of garbage nor a second run.
#[test]
fn a_corrupt_row_is_a_counted_500() {
    let events = events::Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = store_on(&pg_server::shared_server().url()).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let app = counted_app(store.clone(), runs.clone(), Duration::ZERO);
        assert_eq!(send(&app, "damaged").await.0, StatusCode::CREATED);
        sqlx::query(&format!(
            "UPDATE {} SET record = '\\xdeadbeef'",
            store.table()
        ))
        .execute(store.pool())
        .await
        .unwrap();
        let (status, headers, body) = send(&app, "damaged").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(headers["content-type"], "application/problem+json");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["type"], "urn:tower-idempotency:problem:record-corrupt");
        assert_eq!(events.get(Event::CorruptRecord), 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "a corrupt record ran again");
    });
}

/// The sweep deletes expired rows, completed or leases, in bounded batches, and keeps every
/// live one. Expired rows were never served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_deletes_expired_rows_and_keeps_live_ones() {
    let store = store_on(&pg_server::shared_server().url()).await;
    let count = |sql: String| {
        let pool = store.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let table = store.table().to_owned();
    // 2500 expired rows (more than two batches), 10 live.
    sqlx::query(&format!(
        "INSERT INTO {table} (key, fingerprint, owner, record, expires_at) \
         SELECT sha256(int4send(n)), sha256(int4send(n)), gen_random_uuid(), \
                CASE WHEN n % 2 = 0 THEN '\\x00'::bytea END, \
                now() - CASE WHEN n <= 2500 THEN interval '1 second' ELSE interval '-1 hour' END \
         FROM generate_series(1, 2510) AS n"
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let expired_key = tower_idempotency::StorageKey(
        sqlx::query_scalar::<_, Vec<u8>>(&format!(
            "SELECT key FROM {table} WHERE expires_at < now() AND record IS NOT NULL LIMIT 1"
        ))
        .fetch_one(store.pool())
        .await
        .unwrap()
        .try_into()
        .unwrap(),
    );
    // An expired completed record is not served: its key is claimed again.
    let fp = conformance::fp(1);
    assert!(matches!(
        store
            .begin(&expired_key, &fp, Duration::from_secs(60))
            .await
            .unwrap(),
        BeginOutcome::Acquired(_)
    ));
    assert_eq!(store.sweep().await.unwrap(), 2499);
    assert_eq!(count(format!("SELECT count(*) FROM {table}")).await, 11);
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM {table} WHERE expires_at <= now()"
        ))
        .await,
        0
    );
}

/// The listening connection is killed while duplicates wait: they are woken all the same (the
/// listener's loss wakes them to look again, and it listens again), and the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_survive_the_loss_of_the_listening_connection() {
    let server = pg_server::shared_server();
    let store = store_on(&server.url()).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counted_app(store.clone(), runs.clone(), Duration::from_millis(1500));
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, "listener").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = server.psql(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE query = 'LISTEN \"{}\"'",
        store.table()
    ));
    assert_eq!(killed.trim(), "1", "the store's one listening connection");
    let start = Instant::now();
    for call in calls {
        let (status, _, body) = call.await.unwrap();
        assert_eq!(
            (status, &body[..]),
            (StatusCode::CREATED, &b"order of run 1"[..])
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // It listens again: a fresh wait is woken by a notice, not by the poll interval's end.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server
        .psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN \"{}\"'",
            store.table()
        ))
        .trim()
        != "1"
    {
        assert!(Instant::now() < deadline, "the listener did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Errors a misconfiguration gets: clear, and never a panic.
#[tokio::test]
async fn misconfigurations_get_clear_errors() {
    let url = pg_server::shared_server().url();
    let err = PostgresStore::builder()
        .with_table("orders; DROP TABLE orders")
        .connect(&url)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lower-case identifier"), "{err}");
    let err = PostgresStore::connect("mysql://nope").await.unwrap_err();
    assert!(err.to_string().contains("invalid PostgreSQL URL"), "{err}");

    // A table nobody created: the error says what to do.
    let store = PostgresStore::builder()
        .with_table("never_migrated")
        .connect(&url)
        .await
        .unwrap();
    let err = store
        .begin(
            &conformance::key(),
            &conformance::fp(1),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)));
    assert!(err.to_string().contains("PostgresStore::migrate"), "{err}");

    // Migrating from many processes at once is safe, and migrating again changes nothing.
    let store = PostgresStore::builder()
        .with_table("migrated_by_many")
        .connect(&url)
        .await
        .unwrap();
    let migrations: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    for m in migrations {
        m.await.unwrap().unwrap();
    }
    store.migrate().await.unwrap();
}

/// The schema printed in the docs is the one `migrate` runs.
#[test]
fn the_documented_schema_is_the_shipped_one() {
    assert!(PostgresStore::SCHEMA.contains("CREATE TABLE IF NOT EXISTS idempotency_records"));
    assert!(PostgresStore::SCHEMA.contains("expires_at  timestamptz NOT NULL"));
}
