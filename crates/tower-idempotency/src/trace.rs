//! What the layer tells a `tracing` subscriber: a span for each tracked request, with its key's
//! hash (never the key), its outcome and how long it waited, child spans for the store's verbs
//! and the handler, and one event when the request is answered.
//!
//! Every span and event here is at `DEBUG`, under the targets [`REQUEST_TARGET`],
//! [`STORE_TARGET`] and [`HANDLER_TARGET`], so that a subscriber that filters at `info` builds
//! nothing for them: a disabled span costs a level check.

use std::fmt;
use std::future::Future;

use http::Method;
use tokio::time::Instant;
use tracing::Span;
use tracing::field::{Empty, display};

use crate::metrics::{self, Verb};
use crate::storage_key::StorageKey;
use crate::store::StoreError;

/// The target of the span of each tracked request (`idempotency.request`) and of the event
/// that ends it (`tracked request`).
pub const REQUEST_TARGET: &str = "tower_idempotency::request";
/// The target of the spans of the store's verbs (`idempotency.store.begin`, ...).
pub const STORE_TARGET: &str = "tower_idempotency::store";
/// The target of the span of the handler's run (`idempotency.handler`).
pub const HANDLER_TARGET: &str = "tower_idempotency::handler";

/// What became of a tracked request: the span's `idempotency.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It took the lease and ran the handler (perhaps after waiting).
    Executed,
    /// A stored response was replayed at once.
    Replayed,
    /// It waited for the request in flight, then replayed its response.
    Waited,
    /// Refused at once because the key is in flight (`on_conflict = reject`).
    Conflict,
    /// Its wait for the request in flight ran out.
    WaitTimeout,
    /// The key was used with another request (422).
    Mismatch,
    /// Refused before the store was asked: a bad key (in a header, the query or a form), a
    /// required key missing, a body too large, too slow or unreadable, a malformed form, or too
    /// many requests in flight.
    Rejected,
    /// The store failed and the request was refused (503).
    StoreError,
    /// The store failed and the request ran untracked (`fail_open`).
    FailOpen,
    /// The key's record could not be read (500 `record-corrupt`).
    CorruptRecord,
    /// The key's record says its response cannot be replayed (too large, or outcome unknown).
    Unreplayable,
    /// The request's scope could not be told (500 `scope-unavailable`).
    ScopeUnavailable,
    /// A form that named no key: the request ran untracked.
    Untracked,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::Replayed => "replayed",
            Outcome::Waited => "waited",
            Outcome::Conflict => "conflict",
            Outcome::WaitTimeout => "wait_timeout",
            Outcome::Mismatch => "mismatch",
            Outcome::Rejected => "rejected",
            Outcome::StoreError => "store_error",
            Outcome::FailOpen => "fail_open",
            Outcome::CorruptRecord => "corrupt_record",
            Outcome::Unreplayable => "unreplayable",
            Outcome::ScopeUnavailable => "scope_unavailable",
            Outcome::Untracked => "untracked",
        }
    }

    /// Whether the outcome is a failure of the layer or its store, for the span's status.
    fn is_error(self) -> bool {
        matches!(
            self,
            Outcome::StoreError | Outcome::CorruptRecord | Outcome::ScopeUnavailable
        )
    }
}

/// The first 16 hex digits of a storage key: what logs and spans show of a key.
#[derive(Clone, Copy)]
pub(crate) struct KeyHash(pub(crate) StorageKey);

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        for (i, b) in self.0.0[..8].iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(b >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
        }
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

/// The span of a tracked request, before it is entered: disabled (and free) unless a
/// subscriber wants [`REQUEST_TARGET`] at `DEBUG`.
pub(crate) fn request_span(method: &Method) -> Span {
    tracing::debug_span!(
        target: REQUEST_TARGET,
        "idempotency.request",
        http.request.method = method.as_str(),
        idempotency.key_hash = Empty,
        idempotency.outcome = Empty,
        idempotency.wait_seconds = Empty,
        idempotency.lease = Empty,
        http.response.status_code = Empty,
        otel.status_code = Empty,
    )
}

/// A tracked request's trace: its span, the key once it is known, and when it began to wait.
pub(crate) struct RequestTrace {
    span: Span,
    key: Option<StorageKey>,
    wait_started: Option<Instant>,
    waited: Option<f64>,
}

impl RequestTrace {
    pub(crate) fn new(span: Span) -> Self {
        Self {
            span,
            key: None,
            wait_started: None,
            waited: None,
        }
    }

    /// The request's span, for the work that runs in a task of its own (the owner).
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// The request's storage key is known: its hash goes on the span.
    pub(crate) fn key(&mut self, key: StorageKey) {
        self.key = Some(key);
        if !self.span.is_disabled() {
            self.span
                .record("idempotency.key_hash", display(KeyHash(key)));
        }
    }

    /// The request waits for the request in flight; `true` the first time.
    pub(crate) fn start_wait(&mut self) -> bool {
        if self.wait_started.is_some() || self.waited.is_some() {
            return false;
        }
        self.wait_started = Some(Instant::now());
        true
    }

    /// Whether the request waited (or waits now) for another.
    pub(crate) fn has_waited(&self) -> bool {
        self.wait_started.is_some() || self.waited.is_some()
    }

    /// The request stops waiting: its wait is observed and goes on the span. Nothing when it
    /// did not wait, or its wait was already ended.
    pub(crate) fn end_wait(&mut self) {
        let Some(started) = self.wait_started.take() else {
            return;
        };
        let waited = started.elapsed().as_secs_f64();
        self.waited = Some(waited);
        metrics::observe_wait(waited);
        if !self.span.is_disabled() {
            self.span.record("idempotency.wait_seconds", waited);
        }
    }

    /// Records the outcome on the span, before the answer is known (a request that runs its
    /// handler shows `executed` even if its caller goes away).
    pub(crate) fn outcome(&self, outcome: Outcome) {
        if !self.span.is_disabled() {
            self.span.record("idempotency.outcome", outcome.as_str());
            if outcome.is_error() {
                self.span.record("otel.status_code", "error");
            }
        }
    }

    /// The request is answered with `res`, which is returned: see [`finish`](Self::finish).
    pub(crate) fn answer<B>(
        &mut self,
        outcome: Outcome,
        res: http::Response<B>,
    ) -> http::Response<B> {
        self.finish(outcome, Some(res.status()));
        res
    }

    /// The request is answered with `res` (an error: the inner service failed), which is
    /// returned: see [`finish`](Self::finish).
    pub(crate) fn answered<B, E>(
        &mut self,
        outcome: Outcome,
        res: Result<http::Response<B>, E>,
    ) -> Result<http::Response<B>, E> {
        self.finish(outcome, res.as_ref().ok().map(http::Response::status));
        res
    }

    /// The request is answered with `status` (none: the inner service failed): the span gets
    /// the outcome and the status, and one event says so, with the key's hash and the outcome.
    pub(crate) fn finish(&mut self, outcome: Outcome, status: Option<http::StatusCode>) {
        self.end_wait();
        self.outcome(outcome);
        // As an i64: an OpenTelemetry layer keeps i64 as integers, but u64 as text.
        let status = status.map(|s| i64::from(s.as_u16()));
        if let (Some(status), false) = (status, self.span.is_disabled()) {
            self.span.record("http.response.status_code", status);
        }
        tracing::debug!(
            target: REQUEST_TARGET,
            {
                idempotency.key_hash = self.key.map(|k| display(KeyHash(k))),
                idempotency.outcome = outcome.as_str(),
                idempotency.wait_seconds = self.waited,
                http.response.status_code = status,
            },
            "tracked request"
        );
    }
}

/// Runs one call of the store's `verb`: in a span of its own, child of the request's, and
/// timed for [`STORE_DURATION`](crate::STORE_DURATION) (except `wait`, whose time is the
/// duplicate's wait). `result` names what the store answered, for the span.
pub(crate) async fn store_call<T>(
    verb: Verb,
    call: impl Future<Output = Result<T, StoreError>>,
    result: impl FnOnce(&T) -> &'static str,
) -> Result<T, StoreError> {
    let span = match verb {
        Verb::Begin => {
            tracing::debug_span!(target: STORE_TARGET, "idempotency.store.begin", idempotency.store.result = Empty, otel.status_code = Empty)
        }
        Verb::Complete => {
            tracing::debug_span!(target: STORE_TARGET, "idempotency.store.complete", idempotency.store.result = Empty, otel.status_code = Empty)
        }
        Verb::Release => {
            tracing::debug_span!(target: STORE_TARGET, "idempotency.store.release", idempotency.store.result = Empty, otel.status_code = Empty)
        }
        Verb::Renew => {
            tracing::debug_span!(target: STORE_TARGET, "idempotency.store.renew", idempotency.store.result = Empty, otel.status_code = Empty)
        }
        Verb::Wait => {
            tracing::debug_span!(target: STORE_TARGET, "idempotency.store.wait", idempotency.store.result = Empty, otel.status_code = Empty)
        }
    };
    let started = Instant::now();
    // Entered for each poll, and kept for the result: no clone of the span.
    let mut call = std::pin::pin!(call);
    let out = std::future::poll_fn(|cx| {
        let _entered = span.enter();
        call.as_mut().poll(cx)
    })
    .await;
    metrics::observe_store(verb, started.elapsed().as_secs_f64());
    if !span.is_disabled() {
        match &out {
            Ok(value) => span.record("idempotency.store.result", result(value)),
            Err(e) => span
                .record("idempotency.store.result", store_error(e))
                .record("otel.status_code", "error"),
        };
    }
    out
}

/// A store error, as the span's `idempotency.store.result`.
fn store_error(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Full => "full",
        StoreError::Corrupt(_) => "corrupt",
        #[allow(unreachable_patterns)]
        _ => "error",
    }
}

/// What an owner-checked verb (complete, release, renew) answered, for its span.
pub(crate) fn owner_checked(taken: &bool) -> &'static str {
    if *taken { "ok" } else { "refused" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_hash_is_the_first_sixteen_hex_digits_of_the_storage_key() {
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(0x0f);
        }
        let key = StorageKey(k);
        assert_eq!(KeyHash(key).to_string(), key.to_hex()[..16]);
        assert_eq!(format!("{key:?}"), format!("StorageKey({})", KeyHash(key)));
    }
}
