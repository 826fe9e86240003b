//! The store conformance suite: the contract of [`Store`] as tests, which any store crate runs
//! against its own backend (feature `conformance`).
//!
//! [`store_conformance!`](crate::store_conformance) expands to one `#[test]` per rule of the
//! contract, each on a fresh store made by the expression it is given (a future of the store):
//!
//! ```ignore
//! // tests/conformance.rs of a store crate, with tower-idempotency's `conformance` feature
//! // among its dev-dependencies.
//! tower_idempotency::store_conformance!(async { MyStore::connect(&test_url()).await });
//! ```
//!
//! The suite and the macro are written from one list, so every test of the suite runs. Each
//! test is also a public function, for a test that wants one rule on a store of its own; [`all`]
//! runs every one of them at once.
//!
//! Tests use real time with short durations (hundreds of milliseconds to a few seconds), so they
//! work for networked stores, and they assert outcomes. Timing is asserted only with bounds
//! generous enough for a loaded machine: "promptly" is seconds, and where something must happen
//! before a lease or a record expires, the lease or record lives seconds too. `wait` is bounded
//! from below as well: a store may return from it spuriously, now and then, but one that returns
//! at once (and so has its callers poll it in a busy loop) fails.
//!
//! # A store of your own
//!
//! A store kept in a `Mutex<HashMap>` with one [`Notify`](tokio::sync::Notify) for its waiters
//! passes the suite:
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use std::time::Duration;
//!
//! use async_trait::async_trait;
//! use bytes::Bytes;
//! use tokio::sync::Notify;
//! use tokio::time::Instant;
//! use tower_idempotency::{BeginOutcome, Fingerprint, LeaseToken, StorageKey, Store, StoreError};
//!
//! enum Entry {
//!     Lease { token: LeaseToken, fingerprint: Fingerprint, expires: Instant },
//!     Done { record: Bytes, expires: Instant },
//! }
//!
//! #[derive(Default)]
//! struct MapStore {
//!     map: Mutex<HashMap<StorageKey, Entry>>,
//!     /// Wakes every waiter, whatever key changed: a spurious return is allowed.
//!     changed: Notify,
//! }
//!
//! impl MapStore {
//!     /// Applies `f` to the live lease of `token`, if it still holds one.
//!     fn owned(&self, key: &StorageKey, token: LeaseToken, f: impl FnOnce(&mut Entry)) -> bool {
//!         let mut map = self.map.lock().unwrap();
//!         match map.get_mut(key) {
//!             Some(entry @ Entry::Lease { .. }) => {
//!                 let Entry::Lease { token: owner, expires, .. } = entry else { unreachable!() };
//!                 if *owner != token || *expires <= Instant::now() {
//!                     return false;
//!                 }
//!                 f(entry);
//!                 true
//!             }
//!             _ => false,
//!         }
//!     }
//! }
//!
//! #[async_trait]
//! impl Store for MapStore {
//!     async fn begin(
//!         &self,
//!         key: &StorageKey,
//!         fingerprint: &Fingerprint,
//!         lease_ttl: Duration,
//!     ) -> Result<BeginOutcome, StoreError> {
//!         let now = Instant::now();
//!         let mut map = self.map.lock().unwrap();
//!         match map.get(key) {
//!             Some(Entry::Done { record, expires }) if *expires > now => {
//!                 return Ok(BeginOutcome::Completed(record.clone()));
//!             }
//!             Some(Entry::Lease { fingerprint, expires, .. }) if *expires > now => {
//!                 return Ok(BeginOutcome::InFlight { fingerprint: *fingerprint });
//!             }
//!             _ => {}
//!         }
//!         let token = LeaseToken::random();
//!         let lease = Entry::Lease { token, fingerprint: *fingerprint, expires: now + lease_ttl };
//!         map.insert(*key, lease);
//!         Ok(BeginOutcome::Acquired(token))
//!     }
//!
//!     async fn complete(
//!         &self,
//!         key: &StorageKey,
//!         token: LeaseToken,
//!         record: Bytes,
//!         ttl: Duration,
//!     ) -> Result<bool, StoreError> {
//!         let expires = Instant::now() + ttl;
//!         let done = self.owned(key, token, |e| *e = Entry::Done { record, expires });
//!         self.changed.notify_waiters();
//!         Ok(done)
//!     }
//!
//!     async fn release(&self, key: &StorageKey, token: LeaseToken) -> Result<bool, StoreError> {
//!         let done = self.owned(key, token, |_| ());
//!         if done {
//!             self.map.lock().unwrap().remove(key);
//!             self.changed.notify_waiters();
//!         }
//!         Ok(done)
//!     }
//!
//!     async fn renew(
//!         &self,
//!         key: &StorageKey,
//!         token: LeaseToken,
//!         lease_ttl: Duration,
//!     ) -> Result<bool, StoreError> {
//!         let until = Instant::now() + lease_ttl;
//!         Ok(self.owned(key, token, |e| {
//!             if let Entry::Lease { expires, .. } = e {
//!                 *expires = until;
//!             }
//!         }))
//!     }
//!
//!     async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
//!         // Listening before looking: a completion between the two is not lost.
//!         let notified = self.changed.notified();
//!         tokio::pin!(notified);
//!         notified.as_mut().enable();
//!         let lease_expires = match self.map.lock().unwrap().get(key) {
//!             Some(Entry::Lease { expires, .. }) if *expires > Instant::now() => *expires,
//!             _ => return Ok(()),
//!         };
//!         let until = lease_expires.min(Instant::now() + timeout);
//!         let _ = tokio::time::timeout_at(until, notified).await;
//!         Ok(())
//!     }
//! }
//!
//! // In a store crate's tests this is `tower_idempotency::store_conformance!(async {
//! // MapStore::default() });`, one test each; a doctest runs them all in one.
//! tower_idempotency::conformance::run(tower_idempotency::conformance::all(|| async {
//!     MapStore::default()
//! }));
//! ```

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
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

/// Runs one test (or [`all`]) to completion on a multi-threaded tokio runtime with four
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
async fn poll_until_acquired<S: Store>(store: &S, key: &StorageKey) -> (Instant, Instant) {
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
async fn waits_until_set<S: Store>(
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

/// Writes each test once: as a public function, in the list [`all`] runs, and in the list
/// [`store_conformance!`](crate::store_conformance) expands, so no test is written without
/// running. `$d` is a `$`, for the macro this one defines.
macro_rules! suite {
    ($d:tt $( $(#[$meta:meta])* async fn $name:ident($store:ident) $body:block )*) => {
        $(
            $(#[$meta])*
            pub async fn $name<S: Store>($store: Arc<S>) $body
        )*

        /// Runs every test of the suite at once, each on a fresh store made by `make`; then
        /// panics naming each test that failed (their own panics say why).
        pub async fn all<S, F, Fut>(make: F)
        where
            S: Store,
            F: Fn() -> Fut,
            Fut: Future<Output = S>,
        {
            let make = &make;
            let tests: Vec<Pin<Box<dyn Future<Output = Result<(), &'static str>> + '_>>> = vec![
                $(
                    Box::pin(async move {
                        let store = Arc::new(make().await);
                        AssertUnwindSafe($name(store))
                            .catch_unwind()
                            .await
                            .map_err(|_| stringify!($name))
                    }),
                )*
            ];
            let failed: Vec<&str> = futures_util::future::join_all(tests)
                .await
                .into_iter()
                .filter_map(Result::err)
                .collect();
            assert!(failed.is_empty(), "the store fails the conformance tests {failed:?}");
        }

        /// Expands to one `#[test]` per rule of the store contract (each a function of
        /// [`conformance`](crate::conformance)), each running on a fresh store made by `$make`,
        /// an expression evaluating to a future of a [`Store`](crate::Store):
        ///
        /// ```ignore
        /// mod standalone {
        ///     tower_idempotency::store_conformance!(async { crate::store_on(&url()).await });
        /// }
        /// ```
        ///
        /// The expression is evaluated once per test, in the module the macro is called in,
        /// on the test's own runtime (see [`run`](crate::conformance::run)).
        #[macro_export]
        #[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
        macro_rules! store_conformance {
            ($d make:expr) => {
                $(
                    #[test]
                    fn $name() {
                        $d crate::conformance::run(async {
                            let store = ::std::sync::Arc::new($d make.await);
                            $d crate::conformance::$name(store).await;
                        });
                    }
                )*
            };
        }
    };
}

suite! {$
    // ---------------------------------------------------------------------------------------------
    // begin

    /// Of many simultaneous begins on one key, exactly one gets the lease; every other one sees the
    /// request in flight with the owner's fingerprint.
    async fn begin_grants_exactly_one_lease(store) {
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
    async fn in_flight_reports_the_owners_fingerprint(store) {
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
    async fn complete_is_owner_checked(store) {
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
    async fn completed_record_is_returned_byte_identical(store) {
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
    async fn completed_record_is_final(store) {
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
    async fn release_is_owner_checked_and_lets_the_next_begin_acquire(store) {
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
    async fn renew_is_owner_checked_and_extends(store) {
        let k = key();
        let start = Instant::now();
        let t = acquire(&*store, &k, RACED).await;
        assert!(
            !store
                .renew(&k, LeaseToken::random(), Duration::from_secs(3))
                .await
                .expect("renew")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let renewed = Instant::now();
        assert!(store.renew(&k, t, 2 * RACED).await.expect("renew"));
        // Half a lease past the original expiry, and at least as long before the renewed one.
        tokio::time::sleep_until(start + RACED + RACED / 2).await;
        expect_in_flight(&*store, &k, fp(1)).await;
        // And the renewal does expire, not before it is due.
        let (_, free) = poll_until_acquired(&*store, &k).await;
        assert!(
            free >= renewed + 2 * RACED,
            "the renewed lease expired early"
        );
    }

    /// An expired lease goes to the next caller; the old owner is fenced off: its complete, renew
    /// and release are refused and change nothing.
    async fn expired_lease_is_taken_over_and_its_owner_fenced(store) {
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
    async fn expired_lease_refuses_its_owner(store) {
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
    async fn completed_record_expires_after_ttl(store) {
        let k = key();
        let t = acquire(&*store, &k, LONG).await;
        let completed = Instant::now();
        assert!(
            store
                .complete(&k, t, record("brief"), RACED)
                .await
                .expect("complete")
        );
        assert_eq!(expect_completed(&*store, &k).await, record("brief"));
        // The store's clock started the TTL after `completed`: a look that found the key free
        // cannot have come back before the TTL was over.
        let (_, free) = poll_until_acquired(&*store, &k).await;
        assert!(free >= completed + RACED, "the record expired early");
    }

    // ---------------------------------------------------------------------------------------------
    // wait

    /// Many waiters, then a completion: every waiter returns well before its timeout, and finds
    /// the record. Until the completion a waiter keeps waiting: it may return spuriously now
    /// and then, never in a busy loop.
    async fn wait_wakes_every_waiter_when_the_owner_completes(store) {
        let k = key();
        let t = acquire(&*store, &k, LONG).await;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let start = Instant::now();
        let waiters: Vec<_> = (0..50)
            .map(|_| {
                let store = store.clone();
                let done = done.clone();
                tokio::spawn(async move { waits_until_set(&*store, &k, &done).await })
            })
            .collect();
        // Let most of them settle into waiting; the rest race with the completion.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let completing = Instant::now();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(
            store
                .complete(&k, t, record("done"), TTL)
                .await
                .expect("complete")
        );
        for w in waiters {
            let (returned, waits) = w.await.expect("waiter");
            assert!(
                returned - start < PROMPTLY,
                "a waiter slept through the completion"
            );
            assert!(
                waits <= allowed_returns(completing - start),
                "a waiter's wait returned {waits} times before the completion: a busy loop"
            );
        }
        assert_eq!(expect_completed(&*store, &k).await, record("done"));
    }

    /// A completion racing with the call to wait is never lost, however the two interleave.
    async fn wait_does_not_lose_a_racing_completion(store) {
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

    /// A release wakes the waiters; one of them can then take the lease. Until the release a
    /// waiter keeps waiting.
    async fn wait_wakes_when_the_owner_releases(store) {
        let k = key();
        let t = acquire(&*store, &k, LONG).await;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let start = Instant::now();
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let store = store.clone();
                let done = done.clone();
                tokio::spawn(async move { waits_until_set(&*store, &k, &done).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let releasing = Instant::now();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(store.release(&k, t).await.expect("release"));
        for w in waiters {
            let (_, waits) = w.await.expect("waiter");
            assert!(
                waits <= allowed_returns(releasing - start),
                "a waiter's wait returned {waits} times before the release: a busy loop"
            );
        }
        assert!(
            start.elapsed() < PROMPTLY,
            "a waiter slept through the release"
        );
        let t2 = acquire(&*store, &k, LONG).await;
        assert_ne!(t, t2);
    }

    /// With no live lease (no record, a completed record, an expired lease) wait returns at once.
    async fn wait_returns_at_once_without_a_live_lease(store) {
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
    /// expiry, not their timeout, and the next begin takes over; not before the expiry, and
    /// without polling the store in a busy loop meanwhile.
    async fn wait_returns_by_the_lease_expiry_when_the_owner_vanishes(store) {
        let k = key();
        let start = Instant::now();
        let _gone = acquire(&*store, &k, RACED).await;
        let (t, waits) = acquire_eventually(&*store, &k, RACED + PROMPTLY).await;
        let took = start.elapsed();
        assert!(took < RACED + PROMPTLY, "wait ignored the lease's expiry");
        assert!(took >= RACED, "the lease was taken over before it expired");
        assert!(
            waits <= allowed_returns(RACED),
            "wait returned {waits} times during a {RACED:?} lease: a busy loop"
        );
        assert!(
            store
                .complete(&k, t, record("taken over"), TTL)
                .await
                .expect("complete")
        );
    }

    /// wait returns by its timeout when nothing happens; the lease is still there. It does not
    /// return long before: over a quiet second, a waiter's calls come back a few times at most.
    async fn wait_honours_its_timeout(store) {
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

        let quiet = Duration::from_secs(1);
        let waits = wait_until(&*store, &k, Instant::now() + quiet).await;
        assert!(
            waits <= allowed_returns(quiet),
            "wait returned {waits} times in a quiet {quiet:?}: a busy loop"
        );
        expect_in_flight(&*store, &k, fp(1)).await;
    }

    /// A renewed lease is still live: a waiter capped by the lease's expiry does not hand the key
    /// to the next caller while its owner keeps renewing, and still wakes on completion.
    async fn wait_keeps_waiting_across_renewals(store) {
        let k = key();
        // Renewed every quarter of its life, so a renewal may come late by most of a lease.
        let lease = RACED;
        let t = acquire(&*store, &k, lease).await;
        let renewer = {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..6 {
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
        let mut waits = 0;
        loop {
            match store.begin(&k, &fp(1), LONG).await.expect("begin") {
                BeginOutcome::InFlight { .. } => {
                    store.wait(&k, GENEROUS).await.expect("wait");
                    waits += 1;
                }
                BeginOutcome::Completed(bytes) => {
                    assert_eq!(bytes, record("renewed"));
                    break;
                }
                BeginOutcome::Acquired(_) => panic!("a renewed lease was taken over"),
            }
        }
        let took = start.elapsed();
        assert!(took < PROMPTLY + lease);
        assert!(
            waits <= allowed_returns(took),
            "wait returned {waits} times in {took:?} of renewals: a busy loop"
        );
        renewer.await.expect("renewer");
    }

    // ---------------------------------------------------------------------------------------------
    // keys

    /// What happens to one key does not touch another.
    async fn distinct_keys_are_independent(store) {
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
    async fn many_keys_each_grant_one_lease(store) {
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
    async fn ping_answers(store) {
        store.ping().await.expect("ping");
    }
}
