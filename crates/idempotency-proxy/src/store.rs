//! Opening the store named by `--store`, and checking that it answers.

use std::sync::Arc;
use std::time::Duration;

use tower_idempotency::store::RedisStore;
use tower_idempotency::{MemoryStore, Store};

use crate::cli::{StoreArgs, StoreSpec};

/// How long the start-up check and `/healthz` wait for the store.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// How long start-up waits to connect to a Redis store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the store and checks that it answers. The error is one line for the operator, and
/// never shows a password.
pub(crate) async fn open(args: &StoreArgs) -> Result<Arc<dyn Store>, String> {
    let spec = &args.spec;
    let store: Arc<dyn Store> = match spec {
        StoreSpec::Memory if args.redis_replica_acks > 0 => {
            return Err("--redis-replica-acks needs a Redis store (--store redis://...)".into());
        }
        StoreSpec::Memory => Arc::new(MemoryStore::default()),
        StoreSpec::Redis(url) => {
            let connect = RedisStore::builder(url.as_str())
                .with_replica_acks(args.redis_replica_acks)
                .connect();
            match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(store)) => Arc::new(store),
                Ok(Err(e)) => {
                    return Err(format!("--store {spec}: cannot connect: {}", one_line(&e)));
                }
                Err(_) => {
                    return Err(format!(
                        "--store {spec}: cannot connect: no answer within {}",
                        humantime::format_duration(CONNECT_TIMEOUT)
                    ));
                }
            }
        }
    };
    ping(&*store)
        .await
        .map_err(|e| format!("--store {spec}: the store does not answer: {e}"))?;
    Ok(store)
}

/// Whether the store answers within [`PING_TIMEOUT`].
pub(crate) async fn ping(store: &dyn Store) -> Result<(), String> {
    match tokio::time::timeout(PING_TIMEOUT, store.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(one_line(&e)),
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(PING_TIMEOUT)
        )),
    }
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
