//! The HTTP harness: a real axum server on 127.0.0.1:0, a real HTTP client,
//! handlers that count their executions, and a few helpers to read and judge responses.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::raw_http::{RawAnswer, raw_request};

/// A server bound to 127.0.0.1:0, stopped when dropped.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TestServer {
    /// The absolute URL of `path_and_query` on this server.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` on a fresh port of 127.0.0.1 in the current runtime.
pub async fn serve(app: Router) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    TestServer { addr, task }
}

/// A real HTTP client. The generous timeout only keeps a broken build from hanging the suite;
/// no test asserts on how long anything took.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Counts executions of a handler, and lets a test wait until it reached a number.
#[derive(Clone)]
pub struct Counter(Arc<watch::Sender<usize>>);

impl Default for Counter {
    fn default() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

impl Counter {
    /// Counts one execution and returns its number, from 1.
    pub fn hit(&self) -> usize {
        let mut n = 0;
        self.0.send_modify(|c| {
            *c += 1;
            n = *c;
        });
        n
    }

    /// Executions so far.
    pub fn get(&self) -> usize {
        *self.0.borrow()
    }

    /// Waits until at least `n` executions have started.
    pub async fn reached(&self, n: usize) {
        let mut rx = self.0.subscribe();
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("the handler never reached {n} executions"))
            .unwrap();
    }
}

/// A gate a handler waits at until the test opens it. Once open it stays open.
#[derive(Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl Gate {
    /// Opens the gate for every handler waiting at it, and every one to come.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    /// Waits until the gate is open.
    pub async fn pass(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// What a client saw: status, headers and body bytes.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// Whether the response is marked `Idempotent-Replayed: true`.
    pub fn replayed(&self) -> bool {
        match self.headers.get("idempotent-replayed") {
            None => false,
            Some(v) => {
                assert_eq!(v, "true", "Idempotent-Replayed must be `true` when present");
                true
            }
        }
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// Sends the request and reads the whole response.
pub async fn send(req: reqwest::RequestBuilder) -> Reply {
    let res = req.send().await.expect("request failed");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.bytes().await.expect("response body failed");
    Reply {
        status,
        headers,
        body,
    }
}

/// GETs `url` and returns the body as text, whatever the status.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    let res = client.get(url).send().await.expect("GET failed");
    res.text().await.expect("response body failed")
}

/// Asserts that `reply` is an RFC 9457 problem with this status whose `type` ends in `slug`, and
/// returns its JSON.
pub fn assert_problem(reply: &Reply, status: u16, slug: &str) -> serde_json::Value {
    assert_eq!(
        reply.status.as_u16(),
        status,
        "expected a {status} problem, got {} {}",
        reply.status,
        reply.text()
    );
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json"),
        "a problem is application/problem+json"
    );
    assert!(!reply.replayed(), "a problem is never a replay");
    let json: serde_json::Value = serde_json::from_slice(&reply.body).expect("problem is JSON");
    let ty = json["type"].as_str().expect("problem has a type");
    assert!(
        ty.ends_with(slug),
        "problem type `{ty}` should end in `{slug}`"
    );
    assert!(
        !json["title"]
            .as_str()
            .expect("problem has a title")
            .is_empty(),
        "title is not empty"
    );
    assert_eq!(json["status"], status, "problem status member");
    assert!(
        !json["detail"]
            .as_str()
            .expect("problem has a detail")
            .is_empty(),
        "detail is not empty"
    );
    json
}

/// Asserts a `Retry-After` of a whole number of seconds, at least 1.
pub fn assert_retry_after(reply: &Reply) {
    let after = reply
        .header("retry-after")
        .unwrap_or_else(|| panic!("{} without Retry-After", reply.status));
    let secs: u64 = after.parse().expect("Retry-After is delta-seconds");
    assert!(secs >= 1, "Retry-After is at least one second");
}

/// A router whose routes `/orders` and `/other` (any method) count their executions and answer
/// 201 with a body unique to the execution: `exec-N METHOD PATH BODYLEN`.
pub fn counting_app(layer: tower_idempotency::IdempotencyLayer) -> (Router, Counter) {
    let count = Counter::default();
    let c = count.clone();
    let handler = move |method: Method, uri: Uri, body: Bytes| {
        let c = c.clone();
        async move {
            let n = c.hit();
            (
                StatusCode::CREATED,
                format!("exec-{n} {method} {} {}", uri.path(), body.len()),
            )
        }
    };
    let router = Router::new()
        .route("/orders", axum::routing::any(handler.clone()))
        .route("/other", axum::routing::any(handler))
        .layer(layer);
    (router, count)
}

/// A router whose `/slow` route counts, then waits at `gate`, then answers 201 `exec-N`.
pub fn gated_app(layer: tower_idempotency::IdempotencyLayer, gate: Gate) -> (Router, Counter) {
    let count = Counter::default();
    let c = count.clone();
    let handler = move || {
        let c = c.clone();
        let gate = gate.clone();
        async move {
            let n = c.hit();
            gate.pass().await;
            (StatusCode::CREATED, format!("exec-{n}"))
        }
    };
    let router = Router::new()
        .route("/slow", axum::routing::post(handler))
        .layer(layer);
    (router, count)
}

/// Tells whether the server dropped a request's future before it answered (the client went
/// away): an axum middleware outside the layer that flags its own cancellation.
#[derive(Clone, Default)]
pub struct CancelProbe(Counter);

impl CancelProbe {
    /// `router` with the probe outside every layer it already has.
    pub fn wrap(&self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), probe))
    }

    /// Waits until a request future was dropped unfinished.
    pub async fn cancelled(&self) {
        self.0.reached(1).await;
    }
}

async fn probe(
    axum::extract::State(probe): axum::extract::State<CancelProbe>,
    req: Request,
    next: Next,
) -> Response {
    struct Guard(Option<Counter>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(c) = self.0.take() {
                c.hit();
            }
        }
    }
    let mut guard = Guard(Some(probe.0.clone()));
    let res = next.run(req).await;
    guard.0 = None;
    res
}

/// Sends `head` (the request line and headers, without the blank line that ends them) and the
/// first bytes of a body over raw TCP, then nothing more (`trickle: None`), or one more byte
/// of the body per `trickle` pause, until the server answers. Returns the answer.
pub async fn slow_request(
    addr: SocketAddr,
    head: &str,
    first: &[u8],
    trickle: Option<Duration>,
) -> RawAnswer {
    let mut req = format!("{head}\r\n\r\n").into_bytes();
    req.extend_from_slice(first);
    raw_request(addr, &req, trickle).await
}

/// One request that reached a router, as it arrived.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Its method.
    pub method: Method,
    /// Its path.
    pub path: String,
    /// Its `Idempotency-Key` header, if any.
    pub idempotency_key: Option<String>,
    /// Whether its answer has left, or its future was dropped (the client went away).
    pub finished: bool,
}

/// Notes every request that reaches a router, before any of the router's layers sees it, and
/// when it is finished: what a browser really sent, and when all of it has been answered.
#[derive(Clone, Default)]
pub struct Arrivals(Arc<Mutex<Vec<Arrival>>>);

impl Arrivals {
    /// `router` with the notes taken outside every layer it already has.
    pub fn wrap(&self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), note))
    }

    /// The POSTs to `path` so far.
    pub fn posts_to(&self, path: &str) -> Vec<Arrival> {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter(|a| a.method == Method::POST && a.path == path)
            .cloned()
            .collect()
    }

    /// Waits (up to 20 s) until at least `n` POSTs to `path` have arrived and every request
    /// that arrived is finished; returns those POSTs.
    pub async fn settled(&self, path: &str, n: usize) -> Vec<Arrival> {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let posts = self.posts_to(path);
            let busy = self.0.lock().unwrap().iter().any(|a| !a.finished);
            if posts.len() >= n && !busy {
                return posts;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "{} POSTs to {path} arrived ({n} expected); unfinished: {busy}",
                posts.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn note(
    axum::extract::State(arrivals): axum::extract::State<Arrivals>,
    req: Request,
    next: Next,
) -> Response {
    struct Finished(Arrivals, usize);
    impl Drop for Finished {
        fn drop(&mut self) {
            self.0.0.lock().unwrap()[self.1].finished = true;
        }
    }
    let key = req
        .headers()
        .get("idempotency-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let index = {
        let mut all = arrivals.0.lock().unwrap();
        all.push(Arrival {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            idempotency_key: key,
            finished: false,
        });
        all.len() - 1
    };
    let _finished = Finished(arrivals, index);
    next.run(req).await
}

/// Sends `POST /orders` with the idempotency key `key` (none when `None`) and `body` straight
/// to `app`, in this process, and returns the answer's status, headers and body.
pub async fn post_orders(
    app: &Router,
    key: Option<&str>,
    body: impl Into<axum::body::Body>,
) -> (StatusCode, HeaderMap, Bytes) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = http::Request::post("/orders");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let req = req.body(body.into()).expect("a request");
    let res = app.clone().oneshot(req).await.expect("the router answers");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("the body").to_bytes();
    (parts.status, parts.headers, body)
}

/// Whether the answer says it is a replay (`Idempotent-Replayed: true`).
pub fn is_replay(headers: &HeaderMap) -> bool {
    headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}
