//! For operators: ask the store about one key, forget a key that must run again, list what is
//! in flight, as an axum [`Router`] to mount behind an application's own authentication, or
//! as calls for a tool of its own.
//!
//! ```
//! # async fn run() {
//! use tower_idempotency::{IdempotencyLayer, MemoryStore, admin::Admin};
//!
//! let layer = IdempotencyLayer::new(MemoryStore::default()).with_namespace("shop");
//! // The same namespace, key secret and scope as the layer's: its keys are found.
//! let admin: axum::Router = Admin::for_layer(&layer).router();
//! let app: axum::Router = axum::Router::new()
//!     // .route(...) the application, with `layer`
//!     .nest("/admin/idempotency", admin); // behind the application's own authentication
//! # let _ = app; }
//! ```
//!
//! # Routes
//!
//! - `GET /keys/{key}`: 200 with the record as JSON ([`Admin::inspect`] shows its members),
//!   404 problem+json when there is none. `?body=1` adds the stored response's headers and
//!   body.
//! - `DELETE /keys/{key}`: 204 when the record went; 404 when there was none; 409 while its
//!   request is in flight, unless `?force=1` (counted as [`Event::ForgottenInFlight`] and
//!   logged at warn).
//! - `GET /in-flight?limit=N`: a JSON array of the requests in flight (at most `N`, default
//!   100, at most 1000), in the order of their storage keys; when there are more, a
//!   `Link: <...?limit=N&after=STORAGE_KEY>; rel="next"` header names the next page.
//!
//! The key is the one the client sent, as the layer reads it (an sf-string `Idempotency-Key`
//! unquoted). Its scope is given as `?scope=VALUE`, once per scope header in their order, the
//! raw header value (`?scope=Bearer%20abc` for `Authorization: Bearer abc`); without `scope`
//! the key is looked up in the global scope, where requests without those headers are. A scope
//! header a request did not carry is left out at the end; one in the middle cannot be told
//! apart here. Nothing answered names the raw key or scope: records are found by their
//! storage key, a hash, and reported with it.
//!
//! Every error is `application/problem+json`: 400 for a bad key or parameter, 503 when the
//! store does not answer, 501 for a store without these verbs.
//!
//! [`Event::ForgottenInFlight`]: crate::Event::ForgottenInFlight

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use crate::config::KeySecret;
use crate::metrics::{Event, count};
use crate::problem::ProblemDetails;
use crate::record::{Record, Unreplayable};
use crate::scope::{HeaderScope, Scope, ScopeExtractor};
use crate::{
    Forgotten, IdempotencyKey, IdempotencyLayer, InFlightPage, Inspected, LeaseInfo, MAX_KEY_LEN,
    StorageKey, Store, StoreError,
};

/// How many requests in flight a page lists unless told otherwise, and at most.
pub const DEFAULT_PAGE: usize = 100;
/// The most requests in flight one page lists.
pub const MAX_PAGE: usize = 1000;

/// The admin router for `store`, with a default layer's key derivation: no namespace, no key
/// secret, the `Authorization` header as the scope. [`Admin::for_layer`] takes a layer's own.
pub fn router(store: impl Store) -> Router {
    Admin::new(Arc::new(store)).router()
}

/// What the admin routes and tools do, for one store and one way of deriving storage keys.
#[derive(Clone)]
pub struct Admin {
    store: Arc<dyn Store>,
    namespace: String,
    secret: Option<KeySecret>,
    scope: Arc<dyn ScopeExtractor>,
    scope_headers: Vec<HeaderName>,
    /// Whether the scope is made of the scope headers ([`Admin::new`]: a [`HeaderScope`] of
    /// them, made again when they change), or is a layer's own extractor that they are given to
    /// ([`Admin::for_layer`]).
    scope_is_headers: bool,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("namespace", &self.namespace)
            .field("key_secret", &self.secret.is_some())
            .field("scope_headers", &self.scope_headers)
            .finish_non_exhaustive()
    }
}

/// What [`Admin::in_flight`] lists: the requests in flight as JSON objects, and the cursor of
/// the next page.
#[derive(Debug, Clone, PartialEq)]
pub struct InFlightList {
    /// One object per request in flight (the `lease` members of [`Admin::inspect`], with
    /// `key_hash` and `storage_key`).
    pub leases: Vec<Value>,
    /// The `after` of the next page, when there is one.
    pub next: Option<StorageKey>,
}

impl Admin {
    /// Operations on `store` for keys of a default layer: no namespace, no key secret, scoped by
    /// the `Authorization` header.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            namespace: String::new(),
            secret: None,
            scope: Arc::new(HeaderScope::default()),
            scope_headers: vec![header::AUTHORIZATION],
            scope_is_headers: true,
        }
    }

    /// Operations on `layer`'s store, deriving storage keys as `layer` does: its namespace, key
    /// secret and scope extractor. The operator's scope values go into the headers that
    /// extractor reads ([`ScopeExtractor::header_names`]: a layer's `with_scope_headers`, or
    /// `Authorization` by default); for an extractor of its own that tells no headers, name
    /// them with [`with_scope_headers`](Self::with_scope_headers).
    pub fn for_layer(layer: &IdempotencyLayer) -> Self {
        let config = &layer.shared().config;
        Self {
            store: layer.store().clone(),
            namespace: config.namespace.clone(),
            secret: config.key_secret.clone(),
            scope: config.scope.clone(),
            scope_headers: config
                .scope
                .header_names()
                .map_or_else(|| vec![header::AUTHORIZATION], <[HeaderName]>::to_vec),
            scope_is_headers: false,
        }
    }

    /// The namespace of the layer whose keys are looked up (default: none).
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The key secret of the layer whose keys are looked up
    /// ([`IdempotencyLayer::with_key_secret`]).
    pub fn with_key_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secret = Some(KeySecret::new(secret.as_ref()));
        self
    }

    /// The headers the scope values stand for, in order. With [`Admin::new`] they are the
    /// scope, as a layer's [`with_scope_headers`](IdempotencyLayer::with_scope_headers) makes
    /// it; with [`Admin::for_layer`] they are given to the layer's own extractor.
    pub fn with_scope_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.scope_headers = names.into_iter().collect();
        if self.scope_is_headers {
            self.scope = Arc::new(HeaderScope::new(self.scope_headers.clone()));
        }
        self
    }

    /// The store asked.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The storage key of `key` in the scope these header values give (none: the global
    /// scope). Errs with a reason when the key is no key or the scope cannot be told.
    pub fn storage_key(&self, key: &str, scope: &[impl AsRef<[u8]>]) -> Result<StorageKey, String> {
        if let Err(e) = IdempotencyKey::new(key) {
            return Err(format!(
                "no idempotency key ({e}): a key is 1 to {MAX_KEY_LEN} visible ASCII characters"
            ));
        }
        if scope.len() > self.scope_headers.len() {
            return Err(format!(
                "{} scope values for {} scope headers ({})",
                scope.len(),
                self.scope_headers.len(),
                self.scope_headers
                    .iter()
                    .map(HeaderName::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let mut request = http::Request::new(());
        for (name, value) in self.scope_headers.iter().zip(scope) {
            let value = HeaderValue::from_bytes(value.as_ref())
                .map_err(|_| format!("the scope value for {name} is no header value"))?;
            request.headers_mut().append(name.clone(), value);
        }
        let (parts, ()) = request.into_parts();
        let scope = match self.scope.scope(&parts) {
            Scope::Caller(bytes) => Some(bytes),
            Scope::Global if !scope.is_empty() => {
                return Err(format!(
                    "these scope values, put in {}, give the global scope: the layer's scope \
                     does not read those headers",
                    self.scope_headers[..scope.len()]
                        .iter()
                        .map(HeaderName::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            Scope::Global => None,
            Scope::Unknown => {
                return Err(
                    "the layer's scope extractor cannot tell a scope from these header values"
                        .to_owned(),
                );
            }
        };
        Ok(StorageKey::derive(
            self.secret.as_ref(),
            &self.namespace,
            scope.as_deref(),
            key.as_bytes(),
        ))
    }

    /// The record of `key` in `scope` as JSON, or `None` when there is none:
    ///
    /// - `key_hash` (the first 16 hex digits of the storage key, as logs and traces name it)
    ///   and `storage_key`;
    /// - `state`: `in_flight`, `completed` or `unreplayable` (completed without a response to
    ///   replay; `reason` says why: `too_large` or `outcome_unknown`);
    /// - `status`: the stored status, `null` unless completed;
    /// - `fingerprint`: the request's, in hex;
    /// - `created` (when the request took its lease, RFC 3339; `null` where the store does not
    ///   keep it), `age_ms`, `expires` and `expires_in_ms`, by the store's clock;
    /// - `size`: the stored record's bytes (`null` in flight);
    /// - `lease`: `owner`, `age_ms`, `renewals`, `expires_in_ms` while in flight, else `null`;
    /// - with `body`: `headers` (name and value pairs) and `body` (UTF-8 text) or
    ///   `body_base64`.
    pub async fn inspect(&self, key: &StorageKey, body: bool) -> Result<Option<Value>, StoreError> {
        let Some(found) = self.store.inspect(key).await? else {
            return Ok(None);
        };
        let now = SystemTime::now();
        let mut doc = match found {
            Inspected::InFlight(lease) => json!({
                "state": "in_flight",
                "status": null,
                "fingerprint": lease.fingerprint.to_hex(),
                "created": timestamp(now.checked_sub(lease.age)),
                "age_ms": millis(lease.age),
                "expires": timestamp(now.checked_add(lease.expires_in)),
                "expires_in_ms": millis(lease.expires_in),
                "size": null,
                "lease": lease_json(&lease),
            }),
            Inspected::Completed(done) => {
                let size = done.record.len();
                let record =
                    Record::decode(done.record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let mut members = json!({
                    "fingerprint": record.fingerprint.to_hex(),
                    "created": timestamp(done.age.and_then(|age| now.checked_sub(age))),
                    "age_ms": done.age.map(millis),
                    "expires": timestamp(now.checked_add(done.expires_in)),
                    "expires_in_ms": millis(done.expires_in),
                    "size": size,
                    "lease": null,
                });
                match record.response {
                    Ok(response) => {
                        members["state"] = json!("completed");
                        members["status"] = json!(response.status.as_u16());
                        if body {
                            members["headers"] = headers_json(&response.headers);
                            match std::str::from_utf8(&response.body) {
                                Ok(text) => members["body"] = json!(text),
                                Err(_) => {
                                    members["body_base64"] = json!(
                                        base64::engine::general_purpose::STANDARD
                                            .encode(&response.body)
                                    )
                                }
                            }
                        }
                    }
                    Err(why) => {
                        members["state"] = json!("unreplayable");
                        members["status"] = Value::Null;
                        members["reason"] = json!(match why {
                            Unreplayable::TooLarge => "too_large",
                            Unreplayable::OutcomeUnknown => "outcome_unknown",
                        });
                    }
                }
                members
            }
        };
        doc["key_hash"] = json!(key_hash(key));
        doc["storage_key"] = json!(key.to_hex());
        Ok(Some(doc))
    }

    /// Forgets the record of `key`, a request in flight only with `force`: the next request
    /// with the key runs again. Counted ([`Event::Forgotten`], [`Event::ForgottenInFlight`])
    /// and logged with the key's hash.
    ///
    /// [`Event::Forgotten`]: crate::Event::Forgotten
    /// [`Event::ForgottenInFlight`]: crate::Event::ForgottenInFlight
    pub async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten, StoreError> {
        let forgotten = self.store.forget(key, force).await?;
        match forgotten {
            Forgotten::Lease => {
                count(Event::ForgottenInFlight);
                tracing::warn!(
                    key_hash = %key_hash(key),
                    "an operator forgot a request in flight (forced): its owner's outcome will not be kept, and the next request with its key runs"
                );
            }
            Forgotten::Record => {
                count(Event::Forgotten);
                tracing::info!(key_hash = %key_hash(key), "an operator forgot a record");
            }
            Forgotten::NotFound | Forgotten::InFlight => {}
        }
        Ok(forgotten)
    }

    /// Up to `limit` requests in flight after the storage key `after`.
    pub async fn in_flight(
        &self,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<InFlightList, StoreError> {
        let InFlightPage { leases, next } = self.store.in_flight(after, limit).await?;
        Ok(InFlightList {
            leases: leases
                .iter()
                .map(|lease| {
                    let mut doc = lease_json(lease);
                    doc["key_hash"] = json!(key_hash(&lease.key));
                    doc["storage_key"] = json!(lease.key.to_hex());
                    doc["fingerprint"] = json!(lease.fingerprint.to_hex());
                    doc
                })
                .collect(),
            next,
        })
    }

    /// The routes (see the [module docs](self)), with no authentication of their own.
    pub fn router(self) -> Router {
        Router::new()
            .route(
                "/keys/{key}",
                get(get_key).delete(delete_key).fallback(method_not_allowed),
            )
            .route(
                "/in-flight",
                get(list_in_flight).fallback(method_not_allowed),
            )
            .with_state(self)
    }
}

impl IdempotencyLayer {
    /// The admin routes for this layer's keys: [`Admin::for_layer`]`(self).router()`.
    pub fn admin_router(&self) -> Router {
        Admin::for_layer(self).router()
    }
}

/// The short hash of a storage key that logs, traces and the admin routes name a key by: its
/// first 16 hex digits.
pub fn key_hash(key: &StorageKey) -> String {
    crate::trace::KeyHash(*key).to_string()
}

fn lease_json(lease: &LeaseInfo) -> Value {
    json!({
        "owner": uuid::Uuid::from_u128(lease.owner.0).to_string(),
        "age_ms": millis(lease.age),
        "renewals": lease.renewals,
        "expires_in_ms": millis(lease.expires_in),
    })
}

fn headers_json(headers: &HeaderMap) -> Value {
    Value::Array(
        headers
            .iter()
            .map(|(name, value)| json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())]))
            .collect(),
    )
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn timestamp(at: Option<SystemTime>) -> Value {
    at.map_or(Value::Null, |at| {
        json!(humantime::format_rfc3339_millis(at).to_string())
    })
}

// ---------------------------------------------------------------------------------------------
// The routes

/// The query's values of `name`, in order.
fn params(query: Option<&str>, name: &str) -> Vec<String> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// Whether the flag `name` is set (`1` or `true`).
fn flag(query: Option<&str>, name: &str) -> Result<bool, String> {
    match params(query, name).last().map(String::as_str) {
        None | Some("0" | "false") => Ok(false),
        Some("1" | "true" | "") => Ok(true),
        Some(other) => Err(format!("`{name}` is 1 or 0, not {other:?}")),
    }
}

fn problem(status: StatusCode, slug: &str, title: &'static str, detail: String) -> Response {
    ProblemDetails::own(status, slug, title)
        .with_detail(detail)
        .with_no_store()
        .into_response()
}

fn bad_request(detail: String) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "bad-admin-request",
        "Bad admin request",
        detail,
    )
}

fn store_failed(e: StoreError) -> Response {
    match e {
        StoreError::Unsupported(verb) => problem(
            StatusCode::NOT_IMPLEMENTED,
            "store-unsupported",
            "The store does not offer this",
            format!("this store does not offer `{verb}`"),
        ),
        StoreError::Corrupt(why) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "record-corrupt",
            "Stored record is corrupt",
            why,
        ),
        e => {
            tracing::warn!(error = %e, "admin: the store failed");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Idempotency store unavailable",
                e.to_string(),
            )
        }
    }
}

fn no_record(key: &StorageKey) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "no-record",
        "No record for this key",
        format!(
            "the store holds no live record for key hash {} in this scope",
            key_hash(key)
        ),
    )
}

fn json_response(status: StatusCode, doc: &Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Bytes::from(doc.to_string()),
    )
        .into_response()
}

async fn method_not_allowed() -> Response {
    problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "the key routes are GET and DELETE /keys/{key}, and GET /in-flight".to_owned(),
    )
}

/// The storage key a key route names (its path's key and its `scope` parameters), and its
/// flag `name`; or why they name none.
fn route_key(
    admin: &Admin,
    path: Result<Path<String>, PathRejection>,
    query: Option<&str>,
    name: &str,
) -> Result<(StorageKey, bool), String> {
    let Path(key) = path.map_err(|e| format!("the key in the path cannot be read: {e}"))?;
    Ok((
        admin.storage_key(&key, &params(query, "scope"))?,
        flag(query, name)?,
    ))
}

async fn get_key(
    State(admin): State<Admin>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    let (key, body) = match route_key(&admin, path, query.as_deref(), "body") {
        Ok(parsed) => parsed,
        Err(why) => return bad_request(why),
    };
    match admin.inspect(&key, body).await {
        Ok(Some(doc)) => json_response(StatusCode::OK, &doc),
        Ok(None) => no_record(&key),
        Err(e) => store_failed(e),
    }
}

async fn delete_key(
    State(admin): State<Admin>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    let (key, force) = match route_key(&admin, path, query.as_deref(), "force") {
        Ok(parsed) => parsed,
        Err(why) => return bad_request(why),
    };
    match admin.forget(&key, force).await {
        Ok(Forgotten::Record | Forgotten::Lease) => StatusCode::NO_CONTENT.into_response(),
        Ok(Forgotten::NotFound) => no_record(&key),
        Ok(Forgotten::InFlight) => problem(
            StatusCode::CONFLICT,
            "request-in-flight",
            "Request in flight",
            format!(
                "the request with key hash {} is in flight; forget it with ?force=1 to let the next request run while it may still be running",
                key_hash(&key)
            ),
        ),
        Err(e) => store_failed(e),
    }
}

async fn list_in_flight(State(admin): State<Admin>, RawQuery(query): RawQuery) -> Response {
    let query = query.as_deref();
    let limit = match params(query, "limit").last() {
        None => DEFAULT_PAGE,
        Some(n) => match n.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return bad_request(format!("`limit` is 1 to {MAX_PAGE}, not {n:?}")),
        },
    };
    let after = match params(query, "after").last() {
        None => None,
        Some(hex) => match StorageKey::from_hex(hex) {
            Some(key) => Some(key),
            None => return bad_request("`after` is a storage key of 64 hex digits".to_owned()),
        },
    };
    match admin.in_flight(after.as_ref(), limit).await {
        Ok(list) => {
            let mut res = json_response(StatusCode::OK, &Value::Array(list.leases));
            if let Some(next) = list.next {
                let link = format!("<?limit={limit}&after={}>; rel=\"next\"", next.to_hex());
                if let Ok(link) = HeaderValue::from_str(&link) {
                    res.headers_mut().insert(header::LINK, link);
                }
            }
            res
        }
        Err(e) => store_failed(e),
    }
}
