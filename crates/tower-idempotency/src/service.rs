//! [`Idempotency`]: the service, and the lifecycle of a tracked request.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use hmac::Mac;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE, SET_COOKIE};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tower::Service;

use crate::body::IdempotencyBody;
use crate::config::{Config, KeySecret, OnConflict};
use crate::extensions::{NotRun, OutcomeUnknown, Tracked};
use crate::extract::{self, FORM_FIELD, FormKind};
use crate::fingerprint::{
    Fingerprint, MULTIPART_FORM_DATA, canonical_multipart, is_multipart, query_without_key,
};
use crate::future::ResponseFuture;
use crate::key::{IdempotencyKey, KeyError};
use crate::layer::IdempotencyLayer;
use crate::metrics::{Event, record};
use crate::problem::Problem;
use crate::record::{EncodeError, Record, Unreplayable};
use crate::store::{BeginOutcome, LeaseToken, StorageKey, Store, StoreError};
use tokio_util::task::TaskTracker;
use tower::BoxError;

/// The header that marks a replayed response.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The service made by [`IdempotencyLayer`].
#[derive(Clone, Debug)]
pub struct Idempotency<S> {
    inner: S,
    layer: IdempotencyLayer,
}

impl<S> Idempotency<S> {
    pub(crate) fn new(inner: S, layer: IdempotencyLayer) -> Self {
        Self { inner, layer }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

type Res<B> = Response<IdempotencyBody<B>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Res<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.layer.config;
        if !config.methods.contains(req.method()) {
            return ResponseFuture::inner(self.inner.call(req.map(IdempotencyBody::stream)));
        }
        let head_key =
            match extract::from_head(req.headers(), req.uri().query(), &config.key_sources) {
                Ok(key) => key,
                Err(e) => return ResponseFuture::ready(bad_key(e)),
            };
        let form = extract::form_kind(req.headers(), &config.key_sources);
        if head_key.is_none() && form.is_none() {
            if config.require_key {
                return ResponseFuture::ready(bad_key(KeyError::Missing));
            }
            return ResponseFuture::inner(self.inner.call(req.map(IdempotencyBody::stream)));
        }
        // The service that was made ready is the one that runs the request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::tracked(Box::pin(tracked(
            self.layer.clone(),
            inner,
            req,
            head_key,
            form,
        )))
    }
}

fn problem<B>(problem: Problem) -> Res<B> {
    problem.to_response().map(IdempotencyBody::full)
}

fn bad_key<B>(e: KeyError) -> Res<B> {
    record(Event::BadKey);
    problem(Problem::BadKey(e))
}

/// The storage key: a hash of (namespace, scope, key), length-prefixed and versioned. A plain
/// SHA-256 without a key secret, an HMAC-SHA256 keyed with it otherwise, over the same input.
pub(crate) fn storage_key(
    secret: Option<&KeySecret>,
    namespace: &str,
    scope: Option<&[u8]>,
    key: &[u8],
) -> StorageKey {
    fn feed(h: &mut impl sha2::digest::Update, namespace: &str, scope: Option<&[u8]>, key: &[u8]) {
        let scope_tag: &[u8] = if scope.is_some() { b"s" } else { b"g" };
        for part in [
            b"tower-idempotency storage v1".as_slice(),
            namespace.as_bytes(),
            scope_tag,
            scope.unwrap_or_default(),
            key,
        ] {
            h.update(&(part.len() as u64).to_be_bytes());
            h.update(part);
        }
    }
    match secret {
        None => {
            let mut h = Sha256::new();
            feed(&mut h, namespace, scope, key);
            StorageKey(h.finalize().into())
        }
        Some(secret) => {
            let mut mac = secret.0.clone();
            feed(&mut mac, namespace, scope, key);
            StorageKey(mac.finalize().into_bytes().into())
        }
    }
}

async fn tracked<S, ReqBody, ResBody>(
    layer: IdempotencyLayer,
    inner: S,
    req: Request<ReqBody>,
    head_key: Option<IdempotencyKey>,
    form: Option<FormKind>,
) -> Result<Res<ResBody>, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    // Paths off the common one (forms, failures, untracked) are boxed where they are taken, so
    // this future stays small: it is moved into its box on every tracked request.
    let config = &*layer.config;
    let (parts, body) = req.into_parts();
    // A form is read to look for its key, so a covered form body is held to the same limit as
    // a tracked one: a key past the limit must not let a large duplicate run again.
    let body = read_request_body(
        body,
        &parts.headers,
        config.max_request_body,
        config.request_body_timeout,
    )
    .await;
    let body = match body {
        Ok(body) => body,
        Err(p) => return Ok(problem(p)),
    };
    let key = match &form {
        Some(kind) => Box::pin(extract::with_form_body(head_key, kind, &body)).await,
        None => Ok(head_key),
    };
    let key = match key {
        Ok(Some(key)) => key,
        Ok(None) if config.require_key => return Ok(bad_key(KeyError::Missing)),
        Ok(None) => return Box::pin(untracked(inner, parts, body)).await,
        Err(e) => return Ok(bad_key(e)),
    };

    let skey = {
        // An unknown scope is refused, never taken for the global one.
        let scope = config.scope.scope(&parts);
        match scope.storage() {
            Some(scope) => storage_key(
                config.key_secret.as_ref(),
                &config.namespace,
                scope,
                key.as_str().as_bytes(),
            ),
            None => return Ok(scope_unavailable(&parts)),
        }
    };
    let query = query_without_key(parts.uri.query().unwrap_or(""), FORM_FIELD);
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .map_or(&[][..], |v| v.as_bytes());
    let canonical = if is_multipart(content_type) {
        match Box::pin(canonical_multipart(content_type, &body)).await {
            Some(fields) => Some(fields),
            // A key may hide past the damage, and the body cannot be fingerprinted as a form:
            // its raw bytes under a multipart content type (one without a boundary) could pass
            // for another request's fields.
            None => return Ok(problem(Problem::MalformedForm)),
        }
    } else {
        None
    };
    let (content_type, fp_body) = match &canonical {
        Some(fields) => (MULTIPART_FORM_DATA, &fields[..]),
        None => (content_type, &body[..]),
    };
    let fingerprint = Fingerprint::compute_with_headers(
        parts.method.as_str().as_bytes(),
        parts.uri.path().as_bytes(),
        query.as_bytes(),
        content_type,
        &parts.headers,
        &config.fingerprint_headers,
        fp_body,
    );

    let budget = match config.on_conflict {
        OnConflict::Reject => Duration::ZERO,
        OnConflict::Wait => {
            prefer_wait(&parts.headers).map_or(config.wait_timeout, |w| w.min(config.wait_timeout))
        }
    };
    // A wait timeout too large to add to the clock (Duration::MAX) waits a year at most.
    let now = Instant::now();
    let deadline = now
        .checked_add(budget)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
    let mut waited = false;
    loop {
        // Checked before the store is asked for anything: a request refused here takes nothing.
        let permit = match &config.in_flight {
            None => None,
            Some(limit) => match limit.permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    record(Event::Overloaded);
                    let retry_after = config.retry_after;
                    return Ok(problem(Problem::Overloaded { retry_after }));
                }
            },
        };
        let begun = match (*layer.store)
            .begin(&skey, &fingerprint, config.lock_ttl)
            .await
        {
            Ok(begun) => begun,
            Err(e) => return Box::pin(store_failed(e, &skey, config, inner, parts, body)).await,
        };
        match begun {
            BeginOutcome::Completed(bytes) => return Ok(replay(bytes, &fingerprint, skey)),
            BeginOutcome::InFlight { fingerprint: other } => {
                // A duplicate that waits holds no place under the in-flight bound.
                drop(permit);
                if other != fingerprint {
                    record(Event::Mismatch);
                    return Ok(problem(Problem::FingerprintMismatch));
                }
                let now = Instant::now();
                if now >= deadline {
                    let retry_after = config.retry_after;
                    return Ok(if budget.is_zero() {
                        record(Event::Conflict);
                        problem(Problem::InFlight { retry_after })
                    } else {
                        record(Event::WaitTimeout);
                        problem(Problem::WaitTimeout { retry_after })
                    });
                }
                if !waited {
                    waited = true;
                    record(Event::Waited);
                }
                if let Err(e) = (*layer.store).wait(&skey, deadline - now).await {
                    return Box::pin(store_failed(e, &skey, config, inner, parts, body)).await;
                }
            }
            BeginOutcome::Acquired(token) => {
                record(Event::Executed);
                let mut req = Request::from_parts(parts, IdempotencyBody::full(body));
                req.extensions_mut().insert(Tracked);
                let lease = Lease {
                    store: layer.store.clone(),
                    key: skey,
                    token,
                    lock_ttl: config.lock_ttl,
                    background: layer.background.clone(),
                    _place: permit,
                };
                // A caller that goes away does not cancel the handler: the rest of the work
                // moves to a task of its own, and its outcome is stored for the retry.
                // Made in a statement of its own: a temporary in the awaiting statement would
                // be kept in this future's state, doubling its size.
                let owner = Detached::new(
                    layer.background.clone(),
                    own(layer.config.clone(), lease, inner, req, fingerprint),
                );
                return match config.caller_timeout {
                    None => owner.await,
                    Some(limit) => Box::pin(answer_within(owner, limit, config.retry_after)).await,
                };
            }
        }
    }
}

/// Waits at most `limit` for the owner's answer. Past it the caller gets 504 `still-running`,
/// and the owner, dropped unfinished, runs on in a task of its own and stores its outcome.
async fn answer_within<B, E: Send + 'static>(
    owner: Detached<Result<Res<B>, E>>,
    limit: Duration,
    retry_after: Duration,
) -> Result<Res<B>, E>
where
    B: Send + 'static,
{
    match tokio::time::timeout(limit, owner).await {
        Ok(answer) => answer,
        Err(_) => {
            tracing::info!(
                ?limit,
                "the handler did not answer within the caller timeout; it runs on and its outcome will be stored"
            );
            Ok(problem(Problem::StillRunning {
                waited: limit,
                retry_after,
            }))
        }
    }
}

async fn untracked<S, ReqBody, ResBody>(
    mut inner: S,
    parts: Parts,
    body: Bytes,
) -> Result<Res<ResBody>, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
{
    let res = inner
        .call(Request::from_parts(parts, IdempotencyBody::full(body)))
        .await?;
    Ok(res.map(IdempotencyBody::stream))
}

async fn store_failed<S, ReqBody, ResBody>(
    e: StoreError,
    key: &StorageKey,
    config: &Config,
    inner: S,
    parts: Parts,
    body: Bytes,
) -> Result<Res<ResBody>, S::Error>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
{
    if let StoreError::Corrupt(why) = &e {
        // Not an outage, so never failed open: the record may stand for a completed request.
        return Ok(corrupt_record(key, why));
    }
    record(Event::StoreError);
    let retry_after = config.retry_after;
    match e {
        // Full is the bound doing its job, not an outage: running untracked would defeat it.
        StoreError::Full => {
            tracing::warn!("idempotency store full of requests in flight; refusing a new key");
        }
        e if config.fail_open => {
            tracing::warn!(error = %e, "idempotency store failed; running the request untracked (fail open)");
            record(Event::FailOpen);
            return Box::pin(untracked(inner, parts, body)).await;
        }
        e => {
            tracing::error!(error = %e, "idempotency store failed; refusing the request (fail closed)")
        }
    }
    Ok(problem(Problem::StoreUnavailable { retry_after }))
}

/// Reads a body the layer needs in full, within `limit` bytes and, if set, within `timeout`
/// of the start of the read.
async fn read_request_body<B>(
    body: B,
    headers: &HeaderMap,
    limit: usize,
    timeout: Option<Duration>,
) -> Result<Bytes, Problem>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Problem::BodyTooLarge { limit });
    }
    let read = Limited::new(body, limit).collect();
    let read = match timeout {
        None => read.await,
        Some(timeout) => match tokio::time::timeout(timeout, read).await {
            Ok(read) => read,
            Err(_) => {
                record(Event::BodyTimeout);
                tracing::debug!(?timeout, "a tracked request's body did not arrive in time");
                return Err(Problem::BodyTimeout);
            }
        },
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(Problem::BodyTooLarge { limit }),
        Err(e) => {
            tracing::debug!(error = %e, "could not read a tracked request's body");
            Err(Problem::BodyUnreadable)
        }
    }
}

/// The `wait=N` preference of RFC 7240, in seconds.
pub(crate) fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(http::header::HeaderName::from_static("prefer"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|pref| {
            let (name, value) = pref.split(';').next()?.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            let secs = value.trim().trim_matches('"').parse::<u64>().ok()?;
            Some(Duration::from_secs(secs))
        })
}

/// The answer to a keyed request whose scope the extractor cannot tell: a counted 500 problem,
/// logged at error, the handler not run and the store not asked.
fn scope_unavailable<B>(parts: &Parts) -> Res<B> {
    record(Event::ScopeUnavailable);
    tracing::error!(
        method = %parts.method,
        path = parts.uri.path(),
        "the scope extractor cannot tell who sent a keyed request (does the authentication layer run after the idempotency layer?); refusing it"
    );
    problem(Problem::ScopeUnavailable)
}

/// The answer to a record that cannot be read: a counted 500 problem, the handler not run and
/// nothing of the record replayed.
fn corrupt_record<B>(key: &StorageKey, why: &dyn std::fmt::Display) -> Res<B> {
    record(Event::CorruptRecord);
    tracing::error!(
        ?key,
        error = %why,
        "idempotency store holds a record that cannot be read; refusing the request until it expires or is removed"
    );
    problem(Problem::CorruptRecord)
}

fn replay<B>(bytes: Bytes, fingerprint: &Fingerprint, key: StorageKey) -> Res<B> {
    let record_ = match Record::decode(bytes) {
        Ok(r) => r,
        Err(e) => return corrupt_record(&key, &e),
    };
    if record_.fingerprint != *fingerprint {
        record(Event::Mismatch);
        return problem(Problem::FingerprintMismatch);
    }
    let stored = match record_.response {
        Ok(stored) => stored,
        Err(Unreplayable::TooLarge) => return problem(Problem::NotReplayable),
        Err(Unreplayable::OutcomeUnknown) => return problem(Problem::OutcomeUnknown),
    };
    record(Event::Replayed);
    let mut res = Response::new(IdempotencyBody::full(stored.body));
    *res.status_mut() = stored.status;
    *res.headers_mut() = stored.headers;
    res.headers_mut().insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    res
}

/// Headers that belong to one connection (RFC 9110 section 7.6.1), never stored or forwarded.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Removes the hop-by-hop headers (RFC 9110 section 7.6.1) and every header that `Connection`
/// names, leaving the end-to-end headers.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in connection_named(headers).iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The headers the `Connection` header names (none, and no allocation, without one).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// The record of a response kept for replay. Its headers are the end-to-end ones except
/// Set-Cookie (another caller's session) and Date (a replay gets a fresh one). A response the
/// record format cannot hold (too many headers, a header or the body too long) is an error, and
/// never written in part.
fn storable_record(
    fingerprint: &Fingerprint,
    parts: &http::response::Parts,
    body: &[u8],
) -> Result<Bytes, EncodeError> {
    let named = connection_named(&parts.headers);
    let keep = |name: &HeaderName| {
        name != SET_COOKIE && name != DATE && !HOP_BY_HOP.contains(name) && !named.contains(name)
    };
    crate::record::encode(fingerprint, Ok((parts.status, &parts.headers, body)), keep)
}

/// The record of a response to keep for replay or, when the format cannot hold it, a counted
/// record that says it cannot be replayed: duplicates get 409, and nothing runs twice.
fn owner_record(
    key: &StorageKey,
    fingerprint: Fingerprint,
    parts: &http::response::Parts,
    body: &[u8],
) -> Bytes {
    storable_record(&fingerprint, parts, body).unwrap_or_else(|e| {
        record(Event::Unstorable);
        tracing::warn!(?key, error = %e, "response cannot be kept for replay; duplicates will get 409");
        Record {
            fingerprint,
            response: Err(Unreplayable::TooLarge),
        }
        .encode()
    })
}

/// The owner's hold on a key. Its store calls go through `&dyn Store` (`(*self.store)`), not
/// through the `Arc`'s own `Store` impl, which would box every future twice.
struct Lease {
    store: Arc<dyn Store>,
    key: StorageKey,
    token: LeaseToken,
    lock_ttl: Duration,
    background: TaskTracker,
    /// The owner's place under the in-flight bound, given back when the lease ends.
    _place: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// An owner-checked write that ends a lease.
#[derive(Clone)]
enum Settle {
    /// Replace the lease with this record, kept for the TTL.
    Complete(Bytes, Duration),
    /// Drop the lease so that the next attempt runs.
    Release,
}

impl Settle {
    async fn write(
        &self,
        store: &dyn Store,
        key: &StorageKey,
        token: LeaseToken,
    ) -> Result<bool, StoreError> {
        match self {
            Settle::Complete(record, ttl) => store.complete(key, token, record.clone(), *ttl).await,
            Settle::Release => store.release(key, token).await,
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Settle::Complete(..) => "completion",
            Settle::Release => "release",
        }
    }
}

impl Lease {
    /// Runs `work` while renewing the lease every third of its TTL.
    async fn renewing<F: Future>(&self, work: F) -> F::Output {
        let renew = async {
            let period = self.lock_ttl / 3;
            let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                match (*self.store)
                    .renew(&self.key, self.token, self.lock_ttl)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(key = ?self.key, "lease lost while the handler runs; its outcome will not be stored");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(key = ?self.key, error = %e, "could not renew a lease")
                    }
                }
            }
            std::future::pending::<Infallible>().await
        };
        tokio::select! {
            biased;
            out = work => out,
            never = renew => match never {},
        }
    }

    async fn release(&self) {
        record(Event::Released);
        self.settle(Settle::Release).await;
    }

    /// Stores the outcome; `true` once the store has taken it.
    async fn complete(&self, record_: Bytes, ttl: Duration) -> bool {
        self.settle(Settle::Complete(record_, ttl)).await
    }

    /// Writes `how` the lease ends; `true` when the store took it at the first attempt. A write
    /// that fails for want of the store (a failover, a blip) is tried again in the background
    /// until it lands or the lease is surely gone, so one failed write never makes a request run
    /// twice: the owner token makes a repeated write safe. Meanwhile the caller has its answer.
    async fn settle(&self, how: Settle) -> bool {
        match how.write(&*self.store, &self.key, self.token).await {
            Ok(true) => true,
            Ok(false) => {
                lease_lost(&self.key, how.what());
                false
            }
            Err(StoreError::Unavailable(e)) => {
                tracing::warn!(key = ?self.key, error = %e, "could not write a lease's {}; trying again", how.what());
                let retry =
                    retry_settle(self.store.clone(), self.key, self.token, how, self.lock_ttl);
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => drop(runtime.spawn(self.background.track_future(retry))),
                    Err(_) => {
                        tracing::warn!(key = ?self.key, "no tokio runtime to retry on; the lease will expire")
                    }
                }
                false
            }
            Err(e) => {
                record(Event::StoreError);
                tracing::warn!(key = ?self.key, error = %e, "could not write a lease's {}; the lease will expire", how.what());
                false
            }
        }
    }
}

fn lease_lost(key: &StorageKey, what: &str) {
    record(Event::LeaseLost);
    tracing::warn!(
        ?key,
        "lease was lost before its {what}; the store refused it"
    );
}

/// The first pause between attempts of a failed lease write, doubled after each one.
const RETRY_FIRST_PAUSE: Duration = Duration::from_millis(50);
/// The longest pause between attempts of a failed lease write.
const RETRY_MAX_PAUSE: Duration = Duration::from_secs(1);

/// Tries a failed lease write again, with backoff, until the store answers, or until two lock
/// TTLs have passed since the first failure: the lease was last renewed before it, so by then it
/// has expired in the store too and the write could only be refused.
async fn retry_settle(
    store: Arc<dyn Store>,
    key: StorageKey,
    token: LeaseToken,
    how: Settle,
    lock_ttl: Duration,
) {
    let give_up = Instant::now() + lock_ttl.saturating_mul(2);
    let mut pause = RETRY_FIRST_PAUSE;
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX_PAUSE);
        record(Event::StoreRetried);
        match how.write(&*store, &key, token).await {
            Ok(true) => {
                tracing::info!(?key, "a lease's {} landed after a retry", how.what());
                return;
            }
            Ok(false) => return lease_lost(&key, how.what()),
            Err(e) if Instant::now() >= give_up => {
                record(Event::StoreError);
                tracing::error!(?key, error = %e, "gave up writing a lease's {} after two lock TTLs; the lease has expired and a retry will run again", how.what());
                return;
            }
            Err(e) => {
                tracing::debug!(?key, error = %e, "a lease's {} failed again", how.what())
            }
        }
    }
}

/// A response body read in full: a body of one chunk (a `Full`, most handlers' answer) is kept
/// as it is, without a copy.
#[derive(Default)]
struct Collect {
    first: Bytes,
    rest: Option<BytesMut>,
}

impl Collect {
    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        match &mut self.rest {
            Some(rest) => rest.extend_from_slice(&data),
            None if self.first.is_empty() => self.first = data,
            None => {
                let mut rest = BytesMut::with_capacity(self.first.len() + data.len());
                rest.extend_from_slice(&self.first);
                rest.extend_from_slice(&data);
                self.rest = Some(rest);
            }
        }
    }

    fn len(&self) -> usize {
        self.rest.as_ref().map_or(self.first.len(), BytesMut::len)
    }

    fn into_bytes(self) -> Bytes {
        self.rest.map_or(self.first, BytesMut::freeze)
    }
}

enum Outcome<B, E> {
    /// The handler failed with a service error.
    Error(E),
    /// A status that is not stored.
    Release(Response<B>),
    /// A storable response, read in full.
    Store(http::response::Parts, Bytes),
    /// A storable response too large to keep.
    TooLarge(http::response::Parts, Bytes, Pin<Box<B>>),
    /// The inner service said the request may have acted without an answer to keep.
    Unknown(Response<B>),
    /// The response body failed after its status was sent: the handler ran, its answer is lost.
    BodyFailed,
}

/// What the lease owner's part ends with: the first caller's answer, and whether a response was
/// stored for replay (so that an answer its caller no longer waits for is counted).
struct Owned<T> {
    answer: T,
    stored: bool,
}

/// The lease owner's part: run the handler, store or release, answer the first caller.
async fn own<S, ReqBody, ResBody>(
    config: Arc<Config>,
    lease: Lease,
    mut inner: S,
    req: Request<IdempotencyBody<ReqBody>>,
    fingerprint: Fingerprint,
) -> Owned<Result<Res<ResBody>, S::Error>>
where
    S: Service<Request<IdempotencyBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let limit = config.max_response_body;
    let storable = config.storable.clone();
    let work = AssertUnwindSafe(async move {
        let res = match inner.call(req).await {
            Ok(res) => res,
            Err(e) => return Outcome::Error(e),
        };
        if res.extensions().get::<OutcomeUnknown>().is_some() {
            return Outcome::Unknown(res);
        }
        if res.extensions().get::<NotRun>().is_some() || !storable(res.status()) {
            return Outcome::Release(res);
        }
        let (parts, body) = res.into_parts();
        let mut body = Box::pin(body);
        let mut buf = Collect::default();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Outcome::BodyFailed;
            };
            if let Ok(data) = frame.into_data() {
                buf.push(data);
                if buf.len() > limit {
                    return Outcome::TooLarge(parts, buf.into_bytes(), body);
                }
            }
        }
        Outcome::Store(parts, buf.into_bytes())
    })
    .catch_unwind();

    let unstored = |answer| Owned {
        answer,
        stored: false,
    };
    match lease.renewing(work).await {
        Err(_panic) => {
            tracing::error!(key = ?lease.key, "handler panicked; lease released");
            lease.release().await;
            unstored(Ok(problem(Problem::HandlerFailed)))
        }
        Ok(Outcome::Error(e)) => {
            lease.release().await;
            unstored(Err(e))
        }
        Ok(Outcome::Release(res)) => {
            lease.release().await;
            unstored(Ok(res.map(IdempotencyBody::stream)))
        }
        Ok(Outcome::Unknown(res)) => {
            tracing::warn!(key = ?lease.key, status = %res.status(), "the request's outcome is unknown; it will not run again for this key");
            outcome_unknown(&lease, fingerprint, config.ttl).await;
            unstored(Ok(res.map(IdempotencyBody::stream)))
        }
        Ok(Outcome::BodyFailed) => {
            tracing::warn!(key = ?lease.key, "response body failed after its status; the outcome is unknown and will not run again for this key");
            outcome_unknown(&lease, fingerprint, config.ttl).await;
            unstored(Ok(problem(Problem::OutcomeUnknown)))
        }
        Ok(Outcome::Store(parts, body)) => {
            let record_ = owner_record(&lease.key, fingerprint, &parts, &body);
            let stored = lease.complete(record_, config.ttl).await;
            Owned {
                answer: Ok(Response::from_parts(parts, IdempotencyBody::full(body))),
                stored,
            }
        }
        Ok(Outcome::TooLarge(parts, prefix, rest)) => {
            tracing::info!(key = ?lease.key, limit, "response too large to keep for replay; duplicates will get 409");
            let record_ = Record {
                fingerprint,
                response: Err(Unreplayable::TooLarge),
            };
            let stored = lease.complete(record_.encode(), config.ttl).await;
            Owned {
                answer: Ok(Response::from_parts(
                    parts,
                    IdempotencyBody::prefixed(prefix, rest),
                )),
                stored,
            }
        }
    }
}

/// Completes the lease with a record that says the outcome is unknown, so that duplicates get
/// 502 `outcome-unknown` for the TTL and never run the request again.
async fn outcome_unknown(lease: &Lease, fingerprint: Fingerprint, ttl: Duration) {
    record(Event::OutcomeUnknown);
    let record_ = Record {
        fingerprint,
        response: Err(Unreplayable::OutcomeUnknown),
    };
    lease.complete(record_.encode(), ttl).await;
}

/// The lease owner's future, run to completion even when its caller drops it: dropped
/// unfinished, it moves to a task of its own on the current tokio runtime, tracked by the
/// layer's background work. Unlike spawning up front, the common case (the caller waits) costs
/// no task, no channel and no cross-thread wake-up.
struct Detached<T: Send + 'static> {
    future: Option<Pin<Box<dyn Future<Output = Owned<T>> + Send>>>,
    background: TaskTracker,
}

impl<T: Send + 'static> Detached<T> {
    fn new(
        background: TaskTracker,
        future: impl Future<Output = Owned<T>> + Send + 'static,
    ) -> Self {
        Self {
            future: Some(Box::pin(future)),
            background,
        }
    }
}

impl<T: Send + 'static> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // Taken out while it is polled: a poll that panics drops it, so `Drop` never moves a
        // panicked future to a task of its own.
        let Some(mut future) = self.future.take() else {
            return Poll::Pending;
        };
        match future.as_mut().poll(cx) {
            Poll::Ready(out) => Poll::Ready(out.answer),
            Poll::Pending => {
                self.future = Some(future);
                Poll::Pending
            }
        }
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(future) = self.future.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                // The caller is gone; the outcome is stored all the same.
                let rest = self.background.track_future(async move {
                    if future.await.stored {
                        record(Event::LateAnswerStored);
                    }
                });
                drop(runtime.spawn(rest));
            }
            Err(_) => tracing::warn!(
                "a tracked request was dropped outside a tokio runtime; its lease will expire"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collected_bodies_keep_every_byte_in_order() {
        let mut c = Collect::default();
        assert_eq!(c.len(), 0);
        c.push(Bytes::from_static(b""));
        c.push(Bytes::from_static(b"ab"));
        assert_eq!(c.len(), 2);
        c.push(Bytes::from_static(b""));
        c.push(Bytes::from_static(b"c"));
        c.push(Bytes::from_static(b"de"));
        assert_eq!(c.len(), 5);
        assert_eq!(c.into_bytes(), "abcde");
        let mut one = Collect::default();
        one.push(Bytes::from_static(b"only"));
        assert_eq!(one.into_bytes(), "only");
    }

    #[test]
    fn prefer_wait_is_parsed() {
        let mut h = HeaderMap::new();
        h.append("prefer", HeaderValue::from_static("respond-async, wait=5"));
        assert_eq!(prefer_wait(&h), Some(Duration::from_secs(5)));
        let mut h = HeaderMap::new();
        h.append("prefer", HeaderValue::from_static("return=minimal"));
        assert_eq!(prefer_wait(&h), None);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, X-Private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn connection_named_and_private_headers_are_not_stored() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("x-hop, close"));
        h.append("x-hop", HeaderValue::from_static("1"));
        h.append("set-cookie", HeaderValue::from_static("s=1"));
        h.append(
            "date",
            HeaderValue::from_static("Mon, 01 Jan 2024 00:00:00 GMT"),
        );
        h.append("x-keep", HeaderValue::from_static("a"));
        h.append("x-keep", HeaderValue::from_static("b"));
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.headers = h;
        let record_ =
            Record::decode(storable_record(&Fingerprint([1; 32]), &parts, b"body").unwrap());
        let kept = record_.unwrap().response.unwrap();
        assert_eq!(kept.headers.len(), 2);
        assert_eq!(kept.headers.get_all("x-keep").iter().count(), 2);
        assert_eq!(kept.body, "body");
    }

    #[test]
    fn scopes_and_namespaces_separate_keys() {
        let key = b"k";
        let a = storage_key(None, "", None, key);
        assert_ne!(a, storage_key(None, "", Some(b""), key));
        assert_ne!(a, storage_key(None, "ns", None, key));
        assert_ne!(
            storage_key(None, "", Some(b"alice"), key),
            storage_key(None, "", Some(b"bob"), key)
        );
    }

    /// The storage key without a secret is pinned: records written before key secrets existed
    /// stay reachable.
    #[test]
    fn the_unkeyed_storage_key_is_unchanged() {
        let mut h = Sha256::new();
        for part in [
            &b"tower-idempotency storage v1"[..],
            b"ns",
            b"s",
            b"alice",
            b"k-1",
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        let expected = StorageKey(h.finalize().into());
        assert_eq!(storage_key(None, "ns", Some(b"alice"), b"k-1"), expected);
    }

    #[test]
    fn a_key_secret_makes_the_storage_key_an_hmac() {
        let a = KeySecret::new(b"secret a");
        let b = KeySecret::new(b"secret b");
        let plain = storage_key(None, "", None, b"k");
        let with_a = storage_key(Some(&a), "", None, b"k");
        assert_ne!(plain, with_a);
        assert_eq!(with_a, storage_key(Some(&a), "", None, b"k"));
        assert_ne!(with_a, storage_key(Some(&b), "", None, b"k"));
        // HMAC-SHA256 over the same length-prefixed input.
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(b"secret a").unwrap();
        for part in [&b"tower-idempotency storage v1"[..], b"", b"g", b"", b"k"] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        assert_eq!(with_a.0, <[u8; 32]>::from(mac.finalize().into_bytes()));
    }
}
