//! [`Store`]: the seam between the layer and a backend, and what the verbs answer.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::fingerprint::Fingerprint;

mod completion;
mod inspect;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;

pub use self::completion::{Completer, Completion};
pub use self::inspect::{CompletedInfo, Forgotten, InFlightPage, Inspected, LeaseInfo};
#[cfg(feature = "postgres")]
pub use self::postgres::{IdempotentTx, PostgresStore, PostgresStoreBuilder};
#[cfg(feature = "redis")]
pub use self::redis::{RedisStore, RedisStoreBuilder};
pub use memory::{MemoryStore, MemoryStoreBuilder, MemoryStoreStats};

pub(crate) use crate::storage_key::StorageKey;

/// The owner token of a lease. Only its holder may complete, release or renew the lease.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct LeaseToken(pub u128);

impl LeaseToken {
    /// A fresh random token.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().as_u128())
    }
}

/// What [`Store::begin`] found.
#[derive(Debug, Clone)]
pub enum BeginOutcome {
    /// There was no record (or only an expired lease): the caller now holds a lease and must
    /// run the request, then complete or release.
    Acquired(LeaseToken),
    /// The request completed earlier: its record, as the layer encoded it (opaque to the store).
    Completed(Bytes),
    /// Another caller holds a live lease for a request with this fingerprint.
    InFlight {
        /// The fingerprint of the request in flight.
        fingerprint: Fingerprint,
    },
}

/// A store error. Each backend maps its own errors to these.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend cannot be reached or failed to answer.
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    /// The store is at capacity with live leases and cannot take a new one.
    Full,
    /// A stored value could not be decoded: corrupt, or written by another tool. The layer
    /// answers it with a 500 `record-corrupt` problem and counts it, and never fails open on it.
    Corrupt(String),
    /// The store does not offer this operator's verb ([`Store::inspect`], [`Store::forget`],
    /// [`Store::in_flight`]); the name of the verb.
    Unsupported(&'static str),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(e) => write!(f, "idempotency store unavailable: {e}"),
            StoreError::Full => f.write_str("idempotency store is full of requests in flight"),
            StoreError::Corrupt(why) => {
                write!(f, "idempotency store returned a corrupt value: {why}")
            }
            StoreError::Unsupported(verb) => {
                write!(f, "this idempotency store does not offer `{verb}`")
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Unavailable(e) => Some(&**e),
            _ => None,
        }
    }
}

/// A backend that keeps idempotency records and leases, shared by every process that uses it.
///
/// Its verbs follow the lifecycle of a tracked request (see the [crate docs](crate#the-contract)):
/// [`begin`](Store::begin) takes a lease or finds the completed record or the request in flight,
/// [`complete`](Store::complete), [`release`](Store::release) and [`renew`](Store::renew) act only
/// for the lease's owner, and [`wait`](Store::wait) returns when the record may have changed.
///
/// Every verb is meant to be one atomic step: one round trip for a networked store. A backend
/// proves itself by passing the conformance suite, `tower_idempotency::conformance` (feature
/// `conformance`), from its own tests.
///
/// Expiry is by the store's own clock: a lease lives `lease_ttl` from its last grant or renewal,
/// a completed record `ttl` from its completion. A lease that has expired belongs to nobody: its
/// former owner's `complete`, `release` and `renew` return `false`, even before another caller
/// takes it over.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Atomically: if a completed record exists, return it; if a live lease exists, report it in
    /// flight; otherwise (no record, or an expired lease) grant a new lease to a fresh owner.
    async fn begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError>;

    /// Replaces the caller's lease with the completed `record`, kept for `ttl`, and wakes the
    /// waiters. Returns `false`, changing nothing, when `token` no longer owns the lease.
    async fn complete(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Drops the caller's lease so that the next attempt runs, and wakes the waiters.
    /// Returns `false` when `token` no longer owns the lease.
    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError>;

    /// Extends the caller's lease to `lease_ttl` from now. Returns `false` when `token` no longer
    /// owns the lease.
    async fn renew(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Waits until the record under `key` may have changed: completed, released, or its lease
    /// expired; or until `timeout` passes. Returns at once when no live lease exists.
    ///
    /// Implementations must not lose a wake-up that happens between the caller's
    /// [`begin`](Store::begin) and this call. Spurious returns are allowed: the caller calls
    /// `begin` again to learn what changed.
    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError>;

    /// Checks that the store answers, for health endpoints.
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// For a store that keeps records in the application's own database: what a handler's
    /// extractor opens a transaction with. When it is `Some`, the layer puts a
    /// [`Completion`](crate::Completion) in the extensions of every request it covers, and a
    /// transaction handed over through it is ended by the layer after the handler, with the
    /// record written in it. `None` (the default): records are written by
    /// [`complete`](Store::complete) alone.
    fn transaction_source(&self) -> Option<std::sync::Arc<dyn std::any::Any + Send + Sync>> {
        None
    }

    /// For operators: what the store holds under `key`, live records only. A networked store
    /// answers in one round trip.
    ///
    /// The default answers [`StoreError::Unsupported`]; every store of this crate implements
    /// it, and the conformance suite checks it.
    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspected>, StoreError> {
        let _ = key;
        Err(StoreError::Unsupported("inspect"))
    }

    /// For operators: drops the record under `key` so that the next request with it runs
    /// again. A live lease is dropped only with `force` (its waiters are woken, and its owner's
    /// completion is then refused as a lost lease); without it the answer is
    /// [`Forgotten::InFlight`] and nothing changes.
    ///
    /// The default answers [`StoreError::Unsupported`].
    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten, StoreError> {
        let _ = (key, force);
        Err(StoreError::Unsupported("forget"))
    }

    /// For operators: up to `limit` live leases with storage keys after `after`, in the order
    /// of their keys, and where the next page starts. A networked store answers from an index of
    /// its leases, not by reading every record (the memory store looks through its own table,
    /// under its lock), and bounds the work of one call.
    ///
    /// The default answers [`StoreError::Unsupported`].
    async fn in_flight(
        &self,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<InFlightPage, StoreError> {
        let _ = (after, limit);
        Err(StoreError::Unsupported("in_flight"))
    }
}

#[async_trait]
impl<T: Store + ?Sized> Store for std::sync::Arc<T> {
    async fn begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        (**self).begin(key, fingerprint, lease_ttl).await
    }
    async fn complete(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        (**self).complete(key, token, record, ttl).await
    }
    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        (**self).release(key, token).await
    }
    async fn renew(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        (**self).renew(key, token, lease_ttl).await
    }
    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        (**self).wait(key, timeout).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        (**self).ping().await
    }
    fn transaction_source(&self) -> Option<std::sync::Arc<dyn std::any::Any + Send + Sync>> {
        (**self).transaction_source()
    }
    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspected>, StoreError> {
        (**self).inspect(key).await
    }
    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten, StoreError> {
        (**self).forget(key, force).await
    }
    async fn in_flight(
        &self,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<InFlightPage, StoreError> {
        (**self).in_flight(after, limit).await
    }
}
