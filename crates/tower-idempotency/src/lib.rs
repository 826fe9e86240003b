//! Idempotency keys for [tower] and [axum]: a request that carries a key runs once, and every
//! duplicate, simultaneous or later, gets the same response instead of running again.
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore};
//!
//! async fn create_order() -> &'static str { "order 1" }
//!
//! let app: Router = Router::new()
//!     .route("/orders", post(create_order))
//!     .layer(IdempotencyLayer::new(MemoryStore::default()));
//! ```
//!
//! # The contract
//!
//! **Which requests.** POST, PUT, PATCH and DELETE ([configurable](IdempotencyLayer::with_methods))
//! that carry a key in the `Idempotency-Key` header (an RFC 8941 sf-string, `"abc"`, or a bare
//! `abc`), the `X-Idempotent-Key` header, the `__idempotent_key` query parameter, or the
//! `__idempotent_key` field of a urlencoded or multipart form. Keys are 1 to 255 visible ASCII
//! characters. A bad key, two sources naming different keys, or a repeated key header is a 400,
//! except that an `Idempotency-Key` header that disagrees with a key the page chose (form field,
//! query parameter, `X-Idempotent-Key`) is ignored, and the page's key wins: browsers (Firefox)
//! add an `Idempotency-Key` of their own to form and fetch POSTs (counted as
//! [`Event::KeyHeaderIgnored`]).
//! Requests without a key pass through, unless [keys are required](IdempotencyLayer::with_require_key).
//!
//! **Scope and fingerprint.** A record belongs to (scope, key); the default scope is the
//! `Authorization` header (anonymous callers share the global scope), so one caller can never
//! replay another's response. A [custom extractor](IdempotencyLayer::with_scope) answers a
//! caller's scope, the global scope on purpose, or [`Scope::Unknown`]: a request whose caller
//! cannot be told (say, the authentication layer runs after this one, see [`ScopeExtractor`]) is a 500
//! `scope-unavailable`, counted as
//! [`Event::ScopeUnavailable`]; the handler does not run, and
//! the request is never put in the global scope. The store sees
//! only a SHA-256 of (namespace, scope, key), or an HMAC-SHA256 with a
//! [server secret](IdempotencyLayer::with_key_secret), so that a reader of the store cannot test
//! guesses of keys. Each record carries a [fingerprint](fingerprint::Fingerprint) of the request
//! (method, path, query without the key, content type, `Content-Encoding`, the
//! [fingerprint headers](IdempotencyLayer::with_fingerprint_headers) configured, body): reusing
//! a key for another request is a 422 and does not run the handler. Requests without
//! `Content-Encoding` or fingerprint headers keep the fingerprint earlier versions gave them; a
//! duplicate of a request that carries one, whose original was stored by a version where it did
//! not count (or before the header was configured), gets 422 within the record's TTL, and does
//! not run.
//!
//! **Lifecycle.** The first request takes a lease (30 s, renewed every 10 s while it runs),
//! runs the handler in its own task, then stores the response for 240 s. Duplicates that arrive
//! meanwhile wait for it, woken by the store, and get the stored response with
//! `Idempotent-Replayed: true`: the same status, body bytes and headers (except `Set-Cookie`,
//! `Date` and hop-by-hop headers). `on_conflict = reject` answers them 409 at once instead, and a
//! client can shorten its wait with `Prefer: wait=N`.
//!
//! Responses with a status of 500 or more, 408, 409, 425 or 429 are not stored
//! ([configurable](IdempotencyLayer::with_storable)), nor is one its inner service marks
//! [`NotRun`]: the lease is released so a retry runs again. So is a handler that panics (its caller gets a 500) or that
//! fails. Nothing else frees a key while the handler may run: a caller that disconnects, that
//! passes its [caller timeout](IdempotencyLayer::with_caller_timeout) (504 `still-running`), or
//! that a timeout around the layer gives up on, does not cancel the handler; its outcome is
//! stored for the retry. When the outcome cannot be known (the inner service marks its response
//! [`OutcomeUnknown`], or the response body fails after its status), duplicates get 502
//! `outcome-unknown` for the TTL and the handler never runs again for the key. A response larger
//! than the replay limit reaches its caller in full; duplicates then get a 409 instead of
//! running the handler twice. So does a response the stored-record format cannot hold (more
//! than 65 535 headers, a header value or a body over 4 GiB; counted as
//! [`Event::Unstorable`]): it is never stored cut to fit. A
//! completion or release that fails for want of the store is written again in the background
//! until it lands; [`IdempotencyLayer::drain`] waits for that work on shutdown.
//!
//! **Crashes.** If a process dies while a handler runs, its lease expires after the lock TTL and
//! the next attempt runs the handler again. After a crash the promise is at-least-once: a
//! handler that must never run twice should also be idempotent in its own data.
//!
//! **Errors** are `application/problem+json` (RFC 9457), see [`Problem`]: 400 bad key (or a
//! tracked request whose multipart form does not parse or has no boundary, or whose body cannot
//! be read), 408 a tracked body that did not arrive within the
//! [body timeout](IdempotencyLayer::with_request_body_timeout), 409 in
//! flight or wait timeout (with `Retry-After`), 413 body too large, 422 key reused, 502 outcome
//! unknown, 504 still running past the caller timeout (with `Retry-After`), 503 store
//! unavailable or full (fail closed; [fail open](IdempotencyLayer::with_fail_open) runs the
//! request untracked instead) or too many tracked requests
//! [in flight](IdempotencyLayer::with_max_in_flight) (with `Retry-After`; nothing taken), 500 a
//! stored record that cannot be read (corrupt, or written by
//! another tool: never replayed, never run again, never failed open; counted as
//! [`Event::CorruptRecord`]), 500 `scope-unavailable` a request
//! whose scope the extractor cannot tell (never run, the store not asked).
//!
//! # Stores
//!
//! [`MemoryStore`] is the embedded default, for one process: bounded, woken by notification.
//! `RedisStore` (feature `redis`) shares records between every process and machine that talks
//! to one Redis or Redis Cluster, at one round trip per step (see [`Store`]). `PostgresStore`
//! (feature `postgres`) keeps records in a PostgreSQL table, durable, and with its
//! `IdempotentTx` extractor the record commits in the handler's own transaction, so that a
//! crash at any instant leaves both the handler's writes and the record, or neither: exactly
//! once for the database's effects (see [`Completion`] for the seam any such store uses). Any backend
//! implements the small [`Store`] trait; every atomic step of the lifecycle is one call, and the
//! conformance suite, `tower_idempotency::conformance` (feature `conformance`), is how a backend
//! proves itself.
//!
//! For operators, every store also answers [`Store::inspect`], [`Store::forget`] and
//! [`Store::in_flight`], and `tower_idempotency::admin` (feature `admin`) serves them as an axum
//! router: what is stored under a key, forget it so that it runs again, what is in flight.
//!
//! # Traces and metrics
//!
//! The layer speaks `tracing` and the `metrics` facade, so it reports to whatever subscriber and
//! recorder the application installs (tracing-subscriber's `fmt`, tracing-opentelemetry for an
//! OTLP collector, a Prometheus exporter, ...), and costs next to nothing without them.
//!
//! Each tracked request is a span `idempotency.request` at `DEBUG` under the target
//! [`REQUEST_TARGET`], with the attributes `idempotency.key_hash` (the first 16 hex digits of its
//! [`StorageKey`]: the key itself is never logged or recorded), `idempotency.outcome`
//! (`executed`, `replayed`, `waited`, `conflict`, `wait_timeout`, `mismatch`, `rejected`,
//! `store_error`, `fail_open`, `corrupt_record`, `unreplayable`, `scope_unavailable` or
//! `untracked`), `idempotency.wait_seconds` when it waited, `idempotency.lease` for an owner
//! (`stored`, `released`, `lost`, `retrying`, `failed`), `http.request.method` and
//! `http.response.status_code`. Its children are a span per store call
//! (`idempotency.store.begin`, `.complete`, `.release`, `.renew`, `.wait`, under
//! [`STORE_TARGET`], with `idempotency.store.result`) and the handler's run
//! (`idempotency.handler`, under [`HANDLER_TARGET`]); an event `tracked request` with the hash,
//! outcome, wait and status ends it. A filter at `info` disables them all, and a disabled span
//! costs a level check: enable `tower_idempotency=debug` for the spans, or
//! `tower_idempotency::request=debug` for one log line per tracked request.
//!
//! Beside the counter [`EVENTS_TOTAL`] (by [`Event`]), the layer records the histograms
//! [`WAIT_DURATION`] (how long duplicates waited), [`OWNER_DURATION`] (how long owners held
//! their key), [`STORE_DURATION`] (the store's round trip, by `verb`) and [`RECORD_BYTES`]
//! (the size of stored records), and the gauge [`LEASES_HELD`]. Their keys are static, so
//! recording allocates nothing. A Prometheus exporter renders a histogram without buckets as a
//! summary: give these buckets (the proxy's are in its `telemetry.rs`).
//!
//! # Runtime
//!
//! The layer runs handlers with `tokio::spawn`, so it needs a tokio runtime.
//!
//! [tower]: https://docs.rs/tower
//! [axum]: https://docs.rs/axum

#![cfg_attr(docsrs, feature(doc_cfg))]

// The public items live in private modules and are re-exported here, so each has one path.
// A tracked request goes through them in this order: `service` routes it, `tracked` reads its
// body and takes the lease or waits, `owner` runs the handler under its `lease` (which
// `detached` keeps alive when the caller goes away), and `replay` answers its duplicates.
mod body;
mod config;
mod detached;
mod extensions;
mod extract;
mod fingerprint;
mod form;
mod future;
mod headers;
mod key;
mod layer;
mod lease;
mod metrics;
mod owner;
mod problem;
mod replay;
mod scope;
mod service;
mod shared;
mod storage_key;
mod store;
mod trace;
mod tracked;
mod transaction;

#[cfg(feature = "admin")]
#[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
pub mod admin;
#[cfg(feature = "conformance")]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;

// The stored-record format: public only for this workspace's benchmarks, which fill stores
// with records directly, and hidden from the docs, as it may change in any release.
#[doc(hidden)]
pub mod record;

/// Entry points for the fuzz targets in `fuzz/`. Not a stable API: it exists only with the
/// `fuzzing` feature and may change in any release.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
#[path = "fuzz_api.rs"]
pub mod __fuzz;

pub use body::IdempotencyBody;
pub use config::{
    ConfigError, DEFAULT_LOCK_TTL, DEFAULT_MAX_REQUEST_BODY, DEFAULT_MAX_RESPONSE_BODY,
    DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT, MAX_DURATION, OnConflict, default_storable,
};
pub use extensions::{NotRun, OutcomeUnknown, Tracked};
pub use extract::{FORM_FIELD, IDEMPOTENCY_KEY, KeySource, KeySources, X_IDEMPOTENT_KEY};
pub use fingerprint::Fingerprint;
#[cfg(feature = "minijinja")]
#[cfg_attr(docsrs, doc(cfg(feature = "minijinja")))]
pub use form::minijinja;
pub use form::{idempotent_input, idempotent_key};
pub use future::ResponseFuture;
pub use headers::{IDEMPOTENT_REPLAYED, strip_hop_by_hop};
pub use key::{IdempotencyKey, KeyError, MAX_KEY_LEN};
pub use layer::IdempotencyLayer;
pub use metrics::{
    EVENTS_TOTAL, Event, LEASES_HELD, OWNER_DURATION, RECORD_BYTES, STORE_DURATION, WAIT_DURATION,
};
pub use problem::{PROBLEM_JSON, Problem, ProblemDetails};
pub use scope::{GlobalScope, HeaderScope, Scope, ScopeExtractor};
pub use service::Idempotency;
pub use storage_key::StorageKey;
pub use store::{
    BeginOutcome, CompletedInfo, Completer, Completion, Forgotten, InFlightPage, Inspected,
    LeaseInfo, LeaseToken, MemoryStore, MemoryStoreBuilder, MemoryStoreStats, Store, StoreError,
};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::{IdempotentTx, PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::{RedisStore, RedisStoreBuilder};
pub use trace::{HANDLER_TARGET, REQUEST_TARGET, STORE_TARGET};
