//! The benchmark's servers and in-process measurements.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use tower_idempotency::Fingerprint;
use tower_idempotency::record::{Record, StoredResponse};
use tower_idempotency::{BeginOutcome, StorageKey};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Store};

/// The minimal handler every row measures: a small JSON answer with a fresh id.
fn app() -> Router {
    let next = Arc::new(AtomicU64::new(1));
    Router::new().route(
        "/orders",
        post(move |_body: Bytes| {
            let id = next.fetch_add(1, Ordering::Relaxed);
            async move {
                (
                    StatusCode::CREATED,
                    [("content-type", "application/json")],
                    format!(r#"{{"id":{id},"product":"Teapot","quantity":2}}"#),
                )
                    .into_response()
            }
        }),
    )
}

fn exit_with(url: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("idempotency-bench: {url}: {e}");
    std::process::exit(2);
}

/// A PostgreSQL store on its own pool of `url`, its table created, and the pool, with the
/// orders' table the ordering handler writes.
async fn pg_store(url: &str) -> Result<(tower_idempotency::PostgresStore, sqlx::PgPool), String> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(48)
        .connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let store = tower_idempotency::PostgresStore::from_pool(pool.clone());
    store.migrate().await.map_err(|e| e.to_string())?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_orders (id bigserial PRIMARY KEY, product text NOT NULL, quantity int NOT NULL)",
    )
    .execute(&pool)
    .await
    .map_err(|e| e.to_string())?;
    Ok((store, pool))
}

/// A handler that inserts an order and answers it: in the layer's transaction
/// (`IdempotentTx`, with `in_layer`), or in a transaction of its own that it commits, the
/// baseline transactional mode is measured against.
fn ordering_app(pool: sqlx::PgPool, in_layer: bool) -> Router {
    const INSERT: &str =
        "INSERT INTO bench_orders (product, quantity) VALUES ('Teapot', 2) RETURNING id";
    let created = |id: i64| {
        (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            format!(r#"{{"id":{id},"product":"Teapot","quantity":2}}"#),
        )
            .into_response()
    };
    if in_layer {
        return Router::new().route(
            "/orders",
            post(
                move |mut tx: tower_idempotency::IdempotentTx, _body: Bytes| async move {
                    match sqlx::query_scalar::<_, i64>(INSERT)
                        .fetch_one(&mut *tx)
                        .await
                    {
                        Ok(id) => created(id),
                        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                    }
                },
            ),
        );
    }
    Router::new().route(
        "/orders",
        post(move |_body: Bytes| {
            let pool = pool.clone();
            async move {
                let inserted = async {
                    let mut tx = pool.begin().await?;
                    let id = sqlx::query_scalar::<_, i64>(INSERT)
                        .fetch_one(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    Ok::<_, sqlx::Error>(id)
                };
                match inserted.await {
                    Ok(id) => created(id),
                    Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                }
            }
        }),
    )
}

/// An upstream on 127.0.0.1 whose every POST to `/large` answers 200 with `body` bytes, served
/// by a task of this process; its address.
pub(crate) async fn large_upstream(body: usize) -> SocketAddr {
    let bytes = Bytes::from(vec![b'x'; body]);
    let app = Router::new().route(
        "/large",
        post(move || {
            let bytes = bytes.clone();
            async move { ([("content-type", "application/octet-stream")], bytes) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Serves the benchmark app: `bare`, `memory`, or a Redis URL (its leases and records
/// acknowledged by `replica_acks` replicas).
pub(crate) async fn serve(kind: &str, listen: SocketAddr, replica_acks: u32) {
    let app = match kind {
        "bare" => app(),
        "memory" => app().layer(IdempotencyLayer::new(MemoryStore::default())),
        url if url.starts_with("redis") => {
            let store = tower_idempotency::RedisStore::builder(url).with_replica_acks(replica_acks);
            match store.connect().await {
                Ok(store) => app().layer(IdempotencyLayer::new(store)),
                Err(e) => exit_with(url, e),
            }
        }
        url if url.starts_with("postgres") => match pg_store(url).await {
            Ok((store, _)) => app().layer(IdempotencyLayer::new(store)),
            Err(e) => exit_with(url, e),
        },
        other if other.starts_with("pg-insert:") || other.starts_with("pg-tx:") => {
            let (kind, url) = other.split_once(':').unwrap_or_default();
            match pg_store(url).await {
                Ok((_, pool)) if kind == "pg-insert" => ordering_app(pool, false),
                Ok((store, pool)) => ordering_app(pool, true).layer(IdempotencyLayer::new(store)),
                Err(e) => exit_with(url, e),
            }
        }
        other => {
            eprintln!("idempotency-bench: unknown app {other:?}");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    axum::serve(listener, app).await.expect("serve");
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A store filled past its bounds, as [`fill_to_bounds`] measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FullStore {
    /// The body of each record, in bytes.
    pub(crate) body: usize,
    /// Records written.
    pub(crate) written: u64,
    /// Records the store held at the end.
    pub(crate) held: usize,
    /// The bytes it counted for them, and its bound.
    pub(crate) bytes: usize,
    pub(crate) max_bytes: usize,
    /// Its bound on records.
    pub(crate) max_records: usize,
    /// The process's RSS before the store was made, at the end, and at its peak (VmHWM).
    pub(crate) rss_before: u64,
    pub(crate) rss: u64,
    pub(crate) rss_peak: u64,
}

/// The process's peak RSS (VmHWM), in bytes.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Writes completed records of `body` bytes into a MemoryStore bounded by `max_bytes` and
/// `max_records`, three times as many as its bounds let it hold, so that the last two thirds
/// each evict the oldest; then reads what it holds and what the process's RSS is. Meant for a
/// process of its own, so that the RSS is the store's and a small runtime's.
pub(crate) async fn fill_to_bounds(max_bytes: usize, max_records: usize, body: usize) -> FullStore {
    let rss_before = rss_bytes();
    let store = MemoryStore::builder()
        .with_max_bytes(max_bytes)
        .with_capacity(max_records)
        .build();
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("content-length", HeaderValue::from(body));
    let fp = Fingerprint([1; 32]);
    let encoded = Record {
        fingerprint: fp,
        response: Ok(StoredResponse {
            status: StatusCode::CREATED,
            headers: headers.clone(),
            body: Bytes::from(vec![b'x'; body]),
        }),
    }
    .encode()
    .len();
    let fits = max_bytes / (tower_idempotency::MemoryStore::RECORD_OVERHEAD + encoded);
    let written = 3 * fits.min(max_records) as u64;
    complete_records(&store, 0..written, &headers, body).await;
    let stats = store.stats();
    FullStore {
        body,
        written,
        held: stats.len,
        bytes: stats.bytes,
        max_bytes: stats.max_bytes,
        max_records: stats.capacity,
        rss_before,
        rss: rss_bytes(),
        rss_peak: peak_rss_bytes(),
    }
}

/// Takes a lease on each key numbered in `keys` and completes it with a 201 record of these
/// headers and `body` bytes, each record its own allocation, as each response is.
async fn complete_records(
    store: &MemoryStore,
    keys: std::ops::Range<u64>,
    headers: &HeaderMap,
    body: usize,
) {
    let fp = Fingerprint([1; 32]);
    for i in keys {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&i.to_be_bytes());
        let key = StorageKey(k);
        let Ok(BeginOutcome::Acquired(token)) =
            store.begin(&key, &fp, Duration::from_secs(30)).await
        else {
            panic!("a fresh key must be acquired");
        };
        let record = Record {
            fingerprint: fp,
            response: Ok(StoredResponse {
                status: StatusCode::CREATED,
                headers: headers.clone(),
                body: Bytes::from(vec![b'x'; body]),
            }),
        };
        let stored = store
            .complete(&key, token, record.encode(), Duration::from_secs(3600))
            .await;
        assert_eq!(stored.ok(), Some(true));
    }
}

/// The pauses of a MemoryStore at its bound, from [`store_pauses`].
pub(crate) struct Pauses {
    pub(crate) records: usize,
    pub(crate) writes: u64,
    pub(crate) slowest: Duration,
    pub(crate) over_1ms: u64,
    pub(crate) over_5ms: u64,
    pub(crate) elapsed: Duration,
}

/// Writes `writes` new keys (a lease and then its record of `body` bytes each) to a MemoryStore
/// bounded to `records`, one after another, so that it fills and then evicts its oldest record
/// for each new one; times each write. A write holds the store's lock, so its time is how long
/// every other request that needs the store waits behind it.
pub(crate) async fn store_pauses(records: usize, writes: u64, body: usize) -> Pauses {
    let store = MemoryStore::with_capacity(records);
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let mut pauses = Pauses {
        records,
        writes,
        slowest: Duration::ZERO,
        over_1ms: 0,
        over_5ms: 0,
        elapsed: Duration::ZERO,
    };
    let started = std::time::Instant::now();
    for i in 0..writes {
        let t = std::time::Instant::now();
        complete_records(&store, i..i + 1, &headers, body).await;
        let took = t.elapsed();
        pauses.slowest = pauses.slowest.max(took);
        pauses.over_1ms += u64::from(took > Duration::from_millis(1));
        pauses.over_5ms += u64::from(took > Duration::from_millis(5));
    }
    pauses.elapsed = started.elapsed();
    assert_eq!(store.stats().len, records.min(writes as usize));
    pauses
}

/// Fills a MemoryStore with `records` completed records of `body` bytes each; returns the RSS
/// growth per record and in all.
pub(crate) async fn memory_per_record(records: u64, body: usize) -> (f64, u64) {
    let store = MemoryStore::with_capacity(records as usize);
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let before = rss_bytes();
    complete_records(&store, 0..records, &headers, body).await;
    let grown = rss_bytes().saturating_sub(before);
    assert_eq!(store.stats().len, records as usize);
    (grown as f64 / records as f64, grown)
}

/// The outcome of a fan-in run.
pub(crate) struct FanIn {
    pub(crate) first_after_completion: Duration,
    pub(crate) last_after_completion: Duration,
    pub(crate) executions: u64,
    pub(crate) redis_connections: Option<u64>,
}

/// Connected clients of the Redis at `addr`, less the one asking.
fn redis_clients(addr: SocketAddr) -> Option<u64> {
    let out = std::process::Command::new("redis-cli")
        .args([
            "-h",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "info",
            "clients",
        ])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .map(|n| n.saturating_sub(1))
}

/// [`fan_in_with`] on a MemoryStore.
pub(crate) async fn fan_in(waiters: usize, work: Duration) -> FanIn {
    fan_in_with(async { MemoryStore::default() }, waiters, work, None).await
}

/// `waiters` concurrent duplicates of one key whose handler takes `work`: how long after the
/// handler completes are the first and the last answered. With `redis`, also how many
/// connections the store holds to it while they wait; `make_store` runs after the count of
/// connections that were there before.
pub(crate) async fn fan_in_with<S, F>(
    make_store: F,
    waiters: usize,
    work: Duration,
    redis: Option<SocketAddr>,
) -> FanIn
where
    S: Store,
    F: std::future::Future<Output = S>,
{
    let baseline = match redis {
        Some(addr) => tokio::task::spawn_blocking(move || redis_clients(addr))
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let store = make_store.await;
    let done: Arc<Mutex<Option<Instant>>> = Arc::default();
    let runs = Arc::new(AtomicU64::new(0));
    let app = {
        let (done, runs) = (done.clone(), runs.clone());
        Router::new()
            .route(
                "/orders",
                post(move || {
                    let (done, runs) = (done.clone(), runs.clone());
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(work).await;
                        *done.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                        (StatusCode::CREATED, "done")
                    }
                }),
            )
            .layer(IdempotencyLayer::new(store))
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let key = format!("\"fan-in-{}\"", std::process::id());
    // Every connection is open before the first request, so the figure measures the layer
    // and the store, not TCP's accept queue.
    let mut senders = Vec::with_capacity(waiters);
    for _ in 0..waiters {
        senders.push(crate::load::connect(addr).await.expect("connect"));
    }
    let mut tasks = Vec::with_capacity(waiters);
    for mut sender in senders {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let req = http::Request::post("/orders")
                .header("host", "127.0.0.1")
                .header("idempotency-key", key)
                .body(http_body_util::Full::new(Bytes::new()))
                .expect("valid request");
            let res = sender.send_request(req).await.ok()?;
            let ok = res.status().is_success();
            http_body_util::BodyExt::collect(res.into_body())
                .await
                .ok()?;
            ok.then(Instant::now)
        }));
    }
    // Read while every duplicate waits on the handler, less what Redis had before this run.
    let connections = match (redis, baseline) {
        (Some(addr), Some(before)) => {
            tokio::time::sleep(work / 2).await;
            tokio::task::spawn_blocking(move || redis_clients(addr))
                .await
                .ok()
                .flatten()
                .map(|during| during.saturating_sub(before))
        }
        _ => None,
    };
    let mut answered = Vec::with_capacity(waiters);
    for t in tasks {
        if let Ok(Some(at)) = t.await {
            answered.push(at);
        }
    }
    server.abort();
    let done = done
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .expect("the handler ran");
    assert_eq!(answered.len(), waiters, "every waiter is answered");
    let first = answered.iter().min().copied().unwrap_or(done);
    let last = answered.iter().max().copied().unwrap_or(done);
    FanIn {
        first_after_completion: first.saturating_duration_since(done),
        last_after_completion: last.saturating_duration_since(done),
        executions: runs.load(Ordering::SeqCst),
        redis_connections: connections,
    }
}
