//! The embedded store: bounded, in-process, the default.
//!
//! This file holds the public face ([`MemoryStore`], its builder, its counts and bounds);
//! `table` the records and how room is made for them; `verbs` the store verbs on that table.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use self::table::{Entry, Table};
use super::StorageKey;

mod table;
#[cfg(test)]
mod tests;
mod verbs;

/// The length of an encoded unreplayable [`Record`](crate::record::Record), the smallest there is: version, flags,
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
/// evicted. When the store is full of live leases, [`Store::begin`](crate::Store::begin) for a new key fails with
/// [`StoreError::Full`](crate::StoreError::Full), which the layer answers with 503, instead of growing without bound. When
/// leases hold half the store or more, expired ones (whose owner is gone) are reclaimed before a
/// completed record is evicted; they are looked for at most once a second.
///
/// A record that cannot fit, because it is larger than `max_bytes` less the leases held (a
/// response bigger than the whole bound, or a store full of requests in flight), is not kept and
/// evicts nothing: its lease completes with an unreplayable record instead, as for a response
/// over the layer's replay limit, so duplicates get 409 `response-not-replayable` and the request
/// never runs twice. It is counted as [`Event::Unstorable`](crate::Event::Unstorable) and logged.
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
    table: Arc<Mutex<Table>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.lock();
        f.debug_struct("MemoryStore")
            .field("capacity", &table.capacity)
            .field("len", &table.map.len())
            .field("max_bytes", &table.max_bytes)
            .field("bytes", &table.bytes)
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
            table: Arc::new(Mutex::new(Table {
                capacity: self.capacity.max(1),
                max_bytes: self.max_bytes.max(MemoryStore::LEASE_BYTES),
                bytes: 0,
                map: table::Shards::default(),
                completed: VecDeque::new(),
                completed_len: 0,
                seq: 0,
                next_lease_scan: Instant::now(),
                epoch: Instant::now(),
            })),
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
        let table = self.lock();
        MemoryStoreStats {
            len: table.map.len(),
            leases: table.leases(),
            completed: table.completed_len,
            capacity: table.capacity,
            bytes: table.bytes,
            max_bytes: table.max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding this lock cannot leave the maps inconsistent in a way that
        // matters more than refusing service would, so poisoning is ignored.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}
