//! Waking waiters: one `LISTEN` connection per store, shared by every waiter of every key.
//!
//! Completions and releases send `pg_notify(<table>, <key in hex>)` in the statement that makes
//! them, so the notice leaves when (and only if) the change commits. The listener task wakes
//! the waiters of that key. A waiter registers before it re-checks the lease, so a notice sent
//! between the caller's `begin` and its `wait` is never missed. When the listener's connection
//! is lost, every waiter is woken to look again (notices may have been lost meanwhile), and
//! until it listens again waiters also look every poll interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::StorageKey;

/// The waiters of each key, and whether the listener currently listens.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    by_key: Mutex<HashMap<StorageKey, Registration>>,
    listening: AtomicBool,
}

#[derive(Debug)]
struct Registration {
    notify: Arc<Notify>,
    waiters: usize,
}

/// A waiter's place on a key; leaving the last one drops the key's entry.
pub(super) struct Waiting<'a> {
    waiters: &'a Waiters,
    key: StorageKey,
    pub(super) notify: Arc<Notify>,
}

impl Waiters {
    /// Registers a waiter on `key`. Create its `notified()` future (and `enable` it) before
    /// looking at the record.
    pub(super) fn register(&self, key: StorageKey) -> Waiting<'_> {
        let mut by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = by_key.entry(key).or_insert_with(|| Registration {
            notify: Arc::new(Notify::new()),
            waiters: 0,
        });
        entry.waiters += 1;
        Waiting {
            waiters: self,
            key,
            notify: entry.notify.clone(),
        }
    }

    /// Whether notices are arriving; if not, waiters poll.
    pub(super) fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    fn wake(&self, key: &StorageKey) {
        let by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = by_key.get(key) {
            entry.notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        let by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        for entry in by_key.values() {
            entry.notify.notify_waiters();
        }
    }

    fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Release);
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut by_key = self
            .waiters
            .by_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = by_key.get_mut(&self.key) {
            entry.waiters -= 1;
            if entry.waiters == 0 {
                by_key.remove(&self.key);
            }
        }
    }
}

/// Parses a notice's payload: the key in hex.
fn parse_key(payload: &str) -> Option<StorageKey> {
    let bytes = payload.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16);
        key[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(StorageKey(key))
}

/// Runs the listener until `stop` is cancelled: listens on `channel`, wakes each notice's
/// waiters, and when the connection is lost wakes everyone and listens again, backing off
/// while the database cannot be reached.
pub(super) async fn listen(
    pool: PgPool,
    channel: String,
    waiters: Arc<Waiters>,
    stop: CancellationToken,
) {
    // Waiters poll while this task does not listen, and also once it has ended, whatever
    // ended it (the store dropped, its runtime gone).
    struct NotListening<'a>(&'a Waiters);
    impl Drop for NotListening<'_> {
        fn drop(&mut self) {
            self.0.set_listening(false);
            self.0.wake_all();
        }
    }
    let _ended = NotListening(&waiters);
    let mut backoff = Duration::from_millis(50);
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            // A lost connection is reported at once (`Ok(None)`), so that the waiters are
            // told and poll, rather than re-made inside `try_recv` while they wait on.
            listener.eager_reconnect(false);
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let listener = tokio::select! {
            _ = stop.cancelled() => return,
            listener = listener => listener,
        };
        match listener {
            Ok(mut listener) => {
                waiters.set_listening(true);
                // A notice may have gone out before this listen began: look again.
                waiters.wake_all();
                backoff = Duration::from_millis(50);
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        next = listener.try_recv() => next,
                    };
                    match next {
                        Ok(Some(notice)) => match parse_key(notice.payload()) {
                            Some(key) => waiters.wake(&key),
                            None => waiters.wake_all(),
                        },
                        // The connection was lost (`None`) or failed: notices may be lost.
                        Ok(None) | Err(_) => break,
                    }
                }
                waiters.set_listening(false);
                waiters.wake_all();
                tracing::warn!(
                    "idempotency store: lost the PostgreSQL notification listener; waiters poll until it is back"
                );
            }
            Err(e) => {
                waiters.set_listening(false);
                tracing::debug!(error = %e, "idempotency store: cannot listen for notices yet");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_keys_in_hex() {
        let key = StorageKey([0xa7; 32]);
        assert_eq!(parse_key(&key.to_hex()), Some(key));
        assert_eq!(parse_key("zz"), None);
        assert_eq!(parse_key(&"g".repeat(64)), None);
    }

    #[tokio::test]
    async fn the_last_waiter_to_leave_removes_the_key() {
        let waiters = Waiters::default();
        let key = StorageKey([1; 32]);
        let a = waiters.register(key);
        let b = waiters.register(key);
        assert!(Arc::ptr_eq(&a.notify, &b.notify));
        drop(a);
        assert_eq!(waiters.by_key.lock().unwrap().len(), 1);
        drop(b);
        assert!(waiters.by_key.lock().unwrap().is_empty());
    }
}
