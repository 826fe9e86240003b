//! [`ResponseFuture`]: the future of [`Idempotency`](crate::Idempotency).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tracing::Span;

use crate::body::IdempotencyBody;

/// The boxed future of a tracked request.
type TrackedFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<IdempotencyBody<B>>, E>> + Send + 'static>>;

pin_project! {
    /// The response future of [`Idempotency`](crate::Idempotency).
    ///
    /// Requests that are not tracked (other methods, no key) cost no allocation: they poll the
    /// inner service's future in place.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Inner { #[pin] future: F },
        Ready { response: Option<Response<IdempotencyBody<B>>> },
        // The span is entered for each poll here, rather than by an `Instrumented` around the
        // future, which would move the whole future once more on its way into its box.
        Tracked { future: TrackedFuture<B, E>, span: Span },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    pub(crate) fn ready(response: Response<IdempotencyBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    /// A boxed future, polled in `span` (disabled, and free, unless a subscriber wants it).
    pub(crate) fn tracked(future: TrackedFuture<B, E>, span: Span) -> Self {
        Self {
            kind: Kind::Tracked { future, span },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<IdempotencyBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => {
                let res = ready!(future.poll(cx))?;
                Poll::Ready(Ok(res.map(IdempotencyBody::stream)))
            }
            KindProj::Ready { response } => match response.take() {
                Some(res) => Poll::Ready(Ok(res)),
                None => panic!("ResponseFuture polled after completion"),
            },
            KindProj::Tracked { future, span } => {
                let _entered = span.enter();
                future.as_mut().poll(cx)
            }
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
