//! The lease owner's part: run the handler while the lease is renewed, read its response, then
//! store it for replay or release the lease, and answer the first caller.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tower::Service;

use crate::body::{Collect, IdempotencyBody, IdempotencyResponse};
use crate::extensions::{NotRun, OutcomeUnknown};
use crate::fingerprint::Fingerprint;
use crate::headers::kept_for_replay;
use crate::lease::Lease;
use crate::metrics::{self, Event, Verb, count};
use crate::problem::Problem;
use crate::record::{EncodeError, Record, Unreplayable};
use crate::shared::Shared;
use crate::storage_key::StorageKey;
use crate::store::{Completer, Completion};
use crate::trace::{HANDLER_TARGET, owner_checked, store_call};
use crate::transaction;
use tracing::Instrument;

/// What the lease owner's part ends with: the first caller's answer, and whether a response was
/// stored for replay (so that an answer its caller no longer waits for is counted).
pub(crate) struct Owned<T> {
    pub(crate) answer: T,
    pub(crate) stored: bool,
}

/// What the handler's run came to, before anything is written to the store.
enum Outcome<B, E> {
    /// The handler failed with a service error.
    Error(E),
    /// A status that is not stored.
    Release(Response<B>),
    /// A storable response, read in full.
    Store(http::response::Parts, Bytes),
    /// A storable response too large to keep.
    TooLarge(http::response::Parts, Bytes, Pin<Box<B>>),
    /// The inner service said the request may have acted without an answer to keep.
    Unknown(Response<B>),
    /// The response body failed after its status was sent: the handler ran, its answer is lost.
    BodyFailed,
}

/// Runs the handler as the owner of `lease`, stores or releases, and answers the first caller.
pub(crate) async fn run<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    lease: Lease,
    mut inner: S,
    mut req: Request<IdempotencyBody<ReqBody>>,
    fingerprint: Fingerprint,
) -> Owned<Result<IdempotencyResponse<ResBody>, S::Error>>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let config = &shared.config;
    let limit = config.max_response_body;
    let storable = config.storable.clone();
    let completion = transaction::offer(&shared, &mut req, true);
    let handler = tracing::debug_span!(target: HANDLER_TARGET, "idempotency.handler");
    let work = AssertUnwindSafe(
        async move {
            let res = match inner.call(req).await {
                Ok(res) => res,
                Err(e) => return Outcome::Error(e),
            };
            if res.extensions().get::<OutcomeUnknown>().is_some() {
                return Outcome::Unknown(res);
            }
            if res.extensions().get::<NotRun>().is_some() || !storable(res.status()) {
                return Outcome::Release(res);
            }
            let (parts, body) = res.into_parts();
            let mut body = Box::pin(body);
            let mut buf = Collect::default();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Outcome::BodyFailed;
                };
                if let Ok(data) = frame.into_data() {
                    buf.push(data);
                    if buf.len() > limit {
                        return Outcome::TooLarge(parts, buf.into_bytes(), body);
                    }
                }
            }
            Outcome::Store(parts, buf.into_bytes())
        }
        .instrument(handler),
    )
    .catch_unwind();

    let unstored = |answer| Owned {
        answer,
        stored: false,
    };
    let outcome = lease.renewing(work).await;
    if let Some(completer) = completion.as_ref().and_then(Completion::take) {
        return in_transaction(&shared, completer, lease, outcome, fingerprint).await;
    }
    match outcome {
        Err(_panic) => {
            tracing::error!(key = ?lease.key, "handler panicked; lease released");
            lease.release().await;
            unstored(Ok(Problem::HandlerFailed.respond()))
        }
        Ok(Outcome::Error(e)) => {
            lease.release().await;
            unstored(Err(e))
        }
        Ok(Outcome::Release(res)) => {
            lease.release().await;
            unstored(Ok(res.map(IdempotencyBody::stream)))
        }
        Ok(Outcome::Unknown(res)) => {
            tracing::warn!(key = ?lease.key, status = %res.status(), "the request's outcome is unknown; it will not run again for this key");
            outcome_unknown(&lease, fingerprint, config.ttl).await;
            unstored(Ok(res.map(IdempotencyBody::stream)))
        }
        Ok(Outcome::BodyFailed) => {
            tracing::warn!(key = ?lease.key, "response body failed after its status; the outcome is unknown and will not run again for this key");
            outcome_unknown(&lease, fingerprint, config.ttl).await;
            unstored(Ok(Problem::OutcomeUnknown.respond()))
        }
        Ok(Outcome::Store(parts, body)) => {
            let record = owner_record(&lease.key, fingerprint, &parts, &body);
            let stored = lease.complete(record, config.ttl).await;
            Owned {
                answer: Ok(Response::from_parts(parts, IdempotencyBody::full(body))),
                stored,
            }
        }
        Ok(Outcome::TooLarge(parts, prefix, rest)) => {
            let (record, answer) = too_large(&lease.key, limit, fingerprint, parts, prefix, rest);
            let stored = lease.complete(record, config.ttl).await;
            Owned {
                answer: Ok(answer),
                stored,
            }
        }
    }
}

/// The owner's end when the handler took its transaction from the layer: the record is
/// written in that transaction and commits with the handler's writes, or the transaction rolls
/// back and the lease is released. The caller gets the response only once it is committed.
async fn in_transaction<B, E>(
    shared: &Shared,
    completer: Box<dyn Completer>,
    lease: Lease,
    outcome: std::thread::Result<Outcome<B, E>>,
    fingerprint: Fingerprint,
) -> Owned<Result<IdempotencyResponse<B>, E>>
where
    B: Body<Data = Bytes>,
{
    let ttl = shared.config.ttl;
    let unstored = |answer| Owned {
        answer,
        stored: false,
    };
    let (record, answer) = match outcome {
        Ok(Outcome::Store(parts, body)) => (
            owner_record(&lease.key, fingerprint, &parts, &body),
            Response::from_parts(parts, IdempotencyBody::full(body)),
        ),
        Ok(Outcome::TooLarge(parts, prefix, rest)) => {
            let limit = shared.config.max_response_body;
            too_large(&lease.key, limit, fingerprint, parts, prefix, rest)
        }
        // Nothing of the handler's writes is kept, so whatever it answered, the key is free
        // again: a retry runs on a clean database.
        Err(_panic) => {
            tracing::error!(key = ?lease.key, "handler panicked; its transaction was rolled back and the lease released");
            return rolled_back(completer, &lease, Ok(Problem::HandlerFailed.respond())).await;
        }
        Ok(Outcome::Error(e)) => return rolled_back(completer, &lease, Err(e)).await,
        Ok(Outcome::Release(res)) => {
            let answer = Ok(res.map(IdempotencyBody::stream));
            return rolled_back(completer, &lease, answer).await;
        }
        // The database's writes go back, but the inner service says the request may have
        // acted where a rollback does not reach (a call to another company that timed out), or
        // its answer broke after its status: as without a transaction, it never runs again for
        // the key.
        Ok(Outcome::Unknown(res)) => {
            tracing::warn!(key = ?lease.key, status = %res.status(), "the request's outcome is unknown; its transaction was rolled back, and it will not run again for this key");
            completer.roll_back().await;
            outcome_unknown(&lease, fingerprint, ttl).await;
            return unstored(Ok(res.map(IdempotencyBody::stream)));
        }
        Ok(Outcome::BodyFailed) => {
            tracing::warn!(key = ?lease.key, "response body failed after its status; its transaction was rolled back, and it will not run again for this key");
            completer.roll_back().await;
            outcome_unknown(&lease, fingerprint, ttl).await;
            return unstored(Ok(Problem::OutcomeUnknown.respond()));
        }
    };
    metrics::observe_record_bytes(record.len());
    let complete = completer.complete(lease.key, lease.token(), record, ttl);
    match store_call(Verb::Complete, complete, owner_checked).await {
        Ok(true) => Owned {
            answer: Ok(answer),
            stored: true,
        },
        Ok(false) => {
            // Another owner holds the key: this one's writes were rolled back with its record,
            // so its response must not reach the caller.
            count(Event::LeaseLost);
            tracing::warn!(key = ?lease.key, "lease was lost while the handler ran; its transaction was rolled back");
            unstored(Ok(Problem::LeaseLost.respond()))
        }
        Err(e) => {
            lease.release().await;
            unstored(Ok(transaction::commit_failed(shared, Some(&lease.key), &e)))
        }
    }
}

/// Rolls the handler's transaction back and releases the lease, so that a retry runs.
async fn rolled_back<T>(completer: Box<dyn Completer>, lease: &Lease, answer: T) -> Owned<T> {
    completer.roll_back().await;
    lease.release().await;
    Owned {
        answer,
        stored: false,
    }
}

/// Completes the lease with a record that says the outcome is unknown, so that duplicates get
/// 502 `outcome-unknown` for the TTL and never run the request again.
async fn outcome_unknown(lease: &Lease, fingerprint: Fingerprint, ttl: Duration) {
    count(Event::OutcomeUnknown);
    let record = unreplayable(fingerprint, Unreplayable::OutcomeUnknown);
    lease.complete(record, ttl).await;
}

/// A record that says the request ran but its response cannot be replayed, and why.
fn unreplayable(fingerprint: Fingerprint, why: Unreplayable) -> Bytes {
    Record {
        fingerprint,
        response: Err(why),
    }
    .encode()
}

/// A response too large to keep for replay: the record that says so (duplicates get 409), and
/// the whole response for the first caller, its read part first.
fn too_large<B>(
    key: &StorageKey,
    limit: usize,
    fingerprint: Fingerprint,
    parts: http::response::Parts,
    prefix: Bytes,
    rest: Pin<Box<B>>,
) -> (Bytes, IdempotencyResponse<B>) {
    tracing::info!(
        ?key,
        limit,
        "response too large to keep for replay; duplicates will get 409"
    );
    let answer = Response::from_parts(parts, IdempotencyBody::prefixed(prefix, rest));
    (unreplayable(fingerprint, Unreplayable::TooLarge), answer)
}

/// The record of a response kept for replay, with the headers
/// [kept for replay](kept_for_replay). A response the record format cannot hold (too many
/// headers, a header or the body too long) is an error, and never written in part.
fn storable_record(
    fingerprint: &Fingerprint,
    parts: &http::response::Parts,
    body: &[u8],
) -> Result<Bytes, EncodeError> {
    let keep = kept_for_replay(&parts.headers);
    crate::record::encode(fingerprint, Ok((parts.status, &parts.headers, body)), keep)
}

/// The record of a response to keep for replay or, when the format cannot hold it, a counted
/// record that says it cannot be replayed: duplicates get 409, and nothing runs twice.
fn owner_record(
    key: &StorageKey,
    fingerprint: Fingerprint,
    parts: &http::response::Parts,
    body: &[u8],
) -> Bytes {
    storable_record(&fingerprint, parts, body).unwrap_or_else(|e| {
        count(Event::Unstorable);
        tracing::warn!(?key, error = %e, "response cannot be kept for replay; duplicates will get 409");
        unreplayable(fingerprint, Unreplayable::TooLarge)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn collected_bodies_keep_every_byte_in_order() {
        let mut c = Collect::default();
        assert_eq!(c.len(), 0);
        c.push(Bytes::from_static(b""));
        c.push(Bytes::from_static(b"ab"));
        assert_eq!(c.len(), 2);
        c.push(Bytes::from_static(b""));
        c.push(Bytes::from_static(b"c"));
        c.push(Bytes::from_static(b"de"));
        assert_eq!(c.len(), 5);
        assert_eq!(c.into_bytes(), "abcde");
        let mut one = Collect::default();
        one.push(Bytes::from_static(b"only"));
        assert_eq!(one.into_bytes(), "only");
    }

    #[test]
    fn connection_named_and_private_headers_are_not_stored() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("x-hop, close"));
        h.append("x-hop", HeaderValue::from_static("1"));
        h.append("set-cookie", HeaderValue::from_static("s=1"));
        h.append(
            "date",
            HeaderValue::from_static("Mon, 01 Jan 2024 00:00:00 GMT"),
        );
        h.append("x-keep", HeaderValue::from_static("a"));
        h.append("x-keep", HeaderValue::from_static("b"));
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.headers = h;
        let record =
            Record::decode(storable_record(&Fingerprint([1; 32]), &parts, b"body").unwrap());
        let kept = record.unwrap().response.unwrap();
        assert_eq!(kept.headers.len(), 2);
        assert_eq!(kept.headers.get_all("x-keep").iter().count(), 2);
        assert_eq!(kept.body, "body");
    }
}
