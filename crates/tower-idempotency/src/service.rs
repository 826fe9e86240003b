//! [`Idempotency`]: the service, which tells a tracked request from one that passes through.
//!
//! A tracked request goes on in `tracked`: its body is read, its key and fingerprint found, and
//! it takes the lease or waits; its owner runs the handler in `owner`, and a duplicate replays
//! the record in `replay`.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower::{BoxError, Service};
use tracing::Span;

use crate::body::{IdempotencyBody, IdempotencyResponse};
use crate::extract;
use crate::future::ResponseFuture;
use crate::key::KeyError;
use crate::problem::bad_key;
use crate::shared::Shared;
use crate::store::Store;
use crate::trace::{Outcome, RequestTrace, request_span};
use crate::tracked::tracked;
use crate::transaction;

/// The service made by [`IdempotencyLayer`](crate::IdempotencyLayer): it runs each covered
/// request that carries a key once, and replays its response to every duplicate.
///
/// [`Idempotency::new`] wraps a service with the default options; the layer's builder methods
/// choose the others.
#[derive(Clone, Debug)]
pub struct Idempotency<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Idempotency<S> {
    /// Wraps `inner`, keeping its records in `store`, with the default options.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use tower::{ServiceExt, service_fn};
    /// use tower_idempotency::{Idempotency, IdempotencyBody, MemoryStore};
    ///
    /// async fn create_order(
    ///     _req: Request<IdempotencyBody<String>>,
    /// ) -> Result<Response<String>, Infallible> {
    ///     Ok(Response::new("order 1".to_owned()))
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let service = Idempotency::new(service_fn(create_order), MemoryStore::default());
    /// let order = || {
    ///     Request::post("/orders")
    ///         .header("idempotency-key", "order-1")
    ///         .body(String::new())
    ///         .unwrap()
    /// };
    /// let first = service.clone().oneshot(order()).await.unwrap();
    /// assert!(first.headers().get("idempotent-replayed").is_none());
    /// let again = service.oneshot(order()).await.unwrap();
    /// assert_eq!(again.headers()["idempotent-replayed"], "true");
    /// # }
    /// ```
    pub fn new(inner: S, store: impl Store) -> Self {
        Self::from_shared(inner, Arc::new(Shared::new(Arc::new(store))))
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, to change.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, this one taken apart.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Idempotency<S> {
    /// Passes a request through untracked: straight to the inner service, unless the store
    /// joins the handler's transactions, which then end after it.
    fn untracked<ReqBody, ResBody>(
        &mut self,
        req: Request<ReqBody>,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        ReqBody: Body<Data = Bytes> + Send + 'static,
        ResBody: Body<Data = Bytes> + Send + 'static,
    {
        let req = req.map(IdempotencyBody::stream);
        if self.shared.transactions.is_none() {
            return ResponseFuture::inner(self.inner.call(req));
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let future = Box::pin(async move { transaction::untracked(&shared, inner, req).await });
        ResponseFuture::tracked(future, Span::none())
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = IdempotencyResponse<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        if !config.methods.contains(req.method()) {
            return self.untracked(req);
        }
        let (head_key, form) =
            match extract::from_head(req.headers(), req.uri().query(), &config.key_sources) {
                Ok(head) => head,
                Err(e) => return ResponseFuture::ready(rejected(req.method(), bad_key(e))),
            };
        if head_key.is_none() && form.is_none() {
            if config.require_key {
                return ResponseFuture::ready(rejected(req.method(), bad_key(KeyError::Missing)));
            }
            return self.untracked(req);
        }
        // The service that was made ready is the one that runs the request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        // Disabled (and free) unless a subscriber asks for it.
        let span = request_span(req.method());
        let trace = RequestTrace::new(span.clone());
        let shared = self.shared.clone();
        let future = tracked(shared, inner, req, head_key, form, trace);
        ResponseFuture::tracked(Box::pin(future), span)
    }
}

/// `res`, the answer to a request refused before it is tracked (its key header is bad, or a
/// required key is missing), told to its trace as a tracked request's would be: a span whose
/// outcome is `rejected`, and its line.
fn rejected<B>(method: &http::Method, res: Response<B>) -> Response<B> {
    let span = request_span(method);
    let _entered = span.enter();
    RequestTrace::new(span.clone()).answer(Outcome::Rejected, res)
}
