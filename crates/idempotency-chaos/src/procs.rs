//! The real processes of a chaos run: `redis-server` and two `idempotency-proxy` processes,
//! each on 127.0.0.1, each killed when its guard is dropped (also while a panic unwinds) and,
//! should this program die without unwinding, by the watchdog of
//! [`Supervised`], which outlives it by at most 200 ms. Redis is the tests' own
//! [`RedisServer`](idempotency_test_support::redis::RedisServer).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use idempotency_test_support::process::{Supervised, free_port};
pub(crate) use idempotency_test_support::redis::{Persistence, RedisServer as Redis};

/// How long a proxy may take to start answering.
const STARTUP: Duration = Duration::from_secs(20);

/// One `idempotency-proxy` process on a fixed address, restartable on the same address.
#[derive(Debug)]
pub(crate) struct ProxyProc {
    /// `A` or `B`.
    pub(crate) name: &'static str,
    /// Where it serves.
    pub(crate) addr: SocketAddr,
    /// Where its `/healthz` and `/metrics` are.
    pub(crate) admin: SocketAddr,
    /// Its log file (every start appends to it).
    pub(crate) log: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    proc: Option<Supervised>,
    /// How many times it was started.
    pub(crate) starts: u32,
}

impl ProxyProc {
    /// A proxy named `name` running `program` with these flags (the listen addresses are
    /// added), not started yet.
    pub(crate) fn new(
        name: &'static str,
        program: &Path,
        flags: &[String],
        dir: &Path,
    ) -> Result<Self, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        while admin == addr {
            admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        }
        let mut args = flags.to_vec();
        args.extend([
            "--listen".into(),
            addr.to_string(),
            "--admin-listen".into(),
            admin.to_string(),
        ]);
        Ok(Self {
            name,
            addr,
            admin,
            log: dir.join(format!("proxy-{name}.log")),
            program: program.to_owned(),
            args,
            proc: None,
            starts: 0,
        })
    }

    /// `http://<addr><path>`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts the process and waits until `/healthz` says its store answers.
    pub(crate) async fn start(&mut self, client: &reqwest::Client) -> Result<(), String> {
        let mut last = String::new();
        for _attempt in 0..3 {
            self.starts += 1;
            if let Ok(mut log) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
            {
                let _ = writeln!(
                    log,
                    "---- chaos: start #{} of proxy {}",
                    self.starts, self.name
                );
            }
            let proc = Supervised::spawn(
                &self.program,
                &self.args,
                &[("RUST_LOG", "warn")],
                &self.log,
            )?;
            self.proc = Some(proc);
            match self.wait_ready(client).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = e;
                    self.kill();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Err(format!(
            "proxy {} did not start: {last}; its log: {}",
            self.name,
            self.log.display()
        ))
    }

    async fn wait_ready(&self, client: &reqwest::Client) -> Result<(), String> {
        let give_up = Instant::now() + STARTUP;
        let health = format!("http://{}/healthz", self.admin);
        loop {
            if !self.alive() {
                return Err("it exited".into());
            }
            if let Ok(res) = client.get(&health).send().await
                && res.status().is_success()
                && tokio::net::TcpStream::connect(self.addr).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= give_up {
                return Err("it did not answer /healthz".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process runs.
    pub(crate) fn alive(&self) -> bool {
        self.proc.as_ref().is_some_and(Supervised::alive)
    }

    /// Sends a signal to the process.
    pub(crate) fn signal(&self, name: &str) -> Result<(), String> {
        match &self.proc {
            Some(p) => p.signal(name),
            None => Err(format!("proxy {} is not running", self.name)),
        }
    }

    /// SIGKILLs the process and waits until it is gone.
    pub(crate) fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// `GET /metrics`.
    pub(crate) async fn metrics(&self, client: &reqwest::Client) -> Option<String> {
        let res = client
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .ok()?;
        res.text().await.ok()
    }

    /// The last `n` lines of its log.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// The value of `idempotency_events_total{event="..."}` in a Prometheus text exposition (0
/// when the proxy has not counted that event yet).
pub(crate) fn event_count(metrics: &str, event: &str) -> u64 {
    idempotency_test_support::events::event_count(metrics, event).unwrap_or(0)
}
