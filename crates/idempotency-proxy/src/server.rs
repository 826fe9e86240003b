//! The proxy's HTTP server: accepts connections until a signal, then drains.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tower_idempotency::{Idempotency, IdempotencyBody, IdempotencyLayer};

use crate::proxy::{BoxError, ClientAddr, InFlight, Proxy, problem};
use crate::telemetry::REQUEST_DURATION;

/// The full stack a request goes through.
pub(crate) type Stack = Idempotency<Proxy>;

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Every request in flight finished.
    Clean,
    /// The shutdown timeout passed first.
    TimedOut,
}

/// How many streams a client may have open at once on one HTTP/2 connection
/// (`SETTINGS_MAX_CONCURRENT_STREAMS`). RFC 9113 advises at least 100.
pub(crate) const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;

/// What bounds the clients of one proxy process, shared by its workers.
#[derive(Clone)]
pub(crate) struct ClientLimits {
    /// How long a connection may go without a request in progress: before its first request's
    /// head is in, between requests, and while a request head trickles in.
    pub(crate) header_timeout: Duration,
    /// One place per client connection served, over all workers (`--max-connections`).
    pub(crate) connections: Arc<Semaphore>,
}

/// Serves `stack` on `listener` until `shutdown` resolves, then stops accepting and waits up to
/// `grace` for connections, upstream calls in flight, and the outcomes `layer` still stores for
/// callers that went away.
pub(crate) async fn serve(
    listener: TcpListener,
    stack: Stack,
    layer: &IdempotencyLayer,
    in_flight: Arc<InFlight>,
    limits: ClientLimits,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> Drained {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A response's head and body go out as one buffer in one write(2), rather than a
        // writev(2) of a queue of buffers: fewer instructions for the small answers most are.
        .writev(false)
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS);
    let connections = TaskTracker::new();
    let closing = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A connection is served only with a place under --max-connections, shared by every
        // worker. Without one it waits, unread, and this worker accepts nothing more: the
        // connections after it wait in the listen backlog. The place is taken once there is a
        // connection for it, so no worker holds a place that connections queued at another
        // worker's socket need.
        let place = tokio::select! {
            place = limits.connections.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        // The stack for this connection's requests: its proxy knows the caller.
        let mut stack = stack.clone();
        stack.get_mut().set_client(Arc::new(ClientAddr::new(peer)));
        let activity = Activity::default();
        let active = activity.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let busy = active.enter();
            handle(stack.clone(), req, busy)
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        // The connection's watchdog is a task of its own: it wakes once per timeout, and on a
        // shutdown, to tell the connection to close. The connection's task then polls a
        // oneshot receiver beside hyper's connection, not a cancellation future and a timer,
        // each time one of its requests makes progress.
        let (mut close, close_requested) = oneshot::channel::<()>();
        let closing = closing.clone();
        let idle_timeout = limits.header_timeout;
        connections.spawn(async move {
            tokio::select! {
                () = closing.cancelled() => {}
                () = activity.idle_for(idle_timeout) => {
                    // No request head came in time (hyper's own header timeout covers
                    // HTTP/1.1 heads once it knows the protocol; this covers the rest).
                    tracing::debug!("closing a connection that sent no request in time");
                }
                // The connection ended on its own.
                () = close.closed() => return,
            }
            let _ = close.send(());
        });
        connections.spawn(async move {
            let _place = place;
            tokio::pin!(conn);
            tokio::select! {
                biased;
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                // Sent, or the watchdog gone (the runtime shutting down): close either way.
                _ = close_requested => conn.as_mut().graceful_shutdown(),
            }
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    closing.cancel();
    connections.close();
    let drain = async {
        connections.wait().await;
        // Upstream calls whose caller went away, or stopped waiting, still run; their outcomes
        // are stored after, and a write that failed for want of the store is retried.
        layer.drain().await;
        in_flight.idle().await;
    };
    match tokio::time::timeout(grace, drain).await {
        Ok(()) => Drained::Clean,
        Err(_) => Drained::TimedOut,
    }
}

/// How many requests of one connection are in progress (from the moment hyper hands one to the
/// service until its response body is sent or dropped), and since when none is. Requests only
/// touch two atomics; the connection's watchdog wakes once per timeout to look.
#[derive(Clone)]
struct Activity(Arc<ActivityState>);

struct ActivityState {
    busy: AtomicUsize,
    /// When the connection last went idle, in milliseconds since `opened`.
    idle_since: AtomicU64,
    opened: tokio::time::Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self(Arc::new(ActivityState {
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            opened: tokio::time::Instant::now(),
        }))
    }
}

impl Activity {
    /// Counts a request in progress until the guard is dropped.
    fn enter(&self) -> Busy {
        self.0.busy.fetch_add(1, Ordering::SeqCst);
        Busy(self.0.clone())
    }

    /// Resolves once no request has been in progress for `timeout` in a row.
    async fn idle_for(&self, timeout: Duration) {
        let state = &*self.0;
        let mut deadline = state.opened + timeout;
        loop {
            tokio::time::sleep_until(deadline).await;
            let now = tokio::time::Instant::now();
            if state.busy.load(Ordering::SeqCst) > 0 {
                deadline = now + timeout;
                continue;
            }
            let since = Duration::from_millis(state.idle_since.load(Ordering::SeqCst));
            let until = state.opened + since + timeout;
            if until <= now {
                return;
            }
            deadline = until;
        }
    }
}

/// A request in progress on its connection.
struct Busy(Arc<ActivityState>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            let since = self.0.opened.elapsed().as_millis();
            self.0
                .idle_since
                .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::SeqCst);
        }
    }
}

async fn handle(
    stack: Stack,
    req: Request<Incoming>,
    busy: Busy,
) -> Result<Response<impl http_body::Body<Data = Bytes, Error = BoxError> + Send>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    // Kept only when it will be logged.
    let path = tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().path().to_owned());
    let res = if has_dot_segment(req.uri().path()) {
        tracing::debug!("refused a request path with dot-segments");
        problem(
            StatusCode::BAD_REQUEST,
            "path-dot-segments",
            "Request path with dot-segments",
            "The request path holds a `.` or `..` segment (perhaps percent-encoded, or with a \
             backslash for a slash). It was not forwarded."
                .into(),
        )
        .map(IdempotencyBody::stream)
    } else {
        stack.oneshot(req).await?
    };
    let elapsed = started.elapsed();
    let status = res.status();
    request_duration(&method, status).record(elapsed.as_secs_f64());
    // The query is left out: it may carry an idempotency key.
    if let Some(path) = path {
        tracing::debug!(
            method = method_label(&method).1,
            path,
            status = status.as_u16(),
            replayed = res.headers().contains_key("idempotent-replayed"),
            elapsed_ms = elapsed.as_millis() as u64,
            "request"
        );
    }
    // The request stays in progress until its response body is sent or dropped.
    Ok(res.map(|body| WhileBusy { body, _busy: busy }))
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in progress until it is dropped.
    struct WhileBusy<B> {
        #[pin]
        body: B,
        _busy: Busy,
    }
}

impl<B: http_body::Body> http_body::Body for WhileBusy<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether `path` holds a `.` or `..` segment as a server behind the proxy may read it: with a
/// dot written `%2e`, a slash written `%2f`, a backslash (or `%5c`) read as a slash, and what
/// follows a `;` in a segment ignored (`/..;/`, which some servers read as `/../`). Such a path
/// could climb out of the upstream's prefix, or reach what a route in front of the proxy
/// meant to keep out.
pub(crate) fn has_dot_segment(path: &str) -> bool {
    // The common path has none of these, and costs no allocation.
    if !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return false;
    }
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .map(|hex| hex.to_ascii_lowercase());
        match escape.as_deref() {
            Some(b"2e") => {
                decoded.push(b'.');
                i += 3;
            }
            Some(b"2f" | b"5c") => {
                decoded.push(b'/');
                i += 3;
            }
            _ => {
                decoded.push(if bytes[i] == b'\\' { b'/' } else { bytes[i] });
                i += 1;
            }
        }
    }
    decoded.split(|&b| b == b'/').any(|segment| {
        let name = segment.split(|&b| b == b';').next().unwrap_or(segment);
        name == b"." || name == b".."
    })
}

/// The request-duration histogram for a method and status. Handles are kept per thread, so a
/// request costs no registry lookup and no label allocation once its kind has been seen; they
/// are found by a number made of the method's label and the status, with foldhash's quick
/// hasher rather than the map's default SipHash (half of the lookup's cost went to hashing).
fn request_duration(method: &Method, status: StatusCode) -> metrics::Histogram {
    type Handles = HashMap<u32, metrics::Histogram, foldhash::fast::FixedState>;
    thread_local! {
        static HANDLES: RefCell<Handles> = RefCell::new(Handles::default());
    }
    let (index, label) = method_label(method);
    let key = u32::from(index) << 16 | u32::from(status.as_u16());
    HANDLES.with_borrow_mut(|handles| {
        handles
            .entry(key)
            .or_insert_with(|| {
                let status = status.as_str().to_owned();
                metrics::histogram!(REQUEST_DURATION, "method" => label, "status" => status)
            })
            .clone()
    })
}

/// The method as a metric label, from a fixed set so that labels stay few, with its place in
/// that set.
fn method_label(m: &Method) -> (u8, &'static str) {
    match *m {
        Method::GET => (0, "GET"),
        Method::POST => (1, "POST"),
        Method::PUT => (2, "PUT"),
        Method::PATCH => (3, "PATCH"),
        Method::DELETE => (4, "DELETE"),
        Method::HEAD => (5, "HEAD"),
        Method::OPTIONS => (6, "OPTIONS"),
        _ => (7, "other"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_however_they_are_written() {
        for path in [
            "/..",
            "/.",
            "/../secret",
            "/a/../../x",
            "/a/./b",
            "/%2e%2e/x",
            "/%2E%2E/x",
            "/.%2e/x",
            "/%2e/x",
            "/..%2fx",
            "/..%2Fx",
            "/a%2f..%2fx",
            "/..\\x",
            "/a\\..\\x",
            "/..%5cx",
            "/..;/x",
            "/a/..;jsessionid=1/x",
            "/a/b/..",
        ] {
            assert!(has_dot_segment(path), "{path} has a dot-segment");
        }
        for path in [
            "/",
            "/orders",
            "/orders/1.2",
            "/.well-known/x",
            "/a..b",
            "/...",
            "/files/..x",
            "/%2e%2e%2e",
            "/100%25",
            "/a%2",
            "/%",
            "*",
        ] {
            assert!(!has_dot_segment(path), "{path} has no dot-segment");
        }
    }
}
