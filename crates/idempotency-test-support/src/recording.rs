//! A [`Store`] that wraps a real one (a [`MemoryStore`] by default) and records every call it
//! gets: which storage keys and records the layer handed it, how often each verb ran and how
//! often the store said no, how many waits are in progress. It can also fail chosen verbs, as a
//! store that cannot be reached would.
//!
//! Tests use it to prove that a refused request never touched the store, which storage key a
//! request landed on, that a duplicate is waiting (rather than sleeping and hoping it is), and
//! that a late owner's completion was refused.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;
use tower_idempotency::{
    BeginOutcome, Fingerprint, Forgotten, InFlightPage, Inspected, LeaseToken, MemoryStore,
    StorageKey, Store, StoreError,
};

#[derive(Default)]
struct Log {
    calls: BTreeMap<&'static str, usize>,
    refused: BTreeMap<&'static str, usize>,
    keys: Vec<StorageKey>,
    records: Vec<Bytes>,
    waiting: usize,
    /// Verbs that fail every time.
    failing: Vec<&'static str>,
    /// Verbs that fail the next `fail_next.1` times between them.
    fail_next: (Vec<&'static str>, usize),
}

/// A store that records its calls. Clones share the store and the record.
pub struct RecordingStore<S = MemoryStore> {
    /// The store every call goes to.
    pub inner: S,
    log: Arc<Mutex<Log>>,
}

impl<S: Clone> Clone for RecordingStore<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            log: self.log.clone(),
        }
    }
}

impl Default for RecordingStore {
    fn default() -> Self {
        Self::new(MemoryStore::default())
    }
}

impl RecordingStore<MemoryStore> {
    /// Records and leases held now.
    pub fn len(&self) -> usize {
        self.inner.stats().len
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S> RecordingStore<S> {
    /// Records the calls made to `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            log: Arc::default(),
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap()
    }

    /// Notes a call, and says whether the test wants it to fail.
    fn note(&self, verb: &'static str, key: &StorageKey) -> Result<(), StoreError> {
        let mut log = self.log();
        *log.calls.entry(verb).or_default() += 1;
        log.keys.push(*key);
        let fail_next = log.fail_next.0.contains(&verb) && log.fail_next.1 > 0;
        if fail_next {
            log.fail_next.1 -= 1;
        }
        if fail_next || log.failing.contains(&verb) {
            return Err(StoreError::Unavailable(
                format!("{verb} failed by the test").into(),
            ));
        }
        Ok(())
    }

    /// Counts a `false` answer of an owner-checked verb.
    fn answered(
        &self,
        verb: &'static str,
        done: Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        if let Ok(false) = done {
            *self.log().refused.entry(verb).or_default() += 1;
        }
        done
    }

    /// How often each verb ran, by name (`begin`, `complete`, `release`, `renew`, `wait`),
    /// failed calls included (`ping`, which a request never makes, is not counted).
    pub fn calls(&self) -> BTreeMap<&'static str, usize> {
        self.log().calls.clone()
    }

    /// How often `verb` ran.
    pub fn count(&self, verb: &str) -> usize {
        self.log().calls.get(verb).copied().unwrap_or(0)
    }

    /// Every call of any verb so far.
    pub fn total_calls(&self) -> usize {
        self.log().calls.values().sum()
    }

    /// How often the store refused `verb` (`complete`, `release` or `renew` answered `false`:
    /// the caller no longer owned the lease).
    pub fn refused(&self, verb: &str) -> usize {
        self.log().refused.get(verb).copied().unwrap_or(0)
    }

    /// The storage keys of every call, in order, repeats included.
    pub fn keys(&self) -> Vec<StorageKey> {
        self.log().keys.clone()
    }

    /// Every record handed to `complete`, in order.
    pub fn records(&self) -> Vec<Bytes> {
        self.log().records.clone()
    }

    /// How many calls to `wait` are in progress now.
    pub fn waiting(&self) -> usize {
        self.log().waiting
    }

    /// Makes every call of `verb` fail as an unreachable store's would, from now on.
    pub fn fail_always(&self, verb: &'static str) {
        self.log().failing.push(verb);
    }

    /// Makes the next `n` calls of any of `verbs`, between them, fail as an unreachable store's
    /// would.
    pub fn fail_next(&self, n: usize, verbs: &[&'static str]) {
        self.log().fail_next = (verbs.to_vec(), n);
    }

    /// Waits (up to 20 s) until `verb` has run at least `n` times: a duplicate has asked the
    /// store to wait, a renewal happened.
    pub async fn reached(&self, verb: &str, n: usize) {
        self.until(
            |store| store.count(verb) >= n,
            &format!("{n} calls of {verb}"),
        )
        .await;
    }

    /// Waits (up to 20 s) until the store has refused `verb` at least `n` times.
    pub async fn refusals(&self, verb: &str, n: usize) {
        self.until(
            |store| store.refused(verb) >= n,
            &format!("{n} refusals of {verb}"),
        )
        .await;
    }

    /// Waits (up to 20 s) until at least `n` calls to `wait` are in progress at once.
    pub async fn waiters(&self, n: usize) {
        self.until(
            |store| store.waiting() >= n,
            &format!("{n} waiters at once"),
        )
        .await;
    }

    async fn until(&self, done: impl Fn(&Self) -> bool, what: &str) {
        let give_up = Instant::now() + Duration::from_secs(20);
        while !done(self) {
            assert!(Instant::now() < give_up, "the store never saw {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[async_trait]
impl<S: Store> Store for RecordingStore<S> {
    async fn begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        self.note("begin", key)?;
        self.inner.begin(key, fingerprint, lease_ttl).await
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.log().records.push(record.clone());
        self.note("complete", key)?;
        let done = self.inner.complete(key, token, record, ttl).await;
        self.answered("complete", done)
    }

    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        self.note("release", key)?;
        let done = self.inner.release(key, token).await;
        self.answered("release", done)
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.note("renew", key)?;
        let done = self.inner.renew(key, token, lease_ttl).await;
        self.answered("renew", done)
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        self.note("wait", key)?;
        struct Waiting<'a>(&'a Mutex<Log>);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap().waiting -= 1;
            }
        }
        self.log().waiting += 1;
        let _waiting = Waiting(&self.log);
        self.inner.wait(key, timeout).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspected>, StoreError> {
        self.inner.inspect(key).await
    }

    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten, StoreError> {
        self.inner.forget(key, force).await
    }

    async fn in_flight(
        &self,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<InFlightPage, StoreError> {
        self.inner.in_flight(after, limit).await
    }
}
