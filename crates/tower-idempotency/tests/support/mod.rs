//! Real Redis processes for the tests: a standalone `redis-server` or a Redis Cluster (masters
//! with or without replicas, which tests can fail over, kill and restart), each on free ports of
//! 127.0.0.1 (never the machine's 6379), in a private temporary directory, without persistence.
//!
//! Every server is started under a small shell watchdog that kills it when the test process
//! exits, so servers shared by a whole test binary (held in statics, which are never dropped)
//! do not outlive it. Servers owned by a test are killed when dropped.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long a server may take to answer after it was started.
const STARTUP: Duration = Duration::from_secs(10);

/// A `redis-server` process on a free port.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    pid: Option<u32>,
    watchdog: Option<Child>,
}

impl RedisServer {
    /// A standalone server without persistence.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with extra `redis-server` arguments. `{dir}` and `{port}` in an argument are
    /// replaced by the server's directory and port.
    pub fn start_with(extra: &[&str]) -> Self {
        for _attempt in 0..5 {
            let port = free_port(extra.iter().any(|a| a.contains("cluster-enabled")));
            let dir = temp_dir(&format!("redis-{port}"));
            let mut server = RedisServer {
                port,
                dir,
                extra: extra.iter().map(|s| s.to_string()).collect(),
                pid: None,
                watchdog: None,
            };
            if server.launch() {
                return server;
            }
            // Someone took the port between our check and the server's bind: try another.
        }
        panic!("could not start redis-server on a free port (is redis-server installed?)");
    }

    /// Starts (or restarts) the process on this server's port; true once it answers PING.
    fn launch(&mut self) -> bool {
        let port = self.port.to_string();
        let dir = self.dir.to_string_lossy().into_owned();
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.clone(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.clone(),
            "--logfile".into(),
            format!("{dir}/redis.log"),
            "--protected-mode".into(),
            "no".into(),
        ];
        args.extend(
            self.extra
                .iter()
                .map(|a| a.replace("{dir}", &dir).replace("{port}", &port)),
        );
        // The watchdog: runs the server, and kills it as soon as the test process is gone
        // (then removes its directory, which a server held in a static never gets to do).
        let script = r#"
            parent=$1; dir=$2; shift 2
            redis-server "$@" >/dev/null 2>&1 &
            child=$!
            echo "$child"
            while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.2; done
            kill -9 "$child" 2>/dev/null
            if ! kill -0 "$parent" 2>/dev/null; then wait "$child"; rm -rf "$dir"; fi
        "#;
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("redis-watchdog")
            .arg(std::process::id().to_string())
            .arg(&dir)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh for redis-server");
        let mut line = String::new();
        if let Some(out) = watchdog.stdout.take() {
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        }
        let pid: Option<u32> = line.trim().parse().ok();
        self.watchdog = Some(watchdog);
        self.pid = pid;
        let give_up = Instant::now() + STARTUP;
        while Instant::now() < give_up {
            if self
                .try_cli(&["PING"])
                .is_some_and(|out| out.trim() == "PONG")
            {
                // Make sure it is our server, not someone else's on a reused port.
                let info = self.cli(&["INFO", "server"]);
                let answering: Option<u32> = info
                    .lines()
                    .find_map(|l| l.strip_prefix("process_id:"))
                    .and_then(|p| p.trim().parse().ok());
                if answering.is_some() && answering == pid {
                    return true;
                }
            }
            if let Some(w) = self.watchdog.as_mut()
                && matches!(w.try_wait(), Ok(Some(_)))
            {
                return false;
            }
            sleep(Duration::from_millis(20));
        }
        false
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server; its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed on port {}", self.port))
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        // Wait until the port is free again.
        let give_up = Instant::now() + STARTUP;
        while Instant::now() < give_up && self.try_cli(&["PING"]).is_some() {
            sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port (empty: there is no persistence).
    pub fn restart(&mut self) {
        self.kill();
        let give_up = Instant::now() + STARTUP;
        while Instant::now() < give_up {
            if self.launch() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
        panic!("could not restart redis-server on port {}", self.port);
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster: masters, each with its replicas, every node on free ports.
pub struct RedisCluster {
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
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        if port == 6379 {
            continue;
        }
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

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tower-idempotency-{}-{name}-{:x}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn rand_u64() -> u64 {
    tower_idempotency::LeaseToken::random().0 as u64
}

/// The path of a directory's file, as a string argument.
pub fn path_arg(dir: &Path, file: &str) -> String {
    dir.join(file).to_string_lossy().into_owned()
}
