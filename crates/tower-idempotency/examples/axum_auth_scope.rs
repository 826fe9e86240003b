//! A scope from an authentication layer: records belong to the user the authentication
//! middleware found, so that one user can never replay another's response by sending the same
//! key and body.
//!
//! ```sh
//! cargo run -p tower-idempotency --example axum_auth_scope
//! curl -i localhost:3000/orders -X POST -H 'x-api-key: alice-secret' -H 'Idempotency-Key: k1'
//! curl -i localhost:3000/orders -X POST -H 'x-api-key: bob-secret' -H 'Idempotency-Key: k1'
//! ```
//!
//! Bob's request runs anew: the same key in another scope is another record.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Scope};

/// Who the caller is, as the authentication middleware puts it in the request's extensions.
#[derive(Clone, Debug)]
struct UserId(u64);

/// Checks the credentials: a known API key becomes a [`UserId`]; anything else is a 401, and
/// the request goes no further.
async fn authenticate(mut req: Request, next: Next) -> Result<Response, StatusCode> {
    let user = match req.headers().get("x-api-key").map(|v| v.as_bytes()) {
        Some(b"alice-secret") => UserId(1),
        Some(b"bob-secret") => UserId(2),
        _ => return Err(StatusCode::UNAUTHORIZED),
    };
    req.extensions_mut().insert(user);
    Ok(next.run(req).await)
}

/// The scope of a request: its user. A request without one is `Unknown`, which the layer
/// refuses (500 `scope-unavailable`) rather than put it in the global scope shared by all.
fn user_scope(parts: &Parts) -> Scope {
    parts
        .extensions
        .get::<UserId>()
        .map_or(Scope::Unknown, |user| Scope::caller(user.0.to_be_bytes()))
}

async fn create_order(Extension(user): Extension<UserId>) -> String {
    format!("order placed for user {}\n", user.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let idempotency = IdempotencyLayer::new(MemoryStore::default()).with_scope(user_scope);

    // Each `.layer` wraps everything added before it, so the layer added last sees the request
    // first. Authentication must run first, to put the user where the scope extractor reads
    // it: add the idempotency layer, then the authentication layer. The other way round, the
    // idempotency layer would run before any user is known and refuse every keyed request.
    let app = Router::new()
        .route("/orders", post(create_order))
        .layer(idempotency) // runs second: the user is known
        .layer(middleware::from_fn(authenticate)); // runs first

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
