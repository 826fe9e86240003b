//! An axum app whose idempotency records live in Redis, so that every instance behind a load
//! balancer sees the same keys: a duplicate that reaches another instance waits for the
//! original there, or replays its answer.
//!
//! ```sh
//! redis-server --port 6379 &
//! cargo run -p tower-idempotency --features redis --example axum_redis
//! # or another Redis, a TLS one, or a Cluster:
//! REDIS_URL=redis+cluster://10.0.0.1:7000,10.0.0.2:7000 \
//!     cargo run -p tower-idempotency --features redis --example axum_redis
//! curl -i localhost:3000/payments -H 'Idempotency-Key: "pay-1"' -d 'amount=1200'
//! ```

use std::time::Duration;

use axum::routing::post;
use axum::{Router, http::StatusCode};
use tower_idempotency::{IdempotencyLayer, RedisStore};

/// Charges a card: slow, and never to be done twice for one key.
async fn create_payment(body: String) -> (StatusCode, String) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    (StatusCode::CREATED, format!("charged: {body}\n"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // One connection for commands and one subscriber for waiting duplicates, per process.
    let store = RedisStore::connect(&url).await?;
    let layer = IdempotencyLayer::new(store)
        // Instances of one service share a namespace; other services on the same Redis take
        // their own, so that equal keys sent to two services never meet.
        .with_namespace("payments")
        .with_ttl(Duration::from_secs(24 * 3600));

    let app = Router::new()
        .route("/payments", post(create_payment))
        .layer(layer);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!(
        "listening on http://{}, records in Redis",
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}
