//! The path of a tracked request up to its outcome: read the body, find the key, the storage
//! key and the fingerprint, then take the lease or wait for the request in flight, until the
//! request is run by its owner, replayed, or refused.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError};
use tokio::time::Instant;
use tower::{BoxError, Service};

use crate::body::{Collect, IdempotencyBody, IdempotencyResponse};
use crate::config::{MAX_DURATION, OnConflict};
use crate::detached::{Detached, answer_within};
use crate::extensions::Tracked;
use crate::extract::{self, FORM_FIELD, FormKind};
use crate::fingerprint::{
    Fingerprint, MULTIPART_FORM_DATA, canonical_multipart, is_multipart, query_without_key,
};
use crate::headers::prefer_wait;
use crate::key::{IdempotencyKey, KeyError};
use crate::lease::Lease;
use crate::metrics::{Event, Verb, count};
use crate::owner;
use crate::problem::{Problem, bad_key};
use crate::replay::{corrupt_record, replay};
use crate::shared::Shared;
use crate::storage_key::StorageKey;
use crate::store::{BeginOutcome, StoreError};
use crate::trace::{Outcome, RequestTrace, store_call};
use crate::transaction;

/// A covered request that names a key in its head (`head_key`) or may name one in its form
/// body (`form`), from its body to its answer, told to `trace` (whose span this future runs
/// in).
pub(crate) async fn tracked<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    inner: S,
    req: Request<ReqBody>,
    head_key: Option<IdempotencyKey>,
    form: Option<FormKind>,
    mut trace: RequestTrace,
) -> Result<IdempotencyResponse<ResBody>, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    // Paths off the common one (forms, failures, untracked) are boxed where they are taken, so
    // this future stays small: it is moved into its box on every tracked request.
    let config = &shared.config;
    let (parts, body) = req.into_parts();
    // A form is read to look for its key, so a covered form body is held to the same limit as
    // a tracked one: a key past the limit must not let a large duplicate run again.
    let body = read_request_body(
        body,
        &parts.headers,
        config.max_request_body,
        config.request_body_timeout,
    )
    .await;
    let body = match body {
        Ok(body) => body,
        Err(p) => return Ok(trace.answer(Outcome::Rejected, p.respond())),
    };
    let key = match &form {
        Some(kind) => Box::pin(extract::with_form_body(head_key, kind, &body)).await,
        None => Ok(head_key),
    };
    let key = match key {
        Ok(Some(key)) => key,
        Ok(None) if config.require_key => {
            return Ok(trace.answer(Outcome::Rejected, bad_key(KeyError::Missing)));
        }
        Ok(None) => {
            let res = Box::pin(untracked(&shared, inner, parts, body)).await;
            return trace.answered(Outcome::Untracked, res);
        }
        Err(e) => return Ok(trace.answer(Outcome::Rejected, bad_key(e))),
    };

    let storage_key = {
        // An unknown scope is refused, never taken for the global one.
        let scope = config.scope.scope(&parts);
        match scope.storage() {
            Some(scope) => StorageKey::derive(
                config.key_secret.as_ref(),
                &config.namespace,
                scope,
                key.as_str().as_bytes(),
            ),
            None => return Ok(trace.answer(Outcome::ScopeUnavailable, scope_unavailable(&parts))),
        }
    };
    trace.key(storage_key);
    let query = query_without_key(parts.uri.query().unwrap_or(""), FORM_FIELD);
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .map_or(&[][..], |v| v.as_bytes());
    let canonical = if is_multipart(content_type) {
        match Box::pin(canonical_multipart(content_type, &body)).await {
            Some(fields) => Some(fields),
            // A key may hide past the damage, and the body cannot be fingerprinted as a form:
            // its raw bytes under a multipart content type (one without a boundary) could pass
            // for another request's fields.
            None => return Ok(trace.answer(Outcome::Rejected, Problem::MalformedForm.respond())),
        }
    } else {
        None
    };
    let (content_type, fingerprinted_body) = match &canonical {
        Some(fields) => (MULTIPART_FORM_DATA, &fields[..]),
        None => (content_type, &body[..]),
    };
    let fingerprint = Fingerprint::compute_with_headers(
        parts.method.as_str().as_bytes(),
        parts.uri.path().as_bytes(),
        query.as_bytes(),
        content_type,
        &parts.headers,
        &config.fingerprint_headers,
        fingerprinted_body,
    );

    let budget = match config.on_conflict {
        OnConflict::Reject => Duration::ZERO,
        OnConflict::Wait => {
            prefer_wait(&parts.headers).map_or(config.wait_timeout, |w| w.min(config.wait_timeout))
        }
    };
    // A wait timeout too large to add to the clock (Duration::MAX) waits "forever" at most.
    let deadline = Instant::now() + budget.min(MAX_DURATION);
    loop {
        // Checked before the store is asked for anything: a request refused here takes nothing.
        let place = match &config.in_flight {
            None => None,
            Some(limit) => match limit.permits.clone().try_acquire_owned() {
                Ok(place) => Some(place),
                Err(_) => {
                    count(Event::Overloaded);
                    let retry_after = config.retry_after;
                    let res = Problem::Overloaded { retry_after }.respond();
                    return Ok(trace.answer(Outcome::Rejected, res));
                }
            },
        };
        let begin = (*shared.store).begin(&storage_key, &fingerprint, config.lock_ttl);
        let begun = match store_call(Verb::Begin, begin, begin_result).await {
            Ok(begun) => begun,
            Err(e) => {
                let failed = store_failed(e, &storage_key, &shared, inner, parts, body);
                let (outcome, res) = Box::pin(failed).await;
                return trace.answered(outcome, res);
            }
        };
        match begun {
            BeginOutcome::Completed(bytes) => {
                let (outcome, res) = replay(bytes, &fingerprint, storage_key);
                let outcome = match outcome {
                    Outcome::Replayed if trace.has_waited() => Outcome::Waited,
                    outcome => outcome,
                };
                return Ok(trace.answer(outcome, res));
            }
            BeginOutcome::InFlight { fingerprint: other } => {
                // A duplicate that waits holds no place under the in-flight bound.
                drop(place);
                if other != fingerprint {
                    count(Event::Mismatch);
                    let res = Problem::FingerprintMismatch.respond();
                    return Ok(trace.answer(Outcome::Mismatch, res));
                }
                let now = Instant::now();
                if now >= deadline {
                    let retry_after = config.retry_after;
                    return Ok(if budget.is_zero() {
                        count(Event::Conflict);
                        let res = Problem::InFlight { retry_after }.respond();
                        trace.answer(Outcome::Conflict, res)
                    } else {
                        count(Event::WaitTimeout);
                        let res = Problem::WaitTimeout { retry_after }.respond();
                        trace.answer(Outcome::WaitTimeout, res)
                    });
                }
                if trace.start_wait() {
                    count(Event::Waited);
                }
                let wait = (*shared.store).wait(&storage_key, deadline - now);
                if let Err(e) = store_call(Verb::Wait, wait, |()| "ok").await {
                    let failed = store_failed(e, &storage_key, &shared, inner, parts, body);
                    let (outcome, res) = Box::pin(failed).await;
                    return trace.answered(outcome, res);
                }
            }
            BeginOutcome::Acquired(token) => {
                count(Event::Executed);
                trace.end_wait();
                trace.outcome(Outcome::Executed);
                let mut req = Request::from_parts(parts, IdempotencyBody::full(body));
                req.extensions_mut().insert(Tracked);
                let lease = Lease::new(&shared, storage_key, token, place);
                // A caller that goes away does not cancel the handler: the rest of the work
                // moves to a task of its own, in the request's span, and its outcome is stored
                // for the retry.
                // Made in a statement of its own: a temporary in the awaiting statement would
                // be kept in this future's state, doubling its size.
                let owner = Detached::new(
                    shared.background.clone(),
                    trace.span().clone(),
                    owner::run(shared.clone(), lease, inner, req, fingerprint),
                );
                let res = match config.caller_timeout {
                    None => owner.await,
                    Some(limit) => Box::pin(answer_within(owner, limit, config.retry_after)).await,
                };
                return trace.answered(Outcome::Executed, res);
            }
        }
    }
}

/// What `begin` answered, for its span.
fn begin_result(begun: &BeginOutcome) -> &'static str {
    match begun {
        BeginOutcome::Acquired(_) => "acquired",
        BeginOutcome::Completed(_) => "completed",
        BeginOutcome::InFlight { .. } => "in_flight",
    }
}

/// Runs a request whose body was read but which names no key, as if it had not been tracked.
async fn untracked<S, ReqBody, ResBody>(
    shared: &Shared,
    inner: S,
    parts: Parts,
    body: Bytes,
) -> Result<IdempotencyResponse<ResBody>, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
{
    let req = Request::from_parts(parts, IdempotencyBody::full(body));
    transaction::untracked(shared, inner, req).await
}

/// The answer when the store fails before the request runs: refused (fail closed), or run
/// untracked when the layer fails open and the failure is an outage; and which of these it was.
async fn store_failed<S, ReqBody, ResBody>(
    e: StoreError,
    key: &StorageKey,
    shared: &Shared,
    inner: S,
    parts: Parts,
    body: Bytes,
) -> (Outcome, Result<IdempotencyResponse<ResBody>, S::Error>)
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
{
    if let StoreError::Corrupt(why) = &e {
        // Not an outage, so never failed open: the record may stand for a completed request.
        return (Outcome::CorruptRecord, Ok(corrupt_record(key, why)));
    }
    count(Event::StoreError);
    let config = &shared.config;
    let retry_after = config.retry_after;
    match e {
        // Full is the bound doing its job, not an outage: running untracked would defeat it.
        StoreError::Full => {
            tracing::warn!("idempotency store full of requests in flight; refusing a new key");
        }
        e if config.fail_open => {
            tracing::warn!(error = %e, "idempotency store failed; running the request untracked (fail open)");
            count(Event::FailOpen);
            let res = Box::pin(untracked(shared, inner, parts, body)).await;
            return (Outcome::FailOpen, res);
        }
        e => {
            tracing::error!(error = %e, "idempotency store failed; refusing the request (fail closed)")
        }
    }
    let res = Problem::StoreUnavailable { retry_after }.respond();
    (Outcome::StoreError, Ok(res))
}

/// Reads a body the layer needs in full, within `limit` bytes and, if set, within `timeout`
/// of the start of the read.
async fn read_request_body<B>(
    body: B,
    headers: &HeaderMap,
    limit: usize,
    timeout: Option<Duration>,
) -> Result<Bytes, Problem>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Problem::BodyTooLarge { limit });
    }
    let read = collect_within(body, limit);
    match timeout {
        None => read.await,
        Some(timeout) => match tokio::time::timeout(timeout, read).await {
            Ok(read) => read,
            Err(_) => {
                count(Event::BodyTimeout);
                tracing::debug!(?timeout, "a tracked request's body did not arrive in time");
                Err(Problem::BodyTimeout)
            }
        },
    }
}

/// Reads `body` in full, refused once it would hold more than `limit` bytes. A body of one
/// chunk, as most small requests arrive, is kept without a copy or a list of its chunks.
async fn collect_within<B>(body: B, limit: usize) -> Result<Bytes, Problem>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut buf = Collect::default();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                let e: BoxError = e.into();
                // A limit of the application's own (axum's `DefaultBodyLimit`) says so too.
                if e.is::<LengthLimitError>() {
                    return Err(Problem::BodyTooLarge { limit });
                }
                tracing::debug!(error = %e, "could not read a tracked request's body");
                return Err(Problem::BodyUnreadable);
            }
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(Problem::BodyTooLarge { limit });
            }
            buf.push(data);
        }
    }
    Ok(buf.into_bytes())
}

/// The answer to a keyed request whose scope the extractor cannot tell: a counted 500 problem,
/// logged at error, the handler not run and the store not asked.
fn scope_unavailable<B>(parts: &Parts) -> IdempotencyResponse<B> {
    count(Event::ScopeUnavailable);
    tracing::error!(
        method = %parts.method,
        path = parts.uri.path(),
        "the scope extractor cannot tell who sent a keyed request (does the authentication layer run after the idempotency layer?); refusing it"
    );
    Problem::ScopeUnavailable.respond()
}
