//! Real PostgreSQL servers for the tests: `initdb` and `postgres` on a free port of 127.0.0.1
//! (never the machine's 5432), in a private temporary directory, run as the `postgres` user
//! when the tests run as root (the server refuses to run as root).
//!
//! Every server runs under a small shell watchdog that kills it when the test process exits,
//! so a server shared by a whole test binary (held in a static, never dropped) does not outlive
//! it. A server owned by a test is killed when dropped. [`PgServer::kill`] is a crash
//! (SIGKILL to the server and every backend); [`PgServer::restart`] brings it back on the same
//! port with the same data.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

const STARTUP: Duration = Duration::from_secs(30);

/// A PostgreSQL server on a free port, with trust authentication for user `postgres`.
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    pid: Option<u32>,
    watchdog: Option<Child>,
}

/// The directory holding `initdb` and `postgres`: the PATH's, or Debian's newest
/// `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        && out.status.success()
    {
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if let Some(dir) = path.parent() {
            return dir.to_path_buf();
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("PostgreSQL is not installed: scripts/test installs the postgresql package")
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program args...`, as the `postgres` user when we are root.
fn as_server_user(program: &Path) -> Command {
    if running_as_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgServer {
    /// A fresh cluster, started.
    pub fn start() -> Self {
        let bin = bin_dir();
        for _attempt in 0..5 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!(
                "tower-idempotency-pg-{}-{port}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            if running_as_root() {
                let ok = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&dir)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown of {} to the postgres user failed", dir.display());
            }
            let init = as_server_user(&bin.join("initdb"))
                .arg("-D")
                .arg(dir.join("data"))
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ])
                .stdout(Stdio::null())
                .output()
                .expect("run initdb");
            assert!(
                init.status.success(),
                "initdb failed: {}",
                String::from_utf8_lossy(&init.stderr)
            );
            let mut server = PgServer {
                port,
                dir,
                pid: None,
                watchdog: None,
            };
            if server.launch() {
                return server;
            }
        }
        panic!("could not start postgres on a free port");
    }

    /// Starts the server process on this server's port; true once it accepts connections.
    fn launch(&mut self) -> bool {
        let bin = bin_dir();
        let data = self.dir.join("data");
        let log = self.dir.join("postgres.log");
        let mut server = as_server_user(&bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=32MB",
                // Crash tests kill the server, not the machine: the OS keeps what was written.
                "-c",
                "fsync=off",
                "-c",
                "shared_preload_libraries=pg_stat_statements",
            ]);
        let command: Vec<String> = std::iter::once(server.get_program())
            .chain(server.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        // The watchdog: runs the server in a process group of its own (so a kill reaches every
        // backend), and kills that group once the test process is gone.
        let script = r#"
            parent=$1; dir=$2; log=$3; shift 3
            setsid "$@" >>"$log" 2>&1 &
            child=$!
            echo "$child"
            while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.2; done
            kill -9 -- "-$child" 2>/dev/null
            if ! kill -0 "$parent" 2>/dev/null; then sleep 0.5; rm -rf "$dir"; fi
        "#;
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.dir)
            .arg(&log)
            .args(&command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh for postgres");
        let mut line = String::new();
        if let Some(out) = watchdog.stdout.take() {
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        }
        self.pid = line.trim().parse().ok();
        self.watchdog = Some(watchdog);
        let give_up = Instant::now() + STARTUP;
        while Instant::now() < give_up {
            if self.try_psql("SELECT pg_backend_pid()").is_some()
                && self
                    .try_psql("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
                    .is_some_and(|d| Path::new(d.trim()) == data)
            {
                return true;
            }
            if let Some(w) = self.watchdog.as_mut()
                && matches!(w.try_wait(), Ok(Some(_)))
            {
                return false;
            }
            sleep(Duration::from_millis(50));
        }
        false
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs `sql` with psql; its unaligned output, or `None` when the server does not answer.
    pub fn try_psql(&self, sql: &str) -> Option<String> {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-X", "-A", "-t", "-q"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "2")
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `sql` with psql and returns its output; panics when it fails.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql)
            .unwrap_or_else(|| panic!("psql failed: {sql}"))
    }

    /// Crashes the server: SIGKILL to it and every backend. The data stays for a restart.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill")
                .args(["-9", "--", &format!("-{pid}")])
                .status();
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.wait();
        }
        let give_up = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < give_up {
            sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port with the same data (after crash recovery).
    pub fn restart(&mut self) {
        self.kill();
        // A killed server's shared memory goes with its last backend; give it a few tries.
        for _ in 0..20 {
            if self.launch() {
                return;
            }
            sleep(Duration::from_millis(250));
        }
        panic!(
            "postgres did not come back: {}",
            std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One server for a whole test binary, for tests that do not kill it.
pub fn shared_server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}
