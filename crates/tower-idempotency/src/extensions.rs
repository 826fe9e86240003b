//! The extensions through which the layer and the service it wraps talk about a request.

/// Put by the layer in the extensions of every request it tracks, before the inner service
/// sees it: this request holds a lease, its outcome will be stored and replayed to duplicates,
/// and its caller may stop waiting (a disconnect, a
/// [caller timeout](crate::IdempotencyLayer::with_caller_timeout)) while it runs on.
///
/// The proxy reads it to give tracked requests their long upstream deadline instead of the
/// caller's timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Tracked;

/// Put by the inner service in the extensions of a response to say that the request may have
/// had its effect, but that this response is not its answer: an upstream connection broke after
/// the request was sent, or a deadline passed while the upstream worked.
///
/// The layer then stores an unreplayable record for the TTL, so the request is never run again
/// for its key, whatever its status; the first caller gets this response, and duplicates get
/// 502 [`outcome-unknown`](crate::Problem::OutcomeUnknown). A response without it is stored or
/// released by its status as usual: a 502 for a request that provably never reached the
/// upstream (its connection was refused) releases the key, so a retry runs.
///
/// ```
/// use http::{Response, StatusCode};
/// use tower_idempotency::OutcomeUnknown;
///
/// let mut res = Response::new(());
/// *res.status_mut() = StatusCode::BAD_GATEWAY;
/// res.extensions_mut().insert(OutcomeUnknown);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutcomeUnknown;

/// Put by the inner service in the extensions of a response to say that the request provably
/// did not run: it never reached what acts on it (the proxy could not connect to the upstream,
/// so the upstream never saw it).
///
/// The layer then releases the key whatever the status and whatever the
/// [storable predicate](crate::IdempotencyLayer::with_storable) says, so that a retry with the
/// same key runs. The first caller gets this response.
///
/// ```
/// use http::{Response, StatusCode};
/// use tower_idempotency::NotRun;
///
/// let mut res = Response::new(());
/// *res.status_mut() = StatusCode::BAD_GATEWAY;
/// res.extensions_mut().insert(NotRun);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NotRun;
