//! The store conformance suite: the contract of [`Store`](crate::Store) as tests, which any
//! store crate runs against its own backend (feature `conformance`).
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

#[macro_use]
mod macros;
mod suite;
mod support;

pub use self::suite::*;
pub use self::support::{
    GENEROUS, LONG, PROMPTLY, RACED, SHORT, TTL, acquire, acquire_eventually, allowed_returns,
    expect_completed, expect_in_flight, fp, key, offers_operator_verbs, record, run, wait_until,
};
