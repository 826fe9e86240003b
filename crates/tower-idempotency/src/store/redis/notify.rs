//! Notices for waiters: one subscriber connection per store, every waiter of every key
//! multiplexed over it, and the re-checks that keep a lost or moved subscription from losing a
//! notice.
//!
//! The first waiter on a channel subscribes to it, later ones share the subscription, and the
//! last one to leave unsubscribes. Pushes from Redis reach the waiters through a [`Registry`]
//! of the channels someone waits on. Whenever a subscription may have been lost, moved or made
//! again by the client library, the waiters concerned are woken to look at the record again,
//! and for [`SETTLE`] afterwards they also poll.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, ProtocolVersion, PushInfo, PushKind, RedisResult, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::connection::{cluster_builder, manager_config};
use super::error::unavailable;
use super::url::Target;
use crate::store::StoreError;

/// How long after subscriptions were lost, moved or re-made waiters also poll.
const SETTLE: Duration = Duration::from_secs(10);
/// Waiters wake this long after the lease's expiry, so that Redis has expired it by then.
pub(super) const EXPIRY_SLACK: Duration = Duration::from_millis(2);

/// The subscriber connection, not yet running, and the registry its pushes go to.
pub(super) struct Subscriber {
    connection: SubscriberConnection,
    registry: Arc<Registry>,
}

impl Subscriber {
    /// A subscriber connection to `target`, speaking RESP3 so that notices arrive as pushes.
    /// Nothing is connected yet: the connection opens the first time a request has to wait.
    pub(super) fn new(target: Target, timeout: Duration) -> Result<Self, StoreError> {
        let registry = Arc::new(Registry::default());
        let pushes = registry.clone();
        let on_push = move |push: PushInfo| {
            pushes.on_push(push);
            Ok::<(), std::convert::Infallible>(())
        };
        let connection = match target {
            Target::Single(info) => {
                let info = *info;
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                let client =
                    Client::open(info.set_redis_settings(settings)).map_err(unavailable)?;
                let connection = ConnectionManager::new_lazy_with_config(
                    client,
                    manager_config(timeout).set_push_sender(on_push),
                )
                .map_err(unavailable)?;
                SubscriberConnection::Single(connection)
            }
            Target::Cluster(nodes) => {
                let client = cluster_builder(nodes, timeout)
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(on_push)
                    .build()
                    .map_err(unavailable)?;
                SubscriberConnection::Cluster {
                    client: Box::new(client),
                    connection: None,
                }
            }
        };
        Ok(Self {
            connection,
            registry,
        })
    }

    /// Hands the connection to a task of its own, which subscribes and unsubscribes as the
    /// waiters come and go; each step is bounded by `timeout`.
    pub(super) fn start(self, timeout: Duration) -> Notices {
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_subscriber(
            self.connection,
            rx,
            self.registry.clone(),
            timeout,
        ));
        Notices {
            registry: self.registry,
            requests,
            timeout,
        }
    }
}

/// The waiters' side of the running subscriber.
pub(super) struct Notices {
    registry: Arc<Registry>,
    requests: mpsc::UnboundedSender<Request>,
    timeout: Duration,
}

impl Notices {
    /// Registers a waiter on `channel`: any notice from now on reaches it.
    pub(super) fn register(&self, channel: &[u8]) -> Waiter {
        self.registry.register(channel, &self.requests)
    }

    /// Asks the subscriber for `channel` and waits for its answer: whether the channel is
    /// subscribed.
    pub(super) async fn subscribe(&self, channel: Vec<u8>, deadline: Instant) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(Request::Subscribe(channel, tx)).is_err() {
            return false;
        }
        let until = deadline.min(Instant::now() + self.timeout);
        matches!(tokio::time::timeout_at(until, rx).await, Ok(Ok(true)))
    }

    /// Whether subscriptions were lost, moved or re-made in the last [`SETTLE`], so that a
    /// waiter should not trust its subscription alone.
    pub(super) fn unsettled(&self) -> bool {
        self.registry.unsettled()
    }
}

/// What waiters on one channel have been told.
#[derive(Clone, Copy, Default)]
struct Signal {
    /// Completions, releases and lost subscriptions seen: any change wakes the waiters.
    changes: u64,
    /// The lease's expiry as of its last announced renewal.
    lease_until: Option<Instant>,
}

/// The waiters on one channel.
struct ChannelWaiters {
    tx: watch::Sender<Signal>,
    count: usize,
}

/// The channels someone waits on, shared by the waiters and the push handler.
#[derive(Default)]
struct Registry {
    channels: Mutex<HashMap<Vec<u8>, ChannelWaiters>>,
    /// Bumped whenever subscriptions may have been lost, so the subscriber re-subscribes.
    epoch: AtomicU64,
    /// Confirmations still to come of subscriptions the subscriber asked for itself; any other
    /// confirmation is a subscription re-made by the client library (after a reconnection or a
    /// change of topology).
    expected: Mutex<HashMap<Vec<u8>, usize>>,
    /// Until when waiters also poll: for a while after subscriptions were lost, moved or re-made.
    unsettled_until: Mutex<Option<Instant>>,
}

impl Registry {
    fn channels(&self) -> MutexGuard<'_, HashMap<Vec<u8>, ChannelWaiters>> {
        // Every critical section leaves the map consistent, so a poisoned lock is still usable.
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The subscriber is about to subscribe to `channel`: its confirmation is not news.
    fn expect_confirmation(&self, channel: &[u8]) {
        let mut expected = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        *expected.entry(channel.to_vec()).or_default() += 1;
    }

    /// Whether a confirmation of `channel` was expected (and is now no longer).
    fn take_expected_confirmation(&self, channel: &[u8]) -> bool {
        let mut expected = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = expected.get_mut(channel) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            expected.remove(channel);
        }
        true
    }

    /// Subscriptions were lost, moved or re-made: for [`SETTLE`], waiters do not trust their
    /// subscription alone. A notice published while a subscription moves (on a new master that
    /// does not know yet that the old one is now its replica, say) may reach nobody.
    fn unsettle(&self) {
        let mut until = self
            .unsettled_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *until = Some(Instant::now() + SETTLE);
    }

    fn unsettled(&self) -> bool {
        let until = self
            .unsettled_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|until| Instant::now() < until)
    }

    /// Wakes every waiter on `channel`: they look at the record again.
    fn wake(&self, channel: &[u8]) -> bool {
        match self.channels().get(channel) {
            Some(waiters) => {
                waiters.tx.send_modify(|signal| signal.changes += 1);
                true
            }
            None => false,
        }
    }

    fn register(
        self: &Arc<Self>,
        channel: &[u8],
        requests: &mpsc::UnboundedSender<Request>,
    ) -> Waiter {
        let mut channels = self.channels();
        let waiters = channels
            .entry(channel.to_vec())
            .or_insert_with(|| ChannelWaiters {
                tx: watch::Sender::new(Signal::default()),
                count: 0,
            });
        waiters.count += 1;
        let rx = waiters.tx.subscribe();
        let base = rx.borrow().changes;
        Waiter {
            registry: self.clone(),
            requests: requests.clone(),
            channel: channel.to_vec(),
            rx,
            base,
        }
    }

    /// Called by the subscriber connection for every push; must not block.
    fn on_push(&self, push: PushInfo) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                    (data.next(), data.next())
                else {
                    return;
                };
                let now = Instant::now();
                if let Some(waiters) = self.channels().get(&channel) {
                    waiters
                        .tx
                        .send_modify(|signal| match payload.split_first() {
                            Some((b'n', ms)) => {
                                if let Some(ms) = std::str::from_utf8(ms)
                                    .ok()
                                    .and_then(|ms| ms.parse::<u64>().ok())
                                {
                                    signal.lease_until = Some(now + Duration::from_millis(ms));
                                }
                            }
                            _ => signal.changes += 1,
                        });
                }
            }
            PushKind::Subscribe | PushKind::SSubscribe => {
                // Ours, or one the client library made again by itself after a reconnection or
                // a change of topology (on the node that now serves the slot). A notice may have
                // been published while there was none: wake the waiters to look again.
                let Some(Value::BulkString(channel)) = push.data.into_iter().next() else {
                    return;
                };
                if !self.take_expected_confirmation(&channel) && self.wake(&channel) {
                    self.unsettle();
                }
            }
            PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                // Ours (the last waiter left) or the server's (a slot moved: failover,
                // migration). If someone still waits on the channel, its subscription is gone:
                // wake them and re-subscribe.
                let Some(Value::BulkString(channel)) = push.data.into_iter().next() else {
                    return;
                };
                if self.wake(&channel) {
                    self.epoch.fetch_add(1, Ordering::SeqCst);
                    self.unsettle();
                }
            }
            PushKind::Disconnection => {
                // Every subscription on that connection is gone: wake every waiter (they look
                // again and re-subscribe) and make the subscriber forget what it had.
                self.epoch.fetch_add(1, Ordering::SeqCst);
                self.unsettle();
                for waiters in self.channels().values() {
                    waiters.tx.send_modify(|signal| signal.changes += 1);
                }
            }
            _ => {}
        }
    }
}

/// One waiter's interest in a channel; the last one to go unsubscribes.
pub(super) struct Waiter {
    registry: Arc<Registry>,
    requests: mpsc::UnboundedSender<Request>,
    channel: Vec<u8>,
    rx: watch::Receiver<Signal>,
    /// The channel's count of changes when this waiter registered.
    base: u64,
}

impl Waiter {
    /// Returns when the record may have changed (a notice, or a subscription lost), at
    /// `deadline`, at the lease's expiry `lease_until` (pushed back by each announced renewal),
    /// or at `poll`, whichever comes first.
    pub(super) async fn changed(
        &mut self,
        deadline: Instant,
        mut lease_until: Instant,
        poll: Option<Instant>,
    ) {
        loop {
            let until = deadline.min(lease_until);
            let until = poll.map_or(until, |poll| until.min(poll));
            match tokio::time::timeout_at(until, self.rx.changed()).await {
                // The deadline, or the lease's expiry: the caller looks again.
                Err(_) | Ok(Err(_)) => return,
                Ok(Ok(())) => {
                    let signal = *self.rx.borrow_and_update();
                    if signal.changes != self.base {
                        return;
                    }
                    // A renewal: keep waiting until the new expiry.
                    if let Some(until) = signal.lease_until {
                        lease_until = lease_until.max(until + EXPIRY_SLACK);
                    }
                }
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut channels = self.registry.channels();
        let Some(waiters) = channels.get_mut(&self.channel) else {
            return;
        };
        waiters.count = waiters.count.saturating_sub(1);
        if waiters.count == 0 {
            channels.remove(&self.channel);
            // Sent under the lock, so it is queued before any later waiter's subscription.
            let _ = self
                .requests
                .send(Request::Unsubscribe(std::mem::take(&mut self.channel)));
        }
    }
}

/// What waiters ask of the subscriber task.
enum Request {
    /// Make sure the channel is subscribed; answers whether it is.
    Subscribe(Vec<u8>, oneshot::Sender<bool>),
    /// Nobody waits on the channel any more.
    Unsubscribe(Vec<u8>),
}

/// The subscriber connection.
enum SubscriberConnection {
    Single(ConnectionManager),
    /// Connected on first use.
    Cluster {
        client: Box<ClusterClient>,
        connection: Option<ClusterConnection>,
    },
}

impl SubscriberConnection {
    async fn subscribe(&mut self, channel: &[u8]) -> RedisResult<()> {
        match self {
            SubscriberConnection::Single(c) => c.subscribe(channel).await,
            SubscriberConnection::Cluster { client, connection } => {
                let connection = match connection {
                    Some(connection) => connection,
                    None => connection.insert(client.get_async_connection().await?),
                };
                connection.ssubscribe(channel).await
            }
        }
    }

    async fn unsubscribe(&mut self, channel: &[u8]) -> RedisResult<()> {
        match self {
            SubscriberConnection::Single(c) => c.unsubscribe(channel).await,
            SubscriberConnection::Cluster { connection, .. } => match connection {
                Some(connection) => connection.sunsubscribe(channel).await,
                None => Ok(()),
            },
        }
    }
}

/// Owns the subscriber connection and applies subscription changes one at a time, in the
/// order they were asked for, so an unsubscribe never overtakes a later subscribe.
async fn run_subscriber(
    mut connection: SubscriberConnection,
    mut requests: mpsc::UnboundedReceiver<Request>,
    registry: Arc<Registry>,
    timeout: Duration,
) {
    let mut subscribed: HashSet<Vec<u8>> = HashSet::new();
    let mut epoch = registry.epoch.load(Ordering::SeqCst);
    while let Some(request) = requests.recv().await {
        let now = registry.epoch.load(Ordering::SeqCst);
        if now != epoch {
            subscribed.clear();
            epoch = now;
        }
        match request {
            Request::Subscribe(channel, reply) => {
                if reply.is_closed() {
                    continue;
                }
                let ok = subscribed.contains(&channel) || {
                    registry.expect_confirmation(&channel);
                    match tokio::time::timeout(timeout, connection.subscribe(&channel)).await {
                        Ok(Ok(())) => {
                            subscribed.insert(channel);
                            true
                        }
                        Ok(Err(e)) => {
                            // Refused: no confirmation will come.
                            registry.take_expected_confirmation(&channel);
                            tracing::debug!(error = %e, "could not subscribe; waiters poll");
                            false
                        }
                        Err(_) => {
                            tracing::debug!("subscribing timed out; waiters poll");
                            false
                        }
                    }
                };
                let _ = reply.send(ok);
            }
            Request::Unsubscribe(channel) => {
                if registry.channels().contains_key(&channel) {
                    // Someone started waiting again meanwhile.
                    continue;
                }
                if subscribed.remove(&channel) {
                    let _ = tokio::time::timeout(timeout, connection.unsubscribe(&channel)).await;
                }
            }
        }
    }
}
