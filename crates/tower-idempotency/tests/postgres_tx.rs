//! Transactional mode on a real PostgreSQL: the handler's writes, made in its `IdempotentTx`,
//! commit with the stored record or not at all. Each test counts the rows the handler wrote and
//! the handler's runs.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

use idempotency_test_support::harness::{is_replay, post_orders};
use idempotency_test_support::postgres as pg_server;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_idempotency::{
    IdempotencyLayer, IdempotentTx, LeaseToken, OutcomeUnknown, PostgresStore,
};

/// What a test's handler does after inserting its order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Then {
    /// Answers 201 with the order's id.
    Created,
    /// Answers 500 on its first run, 201 afterwards.
    FailFirst,
    /// Inserts the same item again, which a deferred unique constraint refuses at commit.
    BreakTheCommit,
    /// Another request takes the lease over (as after its expiry) before the handler answers.
    LoseTheLease,
    /// Panics.
    Panic,
    /// Sleeps, so that duplicates wait.
    Slow,
    /// Answers 201 marked `OutcomeUnknown`: it may have acted where a rollback cannot reach.
    Unknown,
}

#[derive(Clone)]
struct Shop {
    store: PostgresStore,
    orders: String,
    runs: Arc<AtomicUsize>,
    then: Then,
}

async fn create_order(State(shop): State<Shop>, mut tx: IdempotentTx, body: String) -> Response {
    let run = shop.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let id: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO {} (item) VALUES ($1) RETURNING id",
        shop.orders
    ))
    .bind(&body)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    match shop.then {
        Then::Created => {}
        Then::FailFirst if run == 1 => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "try again").into_response();
        }
        Then::FailFirst => {}
        Then::BreakTheCommit => {
            sqlx::query(&format!("INSERT INTO {} (item) VALUES ($1)", shop.orders))
                .bind(&body)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        Then::LoseTheLease => {
            sqlx::query(&format!(
                "UPDATE {} SET owner = gen_random_uuid(), expires_at = now() + interval '1 minute'",
                shop.store.table()
            ))
            .execute(shop.store.pool())
            .await
            .unwrap();
        }
        Then::Panic => panic!("the handler fails"),
        Then::Slow => tokio::time::sleep(Duration::from_millis(500)).await,
        Then::Unknown => {
            let mut res = (StatusCode::CREATED, format!("order {id}")).into_response();
            res.extensions_mut().insert(OutcomeUnknown);
            return res;
        }
    }
    (StatusCode::CREATED, format!("order {id}")).into_response()
}

/// A shop on its own tables: the store's and the orders', whose items are unique at commit.
async fn shop(then: Then) -> (Router, Shop) {
    shop_on(then, &pg_server::shared_server().url(), None).await
}

/// A shop on the database `url` names, with the layer's lock TTL when given.
async fn shop_on(then: Then, url: &str, lock_ttl: Option<Duration>) -> (Router, Shop) {
    let suffix = format!("{:x}", LeaseToken::random().0 as u64);
    let store = PostgresStore::builder()
        .with_table(format!("keys_{suffix}"))
        .connect(url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let orders = format!("orders_{suffix}");
    sqlx::query(&format!(
        "CREATE TABLE {orders} (id bigserial PRIMARY KEY, item text NOT NULL, \
         UNIQUE (item) DEFERRABLE INITIALLY DEFERRED)"
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let shop = Shop {
        store: store.clone(),
        orders,
        runs: Arc::default(),
        then,
    };
    let mut layer = IdempotencyLayer::new(store);
    if let Some(lock_ttl) = lock_ttl {
        layer = layer.with_lock_ttl(lock_ttl);
    }
    let app = Router::new()
        .route("/orders", post(create_order))
        .with_state(shop.clone())
        .layer(layer);
    (app, shop)
}

impl Shop {
    async fn orders(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", self.orders))
            .fetch_one(self.store.pool())
            .await
            .unwrap()
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

async fn send(app: &Router, key: Option<&str>, item: &str) -> (StatusCode, HeaderMap, Bytes) {
    post_orders(app, key, item.to_owned()).await
}

fn problem_type(body: &Bytes) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    json["type"].as_str().unwrap().to_owned()
}

/// A stored response commits with the handler's insert; its replay names the same order, and
/// the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_response_commits_with_the_handlers_writes() {
    let (app, shop) = shop(Then::Created).await;
    let (status, headers, first) = send(&app, Some("k1"), "teapot").await;
    assert_eq!(status, StatusCode::CREATED, "{first:?}");
    assert!(!is_replay(&headers));
    assert_eq!(shop.orders().await, 1);
    let (status, headers, again) = send(&app, Some("k1"), "teapot").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(is_replay(&headers));
    assert_eq!(again, first);
    assert_eq!((shop.runs(), shop.orders().await), (1, 1));
}

/// Duplicates waiting on a transactional owner are woken by its commit and replay it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_duplicates_get_the_committed_response() {
    let (app, shop) = shop(Then::Slow).await;
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, Some("k"), "kettle").await })
        })
        .collect();
    let mut bodies = Vec::new();
    for call in calls {
        let (status, _, body) = call.await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body:?}");
        bodies.push(body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!((shop.runs(), shop.orders().await), (1, 1));
}

/// A 500 is not stored: its insert rolls back and the lease is released, so the retry runs on
/// a clean database and its order is the only one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstored_status_rolls_back_and_the_retry_runs_on_a_clean_database() {
    let (app, shop) = shop(Then::FailFirst).await;
    let (status, _, _) = send(&app, Some("k"), "mug").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(shop.orders().await, 0, "the failed run's insert was kept");
    let (status, headers, _) = send(&app, Some("k"), "mug").await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!is_replay(&headers));
    assert_eq!((shop.runs(), shop.orders().await), (2, 1));
}

/// A handler that panics: its insert rolls back, the caller gets 500 problem+json, the retry
/// runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_rolls_back() {
    let (app, shop) = shop(Then::Panic).await;
    let (status, headers, _) = send(&app, Some("k"), "cup").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(shop.orders().await, 0);
    send(&app, Some("k"), "cup").await;
    assert_eq!(shop.runs(), 2, "the retry after a panic runs");
}

/// Another request took the lease over while the handler ran: the late owner's record is
/// refused, its insert vanishes with it, and its caller gets 409 `lease-lost`, not a response
/// whose writes were not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_rolls_back_the_late_owners_writes() {
    let (app, shop) = shop(Then::LoseTheLease).await;
    let (status, headers, body) = send(&app, Some("k"), "saucer").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body:?}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(
        problem_type(&body),
        "urn:tower-idempotency:problem:lease-lost"
    );
    assert_eq!(shop.orders().await, 0, "the late owner's insert was kept");
    assert_eq!(shop.runs(), 1);
}

/// The commit fails (a deferred constraint): nothing is kept, the caller gets 503 with
/// Retry-After, and the key is free, so the retry runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_keeps_nothing_and_answers_503() {
    let (app, shop) = shop(Then::BreakTheCommit).await;
    let (status, headers, body) = send(&app, Some("k"), "plate").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(shop.orders().await, 0);
    let (status, _, _) = send(&app, Some("k"), "plate").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        shop.runs(),
        2,
        "the key was not released after the failed commit"
    );
    let records: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE record IS NOT NULL",
        shop.store.table()
    ))
    .fetch_one(shop.store.pool())
    .await
    .unwrap();
    assert_eq!(records, 0, "a record was kept without the handler's writes");
}

/// Without a key, the same handler gets a plain transaction, committed after it when its
/// status would be stored, rolled back otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_requests_get_a_plain_transaction() {
    let (app, shop) = shop(Then::FailFirst).await;
    let (status, _, _) = send(&app, None, "bowl").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(shop.orders().await, 0, "the 500's insert was committed");
    let (status, _, _) = send(&app, None, "bowl").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(shop.orders().await, 1);
    let (status, _, _) = send(&app, None, "spoon").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!((shop.runs(), shop.orders().await), (3, 2));
}

/// The extractor without the layer, or on a store that is not PostgreSQL: a 500 problem that
/// says what is missing, and the handler never runs.
#[tokio::test]
async fn the_extractor_says_what_it_needs() {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |_tx: IdempotentTx| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                StatusCode::CREATED
            }
        }
    };
    let bare = Router::new().route("/orders", post(handler.clone()));
    let memory = Router::new()
        .route("/orders", post(handler))
        .layer(IdempotencyLayer::new(
            tower_idempotency::MemoryStore::default(),
        ));
    for app in [bare, memory] {
        for key in [None, Some("k")] {
            let (status, headers, body) = send(&app, key, "fork").await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(headers["content-type"], "application/problem+json");
            assert_eq!(
                problem_type(&body),
                "urn:tower-idempotency:problem:transaction-unavailable"
            );
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// A database whose default isolation is SERIALIZABLE: the handler's transaction still runs
/// at READ COMMITTED, so the renewals and the waiting duplicates that update the lease's row
/// while the handler runs do not make the record's write fail. One run, one order, every
/// duplicate answered 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stricter_default_isolation_does_not_fail_the_record() {
    let url = format!(
        "{}?options=-c%20default_transaction_isolation%3Dserializable",
        pg_server::shared_server().url()
    );
    // A 300 ms lease is renewed every 100 ms while the 500 ms handler runs.
    let (app, shop) = shop_on(Then::Slow, &url, Some(Duration::from_millis(300))).await;
    let isolation: String = sqlx::query_scalar("SHOW default_transaction_isolation")
        .fetch_one(shop.store.pool())
        .await
        .unwrap();
    assert_eq!(isolation, "serializable");
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, Some("strict"), "tray").await })
        })
        .collect();
    for call in calls {
        let (status, _, body) = call.await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body:?}");
    }
    assert_eq!((shop.runs(), shop.orders().await), (1, 1));
}

/// A response marked OutcomeUnknown (the handler may have acted where a rollback cannot
/// reach): its database writes roll back, and the key never runs again for the TTL; the retry
/// gets 502 `outcome-unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_rolls_back_and_never_runs_again() {
    let (app, shop) = shop(Then::Unknown).await;
    let (status, _, _) = send(&app, Some("k"), "jug").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        shop.orders().await,
        0,
        "the writes of an unknown outcome were kept"
    );
    let (status, _, body) = send(&app, Some("k"), "jug").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        problem_type(&body),
        "urn:tower-idempotency:problem:outcome-unknown"
    );
    assert_eq!(shop.runs(), 1);
}
