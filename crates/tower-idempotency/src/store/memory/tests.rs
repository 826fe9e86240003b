//! The memory store's own rules: its bounds, its eviction order, its counts.

use std::time::Duration;

use bytes::Bytes;

use super::table::record_bytes;
use super::*;
use crate::fingerprint::Fingerprint;
use crate::record::{Record, Unreplayable};
use crate::store::{BeginOutcome, Store, StoreError};

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
            let BeginOutcome::Acquired(t) = store.begin(&key(n), &FP, LEASE).await.unwrap() else {
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

#[tokio::test]
async fn a_store_of_many_keys_finds_each_and_counts_them_over_its_shards() {
    // Enough keys that every shard holds some, then each read back, then half forgotten.
    let store = MemoryStore::with_capacity(10_000);
    for n in 0..4_000 {
        let BeginOutcome::Acquired(token) = store.begin(&key(n), &FP, LEASE).await.unwrap() else {
            panic!("key {n} is new");
        };
        let record = Bytes::from(format!("record {n}"));
        assert!(store.complete(&key(n), token, record, TTL).await.unwrap());
    }
    assert_eq!(store.stats().len, 4_000);
    {
        let table = store.lock();
        for n in 0..4_000 {
            assert!(
                matches!(table.map.get(&key(n)), Some(table::Entry::Completed { record, .. }) if record == format!("record {n}").as_bytes()),
                "key {n}"
            );
        }
    }
    for n in (0..4_000).step_by(2) {
        store.forget(&key(n), false).await.unwrap();
    }
    assert_eq!(store.stats().len, 2_000);
    let table = store.lock();
    assert_eq!(table.map.iter().count(), 2_000);
    assert!(table.map.get(&key(0)).is_none());
    assert!(table.map.get(&key(1)).is_some());
}
