//! The smallest axum app with idempotency keys: an in-memory store, one endpoint.
//!
//! ```sh
//! cargo run -p tower-idempotency --example axum_minimal
//! curl -i localhost:3000/orders -X POST -H 'Idempotency-Key: "order-1"'   # runs the handler
//! curl -i localhost:3000/orders -X POST -H 'Idempotency-Key: "order-1"'   # replays its answer
//! ```
//!
//! The second request gets the first one's status, headers and body, with
//! `Idempotent-Replayed: true`, and the counter does not move.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// Places an order: each run takes the next number.
async fn create_order(State(next): State<Arc<AtomicU64>>) -> Json<serde_json::Value> {
    let id = next.fetch_add(1, Ordering::SeqCst) + 1;
    Json(serde_json::json!({ "order": id }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = Router::new()
        .route("/orders", post(create_order))
        // POST, PUT, PATCH and DELETE with a key run once; other requests pass through.
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .with_state(Arc::new(AtomicU64::new(0)));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
