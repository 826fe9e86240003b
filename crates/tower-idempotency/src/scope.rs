//! [`Scope`]: who a request belongs to, and the extractors that tell it.

use http::HeaderName;
use http::request::Parts;

/// The scope a request belongs to, as a [`ScopeExtractor`] tells it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The request belongs to this caller: bytes that identify it (a user or tenant id, a
    /// credential). Only requests with the same bytes share records.
    Caller(Vec<u8>),
    /// The request belongs to the global scope, on purpose: every request answered `Global`
    /// shares records, so anyone who knows a key can read its response. Right for anonymous
    /// callers of endpoints whose responses hold nothing private, and for
    /// [`GlobalScope`].
    Global,
    /// Who sent the request cannot be told (for example, the authentication layer that would
    /// say so has not run yet). The layer refuses the request with 500 `scope-unavailable`,
    /// without running the handler or asking the store.
    Unknown,
}

impl Scope {
    /// The scope of the caller these bytes identify.
    pub fn caller(id: impl Into<Vec<u8>>) -> Self {
        Scope::Caller(id.into())
    }

    /// The bytes the storage key is made from: `Some` for a caller, `None` for the global
    /// scope, and no storage key at all for an unknown scope.
    pub(crate) fn storage(&self) -> Option<Option<&[u8]>> {
        match self {
            Scope::Caller(id) => Some(Some(id)),
            Scope::Global => Some(None),
            Scope::Unknown => None,
        }
    }
}

/// Decides which scope a request belongs to.
///
/// Every record belongs to a (scope, key) pair, and a record is never visible from another
/// scope: the same key sent by another caller runs anew. The default scope is the
/// `Authorization` header; requests without it share the global scope.
///
/// An extractor answers one of three things for a request: the caller's own scope
/// ([`Scope::Caller`]), the global scope on purpose ([`Scope::Global`]), or "I cannot tell"
/// ([`Scope::Unknown`]). The layer refuses an unknown scope with a 500 problem of type
/// `scope-unavailable` ([`Problem::ScopeUnavailable`](crate::Problem::ScopeUnavailable)),
/// logged at error and counted as [`Event::ScopeUnavailable`](crate::Event::ScopeUnavailable):
/// the handler does not run and the store is not asked. An unknown caller is never put in the
/// global scope, where anyone who sends the same key and body would get its response.
///
/// # A scope from an authentication layer
///
/// The usual scope is the authenticated user, which an authentication middleware puts in the
/// request's extensions. That middleware must run **before** the idempotency layer: in axum,
/// a layer added later wraps the ones added before it, so add the idempotency layer first and
/// the authentication layer after it.
///
/// ```
/// use axum::extract::Request;
/// use axum::http::StatusCode;
/// use axum::middleware::{self, Next};
/// use axum::response::Response;
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Scope};
///
/// /// Who the authentication middleware says the caller is.
/// #[derive(Clone)]
/// struct UserId(u64);
///
/// /// Checks the credentials and puts the user in the request's extensions.
/// async fn authenticate(mut req: Request, next: Next) -> Result<Response, StatusCode> {
///     let user = match req.headers().get("x-api-key").map(|v| v.as_bytes()) {
///         Some(b"alice-secret") => UserId(1),
///         Some(b"bob-secret") => UserId(2),
///         _ => return Err(StatusCode::UNAUTHORIZED),
///     };
///     req.extensions_mut().insert(user);
///     Ok(next.run(req).await)
/// }
///
/// async fn create_order() -> &'static str { "order 1" }
///
/// // The scope is the authenticated user. Without one, the scope is unknown: never global.
/// let idempotency = IdempotencyLayer::new(MemoryStore::default()).with_scope(
///     |parts: &http::request::Parts| {
///         parts
///             .extensions
///             .get::<UserId>()
///             .map_or(Scope::Unknown, |user| Scope::caller(user.0.to_be_bytes()))
///     },
/// );
///
/// let app: Router = Router::new()
///     .route("/orders", post(create_order))
///     .layer(idempotency)                              // runs second: the user is known
///     .layer(middleware::from_fn(authenticate));       // runs first
/// ```
///
/// With the two `.layer` calls the other way round, the idempotency layer runs before the
/// user is known: every keyed request gets 500 `scope-unavailable` and nothing runs, which a
/// first test shows at once. An extractor that answered [`Scope::Global`] for a request without
/// a user would instead put every such request in one scope, where user B replays user A's
/// response by sending A's key and body.
///
/// # An extractor from a closure
///
/// Any `Fn(&Parts) -> Scope` is an extractor, so a scope can come from a request extension set
/// by an authentication layer (see [above](#a-scope-from-an-authentication-layer) for the layer
/// order):
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Scope};
///
/// #[derive(Clone)]
/// struct UserId(u64);
///
/// let layer = IdempotencyLayer::new(MemoryStore::default()).with_scope(|parts: &http::request::Parts| {
///     parts
///         .extensions
///         .get::<UserId>()
///         .map_or(Scope::Unknown, |u| Scope::caller(u.0.to_be_bytes()))
/// });
/// ```
///
/// Answer [`Scope::Unknown`] whenever the caller cannot be told, not [`Scope::Global`]: an
/// unknown scope is a refused request, a wrong global scope is a leak.
pub trait ScopeExtractor: Send + Sync + 'static {
    /// The scope of the request.
    fn scope(&self, parts: &Parts) -> Scope;

    /// The request headers the scope is made of, in order, when it is made of headers alone:
    /// what an operator's scope values stand for in the admin routes. `None` (the default) for
    /// a scope told otherwise.
    fn header_names(&self) -> Option<&[HeaderName]> {
        None
    }
}

impl<F> ScopeExtractor for F
where
    F: Fn(&Parts) -> Scope + Send + Sync + 'static,
{
    fn scope(&self, parts: &Parts) -> Scope {
        self(parts)
    }
}

/// Every request in one scope. Use it only when keys are unguessable and responses hold nothing
/// private, since any caller who knows a key can read its response.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalScope;

impl ScopeExtractor for GlobalScope {
    fn scope(&self, _: &Parts) -> Scope {
        Scope::Global
    }

    fn header_names(&self) -> Option<&[HeaderName]> {
        Some(&[])
    }
}

/// The scope is the values of some request headers (default: `Authorization`).
///
/// A request that carries none of the headers is an anonymous caller, in the global scope, by
/// default: an API whose callers authenticate with `Authorization` lets anonymous callers share
/// one scope, as it always did. Where the headers are set by something that always sets them
/// (an authentication gateway in front that adds `X-User-Id`), a request without them means
/// that something did not run: [`unknown_when_absent`](Self::unknown_when_absent) refuses it
/// instead (500 `scope-unavailable`).
#[derive(Debug, Clone)]
pub struct HeaderScope {
    names: Vec<HeaderName>,
    absent: Scope,
}

impl Default for HeaderScope {
    fn default() -> Self {
        Self::new([http::header::AUTHORIZATION])
    }
}

impl HeaderScope {
    /// A scope made of the values of these headers, in this order. A request with none of them
    /// is in the global scope.
    pub fn new(names: impl IntoIterator<Item = HeaderName>) -> Self {
        Self {
            names: names.into_iter().collect(),
            absent: Scope::Global,
        }
    }

    /// A request with none of the headers has an unknown scope, and is refused with 500
    /// `scope-unavailable`, instead of being put in the global scope.
    pub fn unknown_when_absent(mut self) -> Self {
        self.absent = Scope::Unknown;
        self
    }
}

impl ScopeExtractor for HeaderScope {
    fn scope(&self, parts: &Parts) -> Scope {
        if !self.names.iter().any(|n| parts.headers.contains_key(n)) {
            return self.absent.clone();
        }
        let mut scope = Vec::new();
        for name in &self.names {
            // Each header's values, length-prefixed, so that no two header sets share a scope.
            let values = parts.headers.get_all(name);
            scope.extend_from_slice(&(values.iter().count() as u32).to_be_bytes());
            for v in values {
                scope.extend_from_slice(&(v.len() as u32).to_be_bytes());
                scope.extend_from_slice(v.as_bytes());
            }
        }
        Scope::Caller(scope)
    }

    fn header_names(&self) -> Option<&[HeaderName]> {
        Some(&self.names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&'static str, &'static str)]) -> Parts {
        let mut req = http::Request::new(());
        for (n, v) in headers {
            req.headers_mut()
                .append(*n, http::HeaderValue::from_static(v));
        }
        req.into_parts().0
    }

    #[test]
    fn header_scope_without_its_headers_is_global_unless_told_otherwise() {
        let auth = HeaderScope::default();
        assert_eq!(auth.scope(&parts(&[])), Scope::Global);
        assert!(matches!(
            auth.scope(&parts(&[("authorization", "Bearer a")])),
            Scope::Caller(_)
        ));
        let gateway =
            HeaderScope::new([HeaderName::from_static("x-user-id")]).unknown_when_absent();
        assert_eq!(gateway.scope(&parts(&[])), Scope::Unknown);
        assert_eq!(
            gateway.scope(&parts(&[("authorization", "Bearer a")])),
            Scope::Unknown
        );
        assert_ne!(
            gateway.scope(&parts(&[("x-user-id", "1")])),
            gateway.scope(&parts(&[("x-user-id", "2")]))
        );
        // An empty value is a caller of its own, not the global scope.
        assert!(matches!(
            gateway.scope(&parts(&[("x-user-id", "")])),
            Scope::Caller(_)
        ));
    }

    #[test]
    fn global_scope_is_global() {
        assert_eq!(
            GlobalScope.scope(&parts(&[("authorization", "x")])),
            Scope::Global
        );
    }
}
