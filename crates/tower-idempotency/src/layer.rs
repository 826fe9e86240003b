//! [`IdempotencyLayer`]: the tower layer and its builder.

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method, StatusCode};
use tower::Layer;

use crate::config::{Config, ConfigError, InFlightLimit, KeySecret, MAX_DURATION, OnConflict};
use crate::extract::{IDEMPOTENCY_KEY, KeySources, X_IDEMPOTENT_KEY};
use crate::record::MAX_BODY_LEN;
use crate::scope::{GlobalScope, HeaderScope, ScopeExtractor};
use crate::service::Idempotency;
use crate::shared::Shared;
use crate::storage_key::StorageKey;
use crate::store::Store;

/// Makes every covered request that carries an idempotency key run once, and replays its
/// response to every duplicate. See the [crate docs](crate) for the contract.
///
/// ```
/// use axum::{Router, routing::post};
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, OnConflict};
///
/// async fn create_order() -> &'static str { "created" }
///
/// let app: Router = Router::new()
///     .route("/orders", post(create_order))
///     .layer(
///         IdempotencyLayer::new(MemoryStore::default())
///             .with_ttl(Duration::from_secs(24 * 3600))
///             .with_on_conflict(OnConflict::Wait),
///     );
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    /// Copied on write by the builder methods; the work in its background is shared by every
    /// clone of the layer all the same.
    shared: Arc<Shared>,
}

impl std::fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// A layer over `store` with the default options.
    pub fn new(store: impl Store) -> Self {
        Self::from_shared(Arc::new(store))
    }

    /// A layer over a store shared with other parts of the program.
    pub fn from_shared(store: Arc<dyn Store>) -> Self {
        Self {
            shared: Arc::new(Shared::new(store)),
        }
    }

    fn config(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut Arc::make_mut(&mut self.shared).config);
        self
    }

    /// How long a completed response is kept for replay (default 240 s, Flask-Idempotent's; at
    /// most [`MAX_DURATION`](crate::MAX_DURATION)).
    pub fn with_ttl(self, ttl: Duration) -> Self {
        self.config(|c| c.ttl = ttl.min(MAX_DURATION))
    }

    /// How long a lease lives without renewal (default 30 s); it is renewed every third of that
    /// while the handler runs. After a crash, the next attempt runs once this has passed.
    /// Held between 3 ms and [`MAX_DURATION`](crate::MAX_DURATION).
    pub fn with_lock_ttl(self, lock_ttl: Duration) -> Self {
        self.config(|c| c.lock_ttl = lock_ttl.clamp(Duration::from_millis(3), MAX_DURATION))
    }

    /// How long a duplicate waits for the request in flight before a 409 (default 60 s).
    pub fn with_wait_timeout(self, wait_timeout: Duration) -> Self {
        self.config(|c| c.wait_timeout = wait_timeout)
    }

    /// Wait for the request in flight (default) or answer 409 at once.
    pub fn with_on_conflict(self, on_conflict: OnConflict) -> Self {
        self.config(|c| c.on_conflict = on_conflict)
    }

    /// The methods that are tracked (default POST, PUT, PATCH, DELETE). Others pass through.
    pub fn with_methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.config(|c| c.methods = methods)
    }

    /// Whether a covered request without a key is a 400 (default: it passes through untracked).
    pub fn with_require_key(self, require_key: bool) -> Self {
        self.config(|c| c.require_key = require_key)
    }

    /// Whether a request runs untracked when the store is unavailable (default: no, a 503).
    /// Each such pass is logged and counted.
    pub fn with_fail_open(self, fail_open: bool) -> Self {
        self.config(|c| c.fail_open = fail_open)
    }

    /// How requests are assigned to scopes (default: the `Authorization` header, and the global
    /// scope for a request without one).
    ///
    /// A request whose scope the extractor answers [`Scope::Unknown`](crate::Scope::Unknown) is
    /// refused with 500 `scope-unavailable`: the handler does not run and the store is not
    /// asked. When the scope comes from an authentication layer, that layer must run before
    /// this one; see [`ScopeExtractor`](crate::ScopeExtractor#a-scope-from-an-authentication-layer)
    /// for the order in axum.
    pub fn with_scope(self, scope: impl ScopeExtractor) -> Self {
        let scope: Arc<dyn ScopeExtractor> = Arc::new(scope);
        self.config(|c| c.scope = scope)
    }

    /// The scope is the values of these headers (the proxy's `--scope-header`). A request with
    /// none of them is in the global scope; see [`HeaderScope`] to refuse it instead.
    pub fn with_scope_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.with_scope(HeaderScope::new(names))
    }

    /// One scope for every request. Any caller who knows a key can then read its response.
    pub fn with_global_scope(self) -> Self {
        self.with_scope(GlobalScope)
    }

    /// The largest request body a tracked request may carry (default 1 MiB); larger is a 413.
    ///
    /// A covered request with a form body (urlencoded or multipart) is read to look for its
    /// `__idempotent_key` field, so it is held to this limit even without a key. To let large
    /// keyless uploads through a layer, leave [`KeySource::FormField`](crate::KeySource) out of
    /// [`with_key_sources`](Self::with_key_sources), or scope the layer to the routes that
    /// need it.
    pub fn with_max_request_body(self, bytes: usize) -> Self {
        self.config(|c| c.max_request_body = bytes)
    }

    /// The largest response kept for replay (default 1 MiB). A larger response still reaches
    /// its caller in full; duplicates then get a 409 instead of a replay.
    ///
    /// Held to 4 GiB less one byte, the longest body a record can hold: a larger limit would
    /// keep responses that no duplicate could read back.
    pub fn with_max_response_body(self, bytes: usize) -> Self {
        self.config(|c| c.max_response_body = bytes.min(MAX_BODY_LEN))
    }

    /// Request headers that are part of the fingerprint, beside method, path, query, content
    /// type, `Content-Encoding` (always) and body (default: none; the proxy's
    /// `--fingerprint-header`). A header such as `X-HTTP-Method-Override` changes what a request
    /// does, so the same key with another value of it is a 422, not a replay. Each header counts
    /// with every value it carries, in order, and only when the request carries it. Replaces
    /// the headers named before.
    ///
    /// Name only headers a client sends the same on every retry of a request. Changing the list
    /// changes the fingerprint of the requests that carry the headers: within the TTL, a
    /// duplicate of such a request completed before the change gets 422, and does not run.
    ///
    /// Refused with [`ConfigError::KeyHeaderInFingerprint`] when a name is `Idempotency-Key` or
    /// `X-Idempotent-Key`: the key names the record already, and browsers send an
    /// `Idempotency-Key` of their own that changes on every click.
    pub fn with_fingerprint_headers(
        self,
        names: impl IntoIterator<Item = HeaderName>,
    ) -> Result<Self, ConfigError> {
        let mut headers: Vec<HeaderName> = Vec::new();
        for name in names {
            if name == IDEMPOTENCY_KEY || name == X_IDEMPOTENT_KEY {
                return Err(ConfigError::KeyHeaderInFingerprint(name));
            }
            if name != http::header::CONTENT_ENCODING && !headers.contains(&name) {
                headers.push(name);
            }
        }
        Ok(self.config(|c| c.fingerprint_headers = headers))
    }

    /// Which statuses are stored for replay. Others release the lease so a retry runs again.
    /// Default: [`default_storable`](crate::default_storable).
    pub fn with_storable(
        self,
        storable: impl Fn(StatusCode) -> bool + Send + Sync + 'static,
    ) -> Self {
        let storable = Arc::new(storable);
        self.config(|c| c.storable = storable)
    }

    /// Where keys are read from (default: every source).
    pub fn with_key_sources(self, sources: KeySources) -> Self {
        self.config(|c| c.key_sources = sources)
    }

    /// A namespace mixed into every storage key, so that services sharing a store never share
    /// records (default: empty).
    pub fn with_namespace(self, namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        self.config(|c| c.namespace = namespace)
    }

    /// How long the caller whose request runs the handler waits for its answer (default: as
    /// long as it takes). Past it, that caller gets 504
    /// [`still-running`](crate::Problem::StillRunning) with `Retry-After`, and the handler is
    /// not cancelled: it keeps running with its lease held and renewed, and its outcome is
    /// stored when it comes (counted as
    /// [`LateAnswerStored`](crate::Event::LateAnswerStored)). Duplicates meanwhile
    /// wait or get 409 as for any request in flight, then replay it. Nothing runs twice
    /// because a caller stopped waiting. The proxy's `--upstream-timeout` is this option.
    ///
    /// A timeout put around the layer from outside has the same effect on the handler (so does
    /// a caller that disconnects); this option only gives that caller an answer that says so.
    pub fn with_caller_timeout(self, timeout: Duration) -> Self {
        self.config(|c| c.caller_timeout = Some(timeout))
    }

    /// How long a body the layer reads in full may take to arrive, from the moment the layer
    /// starts reading it (default: as long as it takes; the proxy's `--client-body-timeout`,
    /// 30 s there).
    ///
    /// The layer reads the body of a tracked request in full, to fingerprint it, before it
    /// touches the store; so does it for a covered form body, to look for its key. A body that
    /// has not arrived in full by then is answered 408
    /// [`body-timeout`](crate::Problem::BodyTimeout) and counted as
    /// [`BodyTimeout`](crate::Event::BodyTimeout): the handler does not run, no lease
    /// is taken, and the key stays free for a retry. Bodies the layer does not read (requests
    /// without a key, methods it does not cover) stream to the handler as they come and are not
    /// timed by this option.
    pub fn with_request_body_timeout(self, timeout: Duration) -> Self {
        self.config(|c| c.request_body_timeout = Some(timeout))
    }

    /// At most `max` tracked requests run their handler at once (default: no bound; the
    /// proxy's `--max-in-flight`, 4096 there). `max` is at least 1.
    ///
    /// Past the bound, a tracked request is answered 503
    /// [`too-many-in-flight`](crate::Problem::Overloaded) with `Retry-After`, counted as
    /// [`Overloaded`](crate::Event::Overloaded), before the store is asked for
    /// anything: no lease is taken and the key stays free for a retry. The check comes before
    /// each attempt to take the lease, so at the bound a duplicate (of a request in flight or
    /// completed) gets the 503 too, and its retry waits or replays as usual. A request that
    /// runs holds its place until
    /// its outcome is stored or its lease released, including when its caller went away or
    /// stopped waiting and the handler runs on in the background. Duplicates waiting for a
    /// request in flight hold no place. Requests without a key are not counted.
    ///
    /// Every clone of this layer, and every service made from them, shares the bound; calling
    /// this again starts a new one.
    pub fn with_max_in_flight(self, max: usize) -> Self {
        let max = max.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        let limit = InFlightLimit {
            max,
            permits: Arc::new(tokio::sync::Semaphore::new(max)),
        };
        self.config(|c| c.in_flight = Some(limit))
    }

    /// Waits until no work is left in the background: every handler whose caller went away (a
    /// disconnect, the [caller timeout](Self::with_caller_timeout)) has finished, and its
    /// outcome is stored or its lease released, including writes retried after a store failure.
    ///
    /// Call it on shutdown, once the server has stopped taking requests and has drained its
    /// connections, and bound it with a timeout of your own: work cut short here runs again
    /// once its lease expires. Every clone of this layer, and every service made from them,
    /// shares the work it waits for.
    pub async fn drain(&self) {
        // Closed for good: a closed tracker still tracks the work started after, and its
        // `wait` then returns once that is done too. Reopening it here would race with a drain
        // of a clone on another thread (a worker per core, each draining on shutdown): one
        // reopening between the other's `close` and `wait` leaves that one waiting for ever.
        let background = &self.shared.background;
        background.close();
        background.wait().await;
    }

    /// The `Retry-After` advised with 409 and 503 answers (default 1 s).
    pub fn with_retry_after(self, retry_after: Duration) -> Self {
        self.config(|c| c.retry_after = retry_after)
    }

    /// A server secret that makes every storage key an HMAC-SHA256 of (namespace, scope, key)
    /// keyed with `secret`, instead of a plain SHA-256 (default: no secret).
    ///
    /// Without a secret, anyone who can read the store can test a guess of a key (and a scope,
    /// such as a bearer token) by hashing it and looking for the result. With one, storage keys
    /// cannot be computed without the secret. Every process that shares a store must use the
    /// same secret to share its records; setting, changing or removing it makes earlier
    /// records unreachable (they expire with their TTL), so a duplicate of a request completed
    /// before the change runs again. Use at least 32 random bytes, and keep the secret out of
    /// the store's reach.
    pub fn with_key_secret(self, secret: impl AsRef<[u8]>) -> Self {
        let secret = KeySecret::new(secret.as_ref());
        self.config(|c| c.key_secret = Some(secret))
    }

    /// The [`StorageKey`] under which this layer keeps the record of `key` in `scope`: what the
    /// store sees instead of the raw key, for tools and tests that inspect a store.
    ///
    /// `key` is the key as the layer reads it (after unquoting an sf-string `Idempotency-Key`);
    /// it is not validated here. `scope` is the caller's bytes of [`Scope::Caller`], `None` for
    /// [`Scope::Global`]; see [`storage_key_for_request`] to apply the layer's own extractor.
    /// The namespace and the key secret of this layer are taken into account.
    ///
    /// [`Scope::Caller`]: crate::Scope::Caller
    /// [`Scope::Global`]: crate::Scope::Global
    ///
    /// [`storage_key_for_request`]: IdempotencyLayer::storage_key_for_request
    pub fn storage_key_for(&self, scope: Option<&[u8]>, key: &str) -> StorageKey {
        let config = &self.shared.config;
        StorageKey::derive(
            config.key_secret.as_ref(),
            &config.namespace,
            scope,
            key.as_bytes(),
        )
    }

    /// The [`StorageKey`] of `key` for a request with these parts, scoped by this layer's
    /// [`ScopeExtractor`] (by default its `Authorization` header), or `None` when the extractor
    /// cannot tell the request's scope ([`Scope::Unknown`](crate::Scope::Unknown)): the layer
    /// refuses such a request, so no record of it exists.
    pub fn storage_key_for_request(&self, parts: &Parts, key: &str) -> Option<StorageKey> {
        let scope = self.shared.config.scope.scope(parts);
        scope
            .storage()
            .map(|scope| self.storage_key_for(scope, key))
    }

    /// What the layer shares with its services.
    #[cfg(feature = "admin")]
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The store this layer uses.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_shared(inner, self.shared.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[test]
    fn the_response_limit_is_held_to_what_a_record_holds() {
        let layer = IdempotencyLayer::new(MemoryStore::default());
        let huge = layer.clone().with_max_response_body(usize::MAX);
        assert_eq!(huge.shared.config.max_response_body, MAX_BODY_LEN);
        let small = layer.with_max_response_body(1024);
        assert_eq!(small.shared.config.max_response_body, 1024);
    }

    #[test]
    fn fingerprint_headers_are_named_once() {
        let over = HeaderName::from_static("x-http-method-override");
        let layer = IdempotencyLayer::new(MemoryStore::default())
            .with_fingerprint_headers([over.clone(), http::header::CONTENT_ENCODING, over.clone()])
            .unwrap();
        assert_eq!(layer.shared.config.fingerprint_headers, [over]);
    }
}
