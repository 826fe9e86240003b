//! The [`Store`] verbs of a [`MemoryStore`]: each one step under the lock, with what it frees
//! dropped after the lock is released.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::MemoryStore;
use super::table::{Entry, Freed, NO_TIME, Table, record_bytes};
use crate::fingerprint::Fingerprint;
use crate::metrics::{Event, count};
use crate::record::{Record, Unreplayable};
use crate::store::{
    BeginOutcome, CompletedInfo, Forgotten, InFlightPage, Inspected, LeaseInfo, LeaseToken,
    StorageKey, Store, StoreError,
};

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
        let table = &mut *guard;
        let granted = table.millis(now);
        table.purge_expired(now, &mut freed);
        let expired_record = match table.map.get_mut(key) {
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
                        granted,
                        renewals: 0,
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
            freed.push(table.remove(key));
        }
        let room = table.make_room(now, &mut freed);
        let begun = room.map(|()| {
            let token = LeaseToken::random();
            table.map.insert(
                *key,
                Entry::Lease {
                    token,
                    fingerprint: *fingerprint,
                    expires,
                    granted,
                    renewals: 0,
                    notify: None,
                },
            );
            table.bytes += MemoryStore::LEASE_BYTES;
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
        let table = &mut *guard;
        // The caller's lease is replaced, so its bytes are room for the record. Most records fit
        // at once: one lookup, as before the bound on bytes.
        let record = if table
            .bytes
            .saturating_sub(MemoryStore::LEASE_BYTES)
            .saturating_add(bytes)
            <= table.max_bytes
        {
            record
        } else {
            let fingerprint = match table.map.get(key) {
                Some(Entry::Lease {
                    token: owner,
                    fingerprint,
                    expires,
                    ..
                }) if *owner == token && *expires > now => *fingerprint,
                _ => return Ok(false),
            };
            if table.make_room_for_record(bytes, now, &mut freed) {
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
        let Some(entry) = table.map.get_mut(key).filter(|e| e.owned_by(token, now)) else {
            return Ok(false);
        };
        // A grant time reads back right for 49 days (it is four bytes of milliseconds): a
        // record kept longer has none.
        let created = match entry {
            _ if ttl.as_millis() >= u128::from(NO_TIME) => NO_TIME,
            Entry::Lease { granted, .. } => *granted,
            Entry::Completed { created, .. } => *created,
        };
        table.seq += 1;
        let seq = table.seq;
        table.bytes = table.bytes - MemoryStore::LEASE_BYTES + record_bytes(record.len());
        let notify = match std::mem::replace(
            entry,
            Entry::Completed {
                record,
                expires,
                seq,
                created,
            },
        ) {
            Entry::Lease { notify, .. } => notify,
            Entry::Completed { .. } => None,
        };
        table.push_completed(expires, seq, *key);
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
        let mut table = self.lock();
        if !table.map.get(key).is_some_and(|e| e.owned_by(token, now)) {
            return Ok(false);
        }
        let entry = table.map.remove(key);
        table.bytes -= MemoryStore::LEASE_BYTES;
        drop(table);
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
        let mut table = self.lock();
        match table.map.get_mut(key) {
            Some(Entry::Lease {
                token: owner,
                expires,
                renewals,
                ..
            }) if *owner == token && *expires > now => {
                *expires = now + lease_ttl;
                *renewals = renewals.saturating_add(1);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let (notified, expires) = {
            let mut table = self.lock();
            match table.map.get_mut(key) {
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

    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspected>, StoreError> {
        let now = Instant::now();
        let table = self.lock();
        Ok(table
            .map
            .get(key)
            .and_then(|entry| inspected(&table, key, entry, now)))
    }

    async fn forget(&self, key: &StorageKey, force: bool) -> Result<Forgotten, StoreError> {
        let now = Instant::now();
        let mut guard = self.lock();
        let table = &mut *guard;
        let live_lease = match table.map.get(key) {
            Some(Entry::Lease { expires, .. }) => *expires > now,
            Some(Entry::Completed { expires, .. }) if *expires > now => false,
            // An expired record is no record; it goes all the same.
            Some(Entry::Completed { .. }) | None => {
                let gone = table.remove(key);
                drop(guard);
                drop(gone);
                return Ok(Forgotten::NotFound);
            }
        };
        if live_lease && !force {
            return Ok(Forgotten::InFlight);
        }
        let gone = table.remove(key);
        drop(guard);
        if let Some(Entry::Lease {
            notify: Some(notify),
            ..
        }) = &gone
        {
            notify.notify_waiters();
        }
        Ok(match gone {
            Some(Entry::Lease { expires, .. }) if expires <= now => Forgotten::NotFound,
            Some(Entry::Lease { .. }) => Forgotten::Lease,
            Some(Entry::Completed { .. }) => Forgotten::Record,
            None => Forgotten::NotFound,
        })
    }

    async fn in_flight(
        &self,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Result<InFlightPage, StoreError> {
        let now = Instant::now();
        let mut leases: Vec<LeaseInfo> = {
            let table = self.lock();
            // The leases are the requests in flight, few beside the completed records; the
            // scan reads every entry but copies only live leases after the cursor.
            table
                .map
                .iter()
                .filter(|(k, e)| {
                    matches!(e, Entry::Lease { .. }) && after.is_none_or(|after| *k > after)
                })
                .filter_map(|(k, e)| match inspected(&table, k, e, now) {
                    Some(Inspected::InFlight(lease)) => Some(lease),
                    _ => None,
                })
                .collect()
        };
        leases.sort_unstable_by_key(|l| l.key);
        Ok(InFlightPage::from_sorted(leases, after, limit))
    }
}

/// What an operator is told of a live entry.
fn inspected(table: &Table, key: &StorageKey, entry: &Entry, now: Instant) -> Option<Inspected> {
    match entry {
        Entry::Lease {
            token,
            fingerprint,
            expires,
            granted,
            renewals,
            ..
        } if *expires > now => Some(Inspected::InFlight(LeaseInfo {
            key: *key,
            owner: *token,
            fingerprint: *fingerprint,
            age: table.age(*granted, now),
            renewals: *renewals,
            expires_in: *expires - now,
        })),
        Entry::Completed {
            record,
            expires,
            created,
            ..
        } if *expires > now => Some(Inspected::Completed(CompletedInfo {
            record: record.clone(),
            age: (*created != NO_TIME).then(|| table.age(*created, now)),
            expires_in: *expires - now,
        })),
        _ => None,
    }
}
