//! The proxy's own test helpers: a real upstream server that counts its executions, and the
//! real proxy binary. What the library's tests share too comes from `idempotency-test-support`.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

#[allow(unused_imports)] // each test binary uses a part of them
pub use idempotency_test_support::events::{event_count, gauge};
use idempotency_test_support::harness::get_text;
pub use idempotency_test_support::process::free_addr;
use idempotency_test_support::process::proxy_env;
#[allow(unused_imports)]
pub use idempotency_test_support::raw_http::{RawAnswer, parse_answer, raw_request, read_answer};
pub use idempotency_test_support::redis;

pub const BIN: &str = env!("CARGO_BIN_EXE_idempotency-proxy");

/// Where a test's proxy keeps its records.
pub enum Backend {
    /// The embedded memory store.
    Memory,
    /// A Redis server of the test's own.
    Redis(redis::RedisServer),
}

impl Backend {
    pub fn memory() -> Self {
        Backend::Memory
    }

    pub fn redis() -> Self {
        Backend::Redis(redis::RedisServer::start())
    }

    /// The `--store` value.
    pub fn store_arg(&self) -> String {
        match self {
            Backend::Memory => "memory".to_owned(),
            Backend::Redis(server) => server.url(),
        }
    }

    /// A proxy on this store in front of `upstream`.
    pub async fn proxy(&self, upstream: &str, extra: &[&str]) -> Proxy {
        let store = self.store_arg();
        let mut args = vec!["--store", store.as_str()];
        args.extend_from_slice(extra);
        Proxy::start(upstream, &args).await
    }
}

/// An upstream HTTP server on 127.0.0.1:0 that counts how often each path ran.
pub struct Upstream {
    pub addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Hits(Arc<Mutex<HashMap<String, usize>>>);

impl Hits {
    fn hit(&self, uri: &Uri) -> usize {
        let mut hits = self.0.lock().unwrap();
        let n = hits.entry(uri.path().to_owned()).or_default();
        *n += 1;
        *n
    }
}

impl Upstream {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// The same upstream on a given address.
    pub async fn start_on(addr: SocketAddr) -> Self {
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let app = Router::new()
            .route("/orders", any(orders))
            .route("/slow", any(slow))
            .route("/fail", any(fail))
            .route("/echo", any(echo))
            .route("/hop", any(hop))
            .route("/big", any(big))
            .route("/upload", any(upload))
            .route("/sized", any(sized))
            .fallback(any(not_found))
            .with_state(Hits(hits.clone()));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, hits, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How often `path` ran.
    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Every request that reached this upstream, on any path, by path.
    pub fn all_hits(&self) -> HashMap<String, usize> {
        self.hits.lock().unwrap().clone()
    }

    /// How many requests reached this upstream, on any path.
    pub fn total_hits(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// 201 with the execution number in a header and in a JSON body that echoes the request.
async fn orders(State(hits): State<Hits>, method: Method, uri: Uri, body: Bytes) -> Response {
    let n = hits.hit(&uri);
    let doc = serde_json::json!({
        "order": n,
        "method": method.as_str(),
        "received": String::from_utf8_lossy(&body),
    });
    let mut res = (StatusCode::CREATED, axum::Json(doc)).into_response();
    res.headers_mut().insert("x-order-id", HeaderValue::from(n));
    res.headers_mut()
        .append("x-multi", HeaderValue::from_static("a"));
    res.headers_mut()
        .append("x-multi", HeaderValue::from_static("b"));
    res
}

/// Sleeps `ms` milliseconds (default 1000), then answers 200 with the execution number.
async fn slow(
    State(hits): State<Hits>,
    uri: Uri,
    Query(q): Query<HashMap<String, u64>>,
) -> Response {
    let n = hits.hit(&uri);
    let ms = q.get("ms").copied().unwrap_or(1000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    (StatusCode::OK, format!("slow run {n}")).into_response()
}

/// Any other path: counted, then 404 with the path it saw.
async fn not_found(State(hits): State<Hits>, uri: Uri) -> Response {
    hits.hit(&uri);
    (StatusCode::NOT_FOUND, format!("no route {}", uri.path())).into_response()
}

async fn fail(State(hits): State<Hits>, uri: Uri) -> Response {
    let n = hits.hit(&uri);
    (StatusCode::INTERNAL_SERVER_ERROR, format!("failure {n}")).into_response()
}

/// The request headers as JSON: name -> values.
async fn echo(State(hits): State<Hits>, uri: Uri, headers: HeaderMap) -> Response {
    hits.hit(&uri);
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &headers {
        map.entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    axum::Json(map).into_response()
}

/// A response carrying hop-by-hop headers that a proxy must not pass on.
async fn hop(State(hits): State<Hits>, uri: Uri) -> Response {
    hits.hit(&uri);
    let mut res = "hop".into_response();
    let h = res.headers_mut();
    h.insert("connection", HeaderValue::from_static("x-hop"));
    h.insert("x-hop", HeaderValue::from_static("secret"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert("x-end-to-end", HeaderValue::from_static("kept"));
    res
}

/// `mib` MiB of a repeated pattern, streamed in 64 KiB chunks.
async fn big(
    State(hits): State<Hits>,
    uri: Uri,
    Query(q): Query<HashMap<String, u64>>,
) -> Response {
    hits.hit(&uri);
    let mib = q.get("mib").copied().unwrap_or(1);
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let chunks = mib * 16;
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let mut res = Response::new(Body::from_stream(stream));
    res.headers_mut()
        .insert("content-length", HeaderValue::from(mib * 1024 * 1024));
    res
}

/// `kib` KiB (default 1): `run N` and the execution number, padded with `.`.
async fn sized(
    State(hits): State<Hits>,
    uri: Uri,
    Query(q): Query<HashMap<String, usize>>,
) -> Response {
    let n = hits.hit(&uri);
    let len = q.get("kib").copied().unwrap_or(1) * 1024;
    let mut body = format!("run {n}\n").into_bytes();
    body.resize(len.max(body.len()), b'.');
    body.into_response()
}

/// Reads the request body as it streams and answers with its length.
async fn upload(State(hits): State<Hits>, uri: Uri, body: Body) -> Response {
    hits.hit(&uri);
    let mut n: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => n += c.len() as u64,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        }
    }
    n.to_string().into_response()
}

/// An upstream that does the work and then drops the connection without an answer: it reads
/// each request in full, counts it, and closes the socket.
pub struct DroppingUpstream {
    pub addr: SocketAddr,
    runs: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DroppingUpstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let runs = Arc::new(AtomicU64::new(0));
        let counted = runs.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if request_complete(&buf) {
                            break;
                        }
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    // The work is done; the answer never leaves.
                    drop(stream);
                });
            }
        });
        Self { addr, runs, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests it received in full.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }
}

impl Drop for DroppingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `buf` holds a whole HTTP/1.1 request with a `Content-Length` body (or none).
fn request_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    buf.len() >= end + 4 + length
}

static NEXT_LOG: AtomicU64 = AtomicU64::new(0);

fn log_path() -> PathBuf {
    let n = NEXT_LOG.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!(
        "idempotency-proxy-test-{}-{n}.log",
        std::process::id()
    ))
}

/// The proxy binary, running.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proxy {
    /// Starts the proxy in front of `upstream` with extra flags, and waits until it accepts.
    pub async fn start(upstream: &str, extra: &[&str]) -> Self {
        let addr = free_addr();
        let admin = free_addr();
        let mut args = vec![
            "--upstream".to_owned(),
            upstream.to_owned(),
            "--listen".to_owned(),
            addr.to_string(),
            "--admin-listen".to_owned(),
            admin.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(args, &[], addr, admin).await
    }

    /// Starts the proxy with these arguments and environment variables; `addr` and `admin` are
    /// where it will listen.
    pub async fn spawn(
        args: Vec<String>,
        env: &[(&str, String)],
        addr: SocketAddr,
        admin: SocketAddr,
    ) -> Self {
        let log = log_path();
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        proxy_env(&mut cmd, env.iter().map(|(k, v)| (k, v)));
        if !env.iter().any(|(k, _)| *k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd.spawn().unwrap();
        let mut proxy = Self {
            child,
            addr,
            admin,
            log,
            exited: None,
        };
        proxy.wait_ready().await;
        proxy
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("proxy exited early with {status}: {}", self.logs());
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not start: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What `GET /metrics` on the admin listener answers now.
    pub async fn metrics(&self) -> String {
        get_text(&client(), &self.admin_url("/metrics")).await
    }

    /// What the proxy logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.exited = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The peak resident set size (VmHWM) of the process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A client that never goes through a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Runs the binary with these arguments and environment to completion, for config errors. A
/// binary that is still running after 20 s (it took the configuration and serves) is killed,
/// and its exit code is `None`.
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    proxy_env(&mut cmd, env.iter().copied());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    (out.status.code(), text)
}

/// Waits until the proxy closes `stream`, reading (and dropping) whatever it sends first.
pub async fn closed_by_proxy(stream: &mut tokio::net::TcpStream) {
    let mut sink = Vec::new();
    // Only keeps a broken build from hanging the suite.
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the proxy kept the connection open");
}
