//! The store conformance suite against [`MemoryStore`], its bounds under a spray of keys, and
//! the exactness of its count of bytes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::Fingerprint;
use tower_idempotency::MemoryStore;
use tower_idempotency::record::{Record, Unreplayable};
use tower_idempotency::{
    BeginOutcome, LeaseToken, MemoryStoreStats, StorageKey, Store, StoreError,
};

const LEASE_BYTES: usize = MemoryStore::LEASE_BYTES;
const RECORD_OVERHEAD: usize = MemoryStore::RECORD_OVERHEAD;

/// The conformance suite, one test per rule of the store contract.
#[cfg(feature = "conformance")]
mod conformance {
    tower_idempotency::store_conformance!(async { tower_idempotency::MemoryStore::default() });

    /// The suite's operator tests pass a store that offers none of the verbs: this one must.
    #[tokio::test]
    async fn offers_the_operators_verbs() {
        let store = tower_idempotency::MemoryStore::default();
        assert!(tower_idempotency::conformance::offers_operator_verbs(&store).await);
    }
}

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

/// Ten times the capacity in distinct keys, from concurrent tasks, a mix
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
                        Ok(BeginOutcome::Acquired(token)) => token,
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
            Ok(BeginOutcome::InFlight { fingerprint }) => assert_eq!(fingerprint, FP),
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
            Ok(BeginOutcome::Acquired(token)) => held.push((spray_key(salt, n), token)),
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
            Ok(BeginOutcome::InFlight { .. })
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
        Ok(BeginOutcome::Acquired(_))
    ));
    assert!(matches!(
        store.begin(&spray_key(salt, KEYS + 2), &FP, LEASE).await,
        Err(StoreError::Full)
    ));
    let stats = store.stats();
    assert_eq!((stats.len, stats.leases), (CAPACITY, CAPACITY));
}

// ---------------------------------------------------------------------------------------------
// The bound on bytes

fn key(n: usize) -> StorageKey {
    spray_key(0x5eed, n)
}

/// A record of exactly `len` bytes, its first byte telling which write it was.
fn sized(len: usize, tag: u8) -> Bytes {
    let mut v = vec![b'.'; len];
    if let Some(first) = v.first_mut() {
        *first = tag;
    }
    Bytes::from(v)
}

/// What a completed record of `len` bytes is counted as.
fn cost(len: usize) -> usize {
    RECORD_OVERHEAD + len
}

async fn acquire(store: &MemoryStore, k: &StorageKey) -> LeaseToken {
    match store.begin(k, &FP, LEASE).await {
        Ok(BeginOutcome::Acquired(token)) => token,
        other => panic!("expected a lease, got {other:?}"),
    }
}

async fn put(store: &MemoryStore, k: &StorageKey, record: Bytes, ttl: Duration) {
    let token = acquire(store, k).await;
    assert!(
        store
            .complete(k, token, record, ttl)
            .await
            .expect("complete")
    );
}

async fn replayed(store: &MemoryStore, k: &StorageKey) -> Option<Bytes> {
    match store.begin(k, &FP, LEASE).await.expect("begin") {
        BeginOutcome::Completed(bytes) => Some(bytes),
        BeginOutcome::Acquired(token) => {
            assert!(store.release(k, token).await.expect("release"));
            None
        }
        BeginOutcome::InFlight { .. } => panic!("unexpected request in flight"),
    }
}

/// Every record gone: expired, then each key ever used taken and let go. What the store counts
/// must be back to nothing.
async fn clear(store: &MemoryStore, keys: impl IntoIterator<Item = StorageKey>) {
    tokio::time::advance(Duration::from_secs(3600)).await;
    for k in keys {
        let token = acquire(store, &k).await;
        assert!(store.release(&k, token).await.expect("release"));
    }
    let stats = store.stats();
    assert_eq!(
        (stats.len, stats.leases, stats.completed, stats.bytes),
        (0, 0, 0, 0),
        "the store should hold nothing: {stats:?}"
    );
}

/// The store never passes its bounds, and what it counts is what it holds: a lease is
/// `LEASE_BYTES`, a completed record `RECORD_OVERHEAD` plus its length, at most `largest`.
fn check_bounds(stats: MemoryStoreStats, largest: usize) {
    assert!(stats.bytes <= stats.max_bytes, "over the bound: {stats:?}");
    assert!(stats.len <= stats.capacity, "over the count: {stats:?}");
    assert_eq!(stats.len, stats.leases + stats.completed, "{stats:?}");
    let least = stats.leases * LEASE_BYTES + stats.completed * RECORD_OVERHEAD;
    let most = stats.leases * LEASE_BYTES + stats.completed * cost(largest);
    assert!(
        (least..=most).contains(&stats.bytes),
        "{stats:?}: not between {least} and {most}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_byte_bound_evicts_the_oldest_records_and_keeps_the_newest() {
    const LEN: usize = 10_000;
    let store = MemoryStore::with_max_bytes(10 * cost(LEN));
    for n in 0..30 {
        put(&store, &key(n), sized(LEN, n as u8), TTL).await;
        let stats = store.stats();
        assert!(stats.bytes <= stats.max_bytes, "{stats:?}");
    }
    // Ten records fit; the twenty oldest made room for the newest.
    let stats = store.stats();
    assert_eq!((stats.len, stats.completed), (10, 10), "{stats:?}");
    assert_eq!(stats.bytes, 10 * cost(LEN));
    for n in 20..30 {
        let bytes = replayed(&store, &key(n)).await;
        assert_eq!(bytes, Some(sized(LEN, n as u8)), "key {n} should replay");
    }
    for n in 0..20 {
        assert_eq!(replayed(&store, &key(n)).await, None, "key {n} was evicted");
    }
    // The count bound still holds beside it, default 100 000.
    assert_eq!(
        stats.capacity,
        tower_idempotency::MemoryStore::DEFAULT_CAPACITY
    );
}

#[tokio::test(start_paused = true)]
async fn both_bounds_apply_whichever_comes_first() {
    let store = MemoryStore::builder()
        .with_capacity(5)
        .with_max_bytes(3 * cost(1000))
        .build();
    // Large records: the bytes bind first.
    for n in 0..10 {
        put(&store, &key(n), sized(1000, 1), TTL).await;
    }
    assert_eq!(store.stats().len, 3);
    // Small ones: the count does.
    for n in 10..20 {
        put(&store, &key(n), sized(10, 1), TTL).await;
    }
    let stats = store.stats();
    assert_eq!(stats.len, 5, "{stats:?}");
    assert_eq!(stats.bytes, 5 * cost(10));
    // The default bounds.
    let stats = MemoryStore::default().stats();
    assert_eq!((stats.capacity, stats.max_bytes), (100_000, 256 << 20));
    assert_eq!(MemoryStore::with_capacity(7).stats().max_bytes, 256 << 20);
}

/// A store whose byte bound is full of requests in flight refuses new keys with `Full` (503 from
/// the layer), as the count bound does, and never evicts a live lease to make room.
#[tokio::test(start_paused = true)]
async fn leases_fill_the_byte_bound_then_new_keys_get_full() {
    let store = MemoryStore::with_max_bytes(4 * LEASE_BYTES + 100);
    put(&store, &key(0), sized(50, 0), TTL).await;
    let mut held = Vec::new();
    for n in 1..=4 {
        held.push((key(n), acquire(&store, &key(n)).await));
    }
    // The completed record made room for the fourth lease; now only leases are left.
    let stats = store.stats();
    assert_eq!((stats.leases, stats.completed), (4, 0), "{stats:?}");
    assert!(matches!(
        store.begin(&key(9), &FP, LEASE).await,
        Err(StoreError::Full)
    ));
    for (k, _) in &held {
        assert!(matches!(
            store.begin(k, &FP, LEASE).await,
            Ok(BeginOutcome::InFlight { .. })
        ));
    }
    // Beside three other leases, a lease's room is all a record gets: a response that does not
    // fit is kept as not replayable, so a duplicate gets 409 and nothing runs twice.
    let (k, token) = held[0];
    assert!(
        store
            .complete(&k, token, sized(5_000, 7), TTL)
            .await
            .expect("complete")
    );
    let stored = replayed(&store, &k).await.expect("a record is kept");
    let record = Record::decode(stored).expect("a record the layer reads");
    assert_eq!(record.fingerprint, FP);
    assert_eq!(record.response, Err(Unreplayable::TooLarge));
    check_bounds(store.stats(), 5_000);
    // That record can be evicted: a new key gets its room.
    let token = acquire(&store, &key(10)).await;
    assert!(store.release(&key(10), token).await.expect("release"));
    assert_eq!(replayed(&store, &k).await, None);
    // Once leases expire, their owners are gone, and a large record finds room again.
    tokio::time::advance(LEASE + Duration::from_secs(1)).await;
    let fresh = acquire(&store, &key(11)).await;
    assert!(
        store
            .complete(&key(11), fresh, sized(100, 1), TTL)
            .await
            .expect("complete")
    );
    assert_eq!(replayed(&store, &key(11)).await, Some(sized(100, 1)));
}

/// The rule for a record larger than the whole bound: it is not kept and evicts nothing. Its
/// lease completes with an unreplayable record, so duplicates get 409 (they never run again),
/// and every other record stays.
#[tokio::test(start_paused = true)]
async fn a_record_larger_than_the_bound_is_kept_unreplayable_and_evicts_nothing() {
    let max = 100_000;
    let store = MemoryStore::with_max_bytes(max);
    for n in 0..5 {
        put(&store, &key(n), sized(10_000, n as u8), TTL).await;
    }
    let before = store.stats();
    let huge = key(99);
    let token = acquire(&store, &huge).await;
    assert!(
        store
            .complete(&huge, token, sized(max + 1, 9), TTL)
            .await
            .expect("complete")
    );
    let stats = store.stats();
    assert_eq!(stats.completed, 6, "nothing was evicted: {stats:?}");
    assert_eq!(stats.bytes, before.bytes + LEASE_BYTES);
    for n in 0..5 {
        assert_eq!(
            replayed(&store, &key(n)).await,
            Some(sized(10_000, n as u8))
        );
    }
    let stored = replayed(&store, &huge).await.expect("a record is kept");
    let record = Record::decode(stored).expect("a record the layer reads");
    assert_eq!(record.response, Err(Unreplayable::TooLarge));
    // A record that fits the bound, but not beside the others, evicts the oldest to fit.
    let big = key(100);
    let token = acquire(&store, &big).await;
    assert!(
        store
            .complete(&big, token, sized(60_000, 8), TTL)
            .await
            .expect("complete")
    );
    assert_eq!(replayed(&store, &big).await, Some(sized(60_000, 8)));
    assert_eq!(replayed(&store, &key(0)).await, None);
    assert_eq!(replayed(&store, &key(4)).await, Some(sized(10_000, 4)));
    check_bounds(store.stats(), 60_000);
}

/// Expired leases, whose owners are gone, are reclaimed all at once when room is needed, by
/// either bound; what they counted goes with them.
#[tokio::test(start_paused = true)]
async fn expired_leases_reclaimed_for_room_leave_no_bytes_behind() {
    let short = Duration::from_secs(1);
    for store in [
        MemoryStore::with_capacity(10),
        MemoryStore::with_max_bytes(10 * LEASE_BYTES),
    ] {
        for n in 0..10 {
            assert!(matches!(
                store.begin(&key(n), &FP, short).await,
                Ok(BeginOutcome::Acquired(_))
            ));
        }
        assert_eq!(store.stats().bytes, 10 * LEASE_BYTES);
        assert!(matches!(
            store.begin(&key(10), &FP, LEASE).await,
            Err(StoreError::Full)
        ));
        tokio::time::advance(short + Duration::from_secs(1)).await;
        let token = acquire(&store, &key(10)).await;
        let stats = store.stats();
        assert_eq!((stats.len, stats.bytes), (1, LEASE_BYTES), "{stats:?}");
        // A record that needs more than the room left is helped by the same reclaim.
        for n in 11..20 {
            assert!(matches!(
                store.begin(&key(n), &FP, short).await,
                Ok(BeginOutcome::Acquired(_))
            ));
        }
        tokio::time::advance(short + Duration::from_secs(1)).await;
        let len = 5 * LEASE_BYTES;
        assert!(
            store
                .complete(&key(10), token, sized(len, 1), TTL)
                .await
                .expect("complete")
        );
        let stats = store.stats();
        if stats.max_bytes == 10 * LEASE_BYTES {
            assert_eq!((stats.len, stats.bytes), (1, cost(len)), "{stats:?}");
            assert_eq!(replayed(&store, &key(10)).await, Some(sized(len, 1)));
        }
        clear(&store, (0..20).map(key)).await;
    }
}

/// Record sizes for the churn: a spread from empty to large, deterministic.
fn size(n: usize) -> usize {
    (n.wrapping_mul(2_654_435_761) >> 7) % 20_000
}

/// With room for everything, the count of bytes is exactly the sum of what is held after every
/// kind of step: new records, releases, leases in flight, expiry and overwrite, takeover of an
/// expired lease, a stale owner's refused completion.
#[tokio::test(start_paused = true)]
async fn the_byte_count_is_exact_through_every_kind_of_step() {
    let store = MemoryStore::default();
    let short = Duration::from_secs(10);
    // What the store should hold: key -> bytes counted.
    let mut model: HashMap<usize, usize> = HashMap::new();
    let sum = |model: &HashMap<usize, usize>| model.values().sum::<usize>();
    let mut leases = Vec::new();
    for n in 0..300 {
        let k = key(n);
        let token = acquire(&store, &k).await;
        model.insert(n, LEASE_BYTES);
        assert_eq!(store.stats().bytes, sum(&model));
        if n % 5 == 0 {
            assert!(store.release(&k, token).await.expect("release"));
            model.remove(&n);
        } else if n % 7 == 0 {
            leases.push((n, token));
        } else {
            let len = size(n);
            assert!(
                store
                    .complete(&k, token, sized(len, 1), short)
                    .await
                    .expect("complete")
            );
            model.insert(n, cost(len));
        }
        assert_eq!(store.stats().bytes, sum(&model), "after key {n}");
    }
    // The records expire (the leases live on); new writes overwrite them.
    tokio::time::advance(short + Duration::from_secs(1)).await;
    let completed: Vec<usize> = (0..300).filter(|n| n % 5 != 0 && n % 7 != 0).collect();
    for &n in &completed {
        let len = size(n + 1000);
        put(&store, &key(n), sized(len, 2), TTL).await;
        model.insert(n, cost(len));
    }
    assert_eq!(store.stats().bytes, sum(&model));
    assert_eq!(store.stats().len, model.len());
    // The leases expire: new owners take them over and complete; the old owners are refused and
    // change nothing.
    tokio::time::advance(LEASE).await;
    for &(n, stale) in &leases {
        let k = key(n);
        let token = acquire(&store, &k).await;
        assert!(
            !store
                .complete(&k, stale, sized(30_000, 3), TTL)
                .await
                .expect("complete")
        );
        assert!(!store.release(&k, stale).await.expect("release"));
        assert_eq!(store.stats().bytes, sum(&model));
        let len = size(n + 2000);
        assert!(
            store
                .complete(&k, token, sized(len, 4), TTL)
                .await
                .expect("complete")
        );
        model.insert(n, cost(len));
        assert_eq!(
            store.stats().bytes,
            sum(&model),
            "after taking over key {n}"
        );
    }
    let stats = store.stats();
    assert_eq!((stats.len, stats.leases), (model.len(), 0));
    clear(&store, (0..300).map(key)).await;
}

/// Many records of many sizes through a small store: evictions at every step, records larger
/// than the bound, releases, leases that expire and are taken over, records that expire and are
/// overwritten. The bounds hold after every step, and once every record is gone the store
/// counts no bytes: nothing drifted.
#[tokio::test(start_paused = true)]
async fn a_churn_of_every_kind_leaves_no_bytes_behind() {
    const KEYS: usize = 400;
    let max = 200_000;
    let largest = max + 10_000;
    let store = MemoryStore::builder()
        .with_capacity(40)
        .with_max_bytes(max)
        .build();
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut in_flight: Vec<(StorageKey, LeaseToken)> = Vec::new();
    let (mut completed, mut refused, mut released) = (0, 0, 0);
    for round in 0..2 {
        for step in 0..3_000 {
            let k = key((next() % KEYS as u64) as usize);
            let roll = next() % 100;
            // Leases short enough that many expire: taken over, or reclaimed to make room.
            let lease = Duration::from_millis(100 + next() % 3_000);
            match store.begin(&k, &FP, lease).await {
                Ok(BeginOutcome::Acquired(token)) => {
                    let len = match roll {
                        0..=1 => largest - (next() % 20_000) as usize,
                        _ => (next() % 30_000) as usize,
                    };
                    let ttl = Duration::from_millis(500 + next() % 5_000);
                    match roll {
                        2..=11 => {
                            assert!(store.release(&k, token).await.expect("release"));
                            released += 1;
                        }
                        12..=21 => in_flight.push((k, token)),
                        _ => {
                            assert!(
                                store
                                    .complete(&k, token, sized(len, 5), ttl)
                                    .await
                                    .expect("complete")
                            );
                            completed += 1;
                        }
                    }
                }
                Ok(BeginOutcome::Completed(bytes)) => {
                    if Record::decode(bytes)
                        .is_ok_and(|r| r.response == Err(Unreplayable::TooLarge))
                    {
                        refused += 1;
                    }
                }
                Ok(BeginOutcome::InFlight { .. }) | Err(StoreError::Full) => {}
                Err(e) => panic!("round {round} step {step}: {e}"),
            }
            // Some requests in flight finish late; some of their owners lost the lease by then.
            if roll % 9 == 0
                && let Some((k, token)) = in_flight.pop()
            {
                let _ = store
                    .complete(&k, token, sized((next() % 15_000) as usize, 6), TTL)
                    .await
                    .expect("complete");
            }
            check_bounds(store.stats(), largest);
            tokio::time::advance(Duration::from_millis(next() % 40)).await;
        }
        clear(&store, (0..KEYS).map(key)).await;
        in_flight.clear();
    }
    // Every kind of step happened.
    assert!(completed > 1000 && released > 100, "{completed} {released}");
    assert!(
        refused > 0,
        "no record larger than the bound was replayed as such"
    );
}
