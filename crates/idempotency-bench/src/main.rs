//! `idempotency-bench`: every comparison of the performance issue in one run on 127.0.0.1,
//! each against its baseline measured in the same run, written to BENCHMARKS.md.
//!
//! ```sh
//! cargo run --release -p idempotency-bench            # about five minutes; writes BENCHMARKS.md
//! cargo run --release -p idempotency-bench -- --duration 1s --rounds 1 --out /tmp/b.md
//! cargo run --release -p idempotency-bench -- replica-acks   # that group alone, printed
//! ```

mod external;
mod load;
mod server;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::Request;
use http_body_util::Full;

use load::{MakeRequest, Stats};

/// Benchmarks for tower-idempotency, each row with its baseline from the same run.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// How long each load run lasts.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Rounds per comparison: each round measures every row of a group in turn, so that a
    /// change in the machine's speed during the run falls on baseline and rows alike.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent keep-alive connections per load run.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Where the table is written.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Load one server for a while and print what was measured (for profiling a server).
    Load {
        /// The server's address.
        #[arg(long)]
        addr: SocketAddr,
        /// `fresh`, `replay` or `keyless`.
        #[arg(long, default_value = "fresh")]
        shape: String,
    },
    /// Run the fan-in measurement alone, a few times (for profiling it).
    FanIn {
        /// Runs.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Fill a MemoryStore past its bounds with records of one size, and print what it holds, the
    /// bytes it counts and the process's RSS (run in a process of its own by the benchmark).
    FullStore {
        /// The store's bound on bytes.
        #[arg(long, default_value_t = tower_idempotency::MemoryStore::DEFAULT_MAX_BYTES)]
        max_bytes: usize,
        /// The store's bound on records.
        #[arg(long, default_value_t = tower_idempotency::MemoryStore::DEFAULT_CAPACITY)]
        max_records: usize,
        /// Each record's body, in bytes.
        #[arg(long, default_value_t = 200 * 1024)]
        body: usize,
        /// Print one JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Write new keys one after another to a MemoryStore at its bound on records, and print
    /// the slowest write (a write holds the store's lock: every request needing the store
    /// waits behind it).
    StorePauses {
        /// The store's bound on records.
        #[arg(long, default_value_t = tower_idempotency::MemoryStore::DEFAULT_CAPACITY)]
        records: usize,
        /// New keys written, each a lease and then a record.
        #[arg(long, default_value_t = 500_000)]
        writes: u64,
        /// Each record's body, in bytes.
        #[arg(long, default_value_t = 64)]
        body: usize,
    },
    /// Send the proxy (with its default store bounds) keyed requests for 200 KiB responses,
    /// four times what its store holds, and print its RSS.
    ProxyAtBound,
    /// Serve the benchmark app (used by the benchmark itself, in a child process).
    Serve {
        /// `bare`, `memory` or a Redis URL.
        #[arg(long)]
        app: String,
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// With a Redis URL: replicas that must acknowledge each lease and record.
        #[arg(long, default_value_t = 0)]
        replica_acks: u32,
    },
    /// Measure the replica-acks group alone (a Redis primary with one replica) and print it.
    ReplicaAcks,
    /// Measure the PostgreSQL groups alone (a server of their own) and print them.
    Postgres,
}

/// One row of the table.
struct Row {
    group: &'static str,
    name: String,
    stats: Stats,
    baseline: Option<f64>,
}

struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn add(
        &mut self,
        group: &'static str,
        name: impl Into<String>,
        stats: Stats,
        baseline: Option<f64>,
    ) {
        let name = name.into();
        println!(
            "{group:<28} {name:<44} {:>10.0} req/s  p50 {:>8.2} ms  p99 {:>8.2} ms  errors {}{}",
            stats.rps(),
            ms(stats.p50),
            ms(stats.p99),
            stats.errors,
            baseline.map_or(String::new(), |b| format!("  {:.2}x", stats.rps() / b)),
        );
        self.rows.push(Row {
            group,
            name,
            stats,
            baseline,
        });
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A server child process, killed on drop.
struct Served {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

/// Whether something listens on `addr` within 10 s.
async fn wait_up(addr: SocketAddr) -> bool {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

async fn serve(app: &str) -> Served {
    serve_with(app, 0).await
}

async fn serve_with(app: &str, replica_acks: u32) -> Served {
    let addr = free_addr();
    let exe = std::env::current_exe().expect("current exe");
    let child = Command::new(exe)
        .args(["serve", "--app", app, "--listen", &addr.to_string()])
        .args(["--replica-acks", &replica_acks.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a benchmark server");
    assert!(wait_up(addr).await, "the benchmark server did not start");
    Served { child, addr }
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// Requests of one shape, against any server.
#[derive(Clone, Copy)]
enum Shape {
    /// POST with a key never seen before.
    Fresh,
    /// POST with one of `REPLAY_KEYS` keys, each completed before the run.
    Replay,
    /// POST without a key.
    Keyless,
}

const REPLAY_KEYS: u64 = 1000;
const BODY: &[u8] = br#"{"product":"Teapot","quantity":2}"#;

/// The key header: the IETF draft's, or `X-Idempotent-Key` (the one Flask-Idempotent reads).
#[derive(Clone, Copy)]
enum KeyHeader {
    Draft,
    XIdempotentKey,
}

fn request(key: Option<String>, header: KeyHeader) -> Request<Full<Bytes>> {
    let mut b = Request::post("/orders")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json");
    if let Some(key) = key {
        b = match header {
            KeyHeader::Draft => b.header("idempotency-key", format!("\"{key}\"")),
            KeyHeader::XIdempotentKey => b.header("x-idempotent-key", key),
        };
    }
    b.body(Full::new(Bytes::from_static(BODY)))
        .expect("valid request")
}

fn maker(shape: Shape, header: KeyHeader) -> MakeRequest {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let nonce = std::process::id();
    Arc::new(move |conn, n| match shape {
        Shape::Fresh => request(Some(format!("f-{nonce}-{run}-{conn}-{n}")), header),
        Shape::Replay => request(Some(format!("r-{nonce}-{}", n % REPLAY_KEYS)), header),
        Shape::Keyless => request(None, header),
    })
}

/// Completes every replay key once, so that replays find them.
async fn warm_replays(addr: SocketAddr, header: KeyHeader) {
    let nonce = std::process::id();
    let make: MakeRequest = Arc::new(move |_, n| request(Some(format!("r-{nonce}-{n}")), header));
    let stats = load::run_count(addr, make, REPLAY_KEYS).await;
    assert_eq!(stats.errors, 0, "warming the replay keys failed");
}

async fn measure(addr: SocketAddr, shape: Shape, args: &Args) -> Stats {
    measure_once(addr, shape, KeyHeader::Draft, args).await.0
}

async fn measure_once(
    addr: SocketAddr,
    shape: Shape,
    header: KeyHeader,
    args: &Args,
) -> (Stats, hdrhistogram::Histogram<u64>) {
    // A short warm-up, then the measured run.
    load::run(
        addr,
        args.connections,
        Duration::from_millis(500),
        maker(shape, header),
    )
    .await;
    load::run_with_histogram(addr, args.connections, args.duration, maker(shape, header)).await
}

/// One row to measure: a server and the requests it gets.
#[derive(Clone, Copy)]
struct Target {
    addr: SocketAddr,
    shape: Shape,
    header: KeyHeader,
}

const fn target(addr: SocketAddr, shape: Shape) -> Target {
    Target {
        addr,
        shape,
        header: KeyHeader::Draft,
    }
}

/// Measures every target `args.rounds` times, interleaved: each round measures them all in
/// turn. A row's figures are all its rounds together.
async fn interleaved(targets: &[Target], args: &Args) -> Vec<Stats> {
    let mut runs: Vec<Vec<_>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..args.rounds.max(1) {
        for (t, runs) in targets.iter().zip(&mut runs) {
            runs.push(measure_once(t.addr, t.shape, t.header, args).await);
        }
    }
    runs.into_iter().map(Stats::merged).collect()
}

/// A row of a comparison: what it is called, what it measures, and the earlier row it is a
/// ratio to (none for a baseline).
struct Compared {
    name: String,
    target: Target,
    baseline: Option<usize>,
}

fn row(name: impl Into<String>, target: Target, baseline: Option<usize>) -> Compared {
    Compared {
        name: name.into(),
        target,
        baseline,
    }
}

/// Measures the rows of one group, interleaved, and adds them to the report.
async fn compare(report: &mut Report, group: &'static str, rows: Vec<Compared>, args: &Args) {
    let targets: Vec<Target> = rows.iter().map(|r| r.target).collect();
    let stats = interleaved(&targets, args).await;
    let rps: Vec<f64> = stats.iter().map(Stats::rps).collect();
    for (r, stats) in rows.into_iter().zip(stats) {
        let baseline = r.baseline.map(|b| rps[b]);
        report.add(group, r.name, stats, baseline);
    }
}

/// The layer with the store `app` names against the bare handler, a row per request shape.
async fn layer_vs_bare(
    report: &mut Report,
    args: &Args,
    group: &'static str,
    app: &str,
    shapes: &[(Shape, &str)],
) {
    let bare = serve("bare").await;
    let layered = serve(app).await;
    warm_replays(layered.addr, KeyHeader::Draft).await;
    let base = target(bare.addr, Shape::Keyless);
    let mut rows = vec![row("bare handler (baseline)", base, None)];
    for &(shape, name) in shapes {
        rows.push(row(name, target(layered.addr, shape), Some(0)));
    }
    compare(report, group, rows, args).await;
}

/// The PostgreSQL store against the bare handler, and transactional mode against a handler
/// that makes the same insert in a transaction of its own; then the statements each request
/// sends, counted by `pg_stat_statements`.
async fn postgres(report: &mut Report, args: &Args) {
    use idempotency_test_support::postgres::PgServer;
    let pg = match tokio::task::spawn_blocking(|| {
        std::panic::catch_unwind(PgServer::start).map_err(|_| "cannot start PostgreSQL")
    })
    .await
    {
        Ok(Ok(pg)) => pg,
        _ => {
            report.notes.push(
                "PostgreSQL rows not measured: cannot start a server (is postgresql installed?)"
                    .into(),
            );
            return;
        }
    };
    pg.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
    let url = pg.url();
    let shapes = [
        (Shape::Fresh, "layer, fresh keys"),
        (Shape::Replay, "layer, replays"),
    ];
    layer_vs_bare(report, args, "8. layer + PostgresStore", &url, &shapes).await;

    let bare = serve(&format!("pg-insert:{url}")).await;
    let tx = serve(&format!("pg-tx:{url}")).await;
    warm_replays(tx.addr, KeyHeader::Draft).await;
    let rows = vec![
        row(
            "handler inserts in its own transaction (baseline)",
            target(bare.addr, Shape::Keyless),
            None,
        ),
        row(
            "IdempotentTx, fresh keys (the insert and the record in one transaction)",
            target(tx.addr, Shape::Fresh),
            Some(0),
        ),
        row(
            "IdempotentTx, replays",
            target(tx.addr, Shape::Replay),
            Some(0),
        ),
    ];
    compare(report, "9. transactional mode", rows, args).await;

    // Statements per request, from the server's own count: n fresh keys, then n replays.
    let store = serve(&url).await;
    let n = 200;
    for (shape, what) in [(Shape::Fresh, "a new key"), (Shape::Replay, "a replay")] {
        if matches!(shape, Shape::Replay) {
            warm_replays(store.addr, KeyHeader::Draft).await;
        }
        pg.psql("SELECT pg_stat_statements_reset()");
        send_n(store.addr, shape, n).await;
        let calls = pg.psql(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements \
             WHERE query LIKE '%idempotency_records%' AND query NOT LIKE '%pg_stat_statements%'",
        );
        let calls: f64 = calls.trim().parse().unwrap_or(f64::NAN);
        report.notes.push(format!(
            "8. PostgresStore: {:.2} statements (round trips) per request for {what}, {n} requests counted by pg_stat_statements",
            calls / f64::from(n)
        ));
    }
    drop((bare, tx, store, pg));
}

/// Sends `n` requests of `shape`.
async fn send_n(addr: SocketAddr, shape: Shape, n: u32) {
    load::run_count(addr, maker(shape, KeyHeader::Draft), u64::from(n)).await;
}

/// Prints a report's rows and notes, as the table holds them.
fn print_rows(report: &Report) {
    print!("{}", table(report));
}

/// The layer on a Redis primary with one replica, without and with `with_replica_acks(1)`: what
/// a `WAIT` for the replica after each new lease and each record costs.
async fn replica_acks(report: &mut Report, args: &Args) {
    const G: &str = "6. RedisStore, primary + 1 replica";
    let pair = match external::redis_with_replica().await {
        Ok(pair) => pair,
        Err(e) => {
            report
                .notes
                .push(format!("Replica-ack rows not measured: {e}"));
            return;
        }
    };
    let url = format!("redis://{}", pair.0.addr);
    let plain = serve_with(&url, 0).await;
    let acked = serve_with(&url, 1).await;
    warm_replays(plain.addr, KeyHeader::Draft).await;
    warm_replays(acked.addr, KeyHeader::Draft).await;
    let rows = vec![
        row(
            "layer, fresh keys, no replica acks (baseline)",
            target(plain.addr, Shape::Fresh),
            None,
        ),
        row(
            "layer, fresh keys, replica acks 1",
            target(acked.addr, Shape::Fresh),
            Some(0),
        ),
        row(
            "layer, replays, no replica acks (baseline)",
            target(plain.addr, Shape::Replay),
            None,
        ),
        row(
            "layer, replays, replica acks 1",
            target(acked.addr, Shape::Replay),
            Some(2),
        ),
    ];
    compare(report, G, rows, args).await;
}

async fn proxies(
    report: &mut Report,
    args: &Args,
    redis: &external::Proc,
    scratch: &std::path::Path,
) {
    const G: &str = "3. proxy";
    let upstream = serve("bare").await;
    let nginx = match external::nginx(upstream.addr, &scratch.join("nginx")).await {
        Ok(p) => Some(p),
        Err(e) => {
            report.notes.push(format!("3. nginx not measured: {e}"));
            None
        }
    };
    let memory = external::proxy(upstream.addr, "memory").await;
    let redis_proxy = external::proxy(upstream.addr, &format!("redis://{}", redis.addr)).await;
    let mut rows = vec![row(
        "upstream direct (baseline)",
        target(upstream.addr, Shape::Fresh),
        None,
    )];
    if let Some(nginx) = &nginx {
        rows.push(row(
            "nginx proxy_pass",
            target(nginx.addr, Shape::Fresh),
            Some(0),
        ));
    }
    // The proxies' ratios are to nginx, or to the upstream when nginx could not run.
    let rel = rows.len() - 1;
    for (name, proxy) in [("proxy + memory", &memory), ("proxy + Redis", &redis_proxy)] {
        match proxy {
            Ok(p) => {
                warm_replays(p.addr, KeyHeader::Draft).await;
                for (shape, what) in [
                    (Shape::Fresh, "fresh keys"),
                    (Shape::Replay, "replays"),
                    (Shape::Keyless, "keyless"),
                ] {
                    let name = format!("{name}, {what} (ratio to nginx)");
                    rows.push(row(name, target(p.addr, shape), Some(rel)));
                }
            }
            Err(e) => report.notes.push(format!("3. {name} not measured: {e}")),
        }
    }
    compare(report, G, rows, args).await;
}

async fn flask_idempotent(
    report: &mut Report,
    args: &Args,
    redis: &external::Proc,
    scratch: &std::path::Path,
) {
    const G: &str = "4. Flask-Idempotent vs proxy";
    let venv = scratch.join("flask-idempotent-venv");
    if !venv.join("bin/gunicorn").exists() {
        report.notes.push(format!(
            "4. Flask-Idempotent was not measured: no venv at {} (scripts/bench makes it)",
            venv.display()
        ));
        return;
    }
    let flask_idempotent =
        match external::flask(&venv, &scratch.join("flask-idempotent"), Some(redis.addr)).await {
            Ok(p) => p,
            Err(e) => {
                return report
                    .notes
                    .push(format!("4. Flask-Idempotent was not measured: {e}"));
            }
        };
    let plain = match external::flask(&venv, &scratch.join("plain"), None).await {
        Ok(p) => p,
        Err(e) => {
            return report
                .notes
                .push(format!("4. Flask-Idempotent was not measured: {e}"));
        }
    };
    let proxy = match external::proxy(plain.addr, "memory").await {
        Ok(p) => p,
        Err(e) => {
            return report
                .notes
                .push(format!("4. the proxy was not measured: {e}"));
        }
    };
    warm_replays(flask_idempotent.addr, KeyHeader::XIdempotentKey).await;
    warm_replays(proxy.addr, KeyHeader::XIdempotentKey).await;
    let x_keyed = |addr, shape| Target {
        addr,
        shape,
        header: KeyHeader::XIdempotentKey,
    };
    let rows = vec![
        row(
            "Flask-Idempotent, fresh keys (baseline)",
            x_keyed(flask_idempotent.addr, Shape::Fresh),
            None,
        ),
        row(
            "Flask-Idempotent, replays (baseline)",
            x_keyed(flask_idempotent.addr, Shape::Replay),
            None,
        ),
        row(
            "Flask behind proxy, fresh keys",
            x_keyed(proxy.addr, Shape::Fresh),
            Some(0),
        ),
        row(
            "Flask behind proxy, replays",
            x_keyed(proxy.addr, Shape::Replay),
            Some(1),
        ),
    ];
    compare(report, G, rows, args).await;
}

async fn fan_in_redis(report: &mut Report, redis: &external::Proc) {
    let url = format!("redis://{}", redis.addr);
    let connect = async {
        tower_idempotency::RedisStore::connect(&url)
            .await
            .expect("connect to the benchmark's Redis")
    };
    let r = server::fan_in_with(connect, 1000, Duration::from_millis(200), Some(redis.addr)).await;
    report.notes.push(format!(
        "5. Fan-in, RedisStore: 1000 concurrent duplicates of one key, handler 200 ms: the last \
         waiter was answered {:.1} ms after the handler completed (the first after {:.1} ms); \
         {} executions; the store held {} Redis connections while they waited.",
        ms(r.last_after_completion),
        ms(r.first_after_completion),
        r.executions,
        r.redis_connections.map_or("?".into(), |c| c.to_string()),
    ));
    println!("{}", report.notes.last().map_or("", |s| s.as_str()));
}

async fn memory_footprint(report: &mut Report) {
    let (per_record, rss) = server::memory_per_record(100_000, 1024).await;
    report.notes.push(format!(
        "6. MemoryStore memory: {per_record:.0} bytes per stored record with a 1 KiB body; \
         RSS grew by {:.1} MiB for 100 000 records.",
        rss as f64 / (1024.0 * 1024.0)
    ));
    println!("{}", report.notes.last().map_or("", |s| s.as_str()));
}

/// One sentence for a store filled past its bounds.
fn describe_full_store(f: &server::FullStore) -> String {
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let grown = f.rss.saturating_sub(f.rss_before) as f64;
    format!(
        "{} records with a {} body written to a MemoryStore bounded by {:.0} MiB and {} records: \
         it holds {} records and counts {:.1} MiB ({:.0} bytes per record); the process's RSS is \
         {:.1} MiB ({:.1} MiB before the store; {:.0} bytes per record held), {:.1} MiB at its peak",
        f.written,
        if f.body >= 1024 {
            format!("{} KiB", f.body / 1024)
        } else {
            format!("{} B", f.body)
        },
        mib(f.max_bytes as f64),
        f.max_records,
        f.held,
        mib(f.bytes as f64),
        f.bytes as f64 / f.held.max(1) as f64,
        mib(f.rss as f64),
        mib(f.rss_before as f64),
        grown / f.held.max(1) as f64,
        mib(f.rss_peak as f64),
    )
}

/// Runs `full-store` in a child process, so that its RSS is the store's alone.
fn full_store_in_child(
    max_bytes: usize,
    max_records: usize,
    body: usize,
) -> Result<server::FullStore, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new(exe)
        .args([
            "full-store",
            "--json",
            "--max-bytes",
            &max_bytes.to_string(),
            "--max-records",
            &max_records.to_string(),
            "--body",
            &body.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("full-store exited with {}", out.status));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(server::FullStore {
        body: n("body") as usize,
        written: n("written"),
        held: n("held") as usize,
        bytes: n("bytes") as usize,
        max_bytes: n("max_bytes") as usize,
        max_records: n("max_records") as usize,
        rss_before: n("rss_before"),
        rss: n("rss"),
        rss_peak: n("rss_peak"),
    })
}

/// The bounds at work: large records fill the bytes, small ones the count, or the bytes when the
/// count is set high.
const FULL_STORES: [(usize, usize, usize); 3] = [
    (256 << 20, 100_000, 200 * 1024),
    (256 << 20, 100_000, 1024),
    (64 << 20, 1_000_000, 1024),
];

fn full_stores(report: &mut Report) {
    for (max_bytes, max_records, body) in FULL_STORES {
        let note = match full_store_in_child(max_bytes, max_records, body) {
            Ok(f) => format!(
                "7. MemoryStore at its bounds (`idempotency-bench full-store --max-bytes {max_bytes} \
                 --max-records {max_records} --body {body}`): {}.",
                describe_full_store(&f)
            ),
            Err(e) => format!("7. MemoryStore at its bounds not measured: {e}"),
        };
        println!("{note}");
        report.notes.push(note);
    }
}

/// What the proxy's RSS came to after [`fill_proxy`].
struct ProxyRss {
    requests: u64,
    errors: u64,
    before: u64,
    after: u64,
    peak: u64,
}

/// Starts the proxy with `extra` flags in front of `upstream` and sends it `count` keyed
/// requests for its 200 KiB responses, one after another.
async fn fill_proxy(upstream: SocketAddr, extra: &[&str], count: u64) -> Result<ProxyRss, String> {
    let proxy = external::proxy_with(upstream, "memory", extra).await?;
    let before = proxy.status_bytes("VmRSS").unwrap_or(0);
    let nonce = std::process::id();
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let make: MakeRequest = Arc::new(move |_, n| {
        Request::post("/large")
            .header("host", "127.0.0.1")
            .header("idempotency-key", format!("\"large-{nonce}-{run}-{n}\""))
            .body(Full::new(Bytes::new()))
            .expect("valid request")
    });
    let stats = load::run_count(proxy.addr, make, count).await;
    Ok(ProxyRss {
        requests: stats.requests,
        errors: stats.errors,
        before,
        after: proxy.status_bytes("VmRSS").unwrap_or(0),
        peak: proxy.status_bytes("VmHWM").unwrap_or(0),
    })
}

/// The proxy with its default store bounds, sent keyed requests for 200 KiB responses: four
/// times what its bound on bytes holds. Its RSS stays near the bound; with the bound on bytes
/// out of reach (the count of records alone bounding the store), it grows with every response.
async fn proxy_at_its_bound(report: &mut Report) {
    const BODY: usize = 200 * 1024;
    let upstream = server::large_upstream(BODY).await;
    let count = 4 * (tower_idempotency::MemoryStore::DEFAULT_MAX_BYTES / BODY) as u64;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let bounded = fill_proxy(upstream, &[], count).await;
    let unbounded = fill_proxy(upstream, &["--store-max-bytes", "64GiB"], count).await;
    let note = match (bounded, unbounded) {
        (Ok(b), Ok(u)) => format!(
            "8. idempotency-proxy with its default store bounds (256 MiB, 100 000 records), sent \
             {} keyed requests for 200 KiB responses one after another ({:.0} MiB of responses, \
             {} errors; `idempotency-bench proxy-at-bound`): its RSS is {:.1} MiB at the end \
             ({:.1} MiB before), {:.1} MiB at its peak. The same with `--store-max-bytes 64GiB`, \
             the count of records alone bounding the store as before the bound on bytes: {:.1} \
             MiB ({} errors).",
            b.requests,
            mib(b.requests * BODY as u64),
            b.errors,
            mib(b.after),
            mib(b.before),
            mib(b.peak),
            mib(u.after),
            u.errors,
        ),
        (Err(e), _) | (_, Err(e)) => {
            format!("8. the proxy at its store bound was not measured: {e}")
        }
    };
    println!("{note}");
    report.notes.push(note);
}

async fn fan_in_memory(report: &mut Report) {
    let r = server::fan_in(1000, Duration::from_millis(200)).await;
    report.notes.push(format!(
        "5. Fan-in, MemoryStore: 1000 concurrent duplicates of one key, handler 200 ms: the last \
         waiter was answered {:.1} ms after the handler completed (the first after {:.1} ms); \
         {} executions.",
        ms(r.last_after_completion),
        ms(r.first_after_completion),
        r.executions
    ));
    println!("{}", report.notes.last().map_or("", |s| s.as_str()));
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024 / 1024);
    format!("{cores} cores ({cpu}), {mem} GiB")
}

/// The table of a report's rows, then its notes.
fn table(report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| group | row | req/s | p50 ms | p99 ms | errors | ratio |"
    );
    let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &report.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} |",
            r.group,
            r.name,
            r.stats.rps(),
            ms(r.stats.p50),
            ms(r.stats.p99),
            r.stats.errors,
            r.baseline.map_or("baseline".to_string(), |b| format!(
                "{:.2}x",
                r.stats.rps() / b
            )),
        );
    }
    if !report.notes.is_empty() {
        let _ = writeln!(s);
        for n in &report.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

fn write_report(report: &Report, args: &Args) -> std::io::Result<()> {
    let mut s = String::new();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "- Command: `scripts/bench --duration {} --rounds {} --connections {}` (which runs `cargo run --release -p idempotency-bench` with the same flags)",
        humantime::format_duration(args.duration),
        args.rounds,
        args.connections
    );
    let _ = writeln!(s, "- Machine: {}", machine());
    let _ = writeln!(s, "- Date: {date}");
    let _ = writeln!(
        s,
        "- Load: an in-repo hyper HTTP/1.1 generator, {} keep-alive connections, on the same machine as the servers (they share its cores). Every fresh-key request carries a unique key; replays cycle through {REPLAY_KEYS} completed keys. The rows of a group are measured in {} interleaved rounds of {} each (a round measures every row in turn, so that a drift of the machine's speed falls on baseline and rows alike); a row's figures are its rounds together. Ratios are to the baseline of the same group, measured in the same run.\n",
        args.connections,
        args.rounds,
        humantime::format_duration(args.duration)
    );
    s.push_str(&table(report));
    std::fs::write(&args.out, s)
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match &args.command {
        Some(Cmd::Serve {
            app,
            listen,
            replica_acks,
        }) => return rt.block_on(server::serve(app, *listen, *replica_acks)),
        Some(Cmd::ReplicaAcks) => {
            rt.block_on(async {
                let mut report = Report {
                    rows: Vec::new(),
                    notes: Vec::new(),
                };
                replica_acks(&mut report, &args).await;
                for note in &report.notes {
                    println!("{note}");
                }
            });
            return;
        }
        Some(Cmd::Postgres) => {
            rt.block_on(async {
                let mut report = Report {
                    rows: Vec::new(),
                    notes: Vec::new(),
                };
                postgres(&mut report, &args).await;
                print_rows(&report);
            });
            return;
        }
        Some(Cmd::Load { addr, shape }) => {
            let shape = match shape.as_str() {
                "fresh" => Shape::Fresh,
                "replay" => Shape::Replay,
                _ => Shape::Keyless,
            };
            let stats = rt.block_on(async {
                if matches!(shape, Shape::Replay) {
                    warm_replays(*addr, KeyHeader::Draft).await;
                }
                measure(*addr, shape, &args).await
            });
            println!(
                "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                stats.rps(),
                ms(stats.p50),
                ms(stats.p99),
                stats.errors
            );
            return;
        }
        Some(Cmd::FullStore {
            max_bytes,
            max_records,
            body,
            json,
        }) => {
            let f = rt.block_on(server::fill_to_bounds(*max_bytes, *max_records, *body));
            if *json {
                println!(
                    "{}",
                    serde_json::json!({
                        "body": f.body,
                        "written": f.written,
                        "held": f.held,
                        "bytes": f.bytes,
                        "max_bytes": f.max_bytes,
                        "max_records": f.max_records,
                        "rss_before": f.rss_before,
                        "rss": f.rss,
                        "rss_peak": f.rss_peak,
                    })
                );
            } else {
                println!("{}.", describe_full_store(&f));
            }
            return;
        }
        Some(Cmd::StorePauses {
            records,
            writes,
            body,
        }) => {
            let p = rt.block_on(server::store_pauses(*records, *writes, *body));
            println!(
                "MemoryStore bounded to {} records, {} new keys written one after another \
                 (a lease and a record of {body} bytes each): the slowest write took {:.2} ms; \
                 {} took over 1 ms, {} over 5 ms; {:.2} µs a write on average.",
                p.records,
                p.writes,
                ms(p.slowest),
                p.over_1ms,
                p.over_5ms,
                p.elapsed.as_secs_f64() * 1e6 / p.writes as f64,
            );
            return;
        }
        Some(Cmd::ProxyAtBound) => {
            let mut report = Report {
                rows: Vec::new(),
                notes: Vec::new(),
            };
            rt.block_on(proxy_at_its_bound(&mut report));
            return;
        }
        Some(Cmd::FanIn { runs }) => {
            rt.block_on(async {
                for _ in 0..*runs {
                    let r = server::fan_in(1000, Duration::from_millis(200)).await;
                    println!(
                        "MemoryStore: last waiter {:.1} ms, first {:.1} ms after completion, {} executions",
                        ms(r.last_after_completion),
                        ms(r.first_after_completion),
                        r.executions
                    );
                }
            });
            return;
        }
        None => {}
    }
    rt.block_on(async {
        let mut report = Report {
            rows: Vec::new(),
            notes: Vec::new(),
        };
        // Memory first, while this process is small.
        memory_footprint(&mut report).await;
        full_stores(&mut report);
        proxy_at_its_bound(&mut report).await;
        let scratch = std::env::current_dir()
            .unwrap_or_default()
            .join("target/bench");
        let shapes = [
            (Shape::Fresh, "layer, fresh keys"),
            (Shape::Replay, "layer, replays"),
            (Shape::Keyless, "layer, keyless"),
        ];
        let group = "1. layer + MemoryStore";
        layer_vs_bare(&mut report, &args, group, "memory", &shapes).await;
        fan_in_memory(&mut report).await;
        match external::redis().await {
            Ok(redis) => {
                let url = format!("redis://{}", redis.addr);
                let group = "2. layer + RedisStore";
                layer_vs_bare(&mut report, &args, group, &url, &shapes[..2]).await;
                proxies(&mut report, &args, &redis, &scratch).await;
                flask_idempotent(&mut report, &args, &redis, &scratch).await;
                fan_in_redis(&mut report, &redis).await;
                drop(redis);
                replica_acks(&mut report, &args).await;
            }
            Err(e) => report.notes.push(format!("Redis rows not measured: {e}")),
        }
        postgres(&mut report, &args).await;
        if let Err(e) = write_report(&report, &args) {
            eprintln!("cannot write {}: {e}", args.out.display());
            std::process::exit(1);
        }
        println!("wrote {}", args.out.display());
    });
}
