//! A duplicate's answer from a completed record: the stored response, marked
//! `Idempotent-Replayed: true`, or the error that stands in for it.

use bytes::Bytes;
use http::{HeaderValue, Response};

use crate::body::{IdempotencyBody, IdempotencyResponse};
use crate::fingerprint::Fingerprint;
use crate::headers::IDEMPOTENT_REPLAYED;
use crate::metrics::{Event, count};
use crate::problem::Problem;
use crate::record::{Record, Unreplayable};
use crate::storage_key::StorageKey;
use crate::trace::Outcome;

/// The answer to a request with `fingerprint` whose key holds the completed record `bytes`,
/// and what it is: a replay, or the error that stands in for one.
pub(crate) fn replay<B>(
    bytes: Bytes,
    fingerprint: &Fingerprint,
    key: StorageKey,
) -> (Outcome, IdempotencyResponse<B>) {
    let record = match Record::decode(bytes) {
        Ok(record) => record,
        Err(e) => return (Outcome::CorruptRecord, corrupt_record(&key, &e)),
    };
    if record.fingerprint != *fingerprint {
        count(Event::Mismatch);
        return (Outcome::Mismatch, Problem::FingerprintMismatch.respond());
    }
    let stored = match record.response {
        Ok(stored) => stored,
        Err(why) => {
            let res = match why {
                Unreplayable::TooLarge => Problem::NotReplayable.respond(),
                Unreplayable::OutcomeUnknown => Problem::OutcomeUnknown.respond(),
            };
            return (Outcome::Unreplayable, res);
        }
    };
    count(Event::Replayed);
    let mut res = Response::new(IdempotencyBody::full(stored.body));
    *res.status_mut() = stored.status;
    *res.headers_mut() = stored.headers;
    res.headers_mut().insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    (Outcome::Replayed, res)
}

/// The answer to a record that cannot be read: a counted 500 problem, the handler not run and
/// nothing of the record replayed.
pub(crate) fn corrupt_record<B>(
    key: &StorageKey,
    why: &dyn std::fmt::Display,
) -> IdempotencyResponse<B> {
    count(Event::CorruptRecord);
    tracing::error!(
        ?key,
        error = %why,
        "idempotency store holds a record that cannot be read; refusing the request until it expires or is removed"
    );
    Problem::CorruptRecord.respond()
}
