//! What a store answers to an operator: one record inspected ([`Store::inspect`]), one record
//! forgotten ([`Store::forget`]), the requests in flight listed ([`Store::in_flight`]).
//!
//! [`Store::inspect`]: super::Store::inspect
//! [`Store::forget`]: super::Store::forget
//! [`Store::in_flight`]: super::Store::in_flight

use std::time::Duration;

use bytes::Bytes;

use super::{LeaseToken, StorageKey};
use crate::fingerprint::Fingerprint;

/// What a store holds under one key, as [`Store::inspect`](super::Store::inspect) found it.
/// Expired records are never reported.
#[derive(Debug, Clone, PartialEq)]
pub enum Inspected {
    /// A request in flight: a live lease.
    InFlight(LeaseInfo),
    /// A completed request.
    Completed(CompletedInfo),
}

/// A live lease: who holds it, since when, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The record's storage key.
    pub key: StorageKey,
    /// The owner token of the lease.
    pub owner: LeaseToken,
    /// The fingerprint of the request that holds it.
    pub fingerprint: Fingerprint,
    /// How long ago the lease was granted (a takeover of an expired lease is a new grant), by
    /// the store's clock.
    pub age: Duration,
    /// How many times its owner renewed it.
    pub renewals: u32,
    /// How long it lives unless renewed, by the store's clock.
    pub expires_in: Duration,
}

/// A completed record.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletedInfo {
    /// The record as the layer encoded it (opaque to the store; the layer's admin tools decode
    /// it).
    pub record: Bytes,
    /// How long ago the request that completed it took its lease, by the store's clock; `None`
    /// where the store does not keep it (a Redis store keeps the grant time on the lease only).
    pub age: Option<Duration>,
    /// How long the record is kept yet, by the store's clock.
    pub expires_in: Duration,
}

/// What [`Store::forget`](super::Store::forget) did, told by the store in the same step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgotten {
    /// A completed record is gone: the next request with its key runs.
    Record,
    /// A live lease is gone, by force: its waiters are woken, its owner's completion is refused
    /// as a lost lease, and the next request with its key runs.
    Lease,
    /// There was no live record under the key.
    NotFound,
    /// A live lease is there and `force` was not given: nothing changed.
    InFlight,
}

impl Forgotten {
    /// Whether a record or a lease went.
    pub fn is_forgotten(self) -> bool {
        matches!(self, Forgotten::Record | Forgotten::Lease)
    }
}

/// One page of [`Store::in_flight`](super::Store::in_flight): live leases in the order of their
/// storage keys. A store may answer a short page (even an empty one) with a `next`, when it
/// stopped after examining as many candidates as it allows one call: go on from `next`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InFlightPage {
    /// At most the asked-for number of leases, each with a storage key greater than the
    /// cursor given.
    pub leases: Vec<LeaseInfo>,
    /// Where the next page starts (after this key), or `None` when this page is the last.
    pub next: Option<StorageKey>,
}

impl InFlightPage {
    /// The page of `limit` leases after `after` from every live lease, given in any order: for
    /// stores that gather the leases before they page them.
    pub fn from_unsorted(
        mut leases: Vec<LeaseInfo>,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Self {
        leases.retain(|l| after.is_none_or(|after| l.key > *after));
        leases.sort_unstable_by_key(|l| l.key);
        Self::from_sorted(leases, after, limit)
    }

    /// The page of at most `limit` leases from `leases`, in key order and all after `after`:
    /// its `next` is set when there are more. A `limit` of 0 gives an empty page that goes on
    /// from `after`.
    pub fn from_sorted(
        mut leases: Vec<LeaseInfo>,
        after: Option<&StorageKey>,
        limit: usize,
    ) -> Self {
        let more = leases.len() > limit;
        leases.truncate(limit);
        let next = if more {
            leases.last().map(|l| l.key).or(after.copied())
        } else {
            None
        };
        Self { leases, next }
    }
}
