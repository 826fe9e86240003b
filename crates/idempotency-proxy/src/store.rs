//! Opening the store named by `--store`, and checking that it answers.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tower_idempotency::{MemoryStore, PostgresStore, RedisStore, Store};

use crate::cli::{StoreArgs, StoreSpec};

/// Gauges of what the memory store holds, set at each scrape of `/metrics`.
const MEMORY_STORE_BYTES: &str = "idempotency_memory_store_bytes";
const MEMORY_STORE_MAX_BYTES: &str = "idempotency_memory_store_max_bytes";
const MEMORY_STORE_RECORDS: &str = "idempotency_memory_store_records";
const MEMORY_STORE_MAX_RECORDS: &str = "idempotency_memory_store_max_records";

/// The memory store, when `--store memory` opened one, for its gauges.
static MEMORY: OnceLock<MemoryStore> = OnceLock::new();

/// How long the start-up check and `/healthz` wait for the store.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// How long start-up waits to connect to a Redis store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the store and checks that it answers. The error is one line for the operator, and
/// never shows a password.
pub(crate) async fn open(args: &StoreArgs) -> Result<Arc<dyn Store>, String> {
    open_with(args, true).await
}

/// The store as [`open`] opens it, but without creating a missing PostgreSQL table: for the
/// `keys` commands, which may run as a role that cannot.
pub(crate) async fn open_existing(args: &StoreArgs) -> Result<Arc<dyn Store>, String> {
    open_with(args, false).await
}

async fn open_with(args: &StoreArgs, migrate: bool) -> Result<Arc<dyn Store>, String> {
    let spec = &args.spec;
    let store: Arc<dyn Store> = match spec {
        StoreSpec::Memory if args.redis_replica_acks > 0 => {
            return Err("--redis-replica-acks needs a Redis store (--store redis://...)".into());
        }
        StoreSpec::Memory => Arc::new(memory(args)),
        StoreSpec::Postgres(_) if args.redis_replica_acks > 0 => {
            return Err(format!(
                "--redis-replica-acks needs a Redis store; PostgreSQL's own replication \
                 settles that (--store {spec})"
            ));
        }
        StoreSpec::Redis(_) | StoreSpec::Postgres(_)
            if args.store_max_bytes.is_some() || args.store_max_records.is_some() =>
        {
            let flag = match args.store_max_bytes {
                Some(_) => "--store-max-bytes",
                None => "--store-max-records",
            };
            let bound = match spec {
                StoreSpec::Postgres(_) => "a PostgreSQL store sweeps its expired records",
                _ => "a Redis store is bounded by its own maxmemory",
            };
            return Err(format!(
                "{flag} bounds the memory store; {bound} (--store {spec})"
            ));
        }
        StoreSpec::Postgres(url) => Arc::new(postgres(url, spec, migrate).await?),
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

/// A PostgreSQL store on its own pool, its table created when missing. Not transactional: the
/// upstream's writes are in its own database, out of the proxy's reach, so the promise is the
/// Redis store's (exactly once while the records last), with records that survive restarts.
async fn postgres(url: &str, spec: &StoreSpec, migrate: bool) -> Result<PostgresStore, String> {
    let opening = async {
        let store = PostgresStore::connect(url).await?;
        if migrate {
            store.migrate().await?;
        }
        Ok::<_, tower_idempotency::StoreError>(store)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, opening).await {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(e)) => Err(format!("--store {spec}: cannot connect: {}", one_line(&e))),
        Err(_) => Err(format!(
            "--store {spec}: cannot connect: no answer within {}",
            humantime::format_duration(CONNECT_TIMEOUT)
        )),
    }
}

/// The memory store, bounded by `--store-max-bytes` and `--store-max-records`.
fn memory(args: &StoreArgs) -> MemoryStore {
    let mut builder = MemoryStore::builder();
    if let Some(max_bytes) = args.store_max_bytes {
        builder = builder.with_max_bytes(max_bytes);
    }
    if let Some(max_records) = args.store_max_records {
        builder = builder.with_capacity(usize::try_from(max_records).unwrap_or(usize::MAX));
    }
    let store = builder.build();
    if MEMORY.set(store.clone()).is_ok() {
        metrics::describe_gauge!(
            MEMORY_STORE_BYTES,
            metrics::Unit::Bytes,
            "Bytes the memory store counts for what it holds: responses, headers and per-key overhead."
        );
        metrics::describe_gauge!(
            MEMORY_STORE_MAX_BYTES,
            metrics::Unit::Bytes,
            "The memory store's bound on bytes (--store-max-bytes)."
        );
        metrics::describe_gauge!(
            MEMORY_STORE_RECORDS,
            "Records the memory store holds: stored responses and requests in flight."
        );
        metrics::describe_gauge!(
            MEMORY_STORE_MAX_RECORDS,
            "The memory store's bound on records (--store-max-records)."
        );
    }
    store
}

/// Sets the memory store's gauges to what it holds now; nothing for a Redis store.
pub(crate) fn record_gauges() {
    if let Some(store) = MEMORY.get() {
        let stats = store.stats();
        metrics::gauge!(MEMORY_STORE_BYTES).set(stats.bytes as f64);
        metrics::gauge!(MEMORY_STORE_MAX_BYTES).set(stats.max_bytes as f64);
        metrics::gauge!(MEMORY_STORE_RECORDS).set(stats.len as f64);
        metrics::gauge!(MEMORY_STORE_MAX_RECORDS).set(stats.capacity as f64);
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    use super::*;
    use crate::cli::Args;

    fn store_args(flags: &[&str]) -> StoreArgs {
        Args::with_upstream(flags).unwrap().store
    }

    #[test]
    fn the_memory_store_takes_its_bounds_from_the_flags() {
        let stats = memory(&store_args(&[])).stats();
        assert_eq!((stats.max_bytes, stats.capacity), (256 << 20, 100_000));
        let bounded = store_args(&["--store-max-bytes", "2MiB", "--store-max-records", "500"]);
        let stats = memory(&bounded).stats();
        assert_eq!((stats.max_bytes, stats.capacity), (2 << 20, 500));
    }

    #[tokio::test]
    async fn flags_for_the_other_kind_of_store_are_refused() {
        let acks = store_args(&["--redis-replica-acks", "1"]);
        let e = open(&acks).await.err().unwrap();
        assert!(
            e.contains("--redis-replica-acks needs a Redis store"),
            "{e}"
        );
        for flag in ["--store-max-bytes", "--store-max-records"] {
            let args = store_args(&["--store", "redis://127.0.0.1:1", flag, "10"]);
            let e = open(&args).await.err().unwrap();
            assert!(e.starts_with(flag), "{e}");
            assert!(e.contains("maxmemory"), "{e}");
        }
    }
}
