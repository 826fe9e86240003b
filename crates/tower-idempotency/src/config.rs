//! Options and their defaults. The builder methods live on
//! [`IdempotencyLayer`](crate::IdempotencyLayer) and mirror the proxy's flags.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use http::{HeaderName, Method, StatusCode};
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::extract::KeySources;
use crate::scope::{HeaderScope, ScopeExtractor};

/// How long a completed record is kept: 240 s, Flask-Idempotent's default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(240);
/// How long a lease lives without renewal: 30 s. It is renewed every third of that while the
/// handler runs.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(30);
/// How long a duplicate waits for the request in flight: 60 s.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest request body a tracked request may carry: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 1024 * 1024;
/// The largest response kept for replay: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 1024 * 1024;

/// The longest duration the layer and its stores keep anything (ten years): "forever", without
/// overflowing a clock. A longer TTL or lease is held to it, and so is a wait past it.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What a duplicate does while the original request is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnConflict {
    /// Wait for the original's outcome and replay it (Flask-Idempotent's behaviour). A request may ask
    /// for less waiting with `Prefer: wait=N`.
    #[default]
    Wait,
    /// Answer 409 with `Retry-After` at once (the IETF draft's advice).
    Reject,
}

/// The default storable predicate: any status below 500 except 408, 409, 425 and 429, which
/// say "try again", so storing them would make the retry fail forever.
pub fn default_storable(status: StatusCode) -> bool {
    status.as_u16() < 500 && !matches!(status.as_u16(), 408 | 409 | 425 | 429)
}

pub(crate) type Storable = Arc<dyn Fn(StatusCode) -> bool + Send + Sync>;

/// A configuration the layer refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A header that carries the idempotency key (`Idempotency-Key`, `X-Idempotent-Key`) was
    /// named as a fingerprint header. The key already names the record; a browser that adds an
    /// `Idempotency-Key` of its own beside the page's key sends a new one on every click, so a
    /// fingerprint over it would make every duplicate a 422.
    KeyHeaderInFingerprint(HeaderName),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::KeyHeaderInFingerprint(name) => write!(
                f,
                "`{name}` carries the idempotency key and cannot be a fingerprint header"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// HMAC-SHA256 keyed with the server secret, ready to be cloned for each storage key.
#[derive(Clone)]
pub(crate) struct KeySecret(pub(crate) Hmac<Sha256>);

impl KeySecret {
    pub(crate) fn new(secret: &[u8]) -> Self {
        // HMAC takes keys of any length (RFC 2104: longer ones are hashed first), so this
        // never fails.
        let mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
        Self(mac)
    }
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) ttl: Duration,
    pub(crate) lock_ttl: Duration,
    pub(crate) wait_timeout: Duration,
    pub(crate) on_conflict: OnConflict,
    pub(crate) methods: Vec<Method>,
    pub(crate) require_key: bool,
    pub(crate) fail_open: bool,
    pub(crate) scope: Arc<dyn ScopeExtractor>,
    /// Request headers fingerprinted beside `Content-Encoding`, which always is.
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) max_request_body: usize,
    pub(crate) max_response_body: usize,
    pub(crate) storable: Storable,
    pub(crate) key_sources: KeySources,
    pub(crate) namespace: String,
    pub(crate) retry_after: Duration,
    /// How long the caller that runs the handler waits for its answer; `None`: as long as it
    /// takes.
    pub(crate) caller_timeout: Option<Duration>,
    /// The server secret: storage keys are HMACs instead of plain hashes when it is set.
    pub(crate) key_secret: Option<KeySecret>,
    /// How long a body the layer reads in full may take to arrive; `None`: as long as it takes.
    pub(crate) request_body_timeout: Option<Duration>,
    /// The bound on tracked requests running at once, shared by every clone of the layer;
    /// `None`: no bound.
    pub(crate) in_flight: Option<InFlightLimit>,
}

/// The bound of [`with_max_in_flight`](crate::IdempotencyLayer::with_max_in_flight): a
/// semaphore shared by every clone of the layer, and its size.
#[derive(Clone)]
pub(crate) struct InFlightLimit {
    pub(crate) max: usize,
    pub(crate) permits: Arc<Semaphore>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            lock_ttl: DEFAULT_LOCK_TTL,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            on_conflict: OnConflict::Wait,
            methods: vec![Method::POST, Method::PUT, Method::PATCH, Method::DELETE],
            require_key: false,
            fail_open: false,
            scope: Arc::new(HeaderScope::default()),
            fingerprint_headers: Vec::new(),
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            max_response_body: DEFAULT_MAX_RESPONSE_BODY,
            storable: Arc::new(default_storable),
            key_sources: KeySources::default(),
            namespace: String::new(),
            retry_after: Duration::from_secs(1),
            caller_timeout: None,
            key_secret: None,
            request_body_timeout: None,
            in_flight: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("ttl", &self.ttl)
            .field("lock_ttl", &self.lock_ttl)
            .field("wait_timeout", &self.wait_timeout)
            .field("on_conflict", &self.on_conflict)
            .field("methods", &self.methods)
            .field("require_key", &self.require_key)
            .field("fail_open", &self.fail_open)
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("max_request_body", &self.max_request_body)
            .field("max_response_body", &self.max_response_body)
            .field("key_sources", &self.key_sources)
            .field("namespace", &self.namespace)
            .field("caller_timeout", &self.caller_timeout)
            .field("request_body_timeout", &self.request_body_timeout)
            .field("max_in_flight", &self.in_flight.as_ref().map(|l| l.max))
            // Never the secret itself: only whether there is one.
            .field("key_secret", &self.key_secret.as_ref().map(|_| ".."))
            .finish_non_exhaustive()
    }
}
