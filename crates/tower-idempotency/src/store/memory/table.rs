//! The records of a [`MemoryStore`](super::MemoryStore) under its lock: what each entry is,
//! what it is counted as, and how room is made for a lease or a completed record (expired
//! records first, then the oldest completed, never a live lease).

use std::collections::{HashMap, VecDeque, hash_map};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::MemoryStore;
use crate::fingerprint::Fingerprint;
use crate::store::{LeaseToken, StorageKey, StoreError};

/// Storage keys are already SHA-256 (or HMAC) outputs, so a fast hasher with a random seed is
/// enough; SipHash would cost more than the rest of a lookup.
type Hasher = foldhash::fast::RandomState;

/// How many tables [`Shards`] spreads the entries over.
const SHARDS: usize = 16;

/// The store's entries, spread over [`SHARDS`] hash tables by a hash of their key. A table
/// that grows moves every entry it holds, under the store's lock, and so does one that is
/// rehashed when removals have filled it with tombstones, as a store at its bound does all the
/// time (each new record evicts the oldest). With one table of 100 000 entries, those moves
/// stopped every request for 13-46 ms each time it doubled; a shard holds a sixteenth of the
/// entries, and the shards grow at different times.
pub(super) struct Shards {
    tables: [HashMap<TableKey, Entry, Hasher>; SHARDS],
    /// The entries of all the tables, kept rather than summed: the bounds read it on every
    /// write.
    len: usize,
    /// Picks a key's shard: an odd multiplier, random for each store. A storage key is already a
    /// SHA-256 digest, so a multiply of its folded words ([`fold`]) spreads keys as well as
    /// hashing them again would; the random multiplier keeps a shard from being chosen by the
    /// caller. (The tables' own hasher must not pick shards: they read the same top bits.)
    pick: u64,
}

/// A key as the tables hash it: the four words of its digest folded into one, which the tables'
/// seeded hasher then mixes. `StorageKey`'s own `Hash` feeds all 32 bytes through the hasher
/// again, some 400 instructions a new key for nothing a SHA-256 digest lacks.
#[derive(Clone, Copy, PartialEq, Eq)]
struct TableKey(StorageKey);

impl std::hash::Hash for TableKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(fold(&self.0));
    }
}

/// The four 64-bit words of a key, XORed: each bit of the digest counts.
fn fold(key: &StorageKey) -> u64 {
    key.0
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
        .fold(0, |a, w| a ^ w)
}

impl Default for Shards {
    fn default() -> Self {
        Self {
            tables: std::array::from_fn(|_| HashMap::default()),
            len: 0,
            pick: Hasher::default().hash_one(SHARDS) | 1,
        }
    }
}

impl Shards {
    fn table(&self, key: &StorageKey) -> &HashMap<TableKey, Entry, Hasher> {
        &self.tables[self.shard(key)]
    }

    fn table_mut(&mut self, key: &StorageKey) -> &mut HashMap<TableKey, Entry, Hasher> {
        let shard = self.shard(key);
        &mut self.tables[shard]
    }

    fn shard(&self, key: &StorageKey) -> usize {
        // The top bits of the product: 16 shards take four.
        (fold(key).wrapping_mul(self.pick) >> (64 - SHARDS.trailing_zeros())) as usize
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn get(&self, key: &StorageKey) -> Option<&Entry> {
        self.table(key).get(&TableKey(*key))
    }

    pub(super) fn get_mut(&mut self, key: &StorageKey) -> Option<&mut Entry> {
        self.table_mut(key).get_mut(&TableKey(*key))
    }

    pub(super) fn insert(&mut self, key: StorageKey, entry: Entry) -> Option<Entry> {
        let old = self.table_mut(&key).insert(TableKey(key), entry);
        self.len += usize::from(old.is_none());
        old
    }

    pub(super) fn remove(&mut self, key: &StorageKey) -> Option<Entry> {
        let old = self.table_mut(key).remove(&TableKey(*key));
        self.len -= usize::from(old.is_some());
        old
    }

    /// Removes the entry under `key` if `which` says so, in one lookup.
    pub(super) fn remove_if(
        &mut self,
        key: StorageKey,
        which: impl FnOnce(&Entry) -> bool,
    ) -> Option<Entry> {
        let shard = self.shard(&key);
        match self.tables[shard].entry(TableKey(key)) {
            hash_map::Entry::Occupied(e) if which(e.get()) => {
                self.len -= 1;
                Some(e.remove())
            }
            _ => None,
        }
    }

    pub(super) fn retain(&mut self, mut keep: impl FnMut(&StorageKey, &mut Entry) -> bool) {
        for table in &mut self.tables {
            table.retain(|k, e| keep(&k.0, e));
        }
        self.len = self.tables.iter().map(HashMap::len).sum();
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&StorageKey, &Entry)> {
        self.tables
            .iter()
            .flat_map(HashMap::iter)
            .map(|(k, e)| (&k.0, e))
    }
}

/// A completed record's `created` when its grant time is not kept (it is kept too long for
/// [`Table::millis`] to tell).
pub(super) const NO_TIME: u32 = u32::MAX;

/// How often, at most, a store full of leases is searched for expired ones.
const LEASE_SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// What a [`MemoryStore`] holds, under its lock, and the counts its bounds are checked against.
pub(super) struct Table {
    pub(super) capacity: usize,
    pub(super) max_bytes: usize,
    /// The bytes counted for every entry in `map`: [`Entry::bytes`] summed.
    pub(super) bytes: usize,
    pub(super) map: Shards,
    /// Completed records in the order they completed, by (expiry, sequence number): the
    /// eviction order. An entry whose record has gone since (taken over after it expired) no
    /// longer matches the map's sequence number and is skipped.
    pub(super) completed: VecDeque<(Instant, u64, StorageKey)>,
    /// Completed records in `map`.
    pub(super) completed_len: usize,
    pub(super) seq: u64,
    /// When a store full of leases may next be searched for expired ones.
    pub(super) next_lease_scan: Instant,
    /// What the entries' grant times count from.
    pub(super) epoch: Instant,
}

/// The record under one key: a request in flight, or its completed outcome.
pub(super) enum Entry {
    Lease {
        token: LeaseToken,
        fingerprint: Fingerprint,
        expires: Instant,
        /// When the lease was granted ([`Table::millis`]), and how often it was renewed since:
        /// for operators.
        granted: u32,
        renewals: u32,
        /// Made by the first waiter: most requests have none, and cost no allocation.
        notify: Option<Arc<Notify>>,
    },
    Completed {
        record: Bytes,
        expires: Instant,
        seq: u64,
        /// When the lease of the request that completed it was granted ([`Table::millis`]).
        created: u32,
    },
}

impl Entry {
    /// The bytes this entry is counted as.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Entry::Lease { .. } => MemoryStore::LEASE_BYTES,
            Entry::Completed { record, .. } => record_bytes(record.len()),
        }
    }

    /// Whether `token` holds this lease and it has not expired.
    pub(super) fn owned_by(&self, token: LeaseToken, now: Instant) -> bool {
        matches!(self, Entry::Lease { token: owner, expires, .. } if *owner == token && *expires > now)
    }
}

/// The bytes a completed record of `len` encoded bytes is counted as.
pub(super) fn record_bytes(len: usize) -> usize {
    MemoryStore::RECORD_OVERHEAD.saturating_add(len)
}

/// Entries taken out under the lock, to be freed after it is released: their memory is cold,
/// and freeing it inside would hold the lock longer. One entry, the usual eviction, needs no
/// allocation.
#[derive(Default)]
pub(super) struct Freed {
    one: Option<Entry>,
    more: Vec<Entry>,
}

impl Freed {
    pub(super) fn push(&mut self, entry: Option<Entry>) {
        match (entry, &self.one) {
            (None, _) => {}
            (Some(e), None) => self.one = Some(e),
            (Some(e), Some(_)) => self.more.push(e),
        }
    }
}

impl Table {
    /// `at` in milliseconds since the store was made, modulo 2^32: four bytes an entry, where an
    /// `Instant` would take sixteen. [`Table::age`] reads it back.
    pub(super) fn millis(&self, at: Instant) -> u32 {
        // Truncated on purpose: ages are told apart by wrapping subtraction.
        (at - self.epoch).as_millis() as u32
    }

    /// How long before `now` the time `millis` was: exact for ages under 49 days (2^32 ms),
    /// which no lease reaches, and records only with a TTL that long.
    pub(super) fn age(&self, millis: u32, now: Instant) -> Duration {
        Duration::from_millis(u64::from(self.millis(now).wrapping_sub(millis)))
    }

    /// Leases held, live or expired.
    pub(super) fn leases(&self) -> usize {
        self.map.len() - self.completed_len
    }

    /// Removes the completed record the queue entry `(seq, key)` stands for, if it is still
    /// there. The record is handed back so that it is freed after the lock is released.
    pub(super) fn remove_completed(&mut self, seq: u64, key: &StorageKey) -> Option<Entry> {
        // One lookup: the bucket is cold, as the oldest record's usually is.
        let entry = self.map.remove_if(
            *key,
            |e| matches!(e, Entry::Completed { seq: s, .. } if *s == seq),
        )?;
        self.completed_len -= 1;
        self.bytes -= entry.bytes();
        Some(entry)
    }

    /// Removes whatever is under `key`, keeping the counts; a completed record's queue entry
    /// goes stale. The entry is handed back so that it is freed after the lock is released.
    pub(super) fn remove(&mut self, key: &StorageKey) -> Option<Entry> {
        let entry = self.map.remove(key)?;
        if matches!(entry, Entry::Completed { .. }) {
            self.completed_len -= 1;
        }
        self.bytes -= entry.bytes();
        Some(entry)
    }

    /// Drops up to a few expired completed records, so memory follows the TTL without a sweeper.
    pub(super) fn purge_expired(&mut self, now: Instant, freed: &mut Freed) {
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
    pub(super) fn leases_crowd(&self) -> bool {
        let leases = self.leases();
        leases * 2 >= self.capacity
            || leases.saturating_mul(MemoryStore::LEASE_BYTES * 2) >= self.max_bytes
    }

    /// Makes room for one more lease, or says the store is full of live leases.
    pub(super) fn make_room(&mut self, now: Instant, freed: &mut Freed) -> Result<(), StoreError> {
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
    pub(super) fn make_room_for_record(
        &mut self,
        bytes: usize,
        now: Instant,
        freed: &mut Freed,
    ) -> bool {
        // Leases are never evicted: the caller's own is replaced, the others stay.
        let fits_beside_leases = |table: &Self| {
            ((table.leases() - 1) * MemoryStore::LEASE_BYTES).saturating_add(bytes)
                <= table.max_bytes
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
    pub(super) fn reclaim_expired_leases(&mut self, now: Instant) -> bool {
        self.next_lease_scan = now + LEASE_SCAN_INTERVAL;
        let before = self.map.len();
        self.map
            .retain(|_, e| !matches!(e, Entry::Lease { expires, .. } if *expires <= now));
        let reclaimed = before - self.map.len();
        self.bytes -= reclaimed * MemoryStore::LEASE_BYTES;
        reclaimed > 0
    }

    /// Files a completed record, compacting the queue if takeovers left it mostly stale.
    pub(super) fn push_completed(&mut self, expires: Instant, seq: u64, key: StorageKey) {
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
