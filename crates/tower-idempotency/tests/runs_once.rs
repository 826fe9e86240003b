//! A request that carries a key runs once whatever its caller does: stops waiting (the layer's
//! caller timeout, or a timeout put around the layer), gets no answer it could keep (the inner
//! service says the outcome is unknown, or the response body fails after its status), or meets
//! a store that fails to take the outcome once. Through a real axum server on 127.0.0.1:0 and a
//! real HTTP client; every handler counts its executions.

#![allow(missing_docs, clippy::unwrap_used)]

use idempotency_test_support::harness;
use idempotency_test_support::recording::RecordingStore;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use harness::{Counter, Gate, assert_problem, assert_retry_after, client, gated_app, send, serve};
use http::StatusCode;
use tower_idempotency::{IdempotencyLayer, MemoryStore, OutcomeUnknown};

const KEY: &str = "Idempotency-Key";

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::new(MemoryStore::default()).with_wait_timeout(Duration::from_secs(10))
}

#[tokio::test]
async fn past_the_caller_timeout_the_caller_gets_504_and_the_handler_runs_on() {
    let gate = Gate::default();
    let layer = layer().with_caller_timeout(Duration::from_millis(200));
    let (app, count) = gated_app(layer.clone(), gate.clone());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/slow")).header(KEY, "\"slow\"");

    let first = send(post()).await;
    let doc = assert_problem(&first, 504, "still-running");
    assert_retry_after(&first);
    assert!(doc["detail"].as_str().unwrap().contains("same key"));
    assert_eq!(count.get(), 1);

    // The handler still runs: a duplicate waits for it instead of running again.
    let duplicate = tokio::spawn(send(post()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.open();
    let duplicate = duplicate.await.unwrap();
    assert_eq!(duplicate.status, StatusCode::CREATED);
    assert!(duplicate.replayed());
    assert_eq!(duplicate.text(), "exec-1");

    let retry = send(post()).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "exec-1");
    assert_eq!(count.get(), 1, "one key, one execution");
}

/// A 504 of its own from a timeout around the layer: the layer never got an answer, so the key
/// stays held while the handler runs, and its outcome is stored.
async fn outer_timeout(req: Request, next: Next) -> Response {
    match tokio::time::timeout(Duration::from_millis(150), next.run(req)).await {
        Ok(res) => res,
        Err(_) => StatusCode::GATEWAY_TIMEOUT.into_response(),
    }
}

#[tokio::test]
async fn a_timeout_outside_the_layer_never_frees_the_key() {
    let gate = Gate::default();
    let (app, count) = gated_app(layer(), gate.clone());
    let app = app.layer(axum::middleware::from_fn(outer_timeout));
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/slow")).header(KEY, "\"outer\"");

    for _ in 0..3 {
        // The first copy times out running; the next two time out waiting for it.
        assert_eq!(send(post()).await.status, StatusCode::GATEWAY_TIMEOUT);
    }
    assert_eq!(count.get(), 1);
    gate.open();
    // Once the handler answers, its answer is what every retry gets.
    let mut replay = send(post()).await;
    for _ in 0..20 {
        if replay.status != StatusCode::GATEWAY_TIMEOUT {
            break;
        }
        replay = send(post()).await;
    }
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.replayed());
    assert_eq!(replay.text(), "exec-1");
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn a_response_marked_outcome_unknown_is_never_run_again() {
    let count = Counter::default();
    let c = count.clone();
    let app = Router::new()
        .route(
            "/charge",
            post(move || {
                let c = c.clone();
                async move {
                    c.hit();
                    let mut res = (StatusCode::BAD_GATEWAY, "the answer was lost").into_response();
                    res.extensions_mut().insert(OutcomeUnknown);
                    res
                }
            }),
        )
        .layer(layer());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/charge")).header(KEY, "\"lost\"");

    // The first caller gets the inner service's own answer.
    let first = send(post()).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert_eq!(first.text(), "the answer was lost");
    // A 502 would release the key; this one says the request may have run.
    for _ in 0..2 {
        let again = send(post()).await;
        let doc = assert_problem(&again, 502, "outcome-unknown");
        assert!(doc["detail"].as_str().unwrap().contains("new key"));
    }
    assert_eq!(count.get(), 1);
    // A new key runs it again.
    assert_eq!(
        send(c.post(srv.url("/charge")).header(KEY, "\"new\""))
            .await
            .status,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn a_response_body_that_fails_after_its_status_is_never_run_again() {
    let count = Counter::default();
    let c = count.clone();
    let app = Router::new()
        .route(
            "/charge",
            post(move || {
                let c = c.clone();
                async move {
                    c.hit();
                    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                        Ok(Bytes::from_static(b"{\"charge\":")),
                        Err(std::io::Error::other("the response broke")),
                    ];
                    let body = Body::from_stream(futures_util::stream::iter(chunks));
                    (StatusCode::CREATED, body).into_response()
                }
            }),
        )
        .layer(layer());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/charge")).header(KEY, "\"broken\"");

    for _ in 0..3 {
        assert_problem(&send(post()).await, 502, "outcome-unknown");
    }
    assert_eq!(count.get(), 1, "the handler ran; it is not run again");
}

#[tokio::test]
async fn a_completion_that_fails_for_want_of_the_store_is_retried_until_it_lands() {
    let store = RecordingStore::default();
    // A short lease: were the completion given up, the retry would run once it expired.
    let layer = IdempotencyLayer::new(store.clone())
        .with_lock_ttl(Duration::from_millis(600))
        .with_wait_timeout(Duration::from_secs(10));
    let (app, count) = harness::counting_app(layer);
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/orders")).header(KEY, "\"blip\"").body("x");

    store.fail_next(3, &["complete", "release"]);
    let first = send(post()).await;
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the caller has its answer"
    );
    let retry = send(post()).await;
    assert!(retry.replayed(), "{}", retry.text());
    assert_eq!(retry.body, first.body);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(send(post()).await.replayed());
    assert_eq!(count.get(), 1);
    assert!(
        store.count("complete") + store.count("release") >= 4,
        "three failures, then the write"
    );
}

#[tokio::test]
async fn a_release_that_fails_for_want_of_the_store_is_retried() {
    let store = RecordingStore::default();
    let count = Counter::default();
    let c = count.clone();
    // A long lease and a short wait: a release given up would leave the key held, and the retry
    // would get 409 after its wait instead of running.
    let layer = IdempotencyLayer::new(store.clone())
        .with_lock_ttl(Duration::from_secs(60))
        .with_wait_timeout(Duration::from_secs(5));
    let app = Router::new()
        .route(
            "/flaky",
            post(move || {
                let c = c.clone();
                async move {
                    match c.hit() {
                        1 => (StatusCode::SERVICE_UNAVAILABLE, "try again".to_owned()),
                        n => (StatusCode::CREATED, format!("exec-{n}")),
                    }
                }
            }),
        )
        .layer(layer);
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/flaky")).header(KEY, "\"flaky\"");

    store.fail_next(2, &["complete", "release"]);
    assert_eq!(send(post()).await.status, StatusCode::SERVICE_UNAVAILABLE);
    let retry = send(post()).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.text());
    assert_eq!(retry.text(), "exec-2");
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn drain_waits_for_a_handler_whose_caller_stopped_waiting() {
    let gate = Gate::default();
    let layer = layer().with_caller_timeout(Duration::from_millis(100));
    let (app, count) = gated_app(layer.clone(), gate.clone());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/slow")).header(KEY, "\"drained\"");

    assert_problem(&send(post()).await, 504, "still-running");
    let drain = tokio::spawn({
        let layer = layer.clone();
        async move { layer.drain().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!drain.is_finished(), "the handler still runs");
    gate.open();
    drain.await.unwrap();
    // Drained means stored: the retry replays without waiting.
    let retry = send(post().header("Prefer", "wait=0")).await;
    assert!(retry.replayed(), "{}", retry.text());
    assert_eq!(count.get(), 1);
}

/// Clones of one layer drained at once on threads of their own, as a server with a worker
/// thread per core drains them on shutdown: every drain returns, whichever ends first.
#[test]
fn clones_drained_at_once_on_their_own_threads_all_return() {
    let layer = layer();
    for round in 0..5_000 {
        let start = std::sync::Arc::new(std::sync::Barrier::new(2));
        let (ended, drains) = std::sync::mpsc::channel();
        for _ in 0..2 {
            let (layer, start, ended) = (layer.clone(), start.clone(), ended.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                start.wait();
                runtime.block_on(layer.drain());
                let _ = ended.send(());
            });
        }
        for _ in 0..2 {
            let ended = drains.recv_timeout(Duration::from_secs(10));
            assert!(ended.is_ok(), "round {round}: a drain never returned");
        }
    }
}
