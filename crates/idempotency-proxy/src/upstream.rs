//! `--upstream`: the service requests go to, the URI each request takes there, and the client
//! that takes it.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;

use crate::cli::{UrlWords, plain_http_url};
use crate::proxy::BoxError;

/// `--upstream`: where requests go.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    /// The path prefix, without a trailing slash (empty for none).
    pub(crate) base_path: String,
}

impl Upstream {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let (uri, authority) = plain_http_url(
            s,
            &UrlWords {
                https: "https upstreams are not supported; point the proxy at the service's \
                        plain http:// address",
                example: "http://127.0.0.1:5000",
                credentials: "user names and passwords in the upstream URL are not supported",
                query: "the upstream URL must not carry a query",
            },
        )?;
        Ok(Self {
            scheme: Scheme::HTTP,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The request target to send upstream for a request's path and query: the origin form
    /// (`/path?query`), with the upstream's base path in front.
    pub(crate) fn uri_for(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let pq = match (self.base_path.is_empty(), uri.path_and_query()) {
            // The common case shares the request's bytes: no copy.
            (true, Some(pq)) => pq.clone(),
            (_, pq) => {
                let pq = pq.map_or("/", |pq| pq.as_str());
                http::uri::PathAndQuery::try_from(format!("{}{pq}", self.base_path))?
            }
        };
        Ok(Uri::from(pq))
    }
}

/// Why an upstream request failed.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// The request never left: no connection could be made, or the one made closed before any
    /// of the request was written.
    NotSent(BoxError),
    /// The connection failed with the request sent, or partly sent: it may have run.
    Failed(hyper::Error),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotSent(e) => e.fmt(f),
            Self::Failed(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::NotSent(e) => e.source(),
            Self::Failed(e) => e.source(),
        }
    }
}

/// The HTTP/1.1 client to the upstream and its pool of keep-alive connections. Each worker has
/// its own, so that its connections and their tasks stay on the worker's thread: the pool's
/// lock is never contended. Cheap to clone: clones share the pool.
///
/// A request takes the connection that went idle last (the warmest), or makes one. A connection
/// goes back to the pool once its response body has been read to the end; one whose body was
/// dropped half read is closed by hyper. A request that a pooled connection turned away before
/// writing any of it (the upstream had closed the connection while it sat idle) is sent on
/// another.
pub(crate) struct UpstreamClient<B> {
    inner: Arc<ClientInner<B>>,
}

impl<B> Clone for UpstreamClient<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct ClientInner<B> {
    connector: HttpConnector,
    /// What the connector connects to: `http://authority/`.
    target: Uri,
    /// The `Host` of every request: the upstream's authority.
    host: HeaderValue,
    http1: hyper::client::conn::http1::Builder,
    idle: Mutex<VecDeque<Idle<B>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct Idle<B> {
    tx: SendRequest<B>,
    since: Instant,
}

impl<B> UpstreamClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A client to `upstream` that gives up connecting after `connect_timeout`, and keeps at
    /// most `max_idle` connections idle. One idle longer than `idle_timeout` is closed when a
    /// connection is next put back (or sooner, by the upstream's own keep-alive timeout).
    pub(crate) fn new(
        upstream: &Upstream,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.set_connect_timeout(Some(connect_timeout));
        let target = Uri::builder()
            .scheme(upstream.scheme.clone())
            .authority(upstream.authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_default();
        let host = HeaderValue::from_str(upstream.authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            inner: Arc::new(ClientInner {
                connector,
                target,
                host,
                http1: {
                    let mut http1 = hyper::client::conn::http1::Builder::new();
                    // Head and body in one buffer, one write(2), as the server side does.
                    http1.writev(false);
                    http1
                },
                idle: Mutex::new(VecDeque::new()),
                max_idle,
                idle_timeout,
            }),
        }
    }

    /// The `Host` of every request to the upstream: its authority.
    pub(crate) fn host(&self) -> &HeaderValue {
        &self.inner.host
    }

    /// Sends `req` (its URI in origin form, its `Host` the upstream's, [`Self::host`]) and
    /// returns the response, whose body puts the connection back in the pool once read.
    pub(crate) async fn request(
        &self,
        mut req: Request<B>,
    ) -> Result<Response<PooledBody<B>>, UpstreamError> {
        loop {
            let (mut tx, reused) = match self.checkout() {
                Some(tx) => (tx, true),
                None => (self.connect().await?, false),
            };
            // A pooled connection may still be finishing its last response, or be closing.
            if let Err(e) = tx.ready().await {
                if reused {
                    continue;
                }
                return Err(UpstreamError::NotSent(e.into()));
            }
            match tx.try_send_request(req).await {
                Ok(res) => {
                    let pool = self.clone();
                    return Ok(res.map(|body| PooledBody {
                        body,
                        conn: Some((tx, pool)),
                        ended: false,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Turned away before any of it was written: the upstream never saw it.
                    Some(unsent) if reused => req = unsent,
                    Some(_) => return Err(UpstreamError::NotSent(e.into_error().into())),
                    None => return Err(UpstreamError::Failed(e.into_error())),
                },
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<B>, UpstreamError> {
        let io = self
            .inner
            .connector
            .clone()
            .call(self.inner.target.clone())
            .await
            .map_err(|e| UpstreamError::NotSent(e.into()))?;
        let (tx, conn) = self
            .inner
            .http1
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::NotSent(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }
}

impl<B> UpstreamClient<B> {
    /// The connection that went idle last, if one is still open.
    fn checkout(&self) -> Option<SendRequest<B>> {
        let mut idle = self.inner.idle.lock().ok()?;
        while let Some(conn) = idle.pop_back() {
            if !conn.tx.is_closed() {
                return Some(conn.tx);
            }
        }
        None
    }

    /// Puts back a connection whose response was read to the end.
    fn put(&self, tx: SendRequest<B>) {
        if tx.is_closed() {
            return;
        }
        let Ok(mut idle) = self.inner.idle.lock() else {
            return;
        };
        let now = Instant::now();
        // The oldest go first: those idle too long or closed, then any past the bound.
        while idle.front().is_some_and(|c| {
            c.tx.is_closed() || now.duration_since(c.since) > self.inner.idle_timeout
        }) {
            idle.pop_front();
        }
        if idle.len() >= self.inner.max_idle {
            idle.pop_front();
        }
        idle.push_back(Idle { tx, since: now });
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body that puts its connection back in the pool once read to the
    /// end.
    pub(crate) struct PooledBody<B> {
        #[pin]
        body: Incoming,
        conn: Option<(SendRequest<B>, UpstreamClient<B>)>,
        ended: bool,
    }

    impl<B> PinnedDrop for PooledBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // A body the server wrote out to its end without polling past it.
            if (*this.ended || this.body.is_end_stream())
                && let Some((tx, pool)) = this.conn.take()
            {
                pool.put(tx);
            }
        }
    }
}

impl<B> http_body::Body for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        if frame.is_none() {
            *this.ended = true;
            if let Some((tx, pool)) = this.conn.take() {
                pool.put(tx);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn upstreams() {
        let u = Upstream::parse("http://127.0.0.1:5000/api/").unwrap();
        assert_eq!(u.base_path, "/api");
        let to = u.uri_for(&"/orders?x=1".parse().unwrap()).unwrap();
        assert_eq!(to.to_string(), "/api/orders?x=1");
        let u = Upstream::parse("http://localhost:5000").unwrap();
        assert_eq!(u.authority, "localhost:5000");
        let to = u.uri_for(&"/".parse().unwrap()).unwrap();
        assert_eq!(to.to_string(), "/");
        assert!(Upstream::parse("localhost:5000").is_err());
        assert!(Upstream::parse("https://example.com").is_err());
        assert!(Upstream::parse("http://").is_err());
        assert!(Upstream::parse("http://h:1/?q=1").is_err());
        assert!(Upstream::parse("not a url").is_err());
    }
}
