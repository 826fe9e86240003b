//! `idempotency-demo`: a small shop on 127.0.0.1:3000 that shows tower-idempotency at work.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use idempotency_demo::{Shop, app};
use tower_idempotency::store::RedisStore;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

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
        "memory" => IdempotencyLayer::new(MemoryStore::default()),
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
