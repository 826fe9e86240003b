//! The inner service: forwards a request to the upstream over a pooled keep-alive client.
//!
//! The idempotency layer sits in front of it. Requests it does not track reach this service
//! with their body still streaming, and their responses stream back as they come; tracked ones
//! arrive buffered, and the layer buffers their responses within its limits.
//!
//! A tracked request (marked [`Tracked`] by the layer) has until the upstream deadline to be
//! answered, head and body, since the layer keeps it running after its caller stops waiting.
//! When that deadline passes, or the upstream connection breaks after the request was sent,
//! nobody can know whether the upstream acted: the answer carries [`OutcomeUnknown`], so the
//! layer never sends the request again for its key. A connection that could not be made at
//! all proves the request never arrived: that 502 releases the key.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{EXPECT, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::Notify;
use tower::Service;
use tower_idempotency::{
    IdempotencyBody, NotRun, OutcomeUnknown, Problem, ProblemDetails, Tracked, strip_hop_by_hop,
};

use crate::upstream::{PooledBody, Upstream, UpstreamClient, UpstreamError};

/// The error type of response bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body the upstream client sends: the caller's, as the layer hands it on.
type UpstreamReqBody = IdempotencyBody<Incoming>;

/// The caller's end of a connection, as the forwarding headers name it: made once per
/// connection, so that a request copies these values instead of formatting them.
#[derive(Debug)]
pub(crate) struct ClientAddr {
    /// The caller's IP address, for `X-Forwarded-For` and `X-Real-IP`.
    ip: HeaderValue,
    /// This hop's `for=` parameter of `Forwarded`.
    forwarded_for: String,
    /// The `Forwarded` element of the connection's last request, and the `Host` it was made
    /// for: the requests of a connection name one host, so it is made once.
    forwarded: Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl ClientAddr {
    pub(crate) fn new(peer: SocketAddr) -> Self {
        let ip = peer.ip().to_string();
        let forwarded_for = match peer.ip() {
            std::net::IpAddr::V4(_) => format!("for={ip}"),
            // An IPv6 address is bracketed and quoted (RFC 7239 section 6).
            std::net::IpAddr::V6(_) => format!("for=\"[{ip}]\""),
        };
        Self {
            // An address is always a valid header value.
            ip: HeaderValue::try_from(ip).unwrap_or(HeaderValue::from_static("unknown")),
            forwarded_for,
            forwarded: Mutex::new(None),
        }
    }
}

/// What the proxy answers with: the upstream's body as it streams, or a document of its own.
/// An enum rather than a boxed body: an untracked response costs no allocation and no dynamic
/// call per frame.
pub(crate) enum ProxyBody {
    /// An untracked response's body, streamed.
    Upstream {
        body: PooledBody<UpstreamReqBody>,
        /// Lives as long as the body, so a shutdown waits for it to be read.
        _guard: InFlightGuard,
    },
    /// A tracked response's body, which the layer reads in full by the upstream deadline.
    Tracked {
        body: Pin<Box<Deadline<PooledBody<UpstreamReqBody>>>>,
        _guard: InFlightGuard,
    },
    /// The proxy's own answer.
    Full(Full<Bytes>),
}

impl http_body::Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Upstream { body, .. } => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Tracked { body, .. } => body.as_mut().poll_frame(cx),
            Self::Full(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream { body, .. } => body.is_end_stream(),
            Self::Tracked { body, .. } => body.is_end_stream(),
            Self::Full(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Upstream { body, .. } => body.size_hint(),
            Self::Tracked { body, .. } => body.size_hint(),
            Self::Full(body) => body.size_hint(),
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Histogram of the time until the upstream answered (or failed), by outcome.
pub(crate) const UPSTREAM_DURATION: &str = "idempotency_proxy_upstream_duration_seconds";

/// Counts requests still being worked on, including response bodies still being read, so a
/// shutdown can wait for upstream calls whose caller went away.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    /// Returns once no request is in flight.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub(crate) struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Forwards requests to the upstream. Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub(crate) struct Proxy {
    inner: Arc<Inner>,
    /// The caller, for the forwarding headers: set for each connection.
    client: Option<Arc<ClientAddr>>,
}

struct Inner {
    client: UpstreamClient<UpstreamReqBody>,
    upstream: Upstream,
    /// How long an untracked request waits for its response head.
    timeout: Duration,
    /// How long a tracked request may take, head and body.
    deadline: Duration,
    in_flight: Arc<InFlight>,
    /// Whether the forwarding headers clients send come from proxies of the operator's.
    trust_forwarded: bool,
}

impl Proxy {
    /// A proxy to `upstream` that waits at most `timeout` for the response head of an untracked
    /// request, and at most `deadline` for the whole response to a tracked one. With
    /// `trust_forwarded`, the forwarding headers clients send are kept and appended to;
    /// without, they are written anew.
    pub(crate) fn new(
        upstream: Upstream,
        timeout: Duration,
        deadline: Duration,
        in_flight: Arc<InFlight>,
        trust_forwarded: bool,
    ) -> Self {
        let client = UpstreamClient::new(&upstream, timeout, 64, Duration::from_secs(60));
        Self {
            inner: Arc::new(Inner {
                client,
                upstream,
                timeout,
                deadline,
                in_flight,
                trust_forwarded,
            }),
            client: None,
        }
    }

    /// This proxy for the requests of one connection, from `client`.
    pub(crate) fn set_client(&mut self, client: Arc<ClientAddr>) {
        self.client = Some(client);
    }
}

impl Service<Request<UpstreamReqBody>> for Proxy {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<UpstreamReqBody>) -> Self::Future {
        let inner = self.inner.clone();
        let client = self.client.clone();
        Box::pin(async move { Ok(inner.forward(req, client.as_deref()).await) })
    }
}

impl Inner {
    async fn forward(
        &self,
        req: Request<UpstreamReqBody>,
        client: Option<&ClientAddr>,
    ) -> Response<ProxyBody> {
        let guard = self.in_flight.enter();
        let mut req = req;
        let uri = match self.upstream.uri_for(req.uri()) {
            Ok(uri) => uri,
            Err(e) => {
                tracing::debug!(error = %e, "request target cannot be forwarded");
                return problem(
                    StatusCode::BAD_REQUEST,
                    "bad-request-target",
                    "Bad request target",
                    "The request target cannot be forwarded.".into(),
                );
            }
        };
        // The request is changed where it is, not taken apart and put together again: each of
        // those moves its head.
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        // `Host` and the forwarding headers, six at most, go in with the map grown once.
        headers.reserve(6);
        // The upstream's own `Host` takes the caller's place.
        let host = headers
            .insert(HOST, self.client.host().clone())
            .or_else(|| {
                req.uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            });
        forwarding_headers(req.headers_mut(), client, host, self.trust_forwarded);
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;

        let tracked = req.extensions().get::<Tracked>().is_some();
        let limit = if tracked { self.deadline } else { self.timeout };
        let started = Instant::now();
        let outcome = tokio::time::timeout(limit, self.client.request(req)).await;
        let elapsed = started.elapsed().as_secs_f64();
        match outcome {
            Ok(Ok(res)) => {
                upstream_duration(Outcome::Response).record(elapsed);
                let (mut parts, body) = res.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // The caller's connection has its own version; hyper frames the answer for it.
                parts.version = Version::default();
                let body = if tracked {
                    // The layer reads a tracked body in full: the deadline covers it too.
                    let at = tokio::time::Instant::from_std(started) + self.deadline;
                    ProxyBody::Tracked {
                        body: Box::pin(Deadline::new(body, at)),
                        _guard: guard,
                    }
                } else {
                    ProxyBody::Upstream {
                        body,
                        _guard: guard,
                    }
                };
                Response::from_parts(parts, body)
            }
            Ok(Err(UpstreamError::NotSent(e))) => {
                upstream_duration(Outcome::Error).record(elapsed);
                tracing::warn!(
                    upstream = %self.upstream,
                    error = %error_chain(&*e),
                    "could not connect to the upstream"
                );
                let mut res = problem(
                    StatusCode::BAD_GATEWAY,
                    "upstream-unavailable",
                    "Upstream unavailable",
                    "The proxy could not connect to the upstream service, so the request never \
                     reached it. It was not stored and may be retried with the same key."
                        .into(),
                );
                // Never stored, whatever --release-status says: the request did not run.
                res.extensions_mut().insert(NotRun);
                res
            }
            Ok(Err(UpstreamError::Failed(e))) => {
                upstream_duration(Outcome::Error).record(elapsed);
                tracing::warn!(
                    upstream = %self.upstream,
                    error = %error_chain(&e),
                    tracked,
                    "the upstream connection failed after the request was sent; its outcome is unknown"
                );
                outcome_unknown(
                    tracked,
                    "The upstream connection broke after the request was sent, before an \
                     answer came: the request may have run.",
                )
            }
            Err(_) if tracked => {
                upstream_duration(Outcome::Timeout).record(elapsed);
                tracing::warn!(
                    upstream = %self.upstream,
                    deadline = ?self.deadline,
                    "the upstream did not answer a keyed request by its deadline; its outcome is unknown"
                );
                outcome_unknown(
                    tracked,
                    "The upstream did not answer by its deadline: the request may have run.",
                )
            }
            Err(_) => {
                upstream_duration(Outcome::Timeout).record(elapsed);
                tracing::warn!(
                    upstream = %self.upstream,
                    timeout = ?self.timeout,
                    "upstream did not answer in time"
                );
                problem(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    "Upstream timed out",
                    format!(
                        "The upstream service did not answer within {}. The request carried no \
                         idempotency key and was cancelled.",
                        humantime::format_duration(self.timeout)
                    ),
                )
            }
        }
    }
}

/// How an upstream call ended, as the `outcome` label.
#[derive(Clone, Copy)]
enum Outcome {
    Response,
    Error,
    Timeout,
}

/// The upstream-duration histogram for an outcome, its handle kept per thread so that a request
/// costs no registry lookup.
fn upstream_duration(outcome: Outcome) -> metrics::Histogram {
    thread_local! {
        static HANDLES: [metrics::Histogram; 3] = [
            metrics::histogram!(UPSTREAM_DURATION, "outcome" => "response"),
            metrics::histogram!(UPSTREAM_DURATION, "outcome" => "error"),
            metrics::histogram!(UPSTREAM_DURATION, "outcome" => "timeout"),
        ];
    }
    HANDLES.with(|h| h[outcome as usize].clone())
}

/// Writes the forwarding headers for this hop: `Forwarded` (RFC 7239), `X-Forwarded-For`,
/// `X-Forwarded-Proto`, `X-Forwarded-Host` and `X-Real-IP`.
///
/// Without `trust`, whatever the client sent under those names, and under any other
/// `X-Forwarded-*`, is dropped and written anew from the connection: the caller's address, the
/// `Host` it asked for, and `http`. With `trust`, the client is a proxy of the operator's: this
/// hop is appended to `Forwarded` and `X-Forwarded-For`, and the other headers it sent are kept
/// (an `X-Forwarded-Proto: https` from a front proxy that terminated TLS stays `https`), filled
/// in from the connection only where it sent none. `Expect` is removed either way: the proxy
/// answers `100-continue` itself.
fn forwarding_headers(
    headers: &mut HeaderMap,
    peer: Option<&ClientAddr>,
    host: Option<HeaderValue>,
    trust: bool,
) {
    if trust {
        headers.remove(EXPECT);
    } else {
        // One pass over the names finds what the client sent under the forwarding names, and
        // `Expect`: the proxy answers `100-continue` itself.
        let forged: Vec<HeaderName> = headers
            .keys()
            .filter(|name| {
                *name == EXPECT
                    || *name == http::header::FORWARDED
                    || *name == X_REAL_IP
                    || name.as_str().starts_with("x-forwarded-")
            })
            .cloned()
            .collect();
        for name in forged {
            headers.remove(name);
        }
    }
    if let Some(element) = forwarded_element(peer, host.as_ref()) {
        if trust {
            // The elements of earlier hops and then this one, as one list.
            let mut list: Vec<&[u8]> = headers
                .get_all(http::header::FORWARDED)
                .iter()
                .map(HeaderValue::as_bytes)
                .filter(|v| !v.is_empty())
                .collect();
            list.push(element.as_bytes());
            match HeaderValue::from_bytes(&list.join(&b", "[..])) {
                Ok(v) => {
                    headers.insert(http::header::FORWARDED, v);
                }
                Err(_) => {
                    headers.insert(http::header::FORWARDED, element);
                }
            }
        } else {
            headers.insert(http::header::FORWARDED, element);
        }
    }
    if let Some(peer) = peer {
        if trust {
            append_forwarded_for(headers, peer);
        } else {
            headers.insert(X_FORWARDED_FOR.clone(), peer.ip.clone());
        }
        if !trust || !headers.contains_key(&X_REAL_IP) {
            headers.insert(X_REAL_IP.clone(), peer.ip.clone());
        }
    }
    if !trust || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if let Some(host) = host
        && (!trust || !headers.contains_key(&X_FORWARDED_HOST))
    {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
}

/// This hop's `Forwarded` element: `for=` the caller, `host=` the `Host` it asked for (left out
/// if it cannot be quoted), `proto=http`.
fn forwarded_element(peer: Option<&ClientAddr>, host: Option<&HeaderValue>) -> Option<HeaderValue> {
    let (Some(peer), Some(host)) = (peer, host) else {
        return make_forwarded_element(peer, host);
    };
    let mut last = peer
        .forwarded
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some((for_host, element)) = &*last
        && for_host == host
    {
        return Some(element.clone());
    }
    let element = make_forwarded_element(Some(peer), Some(host))?;
    *last = Some((host.clone(), element.clone()));
    Some(element)
}

/// Builds the element [`forwarded_element`] hands out.
fn make_forwarded_element(
    peer: Option<&ClientAddr>,
    host: Option<&HeaderValue>,
) -> Option<HeaderValue> {
    let host = host.map(HeaderValue::as_bytes).filter(|h| {
        h.iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    });
    let mut element = Vec::with_capacity(64);
    if let Some(peer) = peer {
        element.extend_from_slice(peer.forwarded_for.as_bytes());
        element.push(b';');
    }
    if let Some(host) = host {
        element.extend_from_slice(b"host=\"");
        element.extend_from_slice(host);
        element.extend_from_slice(b"\";");
    }
    element.extend_from_slice(b"proto=http");
    HeaderValue::from_maybe_shared(Bytes::from(element)).ok()
}

/// Appends the caller's address to `X-Forwarded-For`, keeping the addresses already there.
fn append_forwarded_for(headers: &mut HeaderMap, peer: &ClientAddr) {
    let previous: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if previous.is_empty() {
        headers.insert(X_FORWARDED_FOR.clone(), peer.ip.clone());
        return;
    }
    let value = format!(
        "{}, {}",
        previous.join(", "),
        peer.ip.to_str().unwrap_or_default()
    );
    // From the String itself: no second copy.
    match HeaderValue::try_from(value) {
        Ok(v) => {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        Err(_) => {
            headers.remove(&X_FORWARDED_FOR);
        }
    }
}

/// The answer to a request that may have reached the upstream without an answer coming back.
/// A tracked one gets the layer's `outcome-unknown` problem, marked so that the layer stores
/// it as such (duplicates get the same problem, and the request never runs again for its key);
/// an untracked one gets `detail`.
fn outcome_unknown(tracked: bool, detail: &str) -> Response<ProxyBody> {
    if !tracked {
        return problem(
            StatusCode::BAD_GATEWAY,
            "upstream-failed",
            "Upstream failed",
            format!("{detail} Nothing was stored."),
        );
    }
    let mut res = full(Problem::OutcomeUnknown.to_response());
    res.extensions_mut().insert(OutcomeUnknown);
    res
}

pin_project_lite::pin_project! {
    /// A response body that fails once `at` has passed: a tracked response, which the layer
    /// reads in full, cannot keep its lease forever by stalling.
    pub(crate) struct Deadline<B> {
        #[pin]
        body: B,
        #[pin]
        at: tokio::time::Sleep,
    }
}

impl<B> Deadline<B> {
    fn new(body: B, at: tokio::time::Instant) -> Self {
        Self {
            body,
            at: tokio::time::sleep_until(at),
        }
    }
}

impl<B> http_body::Body for Deadline<B>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.at.poll(cx) {
            Poll::Ready(()) => {
                tracing::warn!("the upstream deadline passed while a keyed response was read");
                Poll::Ready(Some(Err(
                    "the upstream deadline passed while the response body was read".into(),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// An `application/problem+json` answer (RFC 9457) made by the proxy itself, of type
/// `urn:idempotency-proxy:problem:{slug}`. It speaks of one request now: no cache keeps it.
pub(crate) fn problem(
    status: StatusCode,
    slug: &str,
    title: &'static str,
    detail: String,
) -> Response<ProxyBody> {
    let problem = ProblemDetails::new(
        status,
        format!("urn:idempotency-proxy:problem:{slug}"),
        title,
    )
    .with_detail(detail)
    .with_no_store();
    full(problem.to_response())
}

/// A response whose whole body is at hand, as the proxy answers.
fn full(res: Response<Bytes>) -> Response<ProxyBody> {
    res.map(|body| ProxyBody::Full(Full::new(body)))
}

/// An error and its sources, as one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_appends() {
        let peer = ClientAddr::new("10.0.0.9:1234".parse().unwrap());
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("2.2.2.2, 3.3.3.3"),
        );
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9");
        let v6 = ClientAddr::new("[::1]:80".parse().unwrap());
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &v6);
        assert_eq!(h[&X_FORWARDED_FOR], "::1");
    }

    #[test]
    fn forwarded_elements_quote_what_they_must() {
        let host = HeaderValue::from_static("shop.example:8080");
        let v4 = ClientAddr::new("10.0.0.9:1234".parse().unwrap());
        let e = forwarded_element(Some(&v4), Some(&host)).unwrap();
        assert_eq!(e, "for=10.0.0.9;host=\"shop.example:8080\";proto=http");
        let v6 = ClientAddr::new("[2001:db8::1]:80".parse().unwrap());
        let e = forwarded_element(Some(&v6), None).unwrap();
        assert_eq!(e, "for=\"[2001:db8::1]\";proto=http");
        let odd = HeaderValue::from_static("a\"b");
        let e = forwarded_element(None, Some(&odd)).unwrap();
        assert_eq!(e, "proto=http");
    }

    #[test]
    fn a_connections_forwarded_element_follows_the_host_each_request_names() {
        let peer = ClientAddr::new("10.0.0.9:1234".parse().unwrap());
        let a = HeaderValue::from_static("a.example");
        let b = HeaderValue::from_static("b.example");
        let odd = HeaderValue::from_static("a\"b");
        for (host, want) in [
            (&a, "for=10.0.0.9;host=\"a.example\";proto=http"),
            (&a, "for=10.0.0.9;host=\"a.example\";proto=http"),
            (&b, "for=10.0.0.9;host=\"b.example\";proto=http"),
            (&odd, "for=10.0.0.9;proto=http"),
            (&a, "for=10.0.0.9;host=\"a.example\";proto=http"),
        ] {
            assert_eq!(forwarded_element(Some(&peer), Some(host)).unwrap(), want);
        }
        assert_eq!(
            forwarded_element(Some(&peer), None).unwrap(),
            "for=10.0.0.9;proto=http"
        );
    }
}
