//! The embedded store: bounded, in-process, the default.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Begin, LeaseToken, StorageKey, Store, StoreError};
use crate::fingerprint::Fingerprint;

/// Default maximum number of records a [`MemoryStore`] holds.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// An in-process store for one process: the embedded default.
///
/// It is bounded: it holds at most `capacity` records (default 100 000). Completed records expire
/// after their TTL and are the first to go when room is needed, soonest-expiring first; a live
/// lease is never evicted. When the store is full of live leases, [`Store::begin`] for a new key
/// fails with [`StoreError::Full`], which the layer answers with 503, instead of growing without
/// bound.
///
/// Waiters are woken by notification the moment a request completes or is released, and at the
/// moment a lease expires, so an abandoned lease is taken over by the next caller.
///
/// Cloning is cheap and clones share the same records. Time is tokio's clock, so tests can
/// pause and advance it.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("MemoryStore")
            .field("capacity", &inner.capacity)
            .field("len", &inner.map.len())
            .finish()
    }
}

type Slot = (Instant, u64);

/// Storage keys are already SHA-256 (or HMAC) outputs, so a fast hasher with a random seed is
/// enough; SipHash would cost more than the rest of a lookup.
type Hasher = foldhash::fast::RandomState;

struct Inner {
    capacity: usize,
    map: HashMap<StorageKey, Entry, Hasher>,
    /// Completed records by expiry: the eviction order.
    completed: BTreeMap<Slot, StorageKey>,
    /// Leases by expiry: to reclaim expired ones when room is needed.
    leases: BTreeMap<Slot, StorageKey>,
    seq: u64,
}

enum Entry {
    Lease {
        token: LeaseToken,
        fingerprint: Fingerprint,
        slot: Slot,
        /// Made by the first waiter: most requests have none, and cost no allocation.
        notify: Option<Arc<Notify>>,
    },
    Completed {
        record: Bytes,
        slot: Slot,
    },
}

impl Entry {
    /// The lease's slot, when `token` holds it and it has not expired.
    fn owned_by(&self, token: LeaseToken, now: Instant) -> Option<Slot> {
        match self {
            Entry::Lease {
                token: owner, slot, ..
            } if *owner == token && slot.0 > now => Some(*slot),
            _ => None,
        }
    }
}

/// Counts of what a [`MemoryStore`] holds, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStoreStats {
    /// Records held, completed and in flight.
    pub len: usize,
    /// Live or expired leases held.
    pub leases: usize,
    /// Completed records held (expired ones are dropped lazily).
    pub completed: usize,
    /// The bound.
    pub capacity: usize,
}

impl MemoryStore {
    /// A store holding at most `capacity` records (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                capacity: capacity.max(1),
                map: HashMap::default(),
                completed: BTreeMap::new(),
                leases: BTreeMap::new(),
                seq: 0,
            })),
        }
    }

    /// What the store holds now.
    pub fn stats(&self) -> MemoryStoreStats {
        let inner = self.lock();
        MemoryStoreStats {
            len: inner.map.len(),
            leases: inner.leases.len(),
            completed: inner.completed.len(),
            capacity: inner.capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps inconsistent in a way that
        // matters more than refusing service would, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn slot(&mut self, at: Instant) -> Slot {
        self.seq += 1;
        (at, self.seq)
    }

    fn remove(&mut self, key: &StorageKey) -> Option<Entry> {
        let entry = self.map.remove(key)?;
        match &entry {
            Entry::Lease { slot, .. } => self.leases.remove(slot),
            Entry::Completed { slot, .. } => self.completed.remove(slot),
        };
        Some(entry)
    }

    /// Drops up to a few expired completed records, so memory follows the TTL without a sweeper.
    fn purge_expired(&mut self, now: Instant) {
        for _ in 0..8 {
            match self.completed.first_key_value() {
                Some((slot, key)) if slot.0 <= now => {
                    let key = *key;
                    self.remove(&key);
                }
                _ => break,
            }
        }
    }

    /// Makes room for one more record, or says the store is full of live leases.
    fn make_room(&mut self, now: Instant) -> Result<(), StoreError> {
        while self.map.len() >= self.capacity {
            if let Some((slot, key)) = self.leases.first_key_value()
                && slot.0 <= now
            {
                let key = *key;
                self.remove(&key);
                continue;
            }
            match self.completed.pop_first() {
                Some((_, key)) => {
                    self.map.remove(&key);
                }
                None => return Err(StoreError::Full),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        let now = Instant::now();
        let mut guard = self.lock();
        guard.purge_expired(now);
        let slot = guard.slot(now + lease_ttl);
        let inner = &mut *guard;
        if let Some(entry) = inner.map.get_mut(key) {
            let notify = match entry {
                Entry::Completed { record, slot } if slot.0 > now => {
                    return Ok(Begin::Completed(record.clone()));
                }
                Entry::Lease {
                    fingerprint, slot, ..
                } if slot.0 > now => {
                    return Ok(Begin::InFlight {
                        fingerprint: *fingerprint,
                    });
                }
                // An expired lease: its owner is presumed gone. Take it over, keeping its
                // waiters.
                Entry::Lease { notify, .. } => notify.take(),
                Entry::Completed { .. } => None,
            };
            match entry {
                Entry::Lease { slot, .. } => inner.leases.remove(slot),
                Entry::Completed { slot, .. } => inner.completed.remove(slot),
            };
            let token = LeaseToken::random();
            *entry = Entry::Lease {
                token,
                fingerprint: *fingerprint,
                slot,
                notify,
            };
            inner.leases.insert(slot, *key);
            return Ok(Begin::Acquired(token));
        }
        inner.make_room(now)?;
        let token = LeaseToken::random();
        inner.leases.insert(slot, *key);
        inner.map.insert(
            *key,
            Entry::Lease {
                token,
                fingerprint: *fingerprint,
                slot,
                notify: None,
            },
        );
        Ok(Begin::Acquired(token))
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut guard = self.lock();
        let slot = guard.slot(now + ttl);
        let inner = &mut *guard;
        // An expired lease is no longer its owner's, even before someone takes it over: the
        // same fencing a store with server-side expiry gives.
        let Some(entry) = inner.map.get_mut(key) else {
            return Ok(false);
        };
        let Some(old) = entry.owned_by(token, now) else {
            return Ok(false);
        };
        let notify = match std::mem::replace(entry, Entry::Completed { record, slot }) {
            Entry::Lease { notify, .. } => notify,
            Entry::Completed { .. } => None,
        };
        inner.leases.remove(&old);
        inner.completed.insert(slot, *key);
        drop(guard);
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
        Ok(true)
    }

    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        if inner
            .map
            .get(key)
            .and_then(|e| e.owned_by(token, now))
            .is_none()
        {
            return Ok(false);
        }
        let entry = inner.remove(key);
        drop(inner);
        if let Some(Entry::Lease {
            notify: Some(notify),
            ..
        }) = entry
        {
            notify.notify_waiters();
        }
        Ok(true)
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        lease_ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut guard = self.lock();
        let new = guard.slot(now + lease_ttl);
        let inner = &mut *guard;
        let Some(entry) = inner.map.get_mut(key) else {
            return Ok(false);
        };
        let Some(old) = entry.owned_by(token, now) else {
            return Ok(false);
        };
        if let Entry::Lease { slot, .. } = entry {
            *slot = new;
        }
        inner.leases.remove(&old);
        inner.leases.insert(new, *key);
        Ok(true)
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let (notified, expires) = {
            let mut inner = self.lock();
            match inner.map.get_mut(key) {
                Some(Entry::Lease { slot, notify, .. }) if slot.0 > now => {
                    // Registered while the lock is held, so a completion that follows cannot be
                    // missed.
                    let notify = notify.get_or_insert_with(Default::default).clone();
                    let mut notified = Box::pin(notify.notified_owned());
                    notified.as_mut().enable();
                    (notified, slot.0)
                }
                _ => return Ok(()),
            }
        };
        let deadline = expires.min(now + timeout);
        let _ = tokio::time::timeout_at(deadline, notified).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> StorageKey {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&n.to_be_bytes());
        StorageKey(k)
    }

    const FP: Fingerprint = Fingerprint([7; 32]);
    const LEASE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(240);

    #[tokio::test(start_paused = true)]
    async fn full_of_leases_refuses_new_keys_and_never_evicts_a_lease() {
        let store = MemoryStore::with_capacity(3);
        for n in 0..3 {
            assert!(matches!(
                store.begin(&key(n), &FP, LEASE).await.unwrap(),
                Begin::Acquired(_)
            ));
        }
        assert!(matches!(
            store.begin(&key(9), &FP, LEASE).await,
            Err(StoreError::Full)
        ));
        // The leases are still there.
        for n in 0..3 {
            assert!(matches!(
                store.begin(&key(n), &FP, LEASE).await.unwrap(),
                Begin::InFlight { .. }
            ));
        }
        // Once they expire, room is made.
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        assert!(matches!(
            store.begin(&key(9), &FP, LEASE).await.unwrap(),
            Begin::Acquired(_)
        ));
        assert_eq!(store.stats().len, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn completed_records_are_evicted_before_leases() {
        let store = MemoryStore::with_capacity(2);
        let Begin::Acquired(t0) = store.begin(&key(0), &FP, LEASE).await.unwrap() else {
            panic!()
        };
        assert!(
            store
                .complete(&key(0), t0, Bytes::from_static(b"r"), TTL)
                .await
                .unwrap()
        );
        let Begin::Acquired(_) = store.begin(&key(1), &FP, LEASE).await.unwrap() else {
            panic!()
        };
        let Begin::Acquired(_) = store.begin(&key(2), &FP, LEASE).await.unwrap() else {
            panic!()
        };
        // key 0 (completed) made room; key 1 (lease) is still in flight.
        assert!(matches!(
            store.begin(&key(1), &FP, LEASE).await.unwrap(),
            Begin::InFlight { .. }
        ));
        assert!(matches!(
            store.begin(&key(0), &FP, LEASE).await,
            Err(StoreError::Full)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn renew_moves_the_expiry() {
        let store = MemoryStore::with_capacity(10);
        let Begin::Acquired(t) = store.begin(&key(0), &FP, LEASE).await.unwrap() else {
            panic!()
        };
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(store.renew(&key(0), t, LEASE).await.unwrap());
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(matches!(
            store.begin(&key(0), &FP, LEASE).await.unwrap(),
            Begin::InFlight { .. }
        ));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(
            store.begin(&key(0), &FP, LEASE).await.unwrap(),
            Begin::Acquired(_)
        ));
        assert!(!store.renew(&key(0), t, LEASE).await.unwrap());
    }
}
