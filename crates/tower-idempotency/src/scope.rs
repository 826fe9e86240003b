//! Who a request belongs to.
//!
//! Every record belongs to a (scope, key) pair, and a record is never visible from another
//! scope: the same key sent by another caller runs anew. The default scope is the
//! `Authorization` header; requests without it share the global scope.

use http::HeaderName;
use http::request::Parts;

/// Decides which scope a request belongs to.
///
/// Return `None` for the global scope. Any `Fn(&Parts) -> Option<Vec<u8>>` is an extractor, so a
/// scope can come from a request extension set by an authentication layer:
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// #[derive(Clone)]
/// struct UserId(u64);
///
/// let layer = IdempotencyLayer::new(MemoryStore::default()).with_scope(|parts: &http::request::Parts| {
///     parts.extensions.get::<UserId>().map(|u| u.0.to_be_bytes().to_vec())
/// });
/// ```
pub trait ScopeExtractor: Send + Sync + 'static {
    /// The scope of the request, or `None` for the global scope.
    fn scope(&self, parts: &Parts) -> Option<Vec<u8>>;
}

impl<F> ScopeExtractor for F
where
    F: Fn(&Parts) -> Option<Vec<u8>> + Send + Sync + 'static,
{
    fn scope(&self, parts: &Parts) -> Option<Vec<u8>> {
        self(parts)
    }
}

/// Every request in one scope. Use it only when keys are unguessable and responses hold nothing
/// private, since any caller who knows a key can read its response.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalScope;

impl ScopeExtractor for GlobalScope {
    fn scope(&self, _: &Parts) -> Option<Vec<u8>> {
        None
    }
}

/// The scope is the values of some request headers (default: `Authorization`).
///
/// A request with none of the headers is in the global scope.
#[derive(Debug, Clone)]
pub struct HeaderScope {
    names: Vec<HeaderName>,
}

impl Default for HeaderScope {
    fn default() -> Self {
        Self::new([http::header::AUTHORIZATION])
    }
}

impl HeaderScope {
    /// A scope made of the values of these headers, in this order.
    pub fn new(names: impl IntoIterator<Item = HeaderName>) -> Self {
        Self {
            names: names.into_iter().collect(),
        }
    }
}

impl ScopeExtractor for HeaderScope {
    fn scope(&self, parts: &Parts) -> Option<Vec<u8>> {
        if !self.names.iter().any(|n| parts.headers.contains_key(n)) {
            return None;
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
        Some(scope)
    }
}
