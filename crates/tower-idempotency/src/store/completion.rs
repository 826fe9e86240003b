//! Completing a record in the handler's own transaction, for stores that keep records in the
//! application's database.

use std::any::Any;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{LeaseToken, StorageKey, StoreError};

/// Put by the layer in the extensions of every request it covers when its store can write
/// records inside a transaction the handler opened (see
/// [`Store::transaction_source`](crate::Store::transaction_source)).
///
/// A handler's extractor (such as `IdempotentTx` of the `postgres` feature) finds the store
/// through it, opens a transaction for the handler, and hands it over as a [`Completer`]. After
/// the handler, the layer ends that transaction by the response's status:
///
/// - a tracked request whose response is stored: the record is written in the transaction,
///   owner-checked, and the transaction commits, before the caller gets the response;
/// - a response that is not stored (a 5xx, 408, 409, 425, 429 by default, a handler error or
///   panic): the transaction rolls back, so the retry runs on a clean database;
/// - a request without a key: the transaction commits when the status would have been stored,
///   and rolls back otherwise, so a handler is written once for both.
#[derive(Clone)]
pub struct Completion(Arc<Slot>);

struct Slot {
    source: Arc<dyn Any + Send + Sync>,
    tracked: bool,
    completer: Mutex<Handed>,
}

/// Where the handler's transaction is.
enum Handed {
    /// Not handed over (yet).
    No,
    Yes(Box<dyn Completer>),
    /// The layer has looked after the handler: a transaction handed over now would never be
    /// ended, so it is refused.
    Closed,
}

impl Completion {
    pub(crate) fn new(source: Arc<dyn Any + Send + Sync>, tracked: bool) -> Self {
        Self(Arc::new(Slot {
            source,
            tracked,
            completer: Mutex::new(Handed::No),
        }))
    }

    /// What the store gave for its extractors to open transactions with, if it is a `T`.
    pub fn source<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.0.source.clone().downcast().ok()
    }

    /// Whether the request carries a key (its record will be written through the completer),
    /// rather than passing through untracked.
    pub fn is_tracked(&self) -> bool {
        self.0.tracked
    }

    /// Hands the handler's transaction over to the layer, which ends it after the handler.
    /// A request has at most one, and none once the layer is past the handler (a task the
    /// handler spawned, a response body): those are given back as the error.
    pub fn hand_over(&self, completer: Box<dyn Completer>) -> Result<(), Box<dyn Completer>> {
        let mut slot = self.slot();
        if !matches!(*slot, Handed::No) {
            return Err(completer);
        }
        *slot = Handed::Yes(completer);
        Ok(())
    }

    /// Whether a transaction can no longer be handed over: one was, or the layer is past the
    /// handler.
    pub fn is_handed_over(&self) -> bool {
        !matches!(*self.slot(), Handed::No)
    }

    /// The transaction handed over, if any; from now on none can be.
    pub(crate) fn take(&self) -> Option<Box<dyn Completer>> {
        match std::mem::replace(&mut *self.slot(), Handed::Closed) {
            Handed::Yes(completer) => Some(completer),
            Handed::No | Handed::Closed => None,
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Handed> {
        self.0
            .completer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("tracked", &self.0.tracked)
            .field("closed", &self.is_handed_over())
            .finish_non_exhaustive()
    }
}

/// A handler's transaction, handed over to the layer through a [`Completion`] to be ended
/// after the handler.
#[async_trait]
pub trait Completer: Send + 'static {
    /// Writes `record` in the transaction in place of the lease `token` holds on `key` (kept for
    /// `ttl`, and owner-checked as [`Store::complete`](crate::Store::complete) is), then
    /// commits. `Ok(true)`: both the handler's writes and the record are committed.
    /// `Ok(false)`: the lease was no longer `token`'s, and the transaction was rolled back.
    /// An error: nothing was kept.
    async fn complete(
        self: Box<Self>,
        key: StorageKey,
        token: LeaseToken,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Commits the transaction of a request without a key.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;

    /// Rolls the transaction back: nothing of the handler's writes is kept.
    async fn roll_back(self: Box<Self>);
}
