//! The other processes a benchmark run starts: redis-server, idempotency-proxy, nginx, and
//! Flask-Idempotent (a Flask app under gunicorn with it). Each is killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{free_addr, wait_up};

/// A child process, killed on drop, with the address it serves.
pub(crate) struct Proc {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first, so that a master process (gunicorn, nginx) stops its workers too.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// A `kB` field of the process's `/proc/PID/status` (`VmRSS`, `VmHWM`), in bytes.
    pub(crate) fn status_bytes(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }
}

async fn spawn(mut cmd: Command, addr: SocketAddr) -> Result<Proc, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let proc = Proc { child, addr };
    if !wait_up(addr).await {
        return Err(format!("{program} did not listen on {addr}"));
    }
    Ok(proc)
}

/// A redis-server on a free port, without persistence.
pub(crate) async fn redis() -> Result<Proc, String> {
    redis_with(&[]).await
}

/// A redis-server on a free port, without persistence, with extra arguments.
async fn redis_with(extra: &[&str]) -> Result<Proc, String> {
    let addr = free_addr();
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &addr.port().to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    cmd.args(extra);
    spawn(cmd, addr).await
}

/// A redis-server primary and a replica of it, each on a free port without persistence, once
/// the replica is in sync.
pub(crate) async fn redis_with_replica() -> Result<(Proc, Proc), String> {
    let primary = redis_with(&["--repl-diskless-sync-delay", "0"]).await?;
    let port = primary.addr.port().to_string();
    // The replica loads its first sync from the socket, leaving no dump file behind.
    let replica = redis_with(&[
        "--replicaof",
        "127.0.0.1",
        &port,
        "--repl-diskless-load",
        "on-empty-db",
    ])
    .await?;
    let replica_port = replica.addr.port().to_string();
    for _ in 0..400 {
        let info = Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &replica_port,
                "INFO",
                "replication",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if info.contains("master_link_status:up") {
            return Ok((primary, replica));
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    Err("the replica did not sync with its primary".into())
}

/// Where the workspace's release binaries are: next to this one.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join(name)
}

/// `idempotency-proxy` in front of `upstream` with `store`.
pub(crate) async fn proxy(upstream: SocketAddr, store: &str) -> Result<Proc, String> {
    proxy_with(upstream, store, &[]).await
}

/// `idempotency-proxy` in front of `upstream` with `store` and `extra` flags.
pub(crate) async fn proxy_with(
    upstream: SocketAddr,
    store: &str,
    extra: &[&str],
) -> Result<Proc, String> {
    let addr = free_addr();
    let bin = sibling("idempotency-proxy");
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--upstream",
        &format!("http://{upstream}"),
        "--listen",
        &addr.to_string(),
        "--store",
        store,
        "--log-format",
        "text",
    ])
    .args(extra)
    .env("RUST_LOG", "warn");
    spawn(cmd, addr)
        .await
        .map_err(|e| format!("{e} (build it with `cargo build --release -p idempotency-proxy`)"))
}

/// nginx as a plain keep-alive `proxy_pass` in front of `upstream`.
pub(crate) async fn nginx(upstream: SocketAddr, dir: &Path) -> Result<Proc, String> {
    let addr = free_addr();
    let conf = dir.join("nginx.conf");
    std::fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
    std::fs::write(
        &conf,
        format!(
            "worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream app {{ server {upstream}; keepalive 64; }}
  server {{
    listen {addr};
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }}
  }}
}}
",
            dir = dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut cmd = Command::new("nginx");
    cmd.args([
        "-p",
        &dir.display().to_string(),
        "-c",
        &conf.display().to_string(),
        "-g",
        "daemon off;",
    ]);
    spawn(cmd, addr).await
}

/// The Flask app, with or without Flask-Idempotent, under gunicorn from `venv`.
pub(crate) async fn flask(
    venv: &Path,
    dir: &Path,
    redis: Option<SocketAddr>,
) -> Result<Proc, String> {
    let addr = free_addr();
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let (module, source) = match redis {
        Some(redis) => (
            "idempotent_app",
            format!(
                "import itertools
from flask import Flask, jsonify
from flask_idempotent import Idempotent

app = Flask(__name__)
app.config['REDIS_URL'] = 'redis://{redis}/0'
Idempotent(app)
ids = itertools.count(1)

@app.route('/orders', methods=['POST'])
def orders():
    return jsonify(id=next(ids), product='Teapot', quantity=2), 201
"
            ),
        ),
        None => (
            "plain_app",
            "import itertools
from flask import Flask, jsonify

app = Flask(__name__)
ids = itertools.count(1)

@app.route('/orders', methods=['POST'])
def orders():
    return jsonify(id=next(ids), product='Teapot', quantity=2), 201
"
            .to_string(),
        ),
    };
    std::fs::write(dir.join(format!("{module}.py")), source).map_err(|e| e.to_string())?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    let mut cmd = Command::new(venv.join("bin/gunicorn"));
    cmd.current_dir(dir).args([
        "--workers",
        &workers.to_string(),
        "--bind",
        &addr.to_string(),
        "--log-level",
        "warning",
        &format!("{module}:app"),
    ]);
    spawn(cmd, addr).await
}
