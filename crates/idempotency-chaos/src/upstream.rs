//! The upstream service, in this process: an axum server on 127.0.0.1:0 that records every
//! execution per idempotency key (the key reaches it as the `Idempotency-Key` header the proxy
//! forwards), with when it started and when its answer was complete, and answers each
//! successful execution with a body no other execution produces.
//!
//! On command it fails some keys with 500s, or answers them only after a hang longer than the
//! proxy's `--upstream-timeout` (a slow payment: the work is done, the answer is late). Which keys is decided by a hash of the key under the run's seed
//! ([`faulty`]), so the checker can attribute every failed execution to its fault.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::rng;

/// Marks every response the upstream itself produced, so a passed-through 500 can be told
/// from one the proxy made.
pub(crate) const UPSTREAM_MARK: &str = "x-chaos-upstream";

/// Which proxy a request was sent through (set by the client, forwarded by the proxy).
pub(crate) const VIA: &str = "x-chaos-via";

/// The salts that pick the keys of each kind of upstream fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum UpstreamFault {
    /// The upstream answers 500.
    Error500,
    /// The upstream answers nothing for longer than the proxy waits.
    Hang,
}

/// Whether `key` is one of the keys that `fault` hits while it is on: about a third of the
/// keys, fixed by the seed. Race keys are never hit.
pub(crate) fn faulty(seed: u64, fault: UpstreamFault, key: &str) -> bool {
    if key.starts_with("race-") {
        return false;
    }
    let salt = match fault {
        UpstreamFault::Error500 => 0x500,
        UpstreamFault::Hang => 0x4A46,
    };
    rng::hash(seed ^ salt, key).is_multiple_of(3)
}

/// What one execution of a key did.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// A 201 with this body.
    Success(Bytes),
    /// A 500 (fault on).
    Failed,
    /// None: the handler was dropped before it answered (hyper drops it when the proxy's
    /// connection closes, as when the proxy is killed mid-hang). Counted by the overlap check
    /// only: it never produced an outcome the other checks could see.
    Unanswered,
}

/// One execution: the upstream's handler ran for the key.
#[derive(Debug, Clone)]
pub(crate) struct Execution {
    /// When the handler started.
    pub(crate) at: Instant,
    /// When it was over: the handler returned its answer (a race's: once its held body was
    /// released), or hyper dropped it. `None` while it runs.
    pub(crate) end: Option<Instant>,
    /// Which proxy forwarded it.
    pub(crate) via: String,
    /// What it answered.
    pub(crate) outcome: Outcome,
}

/// Hooks for a race: the first execution of a key tells the controller it started, and holds
/// its response body until the controller releases it.
struct RaceHook {
    started: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

#[derive(Default)]
struct Shared {
    seed: u64,
    hang_for: Duration,
    error500: std::sync::atomic::AtomicBool,
    hang: std::sync::atomic::AtomicBool,
    serial: AtomicU64,
    executions: Mutex<HashMap<String, Vec<Execution>>>,
    races: Mutex<HashMap<String, RaceHook>>,
}

impl Shared {
    fn executions(&self) -> MutexGuard<'_, HashMap<String, Vec<Execution>>> {
        self.executions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn races(&self) -> MutexGuard<'_, HashMap<String, RaceHook>> {
        self.races.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running upstream. Dropping it stops the server.
pub(crate) struct Upstream {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// An execution in progress: decides its outcome, and marks its end when dropped (once its
/// answer is out, or when hyper drops the handler or the body).
struct Running {
    shared: Arc<Shared>,
    key: String,
    index: usize,
}

impl Running {
    fn begin(shared: &Arc<Shared>, key: &str, via: &str) -> Self {
        let mut all = shared.executions();
        let list = all.entry(key.to_owned()).or_default();
        list.push(Execution {
            at: Instant::now(),
            end: None,
            via: via.to_owned(),
            outcome: Outcome::Unanswered,
        });
        Self {
            shared: shared.clone(),
            key: key.to_owned(),
            index: list.len() - 1,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Execution) -> R) -> Option<R> {
        let mut all = self.shared.executions();
        all.get_mut(&self.key)
            .and_then(|list| list.get_mut(self.index))
            .map(f)
    }

    fn decide(&self, outcome: Outcome) {
        self.with(|x| x.outcome = outcome);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let now = Instant::now();
        self.with(|x| x.end = Some(x.end.unwrap_or(now)));
    }
}

impl Upstream {
    /// Starts the server on 127.0.0.1:0. Faulty keys are picked under `seed`; a hang lasts
    /// `hang_for`.
    pub(crate) async fn start(seed: u64, hang_for: Duration) -> Result<Self, String> {
        let shared = Arc::new(Shared {
            seed,
            hang_for,
            ..Shared::default()
        });
        let app = Router::new()
            .route("/pay", post(pay))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("upstream: bind 127.0.0.1:0: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("upstream: {e}"))?;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("idempotency-chaos: the upstream server failed: {e}");
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// `http://<addr>`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Turns a fault on or off.
    pub(crate) fn set(&self, fault: UpstreamFault, on: bool) {
        match fault {
            UpstreamFault::Error500 => self.shared.error500.store(on, Ordering::SeqCst),
            UpstreamFault::Hang => self.shared.hang.store(on, Ordering::SeqCst),
        }
    }

    /// Arms a race on `key`: its next successful execution signals the returned receiver once
    /// its response head is on its way, and sends its body only when the returned sender fires
    /// (or is dropped).
    pub(crate) fn arm_race(&self, key: &str) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (started_tx, started_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        self.shared.races().insert(
            key.to_owned(),
            RaceHook {
                started: started_tx,
                release: release_rx,
            },
        );
        (started_rx, release_tx)
    }

    /// Every execution so far, by key.
    pub(crate) fn executions(&self) -> HashMap<String, Vec<Execution>> {
        self.shared.executions().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `POST /pay`: one execution of the key's payment.
async fn pay(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(|k| k.trim_matches('"').to_owned())
    else {
        return (
            StatusCode::BAD_REQUEST,
            "no Idempotency-Key reached the upstream",
        )
            .into_response();
    };
    let via = headers
        .get(VIA)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let running = Running::begin(&shared, &key, &via);
    let seed = shared.seed;
    if shared.error500.load(Ordering::SeqCst) && faulty(seed, UpstreamFault::Error500, &key) {
        running.decide(Outcome::Failed);
        return marked(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            Body::from(format!("upstream failure for {key}")),
        );
    }
    if shared.hang.load(Ordering::SeqCst) && faulty(seed, UpstreamFault::Hang, &key) {
        // A slow payment: it answers, well past the proxy's --upstream-timeout. The caller has
        // had its 504 by then; the answer is stored, and retries must replay it.
        tokio::time::sleep(shared.hang_for).await;
    }
    let serial = shared.serial.fetch_add(1, Ordering::SeqCst) + 1;
    let nonce = rng::mix64(seed ^ serial.rotate_left(17));
    let doc = serde_json::json!({
        "key": key,
        "serial": serial,
        "nonce": format!("{nonce:016x}"),
        "via": via,
        "request_bytes": body.len(),
    });
    let out = Bytes::from(doc.to_string());
    running.decide(Outcome::Success(out.clone()));
    let hook = shared.races().remove(&key);
    if let Some(hook) = hook {
        // The head goes out now; the body only once the controller says so. The execution
        // ends with its body.
        let _ = hook.started.send(());
        let release = hook.release;
        let stream = futures_util::stream::once(async move {
            let _ = release.await;
            drop(running);
            Ok::<_, std::convert::Infallible>(out)
        });
        return marked(
            StatusCode::CREATED,
            "application/json",
            Body::from_stream(stream),
        );
    }
    // Long enough that duplicates overlap; one key in 16 outlives a lease renewal period
    // (lock-ttl / 3), well within the proxy's upstream timeout.
    let h = rng::hash(seed, &key);
    let ms = if h.is_multiple_of(16) {
        700
    } else {
        20 + h % 230
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    marked(StatusCode::CREATED, "application/json", Body::from(out))
}

fn marked(status: StatusCode, content_type: &'static str, body: Body) -> Response {
    let mut res = Response::new(body);
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert("content-type", HeaderValue::from_static(content_type));
    h.insert(UPSTREAM_MARK, HeaderValue::from_static("1"));
    res
}
