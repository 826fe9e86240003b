//! The owner's hold on a key: renewed while the handler runs, and ended by one owner-checked
//! write (complete or release) that is tried again in the background when the store fails.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::metrics::{self, Event, Verb, count};
use crate::shared::Shared;
use crate::storage_key::StorageKey;
use crate::store::{LeaseToken, Store, StoreError};
use crate::trace::{KeyHash, STORE_TARGET, owner_checked, store_call};

/// The owner's hold on a key. Its store calls go through `&dyn Store` (`(*self.store)`), not
/// through the `Arc`'s own `Store` impl, which would box every future twice.
pub(crate) struct Lease {
    store: Arc<dyn Store>,
    pub(crate) key: StorageKey,
    token: LeaseToken,
    lock_ttl: Duration,
    background: TaskTracker,
    /// When the lease was taken, for [`OWNER_DURATION`](crate::OWNER_DURATION).
    acquired: Instant,
    /// The owner's place under the in-flight bound, given back when the lease ends.
    _place: Option<OwnedSemaphorePermit>,
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
            Settle::Complete(record, ttl) => {
                let call = store.complete(key, token, record.clone(), *ttl);
                store_call(Verb::Complete, call, owner_checked).await
            }
            Settle::Release => {
                store_call(Verb::Release, store.release(key, token), owner_checked).await
            }
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
    /// The lease `token` on `key`, just granted by the store, holding `place` under the
    /// in-flight bound.
    pub(crate) fn new(
        shared: &Shared,
        key: StorageKey,
        token: LeaseToken,
        place: Option<OwnedSemaphorePermit>,
    ) -> Self {
        metrics::leases_held(1.0);
        Self {
            store: shared.store.clone(),
            key,
            token,
            lock_ttl: shared.config.lock_ttl,
            background: shared.background.clone(),
            acquired: Instant::now(),
            _place: place,
        }
    }

    /// The owner token the lease was granted to.
    pub(crate) fn token(&self) -> LeaseToken {
        self.token
    }

    /// Runs `work` while renewing the lease every third of its TTL.
    pub(crate) async fn renewing<F: Future>(&self, work: F) -> F::Output {
        let renew = async {
            let period = self.lock_ttl / 3;
            let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let call = (*self.store).renew(&self.key, self.token, self.lock_ttl);
                match store_call(Verb::Renew, call, owner_checked).await {
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

    /// Drops the lease so that the next attempt runs.
    pub(crate) async fn release(&self) {
        count(Event::Released);
        self.settle(Settle::Release).await;
    }

    /// Stores the outcome; `true` once the store has taken it.
    pub(crate) async fn complete(&self, record: Bytes, ttl: Duration) -> bool {
        metrics::observe_record_bytes(record.len());
        self.settle(Settle::Complete(record, ttl)).await
    }

    /// Writes `how` the lease ends; `true` when the store took it at the first attempt. A write
    /// that fails for want of the store (a failover, a blip) is tried again in the background
    /// until it lands or the lease is surely gone, so one failed write never makes a request run
    /// twice: the owner token makes a repeated write safe. Meanwhile the caller has its answer.
    async fn settle(&self, how: Settle) -> bool {
        let written = how.write(&*self.store, &self.key, self.token).await;
        let span = tracing::Span::current();
        if !span.is_disabled() {
            let lease = match (&written, &how) {
                (Ok(true), Settle::Complete(..)) => "stored",
                (Ok(true), Settle::Release) => "released",
                (Ok(false), _) => "lost",
                (Err(StoreError::Unavailable(_)), _) => "retrying",
                (Err(_), _) => "failed",
            };
            span.record("idempotency.lease", lease);
        }
        match written {
            Ok(true) => true,
            Ok(false) => {
                lease_lost(&self.key, how.what());
                false
            }
            Err(StoreError::Unavailable(e)) => {
                tracing::warn!(key = ?self.key, error = %e, "could not write a lease's {}; trying again", how.what());
                // The retries outlive the request: a span of their own, that follows from it.
                let retrying = tracing::debug_span!(
                    target: STORE_TARGET,
                    parent: None,
                    "idempotency.store.retry",
                    idempotency.key_hash = %KeyHash(self.key),
                );
                retrying.follows_from(&span);
                let retry =
                    retry_settle(self.store.clone(), self.key, self.token, how, self.lock_ttl)
                        .instrument(retrying);
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => drop(runtime.spawn(self.background.track_future(retry))),
                    Err(_) => {
                        tracing::warn!(key = ?self.key, "no tokio runtime to retry on; the lease will expire")
                    }
                }
                false
            }
            Err(e) => {
                count(Event::StoreError);
                tracing::warn!(key = ?self.key, error = %e, "could not write a lease's {}; the lease will expire", how.what());
                false
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        metrics::leases_held(-1.0);
        metrics::observe_owner(self.acquired.elapsed().as_secs_f64());
    }
}

fn lease_lost(key: &StorageKey, what: &str) {
    count(Event::LeaseLost);
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
        count(Event::StoreRetried);
        match how.write(&*store, &key, token).await {
            Ok(true) => {
                tracing::info!(?key, "a lease's {} landed after a retry", how.what());
                return;
            }
            Ok(false) => return lease_lost(&key, how.what()),
            Err(e) if Instant::now() >= give_up => {
                count(Event::StoreError);
                tracing::error!(?key, error = %e, "gave up writing a lease's {} after two lock TTLs; the lease has expired and a retry will run again", how.what());
                return;
            }
            Err(e) => {
                tracing::debug!(?key, error = %e, "a lease's {} failed again", how.what())
            }
        }
    }
}
