//! `idempotency-demo`: a small shop on 127.0.0.1:3000 that shows tower-idempotency at work.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use idempotency_demo::{Shop, app};
use tower_idempotency::{IdempotencyLayer, MemoryStore, PostgresStore, RedisStore};

/// A small shop whose orders are placed exactly once, however often a form is submitted.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        env = "IDEMPOTENCY_DEMO_LISTEN",
        default_value = "127.0.0.1:3000"
    )]
    listen: SocketAddr,
    /// Where idempotency records live: `memory` (this process only), a Redis shared by
    /// several instances (`redis://H:P[/DB]`, `rediss://...`, `redis+cluster://H:P[,H:P...]`),
    /// or PostgreSQL (`postgres://USER@H:P/DB`), where the orders live too, each inserted in its
    /// request's transaction and committed with its idempotency record: exactly once, crash or
    /// not, and the orders survive restarts.
    #[arg(long, env = "IDEMPOTENCY_DEMO_STORE", default_value = "memory")]
    store: String,
    /// Where the orders live, when not with the records: `memory` (the default, gone when the
    /// shop stops) or `postgres://...`. With `--store redis://...` and orders in PostgreSQL,
    /// each order commits by itself before its record reaches Redis, so a crash between the
    /// two makes the retry order again: the at-least-once that transactional mode removes.
    #[arg(long, env = "IDEMPOTENCY_DEMO_ORDERS")]
    orders: Option<String>,
    /// The most bytes the memory store holds: stored responses with their headers, and a few
    /// hundred bytes for each key; the oldest stored responses make room. Bytes, or with `KiB`,
    /// `MiB` or `GiB`. For `--store memory` only.
    #[arg(
        long,
        env = "IDEMPOTENCY_DEMO_STORE_MAX_BYTES",
        value_name = "BYTES",
        default_value = "256MiB",
        value_parser = parse_size
    )]
    store_max_bytes: usize,
    /// The most records the memory store holds, stored responses and requests in flight. For
    /// `--store memory` only.
    #[arg(
        long,
        env = "IDEMPOTENCY_DEMO_STORE_MAX_RECORDS",
        value_name = "N",
        default_value_t = 100_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    store_max_records: u64,
    /// A namespace for this shop's idempotency records. Shops (or other services) that share a
    /// Redis need one each, or the same key sent to two of them runs on one only and the other
    /// replays its answer; instances of one shop share theirs. Empty by default.
    #[arg(long, env = "IDEMPOTENCY_DEMO_NAMESPACE", default_value = "")]
    namespace: String,
    /// How long a request's hold on its key lasts without renewal: after a crash, a retry runs
    /// again once it has passed.
    #[arg(long, env = "IDEMPOTENCY_DEMO_LOCK_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    lock_ttl: Duration,
    /// How long placing an order takes, to make overlapping duplicates easy to see.
    #[arg(long, env = "IDEMPOTENCY_DEMO_WORK", default_value = "200ms", value_parser = humantime::parse_duration)]
    work: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_idempotency=info".into()),
        )
        .init();
    let args = Args::parse();
    let (layer, shop) = match open(&args).await {
        Ok(opened) => opened,
        Err(why) => {
            eprintln!("idempotency-demo: {why}");
            return ExitCode::from(2);
        }
    };
    let layer = layer
        .with_namespace(args.namespace)
        .with_lock_ttl(args.lock_ttl);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("idempotency-demo: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(2);
        }
    };
    tracing::info!("shop open on http://{}", args.listen);
    let app = app(shop, layer);
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("idempotency-demo: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The layer on the store `--store` names, and the shop with its orders where `--orders` (or
/// a PostgreSQL store) says.
async fn open(args: &Args) -> Result<(IdempotencyLayer, Shop), String> {
    let pool = |url: &str| {
        let url = url.to_owned();
        async move {
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(32)
                .acquire_timeout(Duration::from_secs(5))
                .connect(&url)
                .await
                .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))
        }
    };
    let store = args.store.as_str();
    if store.starts_with("postgres") {
        if args.orders.is_some() {
            return Err("--orders: with --store postgres://... the orders live in the same database, in the request's transaction".into());
        }
        let pool = pool(store).await?;
        let records = PostgresStore::from_pool(pool.clone());
        records
            .migrate()
            .await
            .map_err(|e| format!("--store: {e}"))?;
        let shop = Shop::on_postgres(pool, true, args.work).await?;
        return Ok((IdempotencyLayer::new(records), shop));
    }
    let layer = match store {
        "memory" => IdempotencyLayer::new(
            MemoryStore::builder()
                .with_max_bytes(args.store_max_bytes)
                .with_capacity(usize::try_from(args.store_max_records).unwrap_or(usize::MAX))
                .build(),
        ),
        url if url.starts_with("redis") => IdempotencyLayer::new(
            RedisStore::connect(url)
                .await
                .map_err(|e| format!("--store {url}: {e}"))?,
        ),
        other => {
            return Err(format!(
                "unsupported --store {other:?} (expected `memory`, a redis:// or a postgres:// URL)"
            ));
        }
    };
    let shop = match args.orders.as_deref() {
        None | Some("memory") => Shop::new(args.work),
        Some(url) if url.starts_with("postgres") => {
            Shop::on_postgres(pool(url).await?, false, args.work).await?
        }
        Some(other) => {
            return Err(format!(
                "unsupported --orders {other:?} (expected `memory` or a postgres:// URL)"
            ));
        }
    };
    Ok((layer, shop))
}

/// A size in bytes above zero: `1048576`, `512KiB`, `256MiB`, `1GiB`.
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| "expected a number of bytes, such as 65536, 512KiB or 256MiB".to_owned())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown size unit `{}`; use KiB, MiB or GiB",
                unit.trim()
            ));
        }
    };
    match n.checked_mul(factor).map(usize::try_from) {
        Some(Ok(0)) => Err("must be more than zero".into()),
        Some(Ok(n)) => Ok(n),
        _ => Err("size too large".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("256 MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        for bad in ["", "0", "MiB", "1MB", "-1", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
