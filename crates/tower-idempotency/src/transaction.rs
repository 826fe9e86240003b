//! Requests whose handler took its transaction from the layer ([`Completion`]), on a store
//! that keeps records in the application's database: ending that transaction after the
//! handler. The owner of a tracked request writes its record through it (in `owner`); here are
//! the requests that pass through untracked, and the rules both share.

use http::{Request, Response};
use tower::Service;

use crate::body::{IdempotencyBody, IdempotencyResponse};
use crate::extensions::{NotRun, OutcomeUnknown};
use crate::metrics::{Event, count};
use crate::problem::Problem;
use crate::shared::Shared;
use crate::storage_key::StorageKey;
use crate::store::Completion;

/// Puts a [`Completion`] in `req` when the store joins the handler's transactions, and returns
/// it to look at after the handler.
pub(crate) fn offer<B>(shared: &Shared, req: &mut Request<B>, tracked: bool) -> Option<Completion> {
    let source = shared.transactions.clone()?;
    let completion = Completion::new(source, tracked);
    req.extensions_mut().insert(completion.clone());
    Some(completion)
}

/// Whether a response's transaction commits: when its status would be stored and the inner
/// service did not say the request did not run or that its outcome is unknown.
pub(crate) fn commits<B>(shared: &Shared, res: &Response<B>) -> bool {
    (shared.config.storable)(res.status())
        && res.extensions().get::<NotRun>().is_none()
        && res.extensions().get::<OutcomeUnknown>().is_none()
}

/// The answer when the handler's transaction could not commit: nothing was kept, and the
/// caller may retry.
pub(crate) fn commit_failed<B>(
    shared: &Shared,
    key: Option<&StorageKey>,
    e: &dyn std::fmt::Display,
) -> IdempotencyResponse<B> {
    count(Event::StoreError);
    tracing::warn!(?key, error = %e, "the handler's transaction did not commit; nothing was kept");
    Problem::StoreUnavailable {
        retry_after: shared.config.retry_after,
    }
    .respond()
}

/// Runs a request that passes through untracked. When its handler took a transaction, the
/// transaction commits after it if the response's status would have been stored, and rolls
/// back otherwise, so a handler is written once for requests with and without a key.
pub(crate) async fn untracked<S, ReqBody, ResBody>(
    shared: &Shared,
    mut inner: S,
    mut req: Request<IdempotencyBody<ReqBody>>,
) -> Result<IdempotencyResponse<ResBody>, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
{
    let completion = offer(shared, &mut req, false);
    let res = inner.call(req).await;
    let Some(completer) = completion.as_ref().and_then(Completion::take) else {
        return res.map(|res| res.map(IdempotencyBody::stream));
    };
    match res {
        Ok(res) if commits(shared, &res) => match completer.commit().await {
            Ok(()) => Ok(res.map(IdempotencyBody::stream)),
            Err(e) => Ok(commit_failed(shared, None, &e)),
        },
        Ok(res) => {
            completer.roll_back().await;
            Ok(res.map(IdempotencyBody::stream))
        }
        Err(e) => {
            completer.roll_back().await;
            Err(e)
        }
    }
}
