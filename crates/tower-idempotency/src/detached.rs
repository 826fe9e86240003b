//! The lease owner's future, which outlives its caller: a caller that goes away, or stops
//! waiting at its caller timeout, never cancels the handler or the write of its outcome.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span};

use crate::body::IdempotencyResponse;
use crate::metrics::{Event, count};
use crate::owner::Owned;
use crate::problem::Problem;

/// The lease owner's future, run to completion even when its caller drops it: dropped
/// unfinished, it moves to a task of its own on the current tokio runtime, tracked by the
/// layer's background work. Unlike spawning up front, the common case (the caller waits) costs
/// no task, no channel and no cross-thread wake-up.
pub(crate) struct Detached<T: Send + 'static> {
    future: Option<Pin<Box<dyn Future<Output = Owned<T>> + Send>>>,
    background: TaskTracker,
    /// The request's span, entered for each poll, wherever the future runs.
    span: Span,
}

impl<T: Send + 'static> Detached<T> {
    pub(crate) fn new(
        background: TaskTracker,
        span: Span,
        future: impl Future<Output = Owned<T>> + Send + 'static,
    ) -> Self {
        Self {
            future: Some(Box::pin(future)),
            background,
            span,
        }
    }
}

impl<T: Send + 'static> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // Taken out while it is polled: a poll that panics drops it, so `Drop` never moves a
        // panicked future to a task of its own.
        let Some(mut future) = self.future.take() else {
            return Poll::Pending;
        };
        let polled = {
            let _entered = self.span.enter();
            future.as_mut().poll(cx)
        };
        match polled {
            Poll::Ready(out) => Poll::Ready(out.answer),
            Poll::Pending => {
                self.future = Some(future);
                Poll::Pending
            }
        }
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                // The caller is gone; the outcome is stored all the same.
                let span = std::mem::replace(&mut self.span, Span::none());
                let rest = self.background.track_future(
                    async move {
                        if future.await.stored {
                            count(Event::LateAnswerStored);
                        }
                    }
                    .instrument(span),
                );
                drop(runtime.spawn(rest));
            }
            Err(_) => tracing::warn!(
                "a tracked request was dropped outside a tokio runtime; its lease will expire"
            ),
        }
    }
}

/// Waits at most `limit` for the owner's answer. Past it the caller gets 504 `still-running`,
/// and the owner, dropped unfinished, runs on in a task of its own and stores its outcome.
pub(crate) async fn answer_within<B, E: Send + 'static>(
    owner: Detached<Result<IdempotencyResponse<B>, E>>,
    limit: Duration,
    retry_after: Duration,
) -> Result<IdempotencyResponse<B>, E>
where
    B: Send + 'static,
{
    match tokio::time::timeout(limit, owner).await {
        Ok(answer) => answer,
        Err(_) => {
            tracing::info!(
                ?limit,
                "the handler did not answer within the caller timeout; it runs on and its outcome will be stored"
            );
            Ok(Problem::StillRunning {
                waited: limit,
                retry_after,
            }
            .respond())
        }
    }
}
