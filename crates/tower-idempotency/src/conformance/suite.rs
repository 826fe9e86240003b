//! The tests of the suite, one per rule of the store contract, in the order of the lifecycle.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::time::Instant;

use std::time::Duration;

use bytes::Bytes;

use super::support::{
    GENEROUS, LONG, PROMPTLY, RACED, SHORT, TTL, acquire, acquire_eventually, allowed_returns,
    expect_completed, expect_in_flight, fp, key, offers_operator_verbs, poll_until_acquired,
    record, spawn_waiters, wait_until,
};
use crate::{BeginOutcome, Forgotten, Inspected, LeaseToken, StorageKey, Store};

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
        let start = Instant::now();
        let (done, waiters) = spawn_waiters(&store, k, 50);
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
        let start = Instant::now();
        let (done, waiters) = spawn_waiters(&store, k, 10);
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

    // ---------------------------------------------------------------------------------------------
    // operators: inspect, forget, in_flight
    //
    // Optional verbs: a store that offers none of them answers `StoreError::Unsupported` to all
    // three (checked by `offers_operator_verbs`), and the tests below pass it by that.

    /// Inspecting a key shows nothing, then its lease (owner, fingerprint, renewals, what is
    /// left), then its completed record, byte for byte.
    async fn inspect_follows_the_lifecycle(store) {
        if !offers_operator_verbs(&*store).await {
            return;
        }
        let k = key();
        assert_eq!(store.inspect(&k).await.expect("inspect"), None);
        let t = acquire(&*store, &k, LONG).await;
        match store.inspect(&k).await.expect("inspect") {
            Some(Inspected::InFlight(lease)) => {
                assert_eq!((lease.key, lease.owner, lease.fingerprint), (k, t, fp(1)));
                assert_eq!(lease.renewals, 0);
                assert!(lease.expires_in <= LONG && lease.expires_in > LONG - GENEROUS);
                assert!(lease.age < GENEROUS, "a new lease is {:?} old", lease.age);
            }
            other => panic!("expected the lease, got {other:?}"),
        }
        assert!(store.renew(&k, t, LONG).await.expect("renew"));
        assert!(store.renew(&k, t, LONG).await.expect("renew"));
        match store.inspect(&k).await.expect("inspect") {
            Some(Inspected::InFlight(lease)) => assert_eq!(lease.renewals, 2),
            other => panic!("expected the lease, got {other:?}"),
        }
        assert!(store.complete(&k, t, record("seen"), TTL).await.expect("complete"));
        match store.inspect(&k).await.expect("inspect") {
            Some(Inspected::Completed(done)) => {
                assert_eq!(done.record, record("seen"));
                assert!(done.expires_in <= TTL && done.expires_in > TTL - GENEROUS);
                if let Some(age) = done.age {
                    assert!(age < GENEROUS, "a new record is {age:?} old");
                }
            }
            other => panic!("expected the record, got {other:?}"),
        }
        // Inspecting changes nothing.
        assert_eq!(expect_completed(&*store, &k).await, record("seen"));
    }

    /// An expired lease is nothing to inspect.
    async fn inspect_ignores_an_expired_lease(store) {
        if !offers_operator_verbs(&*store).await {
            return;
        }
        let k = key();
        acquire(&*store, &k, SHORT).await;
        tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
        assert_eq!(store.inspect(&k).await.expect("inspect"), None);
        // Nor to forget, even by force.
        assert_eq!(store.forget(&k, true).await.expect("forget"), Forgotten::NotFound);
    }

    /// A forgotten record runs again: the next begin takes a lease. Forgetting it twice finds
    /// nothing the second time.
    async fn forget_drops_a_completed_record(store) {
        if !offers_operator_verbs(&*store).await {
            return;
        }
        let k = key();
        let t = acquire(&*store, &k, LONG).await;
        assert!(store.complete(&k, t, record("once"), TTL).await.expect("complete"));
        assert_eq!(store.forget(&k, false).await.expect("forget"), Forgotten::Record);
        assert_eq!(store.inspect(&k).await.expect("inspect"), None);
        assert_eq!(store.forget(&k, false).await.expect("forget"), Forgotten::NotFound);
        assert!(matches!(
            store.begin(&k, &fp(1), LONG).await.expect("begin"),
            BeginOutcome::Acquired(_)
        ));
    }

    /// A lease is forgotten only by force; then its owner's completion is refused, and the
    /// next begin takes a new lease.
    async fn forget_leaves_a_lease_unless_forced(store) {
        if !offers_operator_verbs(&*store).await {
            return;
        }
        let k = key();
        let t = acquire(&*store, &k, LONG).await;
        assert_eq!(store.forget(&k, false).await.expect("forget"), Forgotten::InFlight);
        expect_in_flight(&*store, &k, fp(1)).await;
        assert_eq!(store.forget(&k, true).await.expect("forget"), Forgotten::Lease);
        assert!(!store.complete(&k, t, record("late"), TTL).await.expect("complete"));
        let next = acquire(&*store, &k, LONG).await;
        assert_ne!(next, t);
    }

    /// Forcing a lease away wakes the duplicates that wait for it, so they look again at once.
    async fn forced_forget_wakes_waiters(store) {
        if !offers_operator_verbs(&*store).await {
            return;
        }
        let k = key();
        acquire(&*store, &k, LONG).await;
        let start = Instant::now();
        let (done, waiters) = spawn_waiters(&store, k, 10);
        tokio::time::sleep(Duration::from_millis(300)).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(store.forget(&k, true).await.expect("forget"), Forgotten::Lease);
        for w in waiters {
            let (returned, _) = w.await.expect("waiter");
            assert!(returned - start < PROMPTLY, "a waiter slept through the forget");
        }
    }

    /// The requests in flight are listed in pages, in the order of their keys, each once;
    /// completed, released and forgotten ones are not.
    async fn in_flight_lists_live_leases_in_pages(store) {
        if !offers_operator_verbs(&*store).await {
            return;
        }
        let mut mine: Vec<StorageKey> = (0..8).map(|_| key()).collect();
        let mut tokens = Vec::new();
        for k in &mine {
            tokens.push(acquire(&*store, k, LONG).await);
        }
        assert!(store.complete(&mine[0], tokens[0], record("x"), TTL).await.expect("complete"));
        assert!(store.release(&mine[1], tokens[1]).await.expect("release"));
        assert_eq!(store.forget(&mine[2], true).await.expect("forget"), Forgotten::Lease);
        assert!(store.renew(&mine[3], tokens[3], LONG).await.expect("renew"));
        let renewed = mine[3];
        // The first three are done: completed, released, forgotten.
        let owners: std::collections::HashMap<StorageKey, LeaseToken> =
            mine.iter().copied().zip(tokens.iter().copied()).collect();
        let gone = mine.drain(..3).collect::<Vec<_>>();
        mine.sort();
        // Another test's leases may be listed too (a shared server): only ours are checked.
        let mut seen = Vec::new();
        let mut after: Option<StorageKey> = None;
        for _ in 0..100_000 {
            let page = store.in_flight(after.as_ref(), 2).await.expect("in_flight");
            assert!(page.leases.len() <= 2, "a page of {} for a limit of 2", page.leases.len());
            for lease in &page.leases {
                assert!(after.is_none_or(|a| lease.key > a), "a page went back");
                after = Some(lease.key);
                if mine.contains(&lease.key) {
                    assert_eq!(lease.owner, owners[&lease.key]);
                    assert_eq!(lease.fingerprint, fp(1));
                    assert_eq!(lease.renewals, u32::from(lease.key == renewed));
                    seen.push(lease.key);
                }
                assert!(!gone.contains(&lease.key), "a finished request is listed in flight");
            }
            // A page may stop short of its limit (after examining as many candidates as the
            // store allows one call), so its `next` may lie past its last lease, never before.
            match page.next {
                Some(next) => {
                    assert!(after.is_none_or(|a| next >= a), "a next page that goes back");
                    after = Some(next);
                }
                None => break,
            }
        }
        assert_eq!(seen, mine, "every lease listed once, in key order");
        let all = store.in_flight(None, 1_000_000).await.expect("in_flight");
        for k in &mine {
            assert!(all.leases.iter().any(|l| l.key == *k));
        }
    }

    /// The health check answers.
    async fn ping_answers(store) {
        store.ping().await.expect("ping");
    }
}
