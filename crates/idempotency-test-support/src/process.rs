//! Child processes that never outlive the process that started them, free ports, and
//! throwaway directories.
//!
//! A server held in a static (shared by every test of a binary) is never dropped, and a test
//! binary or the chaos program may itself be killed: so every server runs under a small shell
//! watchdog that SIGKILLs it as soon as its parent is gone.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Runs a program with its output appended to a log (in a process group of its own when
/// `group` is 1, so that a kill reaches every process it forks), prints its pid, and SIGKILLs it
/// as soon as the parent is gone; then removes the directory it was given, if any, which a
/// server held in a static never gets to do itself.
const WATCHDOG: &str = r#"
parent=$1; log=$2; dir=$3; group=$4; shift 4
if [ "$group" = 1 ]; then
  setsid "$@" >>"$log" 2>&1 </dev/null &
  child=$!; target="-$child"
else
  "$@" >>"$log" 2>&1 </dev/null &
  child=$!; target=$child
fi
echo "$child"
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.2; done
kill -9 -- "$target" 2>/dev/null
wait "$child" 2>/dev/null
if [ -n "$dir" ] && ! kill -0 "$parent" 2>/dev/null; then
  # The group's other processes may still be going away.
  [ "$group" = 1 ] && sleep 0.5
  rm -rf "$dir"
fi
"#;

/// One child process under a watchdog. Dropping it SIGKILLs the process.
#[derive(Debug)]
pub struct Supervised {
    pid: u32,
    /// Whether the program leads a process group of its own, which signals go to.
    group: bool,
    watchdog: Child,
}

impl Supervised {
    /// Starts `program` with `args` and `env`, appending its output to `log`. Variables named
    /// `IDEMPOTENCY_PROXY_*` in this process's environment are not passed on, so that a
    /// developer's own settings do not change what a test runs.
    pub fn spawn(
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Self, String> {
        Self::launch(program, args, env, log, None, false)
    }

    /// As [`spawn`](Self::spawn), and the watchdog removes `dir` once this process is gone.
    pub fn spawn_owning(
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
        dir: Option<&Path>,
    ) -> Result<Self, String> {
        Self::launch(program, args, env, log, dir, false)
    }

    /// As [`spawn_owning`](Self::spawn_owning), for a server that forks processes of its own
    /// (PostgreSQL's backends): it runs in a process group of its own, and every signal goes to
    /// the whole group.
    pub fn spawn_group(
        program: &Path,
        args: &[String],
        log: &Path,
        dir: Option<&Path>,
    ) -> Result<Self, String> {
        Self::launch(program, args, &[], log, dir, true)
    }

    fn launch(
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
        dir: Option<&Path>,
        group: bool,
    ) -> Result<Self, String> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("watchdog")
            .arg(std::process::id().to_string())
            .arg(log)
            .arg(dir.unwrap_or(Path::new("")))
            .arg(if group { "1" } else { "0" })
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        proxy_env(&mut cmd, env.iter().copied());
        let mut watchdog = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let mut line = String::new();
        if let Some(out) = watchdog.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        match line.trim().parse() {
            Ok(pid) => Ok(Self {
                pid,
                group,
                watchdog,
            }),
            Err(_) => {
                let _ = watchdog.kill();
                let _ = watchdog.wait();
                Err(format!("cannot start {}", program.display()))
            }
        }
    }

    /// The program's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends a signal (`KILL`, `STOP`, `CONT`, ...) to the program (to its whole group, for
    /// [`spawn_group`](Self::spawn_group)).
    pub fn signal(&self, name: &str) -> Result<(), String> {
        let target = if self.group {
            format!("-{}", self.pid)
        } else {
            self.pid.to_string()
        };
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg("--")
            .arg(target)
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
    pub fn alive(&self) -> bool {
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
    pub fn kill(&mut self) {
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

/// Gives `cmd` the environment `env` instead of this process's `IDEMPOTENCY_PROXY_*` variables,
/// so that a developer's own proxy settings do not change what a test or the chaos run starts.
pub fn proxy_env<K, V>(cmd: &mut Command, env: impl IntoIterator<Item = (K, V)>) -> &mut Command
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    for (k, _) in std::env::vars() {
        if k.starts_with("IDEMPOTENCY_PROXY_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env)
}

/// A child started by the test itself (a demo binary, a browser driver), killed when dropped.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free on 127.0.0.1 a moment ago (never Redis's 6379 or PostgreSQL's 5432,
/// which a developer's own server may be about to take).
pub fn free_port() -> u16 {
    loop {
        let port = free_addr().port();
        if port != 6379 && port != 5432 {
            return port;
        }
    }
}

/// An address on 127.0.0.1 that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local address")
}

/// A fresh directory under the system's temporary directory, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory whose name starts with `name`.
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "{name}-{}-{}-{nanos:x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The path of a directory's file, as a command-line argument.
pub fn path_arg(dir: &Path, file: &str) -> String {
    dir.join(file).to_string_lossy().into_owned()
}

/// Waits until `url` answers anything at all (a server that is starting), for up to 20 s.
pub async fn wait_for_url(url: &str) {
    let give_up = Instant::now() + Duration::from_secs(20);
    while reqwest::get(url).await.is_err() {
        assert!(Instant::now() < give_up, "{url} did not come up");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
