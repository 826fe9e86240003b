//! Errors as `application/problem+json` (RFC 9457): [`ProblemDetails`], one document, and
//! [`Problem`], every error the layer answers by itself.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::{Map, Value};

use crate::body::{IdempotencyBody, IdempotencyResponse};
use crate::key::KeyError;
use crate::metrics::{Event, count};

/// Media type of every problem document: `application/problem+json`.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The `type` URI prefix of the layer's own problems; the slug follows it.
const TYPE_PREFIX: &str = "urn:tower-idempotency:problem:";

/// The members a problem document defines itself, which no extension member may replace.
const STANDARD_MEMBERS: [&str; 5] = ["type", "title", "status", "detail", "instance"];

/// A problem document (RFC 9457) and the `application/problem+json` response that carries it.
///
/// The layer, the proxy and the demo answer every error of their own through it.
///
/// It holds the standard members `type`, `title`, `status` and `detail`, any extension members,
/// and two headers of the response: `Retry-After`, and `Cache-Control: no-store` for a problem
/// that describes one request at one moment (a request in flight, a store that is down), which
/// no cache should keep.
///
/// ```
/// use std::time::Duration;
/// use http::StatusCode;
/// use tower_idempotency::{PROBLEM_JSON, ProblemDetails};
///
/// let res = ProblemDetails::new(
///     StatusCode::SERVICE_UNAVAILABLE,
///     "https://example.com/problems/maintenance",
///     "Down for maintenance",
/// )
/// .with_detail("Back at 06:00 UTC.")
/// .with_retry_after(Duration::from_secs(120))
/// .with_no_store()
/// .with_extension("until", "06:00Z")
/// .to_response();
///
/// assert_eq!(res.status(), 503);
/// assert_eq!(res.headers()["content-type"], PROBLEM_JSON);
/// assert_eq!(res.headers()["retry-after"], "120");
/// assert_eq!(res.headers()["cache-control"], "no-store");
/// let doc: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
/// assert_eq!(doc["title"], "Down for maintenance");
/// assert_eq!(doc["status"], 503);
/// assert_eq!(doc["until"], "06:00Z");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProblemDetails {
    status: StatusCode,
    type_uri: Cow<'static, str>,
    title: Cow<'static, str>,
    detail: Option<Cow<'static, str>>,
    retry_after: Option<Duration>,
    no_store: bool,
    extensions: Map<String, Value>,
}

impl ProblemDetails {
    /// A problem of `type_uri` (a URI that names the kind of problem, or `about:blank`) with
    /// its short, human-readable `title`, answered with `status`.
    pub fn new(
        status: StatusCode,
        type_uri: impl Into<Cow<'static, str>>,
        title: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            type_uri: type_uri.into(),
            title: title.into(),
            detail: None,
            retry_after: None,
            no_store: false,
            extensions: Map::new(),
        }
    }

    /// One of this project's own problems: of type `urn:tower-idempotency:problem:{slug}`, as
    /// every [`Problem`] is, for the tools built on the layer (the admin routes, the proxy).
    pub fn own(status: StatusCode, slug: &str, title: impl Into<Cow<'static, str>>) -> Self {
        Self::new(status, format!("{TYPE_PREFIX}{slug}"), title)
    }

    /// The `detail` member: what happened to this request, for a person to read.
    pub fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// A `Retry-After` header, in whole seconds rounded up and at least one.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// A `Cache-Control: no-store` header: the answer holds for this request now, and no cache
    /// may keep it.
    pub fn with_no_store(mut self) -> Self {
        self.no_store = true;
        self
    }

    /// An extension member of the document. The standard members (`type`, `title`, `status`,
    /// `detail`, `instance`) cannot be replaced this way: such a name is ignored.
    pub fn with_extension(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        let name = name.into();
        if !STANDARD_MEMBERS.contains(&name.as_str()) {
            self.extensions.insert(name, value.into());
        }
        self
    }

    /// The status code of the response.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The `type` member.
    pub fn type_uri(&self) -> &str {
        &self.type_uri
    }

    /// The `title` member.
    pub fn title(&self) -> &str {
        &self.title
    }

    /// The `detail` member, if there is one.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// The delay `Retry-After` advises, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The document as JSON: `type`, `title`, `status`, `detail` (when there is one) and the
    /// extension members.
    pub fn to_json(&self) -> Value {
        let mut doc = Map::new();
        doc.insert("type".into(), Value::from(&*self.type_uri));
        doc.insert("title".into(), Value::from(&*self.title));
        doc.insert("status".into(), Value::from(self.status.as_u16()));
        if let Some(detail) = &self.detail {
            doc.insert("detail".into(), Value::from(&**detail));
        }
        for (name, value) in &self.extensions {
            doc.insert(name.clone(), value.clone());
        }
        Value::Object(doc)
    }

    /// The response: the status, `Content-Type: application/problem+json`, the headers asked
    /// for, and the document as its body.
    pub fn to_response(&self) -> Response<Bytes> {
        let body = Bytes::from(self.to_json().to_string());
        let mut res = Response::new(body);
        *res.status_mut() = self.status;
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.no_store {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        if let Some(after) = self.retry_after {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

impl From<ProblemDetails> for Response<Bytes> {
    fn from(problem: ProblemDetails) -> Self {
        problem.to_response()
    }
}

/// An axum handler or extractor may answer with the problem itself.
#[cfg(any(feature = "admin", feature = "postgres"))]
impl axum_core::response::IntoResponse for ProblemDetails {
    fn into_response(self) -> axum_core::response::Response {
        self.to_response().map(axum_core::body::Body::from)
    }
}

impl fmt::Display for ProblemDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.title, self.status)
    }
}

/// An error the layer answers by itself, without running the handler.
///
/// One place maps each case to its status, its `type` and its words. No problem reveals
/// another request's stored response.
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
    /// 409: the request's lease expired while its handler ran and another request with the key
    /// took over. With the handler's transaction ([`Completion`](crate::Completion)), its
    /// writes were rolled back with its record, so its response is not given.
    LeaseLost,
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
            Problem::LeaseLost => StatusCode::CONFLICT,
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
            Problem::LeaseLost => "lease-lost",
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
            Problem::LeaseLost => "The request lost its hold on the idempotency key",
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
            Problem::LeaseLost => {
                "This request ran past its lease and another request with the same idempotency key took over; this one's writes were rolled back. Retry with the same key to get the other request's outcome.".into()
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

    /// The problem as a document, ready to answer with.
    pub fn details(&self) -> ProblemDetails {
        let details = ProblemDetails::new(
            self.status(),
            format!("{TYPE_PREFIX}{}", self.slug()),
            self.title(),
        )
        .with_detail(self.detail())
        .with_no_store();
        match self.retry_after() {
            Some(after) => details.with_retry_after(after),
            None => details,
        }
    }

    /// The problem as a JSON document.
    pub fn to_json(&self) -> serde_json::Value {
        self.details().to_json()
    }

    /// The problem as an HTTP response with an `application/problem+json` body.
    pub fn to_response(&self) -> Response<Bytes> {
        self.details().to_response()
    }

    /// The problem as the layer's answer, in the body type of the service it wraps.
    pub(crate) fn respond<B>(&self) -> IdempotencyResponse<B> {
        self.to_response().map(IdempotencyBody::full)
    }
}

/// The answer to a request refused for its key: a counted 400.
pub(crate) fn bad_key<B>(e: KeyError) -> IdempotencyResponse<B> {
    count(Event::BadKey);
    Problem::BadKey(e).respond()
}

impl From<Problem> for ProblemDetails {
    fn from(problem: Problem) -> Self {
        problem.details()
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

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.title(), self.status())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every problem of the layer, each variant once (and the key errors that pick a slug).
    fn every_problem() -> Vec<Problem> {
        let after = Duration::from_millis(1500);
        vec![
            Problem::BadKey(KeyError::Missing),
            Problem::BadKey(KeyError::Conflicting),
            Problem::BadKey(KeyError::Empty),
            Problem::InFlight { retry_after: after },
            Problem::WaitTimeout { retry_after: after },
            Problem::NotReplayable,
            Problem::BodyTooLarge { limit: 1024 },
            Problem::FingerprintMismatch,
            Problem::HandlerFailed,
            Problem::BodyUnreadable,
            Problem::MalformedForm,
            Problem::StoreUnavailable { retry_after: after },
            Problem::CorruptRecord,
            Problem::OutcomeUnknown,
            Problem::StillRunning {
                waited: Duration::from_millis(250),
                retry_after: Duration::from_millis(10),
            },
            Problem::ScopeUnavailable,
            Problem::BodyTimeout,
            Problem::Overloaded { retry_after: after },
            Problem::LeaseLost,
        ]
    }

    /// The layer's problems keep their bytes: the document `json!` writes of their four
    /// members, `Content-Type`, `Cache-Control` and, where a retry helps, `Retry-After`.
    #[test]
    fn the_layers_problems_answer_the_documented_bytes() {
        for p in every_problem() {
            let res = p.to_response();
            let expected = serde_json::json!({
                "type": format!("urn:tower-idempotency:problem:{}", p.slug()),
                "title": p.title(),
                "status": p.status().as_u16(),
                "detail": p.detail(),
            })
            .to_string();
            assert_eq!(res.body(), expected.as_bytes(), "{p:?}");
            assert_eq!(res.status(), p.status());
            let h = res.headers();
            assert_eq!(h[header::CONTENT_TYPE], PROBLEM_JSON);
            assert_eq!(h[header::CACHE_CONTROL], "no-store");
            let retry_after = h.get(header::RETRY_AFTER).map(|v| v.to_str().unwrap());
            let expected = p.retry_after().map(|d| match d.as_millis() {
                1500 => "2",
                _ => "1",
            });
            assert_eq!(retry_after, expected, "{p:?}");
            assert_eq!(h.len(), 2 + usize::from(expected.is_some()), "{p:?}");
        }
    }

    #[test]
    fn a_document_without_detail_or_headers_holds_only_what_was_given() {
        let res =
            ProblemDetails::new(StatusCode::NOT_FOUND, "about:blank", "Not Found").to_response();
        let expected =
            serde_json::json!({"type": "about:blank", "title": "Not Found", "status": 404});
        assert_eq!(res.body(), expected.to_string().as_bytes());
        assert_eq!(res.headers().len(), 1);
        assert_eq!(res.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }

    #[test]
    fn extension_members_follow_and_never_replace_the_standard_ones() {
        let p = ProblemDetails::new(StatusCode::CONFLICT, "urn:x:conflict", "Conflict")
            .with_extension("status", 200)
            .with_extension("type", "urn:x:other")
            .with_extension("balance", 30);
        let doc = p.to_json();
        assert_eq!(doc["status"], 409);
        assert_eq!(doc["type"], "urn:x:conflict");
        assert_eq!(doc["balance"], 30);
        assert!(doc.get("detail").is_none());
        assert_eq!(p.to_string(), "Conflict (409 Conflict)");
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        for (after, header) in [(0, "1"), (1, "1"), (999, "1"), (1000, "1"), (1001, "2")] {
            let res = ProblemDetails::new(StatusCode::CONFLICT, "urn:x", "x")
                .with_retry_after(Duration::from_millis(after))
                .to_response();
            assert_eq!(res.headers()[header::RETRY_AFTER], header, "{after} ms");
        }
    }
}
