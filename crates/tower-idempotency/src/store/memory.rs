//! The embedded store: bounded, in-process, the default.

use std::collections::{HashMap, VecDeque, hash_map};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{BeginOutcome, LeaseToken, StorageKey, Store, StoreError};
use crate::fingerprint::Fingerprint;
use crate::metrics::{Event, count};
use crate::record::{Record, Unreplayable};

/// The length of an encoded unreplayable [`Record`], the smallest there is: version, flags,
/// fingerprint, status, header count and body length.
const UNREPLAYABLE_LEN: usize = 1 + 1 + 32 + 2 + 2 + 4;

/// What a record's allocation costs beyond its bytes: the allocator's header and rounding, and
/// the shared handle made when the record is first replayed.
const ALLOCATOR_OVERHEAD: usize = 64;

/// An in-process store for one process: the embedded default.
///
/// It is bounded twice: it holds at most `capacity` records (default 100 000) and at most
/// `max_bytes` bytes (default 256 MiB), whichever is reached first. A completed record counts its
/// encoded bytes (status, headers, body) plus [`RECORD_OVERHEAD`](MemoryStore::RECORD_OVERHEAD); a request in flight counts
/// [`LEASE_BYTES`](MemoryStore::LEASE_BYTES). [`MemoryStore::stats`] shows both counts.
///
/// Completed records expire after their TTL and are the first to go when room is needed, oldest
/// completion first (with one TTL for all, that is soonest-expiring first); a live lease is never
/// evicted. When the store is full of live leases, [`Store::begin`] for a new key fails with
/// [`StoreError::Full`], which the layer answers with 503, instead of growing without bound. When
/// leases hold half the store or more, expired ones (whose owner is gone) are reclaimed before a
/// completed record is evicted; they are looked for at most once a second.
///
/// A record that cannot fit, because it is larger than `max_bytes` less the leases held (a
/// response bigger than the whole bound, or a store full of requests in flight), is not kept and
/// evicts nothing: its lease completes with an unreplayable record instead, as for a response
/// over the layer's replay limit, so duplicates get 409 `response-not-replayable` and the request
/// never runs twice. It is counted as [`Event::Unstorable`] and logged.
///
/// Waiters are woken by notification the moment a request completes or is released, and at the
/// moment a lease expires, so an abandoned lease is taken over by the next caller.
///
/// Cloning is cheap and clones share the same records. Time is tokio's clock, so tests can
/// pause and advance it.
///
/// ```
/// use tower_idempotency::MemoryStore;
///
/// // 64 MiB, and no more than 10 000 records.
/// let store = MemoryStore::builder()
///     .with_max_bytes(64 << 20)
///     .with_capacity(10_000)
///     .build();
/// assert_eq!(store.stats().max_bytes, 64 << 20);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("MemoryStore")
            .field("capacity", &inner.capacity)
            .field("len", &inner.map.len())
            .field("max_bytes", &inner.max_bytes)
            .field("bytes", &inner.bytes)
            .finish()
    }
}

/// The bounds of a [`MemoryStore`], from [`MemoryStore::builder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStoreBuilder {
    capacity: usize,
    max_bytes: usize,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            capacity: MemoryStore::DEFAULT_CAPACITY,
            max_bytes: MemoryStore::DEFAULT_MAX_BYTES,
        }
    }
}

impl MemoryStoreBuilder {
    /// At most `capacity` records, completed and in flight (at least 1; default
    /// [`DEFAULT_CAPACITY`](MemoryStore::DEFAULT_CAPACITY)).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// At most `max_bytes` bytes, counted as [`MemoryStore`] says (at least [`LEASE_BYTES`](MemoryStore::LEASE_BYTES), room
    /// for one request in flight; default [`DEFAULT_MAX_BYTES`](MemoryStore::DEFAULT_MAX_BYTES)).
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Mutex::new(Inner {
                capacity: self.capacity.max(1),
                max_bytes: self.max_bytes.max(MemoryStore::LEASE_BYTES),
                bytes: 0,
                map: HashMap::default(),
                completed: VecDeque::new(),
                completed_len: 0,
                seq: 0,
                next_lease_scan: Instant::now(),
            })),
        }
    }
}

/// Storage keys are already SHA-256 (or HMAC) outputs, so a fast hasher with a random seed is
/// enough; SipHash would cost more than the rest of a lookup.
type Hasher = foldhash::fast::RandomState;

/// How often, at most, a store full of leases is searched for expired ones.
const LEASE_SCAN_INTERVAL: Duration = Duration::from_secs(1);

struct Inner {
    capacity: usize,
    max_bytes: usize,
    /// The bytes counted for every entry in `map`: [`Entry::bytes`] summed.
    bytes: usize,
    map: HashMap<StorageKey, Entry, Hasher>,
    /// Completed records in the order they completed, by (expiry, sequence number): the
    /// eviction order. An entry whose record has gone since (taken over after it expired) no
    /// longer matches the map's sequence number and is skipped.
    completed: VecDeque<(Instant, u64, StorageKey)>,
    /// Completed records in `map`.
    completed_len: usize,
    seq: u64,
    /// When a store full of leases may next be searched for expired ones.
    next_lease_scan: Instant,
}

enum Entry {
    Lease {
        token: LeaseToken,
        fingerprint: Fingerprint,
        expires: Instant,
        /// Made by the first waiter: most requests have none, and cost no allocation.
        notify: Option<Arc<Notify>>,
    },
    Completed {
        record: Bytes,
        expires: Instant,
        seq: u64,
    },
}

impl Entry {
    /// The bytes this entry is counted as.
    fn bytes(&self) -> usize {
        match self {
            Entry::Lease { .. } => MemoryStore::LEASE_BYTES,
            Entry::Completed { record, .. } => record_bytes(record.len()),
        }
    }

    /// Whether `token` holds this lease and it has not expired.
    fn owned_by(&self, token: LeaseToken, now: Instant) -> bool {
        matches!(self, Entry::Lease { token: owner, expires, .. } if *owner == token && *expires > now)
    }
}

/// The bytes a completed record of `len` encoded bytes is counted as.
fn record_bytes(len: usize) -> usize {
    MemoryStore::RECORD_OVERHEAD.saturating_add(len)
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
    /// The bound on `len`.
    pub capacity: usize,
    /// The bytes counted for what is held: [`LEASE_BYTES`](MemoryStore::LEASE_BYTES) per lease, and [`RECORD_OVERHEAD`](MemoryStore::RECORD_OVERHEAD)
    /// plus its length per completed record. Zero when the store is empty.
    pub bytes: usize,
    /// The bound on `bytes`.
    pub max_bytes: usize,
}

impl MemoryStore {
    /// Default maximum number of records a [`MemoryStore`] holds.
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// Default maximum number of bytes a [`MemoryStore`] holds: 256 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 256 << 20;

    /// The bytes a [`MemoryStore`] counts for every key it holds, beside the record's own bytes: its
    /// slot in the table (with the room a hash table keeps free), its place in the eviction queue,
    /// and the allocator's share. 400 on a 64-bit target.
    pub const RECORD_OVERHEAD: usize = 2 * size_of::<(StorageKey, Entry)>()
        + 2 * size_of::<(Instant, u64, StorageKey)>()
        + ALLOCATOR_OVERHEAD;

    /// The bytes a [`MemoryStore`] counts for a lease (a request in flight): [`RECORD_OVERHEAD`](Self::RECORD_OVERHEAD) and
    /// the smallest record, the one that says a response could not be kept. So a lease always has
    /// room for its outcome, whatever else the store holds.
    pub const LEASE_BYTES: usize = Self::RECORD_OVERHEAD + UNREPLAYABLE_LEN;
}

impl MemoryStore {
    /// A store holding at most `capacity` records (at least 1) and [`DEFAULT_MAX_BYTES`](MemoryStore::DEFAULT_MAX_BYTES).
    pub fn with_capacity(capacity: usize) -> Self {
        Self::builder().with_capacity(capacity).build()
    }

    /// A store holding at most `max_bytes` bytes (at least [`LEASE_BYTES`](MemoryStore::LEASE_BYTES)) and
    /// [`DEFAULT_CAPACITY`](MemoryStore::DEFAULT_CAPACITY) records.
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        Self::builder().with_max_bytes(max_bytes).build()
    }

    /// A store with both bounds chosen: see [`MemoryStoreBuilder`].
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// What the store holds now.
    pub fn stats(&self) -> MemoryStoreStats {
        let inner = self.lock();
        MemoryStoreStats {
            len: inner.map.len(),
            leases: inner.leases(),
            completed: inner.completed_len,
            capacity: inner.capacity,
            bytes: inner.bytes,
            max_bytes: inner.max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps inconsistent in a way that
        // matters more than refusing service would, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Entries taken out under the lock, to be freed after it is released: their memory is cold,
/// and freeing it inside would hold the lock longer. One entry, the usual eviction, needs no
/// allocation.
#[derive(Default)]
struct Freed {
    one: Option<Entry>,
    more: Vec<Entry>,
}

impl Freed {
    fn push(&mut self, entry: Option<Entry>) {
        match (entry, &self.one) {
            (None, _) => {}
            (Some(e), None) => self.one = Some(e),
            (Some(e), Some(_)) => self.more.push(e),
        }
    }
}

impl Inner {
    /// Leases held, live or expired.
    fn leases(&self) -> usize {
        self.map.len() - self.completed_len
    }

    /// Removes the completed record the queue entry `(seq, key)` stands for, if it is still
    /// there. The record is handed back so that it is freed after the lock is released.
    fn remove_completed(&mut self, seq: u64, key: &StorageKey) -> Option<Entry> {
        // One lookup: the bucket is cold, as the oldest record's usually is.
        match self.map.entry(*key) {
            hash_map::Entry::Occupied(e) if matches!(e.get(), Entry::Completed { seq: s, .. } if *s == seq) =>
            {
                let entry = e.remove();
                self.completed_len -= 1;
                self.bytes -= entry.bytes();
                Some(entry)
            }
            _ => None,
        }
    }

    /// Drops up to a few expired completed records, so memory follows the TTL without a sweeper.
    fn purge_expired(&mut self, now: Instant, freed: &mut Freed) {
        for _ in 0..8 {
            match self.completed.front() {
                Some(&(expires, seq, key)) if expires <= now => {
                    self.completed.pop_front();
                    freed.push(self.remove_completed(seq, &key));
                }
                _ => break,
            }
        }
    }

    /// Whether leases hold half the store or more, by either bound: then expired ones are worth
    /// looking for before a completed record is evicted.
    fn leases_crowd(&self) -> bool {
        let leases = self.leases();
        leases * 2 >= self.capacity
            || leases.saturating_mul(MemoryStore::LEASE_BYTES * 2) >= self.max_bytes
    }

    /// Makes room for one more lease, or says the store is full of live leases.
    fn make_room(&mut self, now: Instant, freed: &mut Freed) -> Result<(), StoreError> {
        while self.map.len() >= self.capacity
            || self.bytes + MemoryStore::LEASE_BYTES > self.max_bytes
        {
            // When leases hold half the store or more, expired ones are looked for before a
            // completed record is evicted, at most once a second. In normal running the leases
            // are the requests in flight, few, and this search never runs.
            if self.leases_crowd()
                && now >= self.next_lease_scan
                && self.reclaim_expired_leases(now)
            {
                continue;
            }
            if let Some((_, seq, key)) = self.completed.pop_front() {
                freed.push(self.remove_completed(seq, &key));
                continue;
            }
            return Err(StoreError::Full);
        }
        Ok(())
    }

    /// Makes room for a completed record of `bytes` to replace a lease of the caller's, evicting
    /// the oldest completed records. Says `false`, evicting nothing, when the record cannot fit
    /// beside the other leases.
    fn make_room_for_record(&mut self, bytes: usize, now: Instant, freed: &mut Freed) -> bool {
        // Leases are never evicted: the caller's own is replaced, the others stay.
        let fits_beside_leases = |inner: &Self| {
            ((inner.leases() - 1) * MemoryStore::LEASE_BYTES).saturating_add(bytes)
                <= inner.max_bytes
        };
        if !fits_beside_leases(self) {
            // Expired leases are no requests in flight: they go, at most once a second.
            let reclaimed = now >= self.next_lease_scan && self.reclaim_expired_leases(now);
            if !reclaimed || !fits_beside_leases(self) {
                return false;
            }
        }
        while self.bytes - MemoryStore::LEASE_BYTES + bytes > self.max_bytes {
            match self.completed.pop_front() {
                Some((_, seq, key)) => freed.push(self.remove_completed(seq, &key)),
                // Not reached: the completed records' bytes are all the rest.
                None => return false,
            }
        }
        true
    }

    /// Drops every expired lease; says whether there was any.
    fn reclaim_expired_leases(&mut self, now: Instant) -> bool {
        self.next_lease_scan = now + LEASE_SCAN_INTERVAL;
        let before = self.map.len();
        self.map
            .retain(|_, e| !matches!(e, Entry::Lease { expires, .. } if *expires <= now));
        let reclaimed = before - self.map.len();
        self.bytes -= reclaimed * MemoryStore::LEASE_BYTES;
        reclaimed > 0
    }

    /// Files a completed record, compacting the queue if takeovers left it mostly stale.
    fn push_completed(&mut self, expires: Instant, seq: u64, key: StorageKey) {
        self.completed.push_back((expires, seq, key));
        self.completed_len += 1;
        if self.completed.len() > 2 * self.completed_len + 1024 {
            let map = &self.map;
            self.completed.retain(|(_, seq, key)| {
                matches!(map.get(key), Some(Entry::Completed { seq: s, .. }) if s == seq)
            });
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn begin(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease_ttl: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let now = Instant::now();
        let expires = now + lease_ttl;
        // Evicted records are freed after the lock is released.
        let mut freed = Freed::default();
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.purge_expired(now, &mut freed);
        let expired_record = match inner.map.get_mut(key) {
            Some(Entry::Completed {
                record, expires, ..
            }) if *expires > now => {
                return Ok(BeginOutcome::Completed(record.clone()));
            }
            Some(Entry::Lease {
                fingerprint,
                expires,
                ..
            }) if *expires > now => {
                return Ok(BeginOutcome::InFlight {
                    fingerprint: *fingerprint,
                });
            }
            // An expired lease: its owner is presumed gone. Take it over, keeping its waiters;
            // a lease for a lease, the counts do not change.
            Some(entry @ Entry::Lease { .. }) => {
                let notify = match entry {
                    Entry::Lease { notify, .. } => notify.take(),
                    Entry::Completed { .. } => None,
                };
                let token = LeaseToken::random();
                let old = std::mem::replace(
                    entry,
                    Entry::Lease {
                        token,
                        fingerprint: *fingerprint,
                        expires,
                        notify,
                    },
                );
                drop(guard);
                drop((old, freed));
                return Ok(BeginOutcome::Acquired(token));
            }
            Some(Entry::Completed { .. }) => true,
            None => false,
        };
        if expired_record {
            // An expired record goes, as if it had been purged (its queue entry goes stale), and
            // the key is a new one: the lease needs room like any other.
            if let Some(old) = inner.map.remove(key) {
                inner.completed_len -= 1;
                inner.bytes -= old.bytes();
                freed.push(Some(old));
            }
        }
        let room = inner.make_room(now, &mut freed);
        let begun = room.map(|()| {
            let token = LeaseToken::random();
            inner.map.insert(
                *key,
                Entry::Lease {
                    token,
                    fingerprint: *fingerprint,
                    expires,
                    notify: None,
                },
            );
            inner.bytes += MemoryStore::LEASE_BYTES;
            BeginOutcome::Acquired(token)
        });
        drop(guard);
        drop(freed);
        begun
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: LeaseToken,
        record: Bytes,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let expires = now + ttl;
        let bytes = record_bytes(record.len());
        // Evicted records, and a record that cannot be kept, are freed after the lock is
        // released.
        let mut freed = Freed::default();
        let mut refused = None;
        let mut guard = self.lock();
        let inner = &mut *guard;
        // The caller's lease is replaced, so its bytes are room for the record. Most records fit
        // at once: one lookup, as before the bound on bytes.
        let record = if inner
            .bytes
            .saturating_sub(MemoryStore::LEASE_BYTES)
            .saturating_add(bytes)
            <= inner.max_bytes
        {
            record
        } else {
            let fingerprint = match inner.map.get(key) {
                Some(Entry::Lease {
                    token: owner,
                    fingerprint,
                    expires,
                    ..
                }) if *owner == token && *expires > now => *fingerprint,
                _ => return Ok(false),
            };
            if inner.make_room_for_record(bytes, now, &mut freed) {
                record
            } else {
                // Too large for the store beside the requests in flight: an unreplayable record
                // takes the lease's room, so the request is not run again for this key.
                refused = Some(record);
                Record {
                    fingerprint,
                    response: Err(Unreplayable::TooLarge),
                }
                .encode()
            }
        };
        // An expired lease is no longer its owner's, even before someone takes it over: the
        // same fencing a store with server-side expiry gives.
        let Some(entry) = inner.map.get_mut(key).filter(|e| e.owned_by(token, now)) else {
            return Ok(false);
        };
        inner.seq += 1;
        let seq = inner.seq;
        inner.bytes = inner.bytes - MemoryStore::LEASE_BYTES + record_bytes(record.len());
        let notify = match std::mem::replace(
            entry,
            Entry::Completed {
                record,
                expires,
                seq,
            },
        ) {
            Entry::Lease { notify, .. } => notify,
            Entry::Completed { .. } => None,
        };
        inner.push_completed(expires, seq, *key);
        drop(guard);
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
        if let Some(refused) = refused {
            count(Event::Unstorable);
            tracing::warn!(
                ?key,
                bytes = refused.len(),
                "response too large for the memory store beside the requests in flight; kept as \
                 not replayable"
            );
        }
        drop(freed);
        Ok(true)
    }

    async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        if !inner.map.get(key).is_some_and(|e| e.owned_by(token, now)) {
            return Ok(false);
        }
        let entry = inner.map.remove(key);
        inner.bytes -= MemoryStore::LEASE_BYTES;
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
        let mut inner = self.lock();
        match inner.map.get_mut(key) {
            Some(Entry::Lease {
                token: owner,
                expires,
                ..
            }) if *owner == token && *expires > now => {
                *expires = now + lease_ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let (notified, expires) = {
            let mut inner = self.lock();
            match inner.map.get_mut(key) {
                Some(Entry::Lease {
                    expires, notify, ..
                }) if *expires > now => {
                    // Registered while the lock is held, so a completion that follows cannot be
                    // missed.
                    let notify = notify.get_or_insert_with(Default::default).clone();
                    let mut notified = Box::pin(notify.notified_owned());
                    notified.as_mut().enable();
                    (notified, *expires)
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

    #[test]
    fn a_lease_is_counted_as_the_smallest_record() {
        let smallest = Record {
            fingerprint: FP,
            response: Err(Unreplayable::TooLarge),
        }
        .encode();
        assert_eq!(smallest.len(), UNREPLAYABLE_LEN);
        assert_eq!(MemoryStore::LEASE_BYTES, record_bytes(smallest.len()));
        // The documented figure, on the 64-bit targets the project is built for.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(MemoryStore::RECORD_OVERHEAD, 400);
    }

    #[tokio::test(start_paused = true)]
    async fn full_of_leases_refuses_new_keys_and_never_evicts_a_lease() {
        let store = MemoryStore::with_capacity(3);
        for n in 0..3 {
            assert!(matches!(
                store.begin(&key(n), &FP, LEASE).await.unwrap(),
                BeginOutcome::Acquired(_)
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
                BeginOutcome::InFlight { .. }
            ));
        }
        // Once they expire, room is made: every expired lease is reclaimed at once.
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        assert!(matches!(
            store.begin(&key(9), &FP, LEASE).await.unwrap(),
            BeginOutcome::Acquired(_)
        ));
        assert_eq!(store.stats().len, 1);
        assert_eq!(store.stats().leases, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_full_of_leases_looks_for_expired_ones_at_most_once_a_second() {
        let store = MemoryStore::with_capacity(2);
        let short = Duration::from_millis(100);
        assert!(matches!(
            store.begin(&key(0), &FP, short).await.unwrap(),
            BeginOutcome::Acquired(_)
        ));
        assert!(matches!(
            store.begin(&key(1), &FP, LEASE).await.unwrap(),
            BeginOutcome::Acquired(_)
        ));
        // Full of live leases: this search finds none, and the next may come a second later.
        assert!(matches!(
            store.begin(&key(2), &FP, LEASE).await,
            Err(StoreError::Full)
        ));
        tokio::time::advance(short).await;
        assert!(matches!(
            store.begin(&key(2), &FP, LEASE).await,
            Err(StoreError::Full)
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(
            store.begin(&key(2), &FP, LEASE).await.unwrap(),
            BeginOutcome::Acquired(_)
        ));
        // The live lease was kept.
        assert!(matches!(
            store.begin(&key(1), &FP, LEASE).await.unwrap(),
            BeginOutcome::InFlight { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_leases_go_before_live_records() {
        let store = MemoryStore::with_capacity(2);
        let BeginOutcome::Acquired(_) = store.begin(&key(0), &FP, LEASE).await.unwrap() else {
            panic!("key 0 must be acquired")
        };
        let BeginOutcome::Acquired(t1) = store.begin(&key(1), &FP, LEASE).await.unwrap() else {
            panic!("key 1 must be acquired")
        };
        assert!(
            store
                .complete(&key(1), t1, Bytes::from_static(b"r"), TTL)
                .await
                .unwrap()
        );
        // Key 0's owner is gone: its lease expires while key 1's record is still live.
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        let BeginOutcome::Acquired(_) = store.begin(&key(2), &FP, LEASE).await.unwrap() else {
            panic!("key 2 must be acquired")
        };
        assert!(matches!(
            store.begin(&key(1), &FP, LEASE).await.unwrap(),
            BeginOutcome::Completed(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn records_taken_over_after_expiry_leave_the_eviction_queue_consistent() {
        let store = MemoryStore::with_capacity(4);
        let ttl = Duration::from_secs(1);
        for round in 0..3 {
            for n in 0..4 {
                let BeginOutcome::Acquired(t) = store.begin(&key(n), &FP, LEASE).await.unwrap()
                else {
                    panic!("round {round}: key {n} must be acquired")
                };
                assert!(
                    store
                        .complete(&key(n), t, Bytes::from_static(b"r"), ttl)
                        .await
                        .unwrap()
                );
            }
            let stats = store.stats();
            assert_eq!((stats.len, stats.completed, stats.leases), (4, 4, 0));
            tokio::time::advance(ttl).await;
        }
        // A new key evicts exactly one record, the oldest, and the counts still add up.
        tokio::time::advance(Duration::from_millis(1)).await;
        let BeginOutcome::Acquired(_) = store.begin(&key(9), &FP, LEASE).await.unwrap() else {
            panic!("a new key must be acquired")
        };
        let stats = store.stats();
        assert_eq!(stats.len, stats.completed + stats.leases);
        assert!(stats.len <= 4);
    }

    #[tokio::test(start_paused = true)]
    async fn completed_records_are_evicted_before_leases() {
        let store = MemoryStore::with_capacity(2);
        let BeginOutcome::Acquired(t0) = store.begin(&key(0), &FP, LEASE).await.unwrap() else {
            panic!()
        };
        assert!(
            store
                .complete(&key(0), t0, Bytes::from_static(b"r"), TTL)
                .await
                .unwrap()
        );
        let BeginOutcome::Acquired(_) = store.begin(&key(1), &FP, LEASE).await.unwrap() else {
            panic!()
        };
        let BeginOutcome::Acquired(_) = store.begin(&key(2), &FP, LEASE).await.unwrap() else {
            panic!()
        };
        // key 0 (completed) made room; key 1 (lease) is still in flight.
        assert!(matches!(
            store.begin(&key(1), &FP, LEASE).await.unwrap(),
            BeginOutcome::InFlight { .. }
        ));
        assert!(matches!(
            store.begin(&key(0), &FP, LEASE).await,
            Err(StoreError::Full)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn renew_moves_the_expiry() {
        let store = MemoryStore::with_capacity(10);
        let BeginOutcome::Acquired(t) = store.begin(&key(0), &FP, LEASE).await.unwrap() else {
            panic!()
        };
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(store.renew(&key(0), t, LEASE).await.unwrap());
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(matches!(
            store.begin(&key(0), &FP, LEASE).await.unwrap(),
            BeginOutcome::InFlight { .. }
        ));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(
            store.begin(&key(0), &FP, LEASE).await.unwrap(),
            BeginOutcome::Acquired(_)
        ));
        assert!(!store.renew(&key(0), t, LEASE).await.unwrap());
    }
}
