//! The store conformance suite: the contract of [`Store`], written once and run against every
//! backend (the memory store, a standalone Redis, a Redis Cluster).
//!
//! Use it from a test crate with
//!
//! ```ignore
//! #[macro_use]
//! mod conformance;
//!
//! store_conformance!(async { make_store().await });
//! ```
//!
//! The expression is evaluated once per test, so every test gets its own store. Tests use real
//! time with short durations (hundreds of milliseconds), so they work for networked stores;
//! they assert outcomes, and timing only with generous bounds (seconds), never tight ones.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tower_idempotency::Fingerprint;
use tower_idempotency::{BeginOutcome, LeaseToken, StorageKey, Store};

/// Expands to one `#[tokio::test]` per rule of the store contract, each running against the
/// store made by `$make` (an expression evaluating to a future of a `Store`).
#[macro_export]
macro_rules! store_conformance {
    ($make:expr) => {
        $crate::store_conformance!(@tests $make;
            begin_grants_exactly_one_lease,
            in_flight_reports_the_owners_fingerprint,
            complete_is_owner_checked,
            completed_record_is_returned_byte_identical,
            completed_record_is_final,
            release_is_owner_checked_and_lets_the_next_begin_acquire,
            renew_is_owner_checked_and_extends,
            expired_lease_is_taken_over_and_its_owner_fenced,
            expired_lease_refuses_its_owner,
            completed_record_expires_after_ttl,
            wait_wakes_every_waiter_when_the_owner_completes,
            wait_does_not_lose_a_racing_completion,
            wait_wakes_when_the_owner_releases,
            wait_returns_at_once_without_a_live_lease,
            wait_returns_by_the_lease_expiry_when_the_owner_vanishes,
            wait_honours_its_timeout,
            wait_keeps_waiting_across_renewals,
            distinct_keys_are_independent,
            many_keys_each_grant_one_lease,
            ping_answers,
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let store = ::std::sync::Arc::new($make.await);
                $crate::conformance::$name(store).await;
            }
        )*
    };
}

/// A lease long enough never to expire during a test.
pub const LONG: Duration = Duration::from_secs(30);
/// A lease or TTL short enough to expire during a test.
pub const SHORT: Duration = Duration::from_millis(300);
/// How long a completed record is kept when the test does not care.
pub const TTL: Duration = Duration::from_secs(60);
/// A wait timeout generous enough that reaching it means a lost wake-up.
pub const GENEROUS: Duration = Duration::from_secs(10);
/// What "promptly" means: far below [`GENEROUS`], far above any scheduling hiccup.
pub const PROMPTLY: Duration = Duration::from_secs(5);

/// A fresh random storage key, so tests sharing a backend never collide.
pub fn key() -> StorageKey {
    let mut k = [0u8; 32];
    k[..16].copy_from_slice(&LeaseToken::random().0.to_be_bytes());
    k[16..].copy_from_slice(&LeaseToken::random().0.to_be_bytes());
    StorageKey(k)
}

/// A fingerprint made of one repeated byte.
pub fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

/// A record that exercises every byte value.
pub fn record(tag: &str) -> Bytes {
    let mut v = tag.as_bytes().to_vec();
    v.extend((0..=255u8).cycle().take(1000));
    v.extend_from_slice(b"\r\n\0\xff");
    Bytes::from(v)
}

pub async fn acquire<S: Store>(store: &S, key: &StorageKey, lease: Duration) -> LeaseToken {
    match store.begin(key, &fp(1), lease).await.expect("begin") {
        BeginOutcome::Acquired(token) => token,
        other => panic!("expected a lease, got {other:?}"),
    }
}

pub async fn expect_in_flight<S: Store>(store: &S, key: &StorageKey, want: Fingerprint) {
    match store.begin(key, &fp(1), LONG).await.expect("begin") {
        BeginOutcome::InFlight { fingerprint } => assert_eq!(fingerprint, want),
        other => panic!("expected in flight, got {other:?}"),
    }
}

pub async fn expect_completed<S: Store>(store: &S, key: &StorageKey) -> Bytes {
    match store.begin(key, &fp(1), LONG).await.expect("begin") {
        BeginOutcome::Completed(bytes) => bytes,
        other => panic!("expected a completed record, got {other:?}"),
    }
}

/// Waits (bounded) until `begin` grants a lease again, as a caller would: begin, wait, repeat.
pub async fn acquire_eventually<S: Store>(
    store: &S,
    key: &StorageKey,
    within: Duration,
) -> LeaseToken {
    let give_up = Instant::now() + within;
    loop {
        match store.begin(key, &fp(1), LONG).await.expect("begin") {
            BeginOutcome::Acquired(token) => return token,
            BeginOutcome::InFlight { .. } => {
                let left = give_up.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "the lease was not released in time");
                store.wait(key, left).await.expect("wait");
            }
            BeginOutcome::Completed(_) => panic!("unexpected completed record"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// begin

/// Of many simultaneous begins on one key, exactly one gets the lease; every other one sees the
/// request in flight with the owner's fingerprint.
pub async fn begin_grants_exactly_one_lease<S: Store>(store: Arc<S>) {
    let k = key();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.begin(&k, &fp(7), LONG).await.expect("begin") })
        })
        .collect();
    let mut acquired = 0;
    for task in tasks {
        match task.await.expect("task") {
            BeginOutcome::Acquired(_) => acquired += 1,
            BeginOutcome::InFlight { fingerprint } => assert_eq!(fingerprint, fp(7)),
            BeginOutcome::Completed(_) => panic!("nothing was completed"),
        }
    }
    assert_eq!(acquired, 1);
}

/// The store reports the owner's fingerprint, whatever the caller's, so the layer can tell a
/// duplicate (wait) from a reused key (422).
pub async fn in_flight_reports_the_owners_fingerprint<S: Store>(store: Arc<S>) {
    let k = key();
    assert!(matches!(
        store.begin(&k, &fp(3), LONG).await.expect("begin"),
        BeginOutcome::Acquired(_)
    ));
    match store.begin(&k, &fp(4), LONG).await.expect("begin") {
        BeginOutcome::InFlight { fingerprint } => assert_eq!(fingerprint, fp(3)),
        other => panic!("expected in flight, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// complete

/// A wrong token cannot complete: false, and nothing changes.
pub async fn complete_is_owner_checked<S: Store>(store: Arc<S>) {
    let k = key();
    let t = acquire(&*store, &k, LONG).await;
    let stranger = LeaseToken::random();
    assert!(
        !store
            .complete(&k, stranger, record("x"), TTL)
            .await
            .expect("complete")
    );
    expect_in_flight(&*store, &k, fp(1)).await;
    assert!(
        store
            .complete(&k, t, record("owner"), TTL)
            .await
            .expect("complete")
    );
    assert_eq!(expect_completed(&*store, &k).await, record("owner"));
    // A token for a key that has no record at all changes nothing either.
    let empty = key();
    assert!(
        !store
            .complete(&empty, t, record("x"), TTL)
            .await
            .expect("complete")
    );
    assert!(matches!(
        store.begin(&empty, &fp(1), LONG).await.expect("begin"),
        BeginOutcome::Acquired(_)
    ));
}

/// What was completed comes back from begin byte for byte: every byte value, an empty
/// record, and a large one.
pub async fn completed_record_is_returned_byte_identical<S: Store>(store: Arc<S>) {
    let mut large = Vec::with_capacity(2 << 20);
    for i in 0..(2u32 << 20) {
        large.push((i.wrapping_mul(2_654_435_761) >> 13) as u8);
    }
    for body in [record("binary"), Bytes::new(), Bytes::from(large)] {
        let k = key();
        let t = acquire(&*store, &k, LONG).await;
        assert!(
            store
                .complete(&k, t, body.clone(), TTL)
                .await
                .expect("complete")
        );
        let got = expect_completed(&*store, &k).await;
        assert_eq!(got.len(), body.len());
        assert!(got == body, "record changed in the store");
        // And again: reading does not consume it.
        assert!(expect_completed(&*store, &k).await == body);
    }
}

/// A completed record is final: its former owner cannot complete, release or renew it again.
pub async fn completed_record_is_final<S: Store>(store: Arc<S>) {
    let k = key();
    let t = acquire(&*store, &k, LONG).await;
    assert!(
        store
            .complete(&k, t, record("first"), TTL)
            .await
            .expect("complete")
    );
    assert!(
        !store
            .complete(&k, t, record("second"), TTL)
            .await
            .expect("complete")
    );
    assert!(!store.release(&k, t).await.expect("release"));
    assert!(!store.renew(&k, t, LONG).await.expect("renew"));
    // Another fingerprint gets the record too: comparing fingerprints is the layer's job.
    match store.begin(&k, &fp(9), LONG).await.expect("begin") {
        BeginOutcome::Completed(bytes) => assert_eq!(bytes, record("first")),
        other => panic!("expected completed, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// release and renew

/// Only the owner can release; after it has, the next begin gets a new lease, and the old
/// token is worthless.
pub async fn release_is_owner_checked_and_lets_the_next_begin_acquire<S: Store>(store: Arc<S>) {
    let k = key();
    let t1 = acquire(&*store, &k, LONG).await;
    assert!(
        !store
            .release(&k, LeaseToken::random())
            .await
            .expect("release")
    );
    expect_in_flight(&*store, &k, fp(1)).await;
    assert!(store.release(&k, t1).await.expect("release"));
    let t2 = acquire(&*store, &k, LONG).await;
    assert_ne!(t1, t2);
    assert!(!store.release(&k, t1).await.expect("release"));
    assert!(!store.renew(&k, t1, LONG).await.expect("renew"));
    assert!(
        !store
            .complete(&k, t1, record("stale"), TTL)
            .await
            .expect("complete")
    );
    expect_in_flight(&*store, &k, fp(1)).await;
    assert!(
        store
            .complete(&k, t2, record("second"), TTL)
            .await
            .expect("complete")
    );
    assert_eq!(expect_completed(&*store, &k).await, record("second"));
}

/// Only the owner can renew; a renewal moves the expiry to `lease_ttl` from now.
pub async fn renew_is_owner_checked_and_extends<S: Store>(store: Arc<S>) {
    let k = key();
    let start = Instant::now();
    let t = acquire(&*store, &k, Duration::from_millis(600)).await;
    assert!(
        !store
            .renew(&k, LeaseToken::random(), Duration::from_secs(3))
            .await
            .expect("renew")
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        store
            .renew(&k, t, Duration::from_millis(1500))
            .await
            .expect("renew")
    );
    // Well past the original expiry (600 ms), well before the renewed one (100 + 1500 ms).
    tokio::time::sleep_until(start + Duration::from_millis(900)).await;
    expect_in_flight(&*store, &k, fp(1)).await;
    // And the renewal does expire.
    tokio::time::sleep_until(start + Duration::from_millis(2300)).await;
    let t2 = acquire(&*store, &k, LONG).await;
    assert_ne!(t, t2);
}

/// An expired lease goes to the next caller; the old owner is fenced off: its complete, renew
/// and release are refused and change nothing.
pub async fn expired_lease_is_taken_over_and_its_owner_fenced<S: Store>(store: Arc<S>) {
    let k = key();
    let old = acquire(&*store, &k, SHORT).await;
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    let new = match store.begin(&k, &fp(2), LONG).await.expect("begin") {
        BeginOutcome::Acquired(token) => token,
        other => panic!("the expired lease was not taken over: {other:?}"),
    };
    assert_ne!(old, new);
    assert!(
        !store
            .complete(&k, old, record("late"), TTL)
            .await
            .expect("complete")
    );
    assert!(!store.renew(&k, old, LONG).await.expect("renew"));
    assert!(!store.release(&k, old).await.expect("release"));
    // The new owner still holds the lease, with its own fingerprint.
    expect_in_flight(&*store, &k, fp(2)).await;
    assert!(
        store
            .complete(&k, new, record("new"), TTL)
            .await
            .expect("complete")
    );
    assert_eq!(expect_completed(&*store, &k).await, record("new"));
}

/// A lease that expired is no longer its owner's even before anyone takes it over.
pub async fn expired_lease_refuses_its_owner<S: Store>(store: Arc<S>) {
    let k = key();
    let t = acquire(&*store, &k, SHORT).await;
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert!(!store.renew(&k, t, LONG).await.expect("renew"));
    assert!(
        !store
            .complete(&k, t, record("late"), TTL)
            .await
            .expect("complete")
    );
    assert!(matches!(
        store.begin(&k, &fp(1), LONG).await.expect("begin"),
        BeginOutcome::Acquired(_)
    ));
}

/// A completed record lives `ttl`, then the key is free again.
pub async fn completed_record_expires_after_ttl<S: Store>(store: Arc<S>) {
    let k = key();
    let t = acquire(&*store, &k, LONG).await;
    assert!(
        store
            .complete(&k, t, record("brief"), SHORT)
            .await
            .expect("complete")
    );
    assert_eq!(expect_completed(&*store, &k).await, record("brief"));
    tokio::time::sleep(SHORT + Duration::from_millis(300)).await;
    assert!(matches!(
        store.begin(&k, &fp(1), LONG).await.expect("begin"),
        BeginOutcome::Acquired(_)
    ));
}

// ---------------------------------------------------------------------------------------------
// wait

/// Many waiters, then a completion: every waiter returns well before its timeout, and finds
/// the record.
pub async fn wait_wakes_every_waiter_when_the_owner_completes<S: Store>(store: Arc<S>) {
    let k = key();
    let t = acquire(&*store, &k, LONG).await;
    let start = Instant::now();
    let waiters: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store.wait(&k, GENEROUS).await.expect("wait");
                Instant::now()
            })
        })
        .collect();
    // Let most of them settle into waiting; the rest race with the completion.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        store
            .complete(&k, t, record("done"), TTL)
            .await
            .expect("complete")
    );
    for w in waiters {
        let returned = w.await.expect("waiter");
        // A waiter may return early (spurious returns are allowed) but never sleep through
        // the completion.
        assert!(
            returned - start < PROMPTLY,
            "a waiter slept through the completion"
        );
    }
    assert_eq!(expect_completed(&*store, &k).await, record("done"));
}

/// A completion racing with the call to wait is never lost, however the two interleave.
pub async fn wait_does_not_lose_a_racing_completion<S: Store>(store: Arc<S>) {
    for round in 0..20u64 {
        let k = key();
        let t = acquire(&*store, &k, LONG).await;
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                // As the layer does: look, then wait while in flight.
                loop {
                    match store.begin(&k, &fp(1), LONG).await.expect("begin") {
                        BeginOutcome::InFlight { .. } => {
                            store.wait(&k, GENEROUS).await.expect("wait")
                        }
                        BeginOutcome::Completed(bytes) => return (bytes, start.elapsed()),
                        BeginOutcome::Acquired(_) => panic!("the lease was lost"),
                    }
                }
            })
        };
        // Vary the interleaving: complete before, during or after the waiter's first look.
        if round % 4 != 0 {
            tokio::time::sleep(Duration::from_micros(round * 250)).await;
        }
        assert!(
            store
                .complete(&k, t, record("raced"), TTL)
                .await
                .expect("complete")
        );
        let (bytes, took) = waiter.await.expect("waiter");
        assert_eq!(bytes, record("raced"));
        assert!(took < PROMPTLY, "round {round}: the wake-up was lost");
    }
}

/// A release wakes the waiters; one of them can then take the lease.
pub async fn wait_wakes_when_the_owner_releases<S: Store>(store: Arc<S>) {
    let k = key();
    let t = acquire(&*store, &k, LONG).await;
    let start = Instant::now();
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.wait(&k, GENEROUS).await.expect("wait") })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(store.release(&k, t).await.expect("release"));
    for w in waiters {
        w.await.expect("waiter");
    }
    assert!(
        start.elapsed() < PROMPTLY,
        "a waiter slept through the release"
    );
    let t2 = acquire(&*store, &k, LONG).await;
    assert_ne!(t, t2);
}

/// With no live lease (no record, a completed record, an expired lease) wait returns at once.
pub async fn wait_returns_at_once_without_a_live_lease<S: Store>(store: Arc<S>) {
    let start = Instant::now();
    store.wait(&key(), GENEROUS).await.expect("wait");

    let done = key();
    let t = acquire(&*store, &done, LONG).await;
    assert!(
        store
            .complete(&done, t, record("done"), TTL)
            .await
            .expect("complete")
    );
    store.wait(&done, GENEROUS).await.expect("wait");

    let expired = key();
    acquire(&*store, &expired, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let before = Instant::now();
    store.wait(&expired, GENEROUS).await.expect("wait");
    assert!(before.elapsed() < Duration::from_secs(2));
    assert!(
        start.elapsed() < PROMPTLY,
        "wait blocked without a live lease"
    );
}

/// An owner that vanishes (never completes, never releases): waiters return by the lease's
/// expiry, not their timeout, and the next begin takes over.
pub async fn wait_returns_by_the_lease_expiry_when_the_owner_vanishes<S: Store>(store: Arc<S>) {
    let k = key();
    let _gone = acquire(&*store, &k, SHORT).await;
    let start = Instant::now();
    store.wait(&k, GENEROUS).await.expect("wait");
    assert!(
        start.elapsed() < PROMPTLY,
        "wait ignored the lease's expiry"
    );
    let t = acquire_eventually(&*store, &k, PROMPTLY).await;
    assert!(
        store
            .complete(&k, t, record("taken over"), TTL)
            .await
            .expect("complete")
    );
}

/// wait returns by its timeout when nothing happens; the lease is still there.
pub async fn wait_honours_its_timeout<S: Store>(store: Arc<S>) {
    let k = key();
    acquire(&*store, &k, LONG).await;
    let start = Instant::now();
    store
        .wait(&k, Duration::from_millis(300))
        .await
        .expect("wait");
    assert!(start.elapsed() < PROMPTLY, "wait overran its timeout");
    expect_in_flight(&*store, &k, fp(1)).await;
    // A zero timeout returns at once.
    store.wait(&k, Duration::ZERO).await.expect("wait");
}

/// A renewed lease is still live: a waiter capped by the lease's expiry does not hand the key
/// to the next caller while its owner keeps renewing, and still wakes on completion.
pub async fn wait_keeps_waiting_across_renewals<S: Store>(store: Arc<S>) {
    let k = key();
    let lease = Duration::from_millis(600);
    let t = acquire(&*store, &k, lease).await;
    let renewer = {
        let store = store.clone();
        tokio::spawn(async move {
            for _ in 0..8 {
                tokio::time::sleep(lease / 4).await;
                assert!(store.renew(&k, t, lease).await.expect("renew"));
            }
            assert!(
                store
                    .complete(&k, t, record("renewed"), TTL)
                    .await
                    .expect("complete")
            );
        })
    };
    // A waiter as the layer runs it: whatever wakes it, it never gets the lease.
    let start = Instant::now();
    loop {
        match store.begin(&k, &fp(1), LONG).await.expect("begin") {
            BeginOutcome::InFlight { .. } => store.wait(&k, GENEROUS).await.expect("wait"),
            BeginOutcome::Completed(bytes) => {
                assert_eq!(bytes, record("renewed"));
                break;
            }
            BeginOutcome::Acquired(_) => panic!("a renewed lease was taken over"),
        }
    }
    assert!(start.elapsed() < PROMPTLY);
    renewer.await.expect("renewer");
}

// ---------------------------------------------------------------------------------------------
// keys

/// What happens to one key does not touch another.
pub async fn distinct_keys_are_independent<S: Store>(store: Arc<S>) {
    let (a, b) = (key(), key());
    let ta = acquire(&*store, &a, LONG).await;
    let tb = acquire(&*store, &b, LONG).await;
    // A token is bound to its key.
    assert!(
        !store
            .complete(&b, ta, record("a"), TTL)
            .await
            .expect("complete")
    );
    assert!(!store.release(&a, tb).await.expect("release"));
    assert!(
        store
            .complete(&a, ta, record("a"), TTL)
            .await
            .expect("complete")
    );
    expect_in_flight(&*store, &b, fp(1)).await;
    assert!(store.release(&b, tb).await.expect("release"));
    assert_eq!(expect_completed(&*store, &a).await, record("a"));
    assert!(matches!(
        store.begin(&b, &fp(1), LONG).await.expect("begin"),
        BeginOutcome::Acquired(_)
    ));
}

/// Many keys at once, several callers each: one lease per key.
pub async fn many_keys_each_grant_one_lease<S: Store>(store: Arc<S>) {
    let keys: Vec<StorageKey> = (0..100).map(|_| key()).collect();
    let tasks: Vec<_> = keys
        .iter()
        .flat_map(|k| std::iter::repeat_n(*k, 5))
        .map(|k| {
            let store = store.clone();
            tokio::spawn(async move { (k, store.begin(&k, &fp(1), LONG).await.expect("begin")) })
        })
        .collect();
    let mut leases = std::collections::HashMap::new();
    for task in tasks {
        let (k, begun) = task.await.expect("task");
        if let BeginOutcome::Acquired(t) = begun {
            assert!(leases.insert(k, t).is_none(), "two leases for one key");
        }
    }
    assert_eq!(leases.len(), keys.len());
    for (k, t) in leases {
        assert!(
            store
                .complete(&k, t, record("k"), TTL)
                .await
                .expect("complete")
        );
    }
}

/// The health check answers.
pub async fn ping_answers<S: Store>(store: Arc<S>) {
    store.ping().await.expect("ping");
}
