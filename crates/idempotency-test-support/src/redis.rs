//! Real Redis processes: a standalone `redis-server` or a Redis Cluster (masters with or without
//! replicas, which tests can fail over, kill and restart), each on free ports of 127.0.0.1
//! (never the machine's 6379), in a private temporary directory, without persistence unless
//! asked for.
//!
//! Every server runs under [`Supervised`]'s watchdog, so servers shared by a whole test binary
//! (held in statics, which are never dropped) do not outlive it. Servers owned by a test are
//! killed when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::process::{Supervised, TempDir};

/// How long a server may take to answer after it was started (a loaded machine, an AOF file
/// to load).
const STARTUP: Duration = Duration::from_secs(20);

/// What Redis keeps across a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// `--save "" --appendonly no`: a restart forgets everything.
    None,
    /// `--appendonly yes --appendfsync always`: every acknowledged write survives a SIGKILL.
    Aof,
}

impl Persistence {
    /// A short name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            Persistence::None => "no persistence",
            Persistence::Aof => "AOF, fsync always",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Persistence::None => &["--appendonly", "no"],
            Persistence::Aof => &["--appendonly", "yes", "--appendfsync", "always"],
        }
    }
}

/// How to start a [`RedisServer`]: which program, with what persistence and extra arguments,
/// in which directory.
#[derive(Debug, Clone)]
pub struct RedisBuilder {
    program: PathBuf,
    extra: Vec<String>,
    persistence: Persistence,
    dir: Option<PathBuf>,
}

impl Default for RedisBuilder {
    fn default() -> Self {
        Self {
            program: PathBuf::from("redis-server"),
            extra: Vec::new(),
            persistence: Persistence::None,
            dir: None,
        }
    }
}

impl RedisBuilder {
    /// The `redis-server` binary to run (default: the one on the `PATH`).
    pub fn program(mut self, program: &Path) -> Self {
        self.program = program.to_owned();
        self
    }

    /// Extra `redis-server` arguments. `{dir}` and `{port}` in an argument are replaced by the
    /// server's directory and port.
    pub fn args(mut self, extra: &[&str]) -> Self {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self
    }

    /// What the server keeps across a restart (default: nothing).
    pub fn persistence(mut self, persistence: Persistence) -> Self {
        self.persistence = persistence;
        self
    }

    /// Keeps the server's data and log in `redis-<port>` under `parent`, left in place after
    /// the server is gone (default: a temporary directory, removed with the server).
    pub fn dir(mut self, parent: &Path) -> Self {
        self.dir = Some(parent.to_owned());
        self
    }

    /// Starts the server on a free port; returns once it answers.
    pub fn start(self) -> Result<RedisServer, String> {
        let mut last = String::new();
        for _attempt in 0..5 {
            let port = free_port(self.extra.iter().any(|a| a.contains("cluster-enabled")));
            let dir = match &self.dir {
                Some(parent) => {
                    let dir = parent.join(format!("redis-{port}"));
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| format!("create {}: {e}", dir.display()))?;
                    Dir::Kept(dir)
                }
                None => Dir::Temp(TempDir::new(&format!("redis-{port}"))),
            };
            let mut server = RedisServer {
                port,
                dir,
                program: self.program.clone(),
                extra: self.extra.clone(),
                persistence: self.persistence,
                proc: None,
            };
            match server.launch() {
                Ok(()) => return Ok(server),
                // Someone took the port between our check and the server's bind: try another.
                Err(e) => last = e,
            }
        }
        Err(format!("redis-server did not start: {last}"))
    }
}

/// Where a server keeps its data.
#[derive(Debug)]
enum Dir {
    /// Removed with the server.
    Temp(TempDir),
    /// The caller's, left in place.
    Kept(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Temp(t) => t.path(),
            Dir::Kept(p) => p,
        }
    }
}

/// A `redis-server` process on a free port.
#[derive(Debug)]
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: Dir,
    program: PathBuf,
    extra: Vec<String>,
    persistence: Persistence,
    proc: Option<Supervised>,
}

impl RedisServer {
    /// A standalone server without persistence.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with extra `redis-server` arguments. `{dir}` and `{port}` in an argument are
    /// replaced by the server's directory and port.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::builder().args(extra).start().unwrap_or_else(|e| {
            panic!("could not start redis-server on a free port (is redis-server installed?): {e}")
        })
    }

    /// A server started the way the builder says.
    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    /// Starts (or restarts) the process on this server's port; returns once it answers PING.
    fn launch(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let dir = self.dir.path().to_string_lossy().into_owned();
        let mut args: Vec<String> = [
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            &dir,
            // To standard output, which the watchdog appends to the log.
            "--logfile",
            "",
            "--protected-mode",
            "no",
        ]
        .iter()
        .chain(self.persistence.args())
        .map(|s| s.to_string())
        .collect();
        args.extend(
            self.extra
                .iter()
                .map(|a| a.replace("{dir}", &dir).replace("{port}", &port)),
        );
        let log = self.dir.path().join("redis.log");
        let owned = match &self.dir {
            Dir::Temp(t) => Some(t.path()),
            Dir::Kept(_) => None,
        };
        let proc = Supervised::spawn_owning(&self.program, &args, &[], &log, owned)?;
        let pid = proc.pid();
        self.proc = Some(proc);
        let give_up = Instant::now() + STARTUP;
        while Instant::now() < give_up {
            if self
                .try_cli(&["PING"])
                .is_some_and(|out| out.trim() == "PONG")
            {
                // Make sure it is our server, not someone else's on a reused port.
                let answering: Option<u32> = self.try_cli(&["INFO", "server"]).and_then(|info| {
                    info.lines()
                        .find_map(|l| l.strip_prefix("process_id:"))
                        .and_then(|p| p.trim().parse().ok())
                });
                if answering == Some(pid) {
                    return Ok(());
                }
            }
            if !self.proc.as_ref().is_some_and(Supervised::alive) {
                break;
            }
            sleep(Duration::from_millis(20));
        }
        self.proc = None;
        Err(format!(
            "redis-server on port {port} did not answer (log {})",
            log.display()
        ))
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's directory (its data and `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The persistence it runs with now.
    pub fn persistence(&self) -> Persistence {
        self.persistence
    }

    /// Runs `redis-cli` against this server; its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed on port {}", self.port))
    }

    /// Runs `redis-cli` against this server; its standard output, or `None` when the server
    /// does not answer.
    pub fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// Kills the server at once (SIGKILL), as a crash would, and waits until its port no
    /// longer answers.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
        let give_up = Instant::now() + STARTUP;
        while Instant::now() < give_up && self.try_cli(&["PING"]).is_some() {
            sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port (empty: there is no persistence).
    pub fn restart(&mut self) {
        let persistence = self.persistence;
        if let Err(e) = self.restart_with(persistence) {
            panic!("could not restart redis-server on port {}: {e}", self.port);
        }
    }

    /// Kills the server and starts it again on the same port with `persistence`; with AOF
    /// both times it reloads what it had.
    pub fn restart_with(&mut self, persistence: Persistence) -> Result<(), String> {
        self.kill();
        self.persistence = persistence;
        let give_up = Instant::now() + STARTUP;
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= give_up => return Err(e),
                Err(_) => sleep(Duration::from_millis(100)),
            }
        }
    }

    /// `DBSIZE`, or `None` when the server does not answer.
    pub fn dbsize(&self) -> Option<u64> {
        self.try_cli(&["DBSIZE"])?.trim().parse().ok()
    }

    /// The number of clients connected now (`CLIENT LIST`, counting the asking `redis-cli`).
    pub fn clients(&self) -> usize {
        self.cli(&["CLIENT", "LIST"])
            .lines()
            .filter(|l| l.starts_with("id="))
            .count()
    }

    /// `INFO commandstats` as (command, calls).
    pub fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        self.cli(&["INFO", "commandstats"])
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster: masters, each with its replicas, every node on free ports.
#[derive(Debug)]
pub struct RedisCluster {
    /// Its nodes, masters and replicas, in the order they were started.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// 3 masters without replicas (cluster node timeout 5 s).
    pub fn start() -> Self {
        Self::start_with(3, 0, 5000)
    }

    /// `masters` masters with `replicas` replicas each; a master unreachable for
    /// `node_timeout_ms` is failed over to one of its replicas. Returns once every slot is
    /// served and every replica is in sync with its master.
    pub fn start_with(masters: usize, replicas: usize, node_timeout_ms: u64) -> Self {
        let timeout = node_timeout_ms.to_string();
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "{dir}/nodes-{port}.conf",
                    "--cluster-node-timeout",
                    &timeout,
                    // A replica (re)joining syncs at once, not after the default 5 s.
                    "--repl-diskless-sync-delay",
                    "0",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_until_healthy(Duration::from_secs(30));
        cluster
    }

    /// `redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,...`, every node a seed.
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", addrs.join(","))
    }

    /// The indexes of the nodes that answer and say they are masters.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.role(i).as_deref() == Some("master"))
            .collect()
    }

    /// `master`, `slave`, or `None` for a node that does not answer.
    pub fn role(&self, i: usize) -> Option<String> {
        let out = self.nodes[i].try_cli(&["ROLE"])?;
        out.lines().next().map(|l| l.trim().to_owned())
    }

    /// The indexes of the nodes that answer and replicate node `i`.
    pub fn replicas_of(&self, i: usize) -> Vec<usize> {
        let master_port = self.nodes[i].port.to_string();
        (0..self.nodes.len())
            .filter(|&j| {
                j != i
                    && self.nodes[j]
                        .try_cli(&["INFO", "replication"])
                        .is_some_and(|info| {
                            info.lines()
                                .any(|l| l.trim() == format!("master_port:{master_port}"))
                        })
            })
            .collect()
    }

    /// Node `i`'s cluster id.
    pub fn node_id(&self, i: usize) -> String {
        self.nodes[i].cli(&["CLUSTER", "MYID"]).trim().to_owned()
    }

    /// The master serving the slot of `key`, by index.
    pub fn master_of(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[self.masters()[0]]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        for i in self.masters() {
            let nodes = self.nodes[i].cli(&["CLUSTER", "NODES"]);
            let mine = nodes.lines().find(|l| l.contains("myself")).unwrap_or("");
            let serves = mine.split_whitespace().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                return i;
            }
        }
        panic!("no master serves the slot of {key}");
    }

    /// Kills node `i` with SIGKILL, as a crash would.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its port, with its cluster configuration file but no data: it
    /// rejoins the cluster (a former master as a replica of whoever took its slots) and syncs.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
    }

    /// Has replica `i` take over its master's slots at once, with its master's consent
    /// (`CLUSTER FAILOVER`), and waits until it serves them.
    pub fn graceful_failover(&self, i: usize) {
        let give_up = Instant::now() + Duration::from_secs(60);
        // A manual failover that does not complete within 5 s (a busy machine) is abandoned by
        // Redis: ask again.
        'asking: loop {
            self.nodes[i].cli(&["CLUSTER", "FAILOVER"]);
            let again = Instant::now() + Duration::from_secs(8);
            while Instant::now() < again {
                if self.role(i).as_deref() == Some("master") {
                    break 'asking;
                }
                assert!(Instant::now() < give_up, "node {i} never became a master");
                sleep(Duration::from_millis(50));
            }
        }
        self.wait_until_healthy(Duration::from_secs(30));
    }

    /// Waits until every node that answers says the cluster is ok and every answering replica
    /// is in sync with its master.
    pub fn wait_until_healthy(&self, within: Duration) {
        let give_up = Instant::now() + within;
        while !self.is_healthy() {
            assert!(
                Instant::now() < give_up,
                "the cluster did not become healthy"
            );
            sleep(Duration::from_millis(100));
        }
    }

    fn is_healthy(&self) -> bool {
        let mut answering = 0;
        for node in &self.nodes {
            let Some(info) = node.try_cli(&["CLUSTER", "INFO"]) else {
                continue;
            };
            answering += 1;
            if !info.contains("cluster_state:ok") {
                return false;
            }
            let Some(repl) = node.try_cli(&["INFO", "replication"]) else {
                return false;
            };
            if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                return false;
            }
        }
        answering > 0
    }
}

/// A standalone server shared by every test of the binary.
pub fn shared_server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// A cluster shared by every test of the binary.
pub fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(RedisCluster::start)
}

/// A port free on 127.0.0.1 (and, for cluster nodes, its bus port + 10000 too).
fn free_port(cluster: bool) -> u16 {
    loop {
        let port = crate::process::free_port();
        if !cluster {
            return port;
        }
        if let Some(bus) = port.checked_add(10_000)
            && TcpListener::bind(("127.0.0.1", bus)).is_ok()
        {
            return port;
        }
    }
}
