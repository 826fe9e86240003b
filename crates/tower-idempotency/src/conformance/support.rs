//! What the suite's tests share: their durations, their keys, fingerprints and records, and
//! the steps several of them take.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::{BeginOutcome, Fingerprint, LeaseToken, StorageKey, Store};

/// A lease long enough never to expire during a test.
pub const LONG: Duration = Duration::from_secs(30);
/// A lease or TTL short enough to expire during a test, for tests that only wait it out (no
/// step of theirs has to land before it expires).
pub const SHORT: Duration = Duration::from_millis(300);
/// A lease or TTL that a step of the test must beat: long enough for a loaded machine to take
/// that step in time, short enough to wait out.
pub const RACED: Duration = Duration::from_secs(2);
/// How long a completed record is kept when the test does not care.
pub const TTL: Duration = Duration::from_secs(60);
/// A wait timeout generous enough that reaching it means a lost wake-up.
pub const GENEROUS: Duration = Duration::from_secs(10);
/// What "promptly" means: far below [`GENEROUS`], far above any scheduling hiccup.
pub const PROMPTLY: Duration = Duration::from_secs(5);

/// Runs one test (or [`all`](super::all)) to completion on a multi-threaded tokio runtime with four
/// workers, as `#[tokio::test(flavor = "multi_thread", worker_threads = 4)]` would.
pub fn run(test: impl Future<Output = ()>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime for the conformance suite")
        .block_on(test);
}

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

/// Takes the lease of a key nobody holds; panics otherwise.
pub async fn acquire<S: Store>(store: &S, key: &StorageKey, lease: Duration) -> LeaseToken {
    match store.begin(key, &fp(1), lease).await.expect("begin") {
        BeginOutcome::Acquired(token) => token,
        other => panic!("expected a lease, got {other:?}"),
    }
}

/// Asserts that `key` is in flight under a lease taken with fingerprint `want`.
pub async fn expect_in_flight<S: Store>(store: &S, key: &StorageKey, want: Fingerprint) {
    match store.begin(key, &fp(1), LONG).await.expect("begin") {
        BeginOutcome::InFlight { fingerprint } => assert_eq!(fingerprint, want),
        other => panic!("expected in flight, got {other:?}"),
    }
}

/// Asserts that `key` holds a completed record, and returns it.
pub async fn expect_completed<S: Store>(store: &S, key: &StorageKey) -> Bytes {
    match store.begin(key, &fp(1), LONG).await.expect("begin") {
        BeginOutcome::Completed(bytes) => bytes,
        other => panic!("expected a completed record, got {other:?}"),
    }
}

/// How many times `wait` may return while nothing happens for `quiet`: a store may come back
/// now and then (a networked one at its own poll interval, say every 500 ms), never in a busy
/// loop.
pub fn allowed_returns(quiet: Duration) -> usize {
    2 + (quiet.as_millis() / 250) as usize
}

/// Waits (bounded) until `begin` grants a lease again, as a caller would: begin, wait, repeat.
/// Returns the lease and how many times `wait` returned before.
pub async fn acquire_eventually<S: Store>(
    store: &S,
    key: &StorageKey,
    within: Duration,
) -> (LeaseToken, usize) {
    let give_up = Instant::now() + within;
    let mut waits = 0;
    loop {
        match store.begin(key, &fp(1), LONG).await.expect("begin") {
            BeginOutcome::Acquired(token) => return (token, waits),
            BeginOutcome::InFlight { .. } => {
                let left = give_up.saturating_duration_since(Instant::now());
                assert!(!left.is_zero(), "the lease was not released in time");
                store.wait(key, left).await.expect("wait");
                waits += 1;
            }
            BeginOutcome::Completed(_) => panic!("unexpected completed record"),
        }
    }
}

/// Calls `wait` on `key` again and again until `deadline`, as a waiter that keeps finding the
/// key in flight would; returns how many calls that took.
pub async fn wait_until<S: Store>(store: &S, key: &StorageKey, deadline: Instant) -> usize {
    let mut waits = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return waits;
        }
        store.wait(key, left).await.expect("wait");
        waits += 1;
    }
}

/// Polls `begin` until the completed record under `key` is gone, and returns when the last
/// look that still found it was sent, and when the look that found it gone came back.
pub(super) async fn poll_until_acquired<S: Store>(
    store: &S,
    key: &StorageKey,
) -> (Instant, Instant) {
    let give_up = Instant::now() + GENEROUS + RACED;
    loop {
        let asked = Instant::now();
        match store.begin(key, &fp(1), LONG).await.expect("begin") {
            BeginOutcome::Acquired(_) => return (asked, Instant::now()),
            _ => {
                assert!(Instant::now() < give_up, "the record never expired");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Waits on `key` until `done` is set, as a waiter that calls `wait` again after each spurious
/// return; returns when it returned for good, and how many calls returned before `done` was set.
pub(super) async fn waits_until_set<S: Store>(
    store: &S,
    key: &StorageKey,
    done: &std::sync::atomic::AtomicBool,
) -> (Instant, usize) {
    let mut early = 0;
    loop {
        store.wait(key, GENEROUS).await.expect("wait");
        if done.load(std::sync::atomic::Ordering::SeqCst) {
            return (Instant::now(), early);
        }
        early += 1;
    }
}

/// `n` tasks waiting on `key` as [`waits_until_set`] does, and the flag to set once the change
/// they wait for is made.
pub(super) fn spawn_waiters<S: Store>(
    store: &std::sync::Arc<S>,
    key: StorageKey,
    n: usize,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    Vec<tokio::task::JoinHandle<(Instant, usize)>>,
) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let waiters = (0..n)
        .map(|_| {
            let store = store.clone();
            let done = done.clone();
            tokio::spawn(async move { waits_until_set(&*store, &key, &done).await })
        })
        .collect();
    (done, waiters)
}

/// Whether `store` offers the operator's verbs: `false` when it answers
/// [`StoreError::Unsupported`](crate::StoreError::Unsupported) to all three; panics when it
/// offers some and not others.
pub async fn offers_operator_verbs<S: Store>(store: &S) -> bool {
    use crate::StoreError::Unsupported;
    let k = key();
    let answers = [
        matches!(store.inspect(&k).await, Err(Unsupported(_))),
        matches!(store.forget(&k, false).await, Err(Unsupported(_))),
        matches!(store.in_flight(None, 1).await, Err(Unsupported(_))),
    ];
    match answers {
        [false, false, false] => true,
        [true, true, true] => false,
        _ => panic!(
            "the store offers some of inspect, forget and in_flight but not all: {answers:?}"
        ),
    }
}
