//! Real PostgreSQL servers for the tests: `initdb` and `postgres` on a free port of 127.0.0.1
//! (never the machine's 5432), in a private temporary directory, run as the `postgres` user
//! when the tests run as root (the server refuses to run as root).
//!
//! Every server runs under [`Supervised`]'s watchdog, in a process group of its own, so a
//! server shared by a whole test binary (held in a static, never dropped) does not outlive
//! it. A server owned by a test is killed when dropped. [`PgServer::kill`] is a crash
//! (SIGKILL to the server and every backend); [`PgServer::restart`] brings it back on the same
//! port with the same data.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::process::{Supervised, TempDir, free_port};

/// How long a server may take to accept connections after it was started.
const STARTUP: Duration = Duration::from_secs(30);

/// A PostgreSQL server on a free port, with trust authentication for user `postgres`.
#[derive(Debug)]
pub struct PgServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: TempDir,
    proc: Option<Supervised>,
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

impl PgServer {
    /// A fresh cluster, started.
    pub fn start() -> Self {
        let bin = bin_dir();
        for _attempt in 0..5 {
            let port = free_port();
            let dir = TempDir::new(&format!("tower-idempotency-pg-{port}"));
            if running_as_root() {
                let ok = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(dir.path())
                    .status()
                    .unwrap()
                    .success();
                assert!(
                    ok,
                    "chown of {} to the postgres user failed",
                    dir.path().display()
                );
            }
            let init = as_server_user(&bin.join("initdb"))
                .arg("-D")
                .arg(dir.path().join("data"))
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
                proc: None,
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
        let dir = self.dir.path();
        let data = dir.join("data");
        let log = dir.join("postgres.log");
        let server = as_server_user(&bin.join("postgres"));
        let mut args: Vec<String> = server
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        args.extend(
            [
                "-D",
                &data.to_string_lossy(),
                "-p",
                &self.port.to_string(),
                "-k",
                &dir.to_string_lossy(),
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
            ]
            .map(str::to_owned),
        );
        let program = PathBuf::from(server.get_program());
        // In a process group of its own, so that a kill reaches every backend.
        match Supervised::spawn_group(&program, &args, &log, Some(dir)) {
            Ok(proc) => self.proc = Some(proc),
            Err(_) => return false,
        }
        let give_up = Instant::now() + STARTUP;
        while Instant::now() < give_up {
            if self.try_psql("SELECT pg_backend_pid()").is_some()
                && self
                    .try_psql("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
                    .is_some_and(|d| Path::new(d.trim()) == data)
            {
                return true;
            }
            if !self.proc.as_ref().is_some_and(Supervised::alive) {
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
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
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
            std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One server for a whole test binary, for tests that do not kill it.
pub fn shared_server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}
