//! Exactly once with PostgreSQL: an order and the message announcing it are written in the
//! request's own transaction, with its idempotency record, so that a crash at any instant
//! leaves all three or none. The message leaves from the outbox afterwards, sent by a relay
//! that marks each row sent, so an e-mail or a call to another company is made once per order
//! too (or, after a crash between the call and the mark, once more: make the receiver
//! idempotent with the row's id as its key).
//!
//! ```sh
//! # a database to play with, for example: docker run -e POSTGRES_HOST_AUTH_METHOD=trust -p 5432:5432 postgres
//! DATABASE_URL=postgres://postgres@127.0.0.1/postgres \
//!     cargo run -p tower-idempotency --features postgres --example axum_postgres_outbox
//! curl -i localhost:3000/orders -H 'Idempotency-Key: "order-1"' -d 'teapot'
//! curl -i localhost:3000/orders -H 'Idempotency-Key: "order-1"' -d 'teapot'   # the same 201, replayed
//! ```

use std::time::Duration;

use axum::routing::post;
use axum::{Router, http::StatusCode};
use sqlx::PgPool;
use tower_idempotency::{IdempotencyLayer, IdempotentTx, PostgresStore};

/// Inserts the order and its message in the request's transaction. The layer writes the
/// response record in the same transaction and commits it before the caller sees the 201.
async fn create_order(
    mut tx: IdempotentTx,
    item: String,
) -> Result<(StatusCode, String), StatusCode> {
    let failed = |_| StatusCode::INTERNAL_SERVER_ERROR;
    let id: i64 = sqlx::query_scalar("INSERT INTO orders (item) VALUES ($1) RETURNING id")
        .bind(&item)
        .fetch_one(&mut *tx)
        .await
        .map_err(failed)?;
    sqlx::query("INSERT INTO outbox (topic, payload) VALUES ('order-placed', $1)")
        .bind(format!(r#"{{"order":{id},"item":{item:?}}}"#))
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
    // A 5xx here would roll both inserts back, and the retry would run on a clean database.
    Ok((StatusCode::CREATED, format!("order {id}\n")))
}

/// Sends what the outbox holds, oldest first, a few at a time. `SKIP LOCKED` lets several
/// relays (one per instance) share the outbox without sending a message twice at once.
async fn relay(pool: PgPool) {
    loop {
        let sent: Result<Vec<(i64, String)>, sqlx::Error> = sqlx::query_as(
            "UPDATE outbox SET sent_at = now() WHERE id IN ( \
                SELECT id FROM outbox WHERE sent_at IS NULL ORDER BY id \
                LIMIT 10 FOR UPDATE SKIP LOCKED \
             ) RETURNING id, payload",
        )
        .fetch_all(&pool)
        .await;
        match sent {
            // Here the message would be sent; printing stands in for it.
            Ok(rows) => rows
                .iter()
                .for_each(|(id, payload)| println!("outbox {id}: {payload}")),
            Err(e) => eprintln!("outbox relay: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1/postgres".into());
    let pool = PgPool::connect(&url).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS orders (id bigserial PRIMARY KEY, item text NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS outbox (id bigserial PRIMARY KEY, topic text NOT NULL, \
         payload text NOT NULL, sent_at timestamptz)",
    )
    .execute(&pool)
    .await?;
    // The store shares the application's pool; its table is created once.
    let store = PostgresStore::from_pool(pool.clone());
    store.migrate().await?;
    tokio::spawn(relay(pool));

    let app = Router::new()
        .route("/orders", post(create_order))
        .layer(IdempotencyLayer::new(store));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(listener, app).await?;
    Ok(())
}
