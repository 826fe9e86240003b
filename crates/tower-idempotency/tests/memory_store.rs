//! The store conformance suite against [`MemoryStore`], and its bound under a spray of keys.

#[macro_use]
mod conformance;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::MemoryStore;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::store::{Begin, LeaseToken, StorageKey, Store, StoreError};

store_conformance!(async { MemoryStore::default() });

const CAPACITY: usize = 1_000;
const KEYS: usize = 10 * CAPACITY;
const FP: Fingerprint = Fingerprint([5; 32]);
const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(240);

fn spray_key(salt: u128, n: usize) -> StorageKey {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(&salt.to_be_bytes());
    k[24..].copy_from_slice(&(n as u64).to_be_bytes());
    StorageKey(k)
}

/// Issue 2, acceptance 4: ten times the capacity in distinct keys, from concurrent tasks, a mix
/// of completed requests and requests still in flight. The store never holds more than its
/// bound, makes room by evicting completed records, and never evicts a live lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spray_of_ten_times_capacity_keeps_the_bound_and_every_live_lease() {
    let store = Arc::new(MemoryStore::with_capacity(CAPACITY));
    let salt = LeaseToken::random().0;
    const TASKS: usize = 8;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut held = Vec::new();
                for n in (task..KEYS).step_by(TASKS) {
                    let k = spray_key(salt, n);
                    let token = match store.begin(&k, &FP, LEASE).await {
                        Ok(Begin::Acquired(token)) => token,
                        other => panic!("key {n}: expected a lease, got {other:?}"),
                    };
                    // One request in 40 stays in flight: 250 live leases in all.
                    if n % 40 == 0 {
                        held.push((k, token));
                    } else {
                        let record = Bytes::from(format!("response {n}"));
                        assert!(
                            store
                                .complete(&k, token, record, TTL)
                                .await
                                .expect("complete")
                        );
                    }
                    let stats = store.stats();
                    assert!(stats.len <= CAPACITY, "over the bound: {stats:?}");
                }
                held
            })
        })
        .collect();
    let mut held = Vec::new();
    for task in tasks {
        held.extend(task.await.expect("spray task"));
    }
    assert_eq!(held.len(), KEYS / 40);

    let stats = store.stats();
    assert_eq!(stats.len, CAPACITY, "the store should be full: {stats:?}");
    assert_eq!(
        stats.leases,
        held.len(),
        "a live lease was evicted: {stats:?}"
    );
    assert_eq!(stats.completed, CAPACITY - held.len());

    // Every held lease is still in flight, with its fingerprint, and its owner can complete it.
    for (k, _) in &held {
        match store.begin(k, &Fingerprint([0; 32]), LEASE).await {
            Ok(Begin::InFlight { fingerprint }) => assert_eq!(fingerprint, FP),
            other => panic!("a live lease was lost: {other:?}"),
        }
    }
    for (k, token) in &held {
        assert!(
            store
                .complete(k, *token, Bytes::from_static(b"late but owned"), TTL)
                .await
                .expect("complete"),
            "a live lease's owner was refused"
        );
    }
    assert!(store.stats().len <= CAPACITY);
}

/// When every slot holds a live lease, new keys are refused with `Full` (a 503 from the layer)
/// instead of growing the store or evicting someone's request in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spray_of_leases_fills_the_store_then_new_keys_get_full() {
    let store = MemoryStore::with_capacity(CAPACITY);
    let salt = LeaseToken::random().0;
    let mut held = Vec::new();
    let mut full = 0;
    for n in 0..KEYS {
        match store.begin(&spray_key(salt, n), &FP, LEASE).await {
            Ok(Begin::Acquired(token)) => held.push((spray_key(salt, n), token)),
            Err(StoreError::Full) => full += 1,
            other => panic!("key {n}: {other:?}"),
        }
        assert!(store.stats().len <= CAPACITY);
    }
    assert_eq!(held.len(), CAPACITY);
    assert_eq!(full, KEYS - CAPACITY);
    for (k, _) in &held {
        assert!(matches!(
            store.begin(k, &FP, LEASE).await,
            Ok(Begin::InFlight { .. })
        ));
    }
    // Completing one request makes its record evictable: the next new key gets its slot.
    let (k0, t0) = held[0];
    assert!(
        store
            .complete(&k0, t0, Bytes::from_static(b"done"), TTL)
            .await
            .expect("complete")
    );
    assert!(matches!(
        store.begin(&spray_key(salt, KEYS + 1), &FP, LEASE).await,
        Ok(Begin::Acquired(_))
    ));
    assert!(matches!(
        store.begin(&spray_key(salt, KEYS + 2), &FP, LEASE).await,
        Err(StoreError::Full)
    ));
    let stats = store.stats();
    assert_eq!((stats.len, stats.leases), (CAPACITY, CAPACITY));
}
