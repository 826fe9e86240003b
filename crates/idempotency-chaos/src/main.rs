//! `idempotency-chaos`: two `idempotency-proxy` processes sharing one Redis, in front of an
//! upstream that counts its executions per key, under random duplicate traffic split across
//! both proxies, while things break:
//!
//! - a proxy is SIGKILLed mid-traffic and started again on the same port;
//! - a proxy is SIGSTOPped past its leases' lifetime while it holds fresh upstream responses,
//!   so the other proxy takes the keys over, and then SIGCONTed, so that its late completions
//!   race the new owner's (the store must refuse them);
//! - Redis is SIGKILLed and restarted: without persistence (records lost), then with AOF and
//!   `appendfsync always` (records kept);
//! - the upstream answers 500 for some keys, or answers only after a hang past
//!   `--upstream-timeout` for some keys (which keys is fixed by the seed): the late answer is
//!   stored and replayed, and a hung key must run exactly once.
//!
//! Every fault is logged with its start and recovery; a key sent while a fault was on (until
//! recovery plus the lease lifetime) counts as touched by it. Then every key is checked:
//! untouched keys ran exactly once; keys touched only by upstream errors succeeded exactly once;
//! keys touched by a crash or an outage ran at least once (the documented promise); no two
//! executions of any key overlapped in time unless the first one's lease was lost while it ran
//! (its proxy paused past the lease, or Redis lost its data); each race's paused proxy had its
//! late completions refused; every 2xx
//! answer carries bytes the upstream produced, and replays are byte-identical while Redis keeps
//! its data; a replayed key never runs again until Redis loses its data; no request took longer
//! than wait-timeout + upstream-timeout + a small slack; every error is a documented status
//! (409, 502, 503, 504 as `application/problem+json`, or the upstream's own 500 passed through).
//! It prints a table and exits 1 on any violation (2 when the run could not be set up).
//!
//! Then the crash run ([`crash`]): the demo shop SIGKILLed at random moments (20 times by
//! default) while clients retry keyed orders until they get a 2xx, once on PostgreSQL in
//! transactional mode (the orders must equal the keys) and once on Redis with the orders in
//! PostgreSQL (where orders placed twice are counted, to show the difference).
//!
//! Everything runs on 127.0.0.1. Every child process is killed when the program ends, also on
//! a panic, and by a watchdog if the program itself is killed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;

mod check;
mod crash;
mod faults;
mod load;
mod procs;
mod rng;
mod upstream;

use check::{Evidence, Limits};
use faults::{World, secs};
use load::{Target, joined};
use procs::{Persistence, ProxyProc, Redis};
use upstream::Upstream;

/// The proxies' `--lock-ttl`: short, so that a crashed owner's lease passes quickly.
const LOCK_TTL: Duration = Duration::from_secs(2);
/// The proxies' `--wait-timeout`.
const WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// The proxies' `--upstream-timeout`.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(1);
/// Allowed on top of wait-timeout + upstream-timeout for any one request.
const SLACK: Duration = Duration::from_secs(2);
/// How long the whole run may overrun `--duration` before it is abandoned.
const OVERRUN: Duration = Duration::from_secs(180);

/// Chaos run for idempotency-proxy: two proxies on one Redis, random duplicates across both,
/// while proxies are killed and paused, Redis restarts and the upstream fails; then a check of
/// every key against the idempotency contract, printed as a table.
#[derive(Parser, Debug)]
#[command(name = "idempotency-chaos", version, about)]
struct Args {
    /// How long traffic runs (the run takes about 15 s more). Faults repeat every 30 s in each
    /// half: the first half with Redis without persistence, the second with AOF.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,

    /// Seed for the traffic and for which keys the upstream's faults hit (default: from the
    /// clock; printed, so a run's choices can be repeated).
    #[arg(long)]
    seed: Option<u64>,

    /// The idempotency-proxy binary (default: the one next to this program, as `cargo build
    /// -p idempotency-proxy` leaves it).
    #[arg(long, value_name = "PATH")]
    proxy_bin: Option<PathBuf>,

    /// The redis-server binary.
    #[arg(long, value_name = "PATH", default_value = "redis-server")]
    redis_server: PathBuf,

    /// Keys in flight at once (each sent 2 to 4 times).
    #[arg(long, default_value_t = 24)]
    concurrency: usize,

    /// The idempotency-demo binary, for the crash run (default: the one next to this program,
    /// as `cargo build -p idempotency-demo` leaves it).
    #[arg(long, value_name = "PATH")]
    demo_bin: Option<PathBuf>,

    /// How often the crash run kills the demo, in each of its two modes (0: no crash run).
    #[arg(long, default_value_t = 20)]
    crash_kills: usize,

    /// Keep the logs and Redis data directory even when the run passes.
    #[arg(long)]
    keep_logs: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(30) {
        return Err("at least 30s, so that every fault fits".into());
    }
    Ok(d)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idempotency-chaos: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("idempotency-chaos: FAILED with {n} violations (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("idempotency-chaos: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<usize, String> {
    let started = Instant::now();
    let seed = args.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        rng::mix64(nanos ^ u64::from(std::process::id())) % 1_000_000
    });
    let proxy_bin = match &args.proxy_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this program's path: {e}"))?
            .with_file_name("idempotency-proxy"),
    };
    if !proxy_bin.is_file() {
        return Err(format!(
            "no proxy binary at {}: build it first (cargo build --release -p idempotency-proxy) \
             or pass --proxy-bin",
            proxy_bin.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("idempotency-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    println!(
        "idempotency-chaos: seed {seed}, traffic for {}, proxy {}\n\
         two proxies on one Redis: --lock-ttl {} --wait-timeout {} --upstream-timeout {}; logs in {}",
        secs(args.duration),
        proxy_bin.display(),
        secs(LOCK_TTL),
        secs(WAIT_TIMEOUT),
        secs(UPSTREAM_TIMEOUT),
        dir.display()
    );
    let demo_bin = match &args.demo_bin {
        Some(p) => p.clone(),
        None => proxy_bin.with_file_name("idempotency-demo"),
    };
    if args.crash_kills > 0 && !demo_bin.is_file() {
        return Err(format!(
            "no demo binary at {}: build it first (cargo build -p idempotency-demo), pass              --demo-bin, or --crash-kills 0",
            demo_bin.display()
        ));
    }
    let limit = args.duration + OVERRUN;
    let mut outcome = match tokio::time::timeout(limit, chaos(&args, seed, &proxy_bin, &dir)).await
    {
        Ok(outcome) => outcome,
        Err(_) => Err(format!(
            "the run did not finish within {}; abandoned",
            secs(limit)
        )),
    };
    if let Ok(violations) = &mut outcome
        && args.crash_kills > 0
    {
        let crash = crash::run(&demo_bin, &dir, seed, args.crash_kills);
        match tokio::time::timeout(OVERRUN, crash).await {
            Ok(Ok(tallies)) => *violations += crash::verdict(&tallies),
            Ok(Err(e)) => outcome = Err(e),
            Err(_) => outcome = Err("the crash run did not finish in time; abandoned".into()),
        }
    }
    let keep = args.keep_logs || !matches!(outcome, Ok(0));
    if keep {
        println!("logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let n = outcome?;
    println!(
        "\nresult: {} in {}",
        if n == 0 { "PASS" } else { "FAIL" },
        secs(started.elapsed())
    );
    Ok(n)
}

/// The run itself; every process it starts is owned here and killed when it returns.
async fn chaos(
    args: &Args,
    seed: u64,
    proxy_bin: &std::path::Path,
    dir: &std::path::Path,
) -> Result<usize, String> {
    let limits = Limits {
        lock_ttl: LOCK_TTL,
        wait_timeout: WAIT_TIMEOUT,
        upstream_timeout: UPSTREAM_TIMEOUT,
        slack: SLACK,
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(limits.bound() + Duration::from_secs(6))
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let upstream = Upstream::start(seed, UPSTREAM_TIMEOUT + Duration::from_secs(2)).await?;
    let redis = Redis::builder()
        .program(&args.redis_server)
        .dir(dir)
        .persistence(Persistence::None)
        .start()?;
    let human = |d: Duration| humantime::format_duration(d).to_string();
    let flags: Vec<String> = [
        "--upstream",
        &upstream.url(),
        "--store",
        &redis.url(),
        "--lock-ttl",
        &human(LOCK_TTL),
        "--wait-timeout",
        &human(WAIT_TIMEOUT),
        "--upstream-timeout",
        &human(UPSTREAM_TIMEOUT),
        "--ttl",
        "1h",
        "--shutdown-timeout",
        "5s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut a = ProxyProc::new("A", proxy_bin, &flags, dir)?;
    let mut b = ProxyProc::new("B", proxy_bin, &flags, dir)?;
    a.start(&client).await?;
    b.start(&client).await?;
    let target = Arc::new(Target {
        bases: [a.url(""), b.url("")],
        client: client.clone(),
    });
    let mut world = World {
        redis,
        proxies: [a, b],
        upstream,
        target: target.clone(),
        lock_ttl: LOCK_TTL,
        seed,
    };

    let t0 = Instant::now();
    let traffic = tokio::spawn(load::run(
        target.clone(),
        seed,
        args.concurrency,
        t0 + args.duration,
    ));
    let log = match faults::run(&mut world, t0, args.duration).await {
        Ok(log) => log,
        Err(e) => {
            traffic.abort();
            return Err(e);
        }
    };
    let mut records = joined(traffic.await);
    records.extend(log.race_records.iter().cloned());

    // Every fault is over: let the last leases expire, then read every key back once.
    tokio::time::sleep(LOCK_TTL + Duration::from_secs(1)).await;
    let keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();
    let index: HashMap<String, usize> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), i))
        .collect();
    for (key, logical) in load::sweep(target.clone(), keys, 32).await {
        if let Some(i) = index.get(&key) {
            records[*i].logicals.push(logical);
        }
    }

    let mut extra = Vec::new();
    for p in &world.proxies {
        if !p.alive() {
            extra.push(format!(
                "proxy {} is not running at the end, though only this program kills it; its log:\n{}",
                p.name,
                p.log_tail(20)
            ));
        }
    }
    if world.redis.dbsize().is_none() {
        extra.push("Redis does not answer at the end".into());
    }
    let executions = world.upstream.executions();
    let violations = check::verdict(&Evidence {
        seed,
        t0,
        records: &records,
        executions: &executions,
        faults: &log.faults,
        races: &log.races,
        limits,
        names: ["A", "B"],
        extra,
    });
    if violations > 0 {
        for p in &world.proxies {
            println!(
                "\nproxy {} log ({}), last lines:\n{}",
                p.name,
                p.log.display(),
                p.log_tail(15)
            );
        }
        println!("\nrerun with --seed {seed} for the same traffic and faulty keys");
    }
    Ok(violations)
}
