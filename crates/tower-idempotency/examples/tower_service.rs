//! The layer around a plain tower service, without axum: any `Service<http::Request<B>>`
//! whose bodies carry `Bytes` can sit behind it (a hyper server, tonic's HTTP services, a
//! client-side stack). Here the requests are sent in-process with `ServiceExt::oneshot`.
//!
//! ```sh
//! cargo run -p tower-idempotency --example tower_service
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::{IdempotencyBody, IdempotencyLayer, MemoryStore};

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    // The inner service gets the request body as an `IdempotencyBody`: buffered when the
    // request is tracked, streamed otherwise.
    let transfer = tower::service_fn(move |req: Request<IdempotencyBody<Full<Bytes>>>| {
        let run = counted.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let amount = req.into_body().collect().await?.to_bytes();
            let body = format!("transfer #{run} of {}", String::from_utf8_lossy(&amount));
            let res = Response::builder()
                .status(StatusCode::CREATED)
                .body(Full::new(Bytes::from(body)))?;
            Ok::<_, tower::BoxError>(res)
        }
    });
    let service = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .service(transfer);

    for attempt in 1..=3 {
        let req = Request::post("/transfers")
            .header("idempotency-key", "\"transfer-7\"")
            .body(Full::new(Bytes::from_static(b"100 EUR")))?;
        let res = service.clone().oneshot(req).await?;
        let replayed = res.headers().contains_key("idempotent-replayed");
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        println!(
            "attempt {attempt}: {status} {:?}{}",
            String::from_utf8_lossy(&body),
            if replayed { " (replayed)" } else { "" }
        );
    }
    println!("the transfer ran {} time(s)", runs.load(Ordering::SeqCst));
    Ok(())
}
