//! The connections that carry commands, to one Redis server or to every node of a Redis
//! Cluster, and how they retry when Redis goes away.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Client, ConnectionInfo, FromRedisValue, RedisResult, Script};

use super::error::unavailable;
use super::url::Target;
use crate::store::StoreError;

/// Connections (to each node) for writes followed by a `WAIT`, taken in turn. More let more
/// writes wait for their acknowledgements at once; in the benchmark 8 did no better than 4.
const ACKED_CONNECTIONS: usize = 4;

/// One auto-reconnecting multiplexed connection: a [`ConnectionManager`] to one server, or a
/// cluster connection that holds one connection per node and routes each command by its key.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    pub(super) async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self {
            Connection::Single(c) => cmd.query_async(&mut c.clone()).await,
            Connection::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    pub(super) async fn pipeline<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> RedisResult<T> {
        match self {
            Connection::Single(c) => pipe.query_async(&mut c.clone()).await,
            Connection::Cluster(c) => pipe.query_async(&mut c.clone()).await,
        }
    }

    pub(super) async fn load(&self, script: &Script) -> RedisResult<String> {
        match self {
            Connection::Single(c) => script.load_async(&mut c.clone()).await,
            Connection::Cluster(c) => script.load_async(&mut c.clone()).await,
        }
    }
}

/// How many replicas must acknowledge a lease or a record, and for how long a write waits.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReplicaAcks {
    pub(super) replicas: u32,
    pub(super) timeout: Duration,
}

/// The connections for acknowledged writes. A `WAIT` holds back the commands behind it on its
/// connection until the replicas answer, so writes are spread over several connections: Redis
/// waits for the acknowledgements of all of them at once.
pub(super) struct AckedConnections {
    connections: Vec<Connection>,
    next: AtomicUsize,
    pub(super) acks: ReplicaAcks,
}

impl AckedConnections {
    /// The next connection in turn.
    pub(super) fn next(&self) -> &Connection {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        &self.connections[i]
    }
}

/// The command connections to `target`: one that carries every verb, and with `acks` the
/// [`AckedConnections`] for the writes followed by a `WAIT`.
pub(super) async fn open(
    target: &Target,
    timeout: Duration,
    acks: Option<ReplicaAcks>,
) -> Result<(Connection, Option<AckedConnections>), StoreError> {
    // Without replica acks there are no acknowledged writes, and no connections for them.
    let acked_count = if acks.is_some() { ACKED_CONNECTIONS } else { 0 };
    let (connection, acked) = match target {
        Target::Single(info) => {
            let client = Client::open((**info).clone()).map_err(unavailable)?;
            let connection =
                ConnectionManager::new_with_config(client.clone(), manager_config(timeout))
                    .await
                    .map_err(unavailable)?;
            let acked = futures_util::future::try_join_all((0..acked_count).map(|_| {
                ConnectionManager::new_with_config(client.clone(), manager_config(timeout))
            }))
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(Connection::Single)
            .collect();
            (Connection::Single(connection), acked)
        }
        Target::Cluster(nodes) => {
            let client = cluster_builder(nodes.clone(), timeout)
                .build()
                .map_err(unavailable)?;
            let connection = client.get_async_connection().await.map_err(unavailable)?;
            let acked = futures_util::future::try_join_all(
                (0..acked_count).map(|_| client.get_async_connection()),
            )
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(Connection::Cluster)
            .collect();
            (Connection::Cluster(connection), acked)
        }
    };
    let acked = acks.map(|acks| AckedConnections {
        connections: acked,
        next: AtomicUsize::new(0),
        acks,
    });
    Ok((connection, acked))
}

/// The retry policy of a connection to one server.
pub(super) fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    // Few, quick reconnection attempts: a request waits at most a few steps for Redis, then
    // gets a 503; the next request tries again.
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

/// A cluster client with the store's retry policy.
pub(super) fn cluster_builder(
    nodes: Vec<ConnectionInfo>,
    timeout: Duration,
) -> ClusterClientBuilder {
    // A command that meets a failover (a node gone, MOVED, CLUSTERDOWN while a replica is
    // promoted) is tried again after a short pause that doubles: up to about 100, 200 and 400
    // ms, within one step's timeout. The client's own default first pause is 1.28 s, which
    // would spend most of a step asleep. What outlasts the step is the layer's business: the
    // step fails as unavailable (503), and a failed completion is tried again in the background.
    ClusterClientBuilder::new(nodes)
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(500)
        .retry_wait_formula(100, 2)
}
