//! `idempotency-demo`: a small shop on 127.0.0.1:3000 that shows tower-idempotency at work.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use idempotency_demo::{Shop, app};
use tower_idempotency::{IdempotencyLayer, MemoryStore, RedisStore};

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
    /// Where idempotency records live: `memory` (this process only), or a Redis shared by
    /// several instances: `redis://H:P[/DB]`, `rediss://...`, `redis+cluster://H:P[,H:P...]`.
    #[arg(long, env = "IDEMPOTENCY_DEMO_STORE", default_value = "memory")]
    store: String,
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
    let layer = match args.store.as_str() {
        "memory" => IdempotencyLayer::new(
            MemoryStore::builder()
                .with_max_bytes(args.store_max_bytes)
                .with_capacity(usize::try_from(args.store_max_records).unwrap_or(usize::MAX))
                .build(),
        ),
        url if url.starts_with("redis") => match RedisStore::connect(url).await {
            Ok(store) => IdempotencyLayer::new(store),
            Err(e) => {
                eprintln!("idempotency-demo: --store {url}: {e}");
                return ExitCode::from(2);
            }
        },
        other => {
            eprintln!(
                "idempotency-demo: unsupported --store {other:?} (expected `memory` or a redis:// URL)"
            );
            return ExitCode::from(2);
        }
    };
    let layer = layer.with_namespace(args.namespace);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("idempotency-demo: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(2);
        }
    };
    tracing::info!("shop open on http://{}", args.listen);
    let app = app(Shop::new(args.work), layer);
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("idempotency-demo: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
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
