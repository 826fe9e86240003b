//! The crash run: the demo shop, killed with SIGKILL at random moments while clients place
//! keyed orders and retry each until it gets a 2xx. Run twice:
//!
//! - **transactional**: `--store postgres://...`, each order inserted in its request's
//!   transaction and committed with its idempotency record. Afterwards the orders must equal
//!   the keys, and every key's replay must name the order its client first got.
//! - **Redis** (for comparison): `--store redis://... --orders postgres://...`, each order
//!   committed on its own before its record reaches Redis. A kill between the two makes the
//!   retry order again; the run reports how many orders ran twice, and checks only that none
//!   was lost.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idempotency_test_support::postgres::PgServer;
use idempotency_test_support::process::free_port;
use idempotency_test_support::redis::RedisServer;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use crate::rng::Rng;

/// The demo's `--lock-ttl`: a killed owner's key runs again soon after.
const LOCK_TTL: &str = "1s";
/// The demo's `--work`: the time between an order's insert and its answer, where a kill hurts.
const WORK: &str = "40ms";
/// Clients placing orders at once.
const CLIENTS: usize = 12;

/// What one mode's run found.
pub(crate) struct Tally {
    pub(crate) mode: &'static str,
    pub(crate) kills: usize,
    pub(crate) keys: usize,
    pub(crate) orders: usize,
    /// Keys whose replay at the end named another order than the first 2xx its client got.
    pub(crate) changed: usize,
    /// Keys with no 2xx at the end.
    pub(crate) unanswered: usize,
    pub(crate) took: Duration,
}

impl Tally {
    /// Orders placed more than once: the orders beyond one per key.
    pub(crate) fn doubled(&self) -> usize {
        self.orders.saturating_sub(self.keys)
    }
}

/// The demo process, restarted on the same port after each kill.
struct Demo {
    bin: std::path::PathBuf,
    args: Vec<String>,
    port: u16,
    log: std::path::PathBuf,
    child: Option<Child>,
}

impl Demo {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn start(&mut self, client: &reqwest::Client) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("open {}: {e}", self.log.display()))?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let give_up = Instant::now() + Duration::from_secs(20);
        while Instant::now() < give_up {
            if let Ok(res) = client.get(self.url("/api/orders")).send().await
                && res.status().is_success()
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "the demo exited at start ({status}); see {}",
                    self.log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "the demo did not answer; see {}",
            self.log.display()
        ))
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

/// Runs both modes and returns their tallies.
pub(crate) async fn run(
    demo_bin: &Path,
    dir: &Path,
    seed: u64,
    kills: usize,
) -> Result<Vec<Tally>, String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let pg = tokio::task::spawn_blocking(PgServer::start)
        .await
        .map_err(|e| format!("start PostgreSQL: {e}"))?;
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .map_err(|e| format!("start Redis: {e}"))?;
    for db in ["crash_tx", "crash_redis"] {
        pg.psql(&format!("CREATE DATABASE {db}"));
    }
    let db_url = |db: &str| {
        let url = pg.url();
        let server = url
            .rsplit_once('/')
            .map_or(url.as_str(), |(server, _)| server);
        format!("{server}/{db}")
    };
    let modes: [(&'static str, Vec<String>); 2] = [
        (
            "PostgreSQL, transactional",
            vec!["--store".into(), db_url("crash_tx")],
        ),
        (
            "Redis, orders in PostgreSQL",
            vec![
                "--store".into(),
                redis.url(),
                "--orders".into(),
                db_url("crash_redis"),
            ],
        ),
    ];
    let mut tallies = Vec::new();
    for (i, (mode, store)) in modes.into_iter().enumerate() {
        let mut args = store;
        args.extend(["--lock-ttl", LOCK_TTL, "--work", WORK].map(String::from));
        let demo = Demo {
            bin: demo_bin.to_path_buf(),
            args,
            port: free_port(),
            log: dir.join(format!("demo-crash-{i}.log")),
            child: None,
        };
        tallies.push(one_mode(mode, demo, &client, seed ^ i as u64, kills).await?);
    }
    drop((pg, redis));
    Ok(tallies)
}

async fn one_mode(
    mode: &'static str,
    mut demo: Demo,
    client: &reqwest::Client,
    seed: u64,
    kills: usize,
) -> Result<Tally, String> {
    let started = Instant::now();
    demo.start(client).await?;
    let base = demo.url("/api/orders");
    let demo = Arc::new(Mutex::new(demo));
    let stop = Arc::new(AtomicBool::new(false));
    let next_key = Arc::new(AtomicUsize::new(0));
    // The first 2xx body each key got.
    let firsts: Arc<std::sync::Mutex<HashMap<String, String>>> = Arc::default();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, base, stop, next_key, firsts) = (
                client.clone(),
                base.clone(),
                stop.clone(),
                next_key.clone(),
                firsts.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    let key = format!("crash-{seed}-{}", next_key.fetch_add(1, Ordering::AcqRel));
                    let body = place_until_2xx(&client, &base, &key).await;
                    firsts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, body);
                }
            })
        })
        .collect();
    let mut rng = Rng::new(seed);
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(450))).await;
        let mut demo = demo.lock().await;
        demo.kill().await;
        demo.start(client).await?;
    }
    stop.store(true, Ordering::Release);
    for c in clients {
        c.await.map_err(|e| format!("a client failed: {e}"))?;
    }
    let firsts = std::mem::take(&mut *firsts.lock().unwrap_or_else(|p| p.into_inner()));
    let orders = client
        .get(&base)
        .send()
        .await
        .map_err(|e| format!("GET /api/orders: {e}"))?
        .text()
        .await
        .map_err(|e| format!("GET /api/orders: {e}"))?;
    let orders: Vec<serde_json::Value> =
        serde_json::from_str(&orders).map_err(|e| format!("GET /api/orders: {e}: {orders}"))?;
    let mut changed = 0;
    let mut unanswered = 0;
    for (key, first) in &firsts {
        let res = post(client, &base, key).await;
        match res {
            Some((status, body)) if status.is_success() => changed += usize::from(&body != first),
            _ => unanswered += 1,
        }
    }
    demo.lock().await.kill().await;
    Ok(Tally {
        mode,
        kills,
        keys: firsts.len(),
        orders: orders.len(),
        changed,
        unanswered,
        took: started.elapsed(),
    })
}

async fn post(
    client: &reqwest::Client,
    base: &str,
    key: &str,
) -> Option<(reqwest::StatusCode, String)> {
    let res = client
        .post(base)
        .header("Idempotency-Key", key)
        .header("Content-Type", "application/json")
        .body(r#"{"product":"Mug","quantity":1}"#)
        .send()
        .await
        .ok()?;
    let status = res.status();
    Some((status, res.text().await.ok()?))
}

/// Sends a keyed order until it gets a 2xx (a connection refused while the demo restarts, a
/// 409 while a killed owner's lease lives, a 503 are all retried), and returns that body.
async fn place_until_2xx(client: &reqwest::Client, base: &str, key: &str) -> String {
    loop {
        if let Some((status, body)) = post(client, base, key).await
            && status.is_success()
        {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Prints the tallies and returns the violations: any lost or unanswered order, and in the
/// transactional mode any order placed twice or any replay that names another order.
pub(crate) fn verdict(tallies: &[Tally]) -> usize {
    println!(
        "\ncrash run: the demo SIGKILLed at random while clients retry keyed orders until a 2xx\n\
         | store | kills | keys | orders | placed twice | replay changed | unanswered | took |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut violations = 0;
    for (i, t) in tallies.iter().enumerate() {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
            t.mode,
            t.kills,
            t.keys,
            t.orders,
            t.doubled(),
            t.changed,
            t.unanswered,
            t.took.as_secs_f64()
        );
        if t.orders < t.keys || t.unanswered > 0 {
            println!(
                "VIOLATION ({}): an order was lost or a key left unanswered",
                t.mode
            );
            violations += 1;
        }
        if i == 0 && (t.orders != t.keys || t.changed > 0) {
            println!(
                "VIOLATION ({}): {} orders for {} keys, {} replays changed: not exactly once",
                t.mode, t.orders, t.keys, t.changed
            );
            violations += 1;
        }
    }
    violations
}
