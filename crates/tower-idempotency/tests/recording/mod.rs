//! A [`Store`] that wraps a real [`MemoryStore`] and records every call it gets: which storage
//! keys the layer asked for, and how often each verb ran. Tests use it to prove that a refused
//! request never touched the store, and which storage key a request landed on.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tower_idempotency::Fingerprint;
use tower_idempotency::MemoryStore;
use tower_idempotency::{BeginOutcome, LeaseToken, StorageKey, Store, StoreError};

#[derive(Default)]
struct Log {
    calls: BTreeMap<&'static str, usize>,
    keys: Vec<StorageKey>,
}

/// A memory store that records its calls. Clones share the store and the record.
#[derive(Clone, Default)]
pub struct RecordingStore {
    pub inner: MemoryStore,
    log: Arc<Mutex<Log>>,
}

impl RecordingStore {
    fn note(&self, verb: &'static str, key: &StorageKey) {
        let mut log = self.log.lock().unwrap();
        *log.calls.entry(verb).or_default() += 1;
        log.keys.push(*key);
    }

    /// How often each verb ran, by name (`begin`, `complete`, `release`, `renew`, `wait`).
    pub fn calls(&self) -> BTreeMap<&'static str, usize> {
        self.log.lock().unwrap().calls.clone()
    }

    /// How often `verb` ran.
    pub fn count(&self, verb: &str) -> usize {
        self.calls().get(verb).copied().unwrap_or(0)
    }

    /// Every call of any verb so far.
    pub fn total_calls(&self) -> usize {
        self.calls().values().sum()
    }

    /// The storage keys of every call, in order, repeats included.
    pub fn keys(&self) -> Vec<StorageKey> {
        self.log.lock().unwrap().keys.clone()
    }

    /// Records and leases held now.
    pub fn len(&self) -> usize {
        self.inner.stats().len
    }
}

#[async_trait]
impl Store for RecordingStore {
    async fn begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        self.note("begin", key);
        self.inner.begin(key, fingerprint, lease_ttl).await
    }
    async fn complete(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.note("complete", key);
        self.inner.complete(key, token, record, ttl).await
    }
    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        self.note("release", key);
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.note("renew", key);
        self.inner.renew(key, token, lease_ttl).await
    }
    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        self.note("wait", key);
        self.inner.wait(key, timeout).await
    }
}
