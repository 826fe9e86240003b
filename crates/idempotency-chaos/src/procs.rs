//! The real processes of a chaos run: `redis-server` and two `idempotency-proxy` processes,
//! each on 127.0.0.1, each killed when its guard is dropped (also while a panic unwinds) and,
//! should this program die without unwinding, by a small shell watchdog that outlives it by at
//! most 200 ms.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a process may take to start answering.
const STARTUP: Duration = Duration::from_secs(20);

/// Runs a program under a watchdog shell: the program gets its own pid (so it can be signalled
/// alone), its output goes to `log`, and it is SIGKILLed as soon as this process is gone.
const WATCHDOG: &str = r#"
parent=$1; log=$2; shift 2
"$@" >>"$log" 2>&1 </dev/null &
child=$!
echo "$child"
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.2; done
kill -9 "$child" 2>/dev/null
wait "$child" 2>/dev/null
"#;

/// One supervised child process.
#[derive(Debug)]
pub(crate) struct Supervised {
    pid: u32,
    watchdog: Child,
}

impl Supervised {
    /// Starts `program` with `args` and `env`, appending its output to `log`.
    pub(crate) fn spawn(
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Self, String> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("chaos-watchdog")
            .arg(std::process::id().to_string())
            .arg(log)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, _) in std::env::vars() {
            if k.starts_with("IDEMPOTENCY_PROXY_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut watchdog = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let mut line = String::new();
        if let Some(out) = watchdog.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        match line.trim().parse() {
            Ok(pid) => Ok(Self { pid, watchdog }),
            Err(_) => {
                let _ = watchdog.kill();
                let _ = watchdog.wait();
                Err(format!("cannot start {}", program.display()))
            }
        }
    }

    /// The program's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends a signal (`KILL`, `STOP`, `CONT`, ...) to the program.
    pub(crate) fn signal(&self, name: &str) -> Result<(), String> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("kill -{name} {}: {e}", self.pid))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{name} {} failed", self.pid))
        }
    }

    /// Whether the program still runs (a zombie does not).
    pub(crate) fn alive(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => {
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next());
                !matches!(state, Some('Z' | 'X') | None)
            }
            Err(_) => false,
        }
    }

    /// SIGKILLs the program and waits until it is gone.
    pub(crate) fn kill(&mut self) {
        let _ = self.signal("KILL");
        let give_up = Instant::now() + Duration::from_secs(5);
        loop {
            match self.watchdog.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= give_up => {
                    let _ = self.watchdog.kill();
                    let _ = self.watchdog.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free on 127.0.0.1 a moment ago (never 6379).
pub(crate) fn free_port() -> Result<u16, String> {
    for _ in 0..100 {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("local address: {e}"))?
            .port();
        if port != 6379 {
            return Ok(port);
        }
    }
    Err("no free port on 127.0.0.1".into())
}

/// What Redis keeps across a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Persistence {
    /// `--save "" --appendonly no`: a restart forgets everything.
    None,
    /// `--appendonly yes --appendfsync always`: every acknowledged write survives a SIGKILL.
    Aof,
}

impl Persistence {
    /// A short name for the table.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Persistence::None => "no persistence",
            Persistence::Aof => "AOF, fsync always",
        }
    }
}

/// A `redis-server` on a fixed port of 127.0.0.1, restartable on the same port.
#[derive(Debug)]
pub(crate) struct Redis {
    /// Its port.
    pub(crate) port: u16,
    dir: PathBuf,
    log: PathBuf,
    program: PathBuf,
    mode: Persistence,
    proc: Option<Supervised>,
}

impl Redis {
    /// Starts `program` (normally `redis-server`) on a free port with its data in `dir`.
    pub(crate) async fn start(
        program: &Path,
        dir: &Path,
        mode: Persistence,
    ) -> Result<Self, String> {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let data = dir.join(format!("redis-{port}"));
            std::fs::create_dir_all(&data)
                .map_err(|e| format!("create {}: {e}", data.display()))?;
            let mut redis = Redis {
                port,
                log: dir.join("redis.log"),
                dir: data,
                program: program.to_owned(),
                mode,
                proc: None,
            };
            match redis.launch(mode).await {
                Ok(()) => return Ok(redis),
                Err(e) => last = e,
            }
        }
        Err(format!("redis-server did not start: {last}"))
    }

    /// `redis://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The persistence it runs with now.
    pub(crate) fn mode(&self) -> Persistence {
        self.mode
    }

    async fn launch(&mut self, mode: Persistence) -> Result<(), String> {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "no",
            "--dir",
            &self.dir.to_string_lossy(),
            "--save",
            "",
            "--logfile",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match mode {
            Persistence::None => args.extend(["--appendonly".into(), "no".into()]),
            Persistence::Aof => args.extend([
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                "always".into(),
            ]),
        }
        let proc = Supervised::spawn(&self.program, &args, &[], &self.log)?;
        let pid = proc.pid();
        self.proc = Some(proc);
        self.mode = mode;
        let give_up = Instant::now() + STARTUP;
        loop {
            // Our server, not someone else's on a reused port, and done loading its data.
            if let Ok(info) = self.command(&["INFO", "server"])
                && info.contains(&format!("process_id:{pid}\r\n"))
                && self
                    .command(&["PING"])
                    .is_ok_and(|r| r.starts_with("+PONG"))
            {
                return Ok(());
            }
            let alive = self.proc.as_ref().is_some_and(Supervised::alive);
            if !alive || Instant::now() >= give_up {
                self.proc = None;
                return Err(format!(
                    "redis-server on port {} did not answer (log {})",
                    self.port,
                    self.log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the server, as a crash would.
    pub(crate) fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts it again on the same port with `mode`; with AOF it reloads what it had.
    pub(crate) async fn restart(&mut self, mode: Persistence) -> Result<(), String> {
        self.kill();
        let give_up = Instant::now() + STARTUP;
        loop {
            match self.launch(mode).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= give_up => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `DBSIZE`, or None when the server does not answer.
    pub(crate) fn dbsize(&self) -> Option<u64> {
        let reply = self.command(&["DBSIZE"]).ok()?;
        reply.strip_prefix(':')?.trim().parse().ok()
    }

    /// Sends one command in RESP and returns the raw reply (bulk strings without their length
    /// line). Bounded by short timeouts.
    fn command(&self, args: &[&str]) -> Result<String, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            .map_err(|e| e.to_string())?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream
            .write_all(req.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        reader.read_line(&mut head).map_err(|e| e.to_string())?;
        if let Some(len) = head.strip_prefix('$') {
            let len: i64 = len.trim().parse().map_err(|_| head.clone())?;
            if len < 0 {
                return Ok(String::new());
            }
            let mut body = vec![0; usize::try_from(len).unwrap_or(0) + 2];
            reader.read_exact(&mut body).map_err(|e| e.to_string())?;
            return Ok(String::from_utf8_lossy(&body).into_owned());
        }
        Ok(head)
    }
}

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
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        while admin == addr {
            admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
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

/// The value of `idempotency_events_total{event="..."}` in a Prometheus text exposition.
pub(crate) fn event_count(metrics: &str, event: &str) -> u64 {
    let prefix = format!("idempotency_events_total{{event=\"{event}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
