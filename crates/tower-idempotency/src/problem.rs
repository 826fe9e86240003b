//! Errors as `application/problem+json` (RFC 9457).
//!
//! Every error the layer answers by itself is a [`Problem`]: one place maps each case to its
//! status, its `type` and its words. No problem reveals another request's stored response.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::key::KeyError;

/// Media type of every error the layer answers.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error the layer answers by itself, without running the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// 400: the key is missing where required, malformed, or named twice.
    BadKey(KeyError),
    /// 409: a request with this key is in flight (reject mode), with the advised retry delay.
    InFlight {
        /// Seconds for `Retry-After`.
        retry_after: Duration,
    },
    /// 409: the wait for the request in flight ran out, with the advised retry delay.
    WaitTimeout {
        /// Seconds for `Retry-After`.
        retry_after: Duration,
    },
    /// 409: the request completed, but its response was too large to keep for replay.
    NotReplayable,
    /// 413: the request body is larger than the limit.
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// 422: the key was used before with another request (fingerprint mismatch).
    FingerprintMismatch,
    /// 500: the handler panicked; its lease was released, so a retry runs.
    HandlerFailed,
    /// 400: the request body could not be read.
    BodyUnreadable,
    /// 400: a tracked request's `multipart/form-data` body does not parse, so the key it may
    /// carry cannot be checked against the others, nor the body fingerprinted.
    MalformedForm,
    /// 503: the store could not be reached or is full.
    StoreUnavailable {
        /// Seconds for `Retry-After`.
        retry_after: Duration,
    },
    /// 500: the store holds a record under this key that cannot be read (corrupt, truncated,
    /// of an unknown version, or written by another tool). The handler does not run, since the
    /// record may stand for a request that completed, and nothing of the record is replayed.
    /// The key stays refused until the record expires or an operator removes it.
    CorruptRecord,
    /// 502: the request with this key may have run, but its outcome is unknown (the upstream's
    /// connection broke after the request was sent, its deadline passed, or the response failed
    /// after its status). The request is never run again for this key while the record lives.
    OutcomeUnknown,
    /// 504: the handler did not answer within the [caller timeout]; it keeps running, its lease
    /// held, and its outcome is stored for a retry with the same key.
    ///
    /// [caller timeout]: crate::IdempotencyLayer::with_caller_timeout
    StillRunning {
        /// How long the caller waited.
        waited: Duration,
        /// Seconds for `Retry-After`.
        retry_after: Duration,
    },
    /// 500: the scope extractor could not tell who the caller is (for example, the
    /// authentication layer runs after this one), so the request is refused rather than put in
    /// the global scope, where another caller could replay its response.
    ScopeUnavailable,
    /// 408: a tracked request's body did not arrive in full in time. No lease was taken.
    BodyTimeout,
    /// 503: too many tracked requests are running at once; nothing was taken.
    Overloaded {
        /// Seconds for `Retry-After`.
        retry_after: Duration,
    },
}

impl Problem {
    /// The status code of this problem.
    pub fn status(&self) -> StatusCode {
        match self {
            Problem::BadKey(_) | Problem::BodyUnreadable | Problem::MalformedForm => {
                StatusCode::BAD_REQUEST
            }
            Problem::InFlight { .. } | Problem::WaitTimeout { .. } | Problem::NotReplayable => {
                StatusCode::CONFLICT
            }
            Problem::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::FingerprintMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::HandlerFailed | Problem::CorruptRecord => StatusCode::INTERNAL_SERVER_ERROR,
            Problem::StoreUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Problem::OutcomeUnknown => StatusCode::BAD_GATEWAY,
            Problem::StillRunning { .. } => StatusCode::GATEWAY_TIMEOUT,
            Problem::ScopeUnavailable => StatusCode::INTERNAL_SERVER_ERROR,
            Problem::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Problem::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable identifier, the last part of the problem's `type` URI.
    pub fn slug(&self) -> &'static str {
        match self {
            Problem::BadKey(KeyError::Missing) => "key-required",
            Problem::BadKey(KeyError::Conflicting) => "key-conflict",
            Problem::BadKey(_) => "key-invalid",
            Problem::InFlight { .. } => "request-in-flight",
            Problem::WaitTimeout { .. } => "wait-timeout",
            Problem::NotReplayable => "response-not-replayable",
            Problem::BodyTooLarge { .. } => "request-too-large",
            Problem::FingerprintMismatch => "key-reused",
            Problem::HandlerFailed => "handler-failed",
            Problem::BodyUnreadable => "body-unreadable",
            Problem::MalformedForm => "form-malformed",
            Problem::StoreUnavailable { .. } => "store-unavailable",
            Problem::CorruptRecord => "record-corrupt",
            Problem::OutcomeUnknown => "outcome-unknown",
            Problem::StillRunning { .. } => "still-running",
            Problem::ScopeUnavailable => "scope-unavailable",
            Problem::BodyTimeout => "body-timeout",
            Problem::Overloaded { .. } => "too-many-in-flight",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Problem::BadKey(KeyError::Missing) => "Idempotency key required",
            Problem::BadKey(_) => "Invalid idempotency key",
            Problem::InFlight { .. } => "A request with this idempotency key is in progress",
            Problem::WaitTimeout { .. } => "Timed out waiting for the original request",
            Problem::NotReplayable => "The original response cannot be replayed",
            Problem::BodyTooLarge { .. } => "Request body too large",
            Problem::FingerprintMismatch => "Idempotency key reused with a different request",
            Problem::HandlerFailed => "The request failed",
            Problem::BodyUnreadable => "Request body unreadable",
            Problem::MalformedForm => "Malformed form body",
            Problem::StoreUnavailable { .. } => "Idempotency store unavailable",
            Problem::CorruptRecord => "Stored idempotency record unreadable",
            Problem::OutcomeUnknown => "The outcome of the original request is unknown",
            Problem::StillRunning { .. } => "The request is still running",
            Problem::ScopeUnavailable => "The caller's scope is unavailable",
            Problem::BodyTimeout => "Request body timed out",
            Problem::Overloaded { .. } => "Too many requests in flight",
        }
    }

    fn detail(&self) -> String {
        match self {
            Problem::BadKey(e) => format!("{e}."),
            Problem::InFlight { .. } => {
                "Another request with this idempotency key is being processed. Retry later with the same key.".into()
            }
            Problem::WaitTimeout { .. } => {
                "The original request with this idempotency key is still being processed. Retry later with the same key.".into()
            }
            Problem::NotReplayable => {
                "The original request with this idempotency key completed, but its response was too large to keep for replay. It will not run again.".into()
            }
            Problem::BodyTooLarge { limit } => {
                format!("Requests with an idempotency key may carry at most {limit} bytes.")
            }
            Problem::FingerprintMismatch => {
                "This idempotency key was already used with a different method, path, query or body. Use a new key for a new request.".into()
            }
            Problem::BodyUnreadable => "The request body could not be read in full.".into(),
            Problem::MalformedForm => {
                "The multipart/form-data body of this request does not parse, so the idempotency key it may carry cannot be checked. The request was not run.".into()
            }
            Problem::HandlerFailed => {
                "The server failed while processing the request. It may be retried with the same key.".into()
            }
            Problem::StoreUnavailable { .. } => {
                "The idempotency store cannot take this request now. Retry later with the same key.".into()
            }
            Problem::CorruptRecord => {
                "The record stored for this idempotency key cannot be read, so the request was neither run nor replayed. It stays refused until the record expires or is removed.".into()
            }
            Problem::OutcomeUnknown => {
                "The request with this idempotency key may have run, but its outcome is unknown, so it will not run again for this key. Look its result up; a new key runs it again.".into()
            }
            Problem::StillRunning { waited, .. } => format!(
                "The request did not finish within {}. It keeps running and its outcome will be stored: retry later with the same key to get it. A new key would run it again.",
                readable_duration(*waited)
            ),
            Problem::ScopeUnavailable => {
                "The server could not tell who sent this request, so it was not run. It may be retried with the same key.".into()
            }
            Problem::BodyTimeout => {
                "The request body did not arrive in full in time. It was not run and may be retried with the same key.".into()
            }
            Problem::Overloaded { .. } => {
                "Too many requests with idempotency keys are running. This one was not run: retry later with the same key.".into()
            }
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Problem::InFlight { retry_after }
            | Problem::WaitTimeout { retry_after }
            | Problem::StoreUnavailable { retry_after }
            | Problem::StillRunning { retry_after, .. }
            | Problem::Overloaded { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// The problem as a JSON document.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "type": format!("urn:tower-idempotency:problem:{}", self.slug()),
            "title": self.title(),
            "status": self.status().as_u16(),
            "detail": self.detail(),
        })
    }

    /// The problem as an HTTP response with an `application/problem+json` body.
    pub fn to_response(&self) -> Response<Bytes> {
        let body = Bytes::from(self.to_json().to_string());
        let mut res = Response::new(body);
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = self.retry_after() {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// A duration as a person reads it: `1.5 s`, `30 s`, `250 ms`.
fn readable_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        let secs = d.as_secs_f64();
        if secs.fract() == 0.0 {
            format!("{secs:.0} s")
        } else {
            format!("{secs:.1} s")
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.title(), self.status())
    }
}
