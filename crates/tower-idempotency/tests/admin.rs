//! `tower_idempotency::admin` mounted in an application: its routes find the layer's records
//! by the layer's own namespace, key secret and scope, and a forgotten key runs again. The
//! proxy's tests run the same routes behind its token, with Redis too.

#![cfg(all(feature = "admin", feature = "conformance"))]
#![allow(clippy::unwrap_used)]

use http::HeaderName;
use idempotency_test_support::harness::{assert_problem, client, counting_app, send, serve};
use serde_json::Value;
use tower_idempotency::admin::Admin;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[tokio::test]
async fn the_admin_router_finds_a_layers_records_and_forgets_them() {
    let user = HeaderName::from_static("x-user");
    let header = user.clone();
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_namespace("shop")
        .with_key_secret("s3cret")
        .with_scope_headers([header]);
    // The layer's own scope headers are where the scope values go.
    let admin = Admin::for_layer(&layer);
    let (app, count) = counting_app(layer);
    let server = serve(app.nest("/admin", admin.router())).await;
    let post = || {
        client()
            .post(server.url("/orders"))
            .header("Idempotency-Key", "k-1")
            .header("X-User", "alice")
            .body("one")
    };
    assert_eq!(send(post()).await.status, 201);

    let found = send(client().get(server.url("/admin/keys/k-1?scope=alice"))).await;
    assert_eq!(found.status, 200, "{}", found.text());
    let doc: Value = serde_json::from_slice(&found.body).unwrap();
    assert_eq!(
        (doc["state"].as_str(), doc["status"].as_u64()),
        (Some("completed"), Some(201))
    );
    // Bob's scope and the global scope hold nothing under this key.
    for path in ["/admin/keys/k-1?scope=bob", "/admin/keys/k-1"] {
        assert_problem(
            &send(client().get(server.url(path))).await,
            404,
            "no-record",
        );
    }
    // One scope value per scope header, no more.
    let two = send(client().get(server.url("/admin/keys/k-1?scope=a&scope=b"))).await;
    assert_problem(&two, 400, "bad-admin-request");
    let long = format!("/admin/keys/{}", "k".repeat(300));
    assert_problem(
        &send(client().get(server.url(&long))).await,
        400,
        "bad-admin-request",
    );

    let forgotten = send(client().delete(server.url("/admin/keys/k-1?scope=alice"))).await;
    assert_eq!(forgotten.status, 204);
    let again = send(post()).await;
    assert_eq!(again.status, 201);
    assert!(!again.replayed());
    assert_eq!(count.get(), 2, "the forgotten key ran again");
    let replay = send(post()).await;
    assert!(replay.replayed());
    assert_eq!(count.get(), 2);
}

/// What an operator reads of each kind of record: a response past the replay limit is
/// `unreplayable` with its reason and no status; a body that is not UTF-8 is shown in base64,
/// and only when asked for; every record has its times and size.
#[tokio::test]
async fn inspect_shows_each_kind_of_record() {
    use axum::routing::post;
    let layer = IdempotencyLayer::new(MemoryStore::default()).with_max_response_body(16);
    let admin = Admin::for_layer(&layer);
    let app = axum::Router::new()
        .route(
            "/big",
            post(|| async { (http::StatusCode::CREATED, "x".repeat(64)) }),
        )
        .route(
            "/bytes",
            post(|| async { (http::StatusCode::OK, vec![0xff_u8, 0xfe, 0x00]) }),
        )
        .layer(layer)
        .nest("/admin", admin.router());
    let server = serve(app).await;
    for (path, key) in [("/big", "k-big"), ("/bytes", "k-bytes")] {
        let res = send(
            client()
                .post(server.url(path))
                .header("Idempotency-Key", key),
        )
        .await;
        assert!(res.status.is_success(), "{}", res.text());
    }
    let inspect = |query: &'static str| {
        let url = server.url(&format!("/admin/keys/{query}"));
        async move {
            let found = send(client().get(url)).await;
            assert_eq!(found.status, 200, "{}", found.text());
            serde_json::from_slice::<Value>(&found.body).unwrap()
        }
    };

    let big = inspect("k-big?body=1").await;
    assert_eq!(big["state"], "unreplayable", "{big}");
    assert_eq!(big["reason"], "too_large", "{big}");
    assert!(big["status"].is_null(), "{big}");
    assert!(
        big.get("body").is_none() && big.get("body_base64").is_none(),
        "{big}"
    );

    let bytes = inspect("k-bytes").await;
    assert_eq!(
        (bytes["state"].as_str(), bytes["status"].as_u64()),
        (Some("completed"), Some(200))
    );
    assert!(
        bytes.get("body_base64").is_none(),
        "the body without ?body=1: {bytes}"
    );
    let bytes = inspect("k-bytes?body=1").await;
    assert_eq!(bytes["body_base64"], "//4A", "{bytes}");
    assert!(bytes.get("body").is_none(), "{bytes}");

    for doc in [&big, &bytes] {
        for member in ["created", "expires", "fingerprint"] {
            assert!(doc[member].is_string(), "{member}: {doc}");
        }
        assert!(doc["size"].as_u64().unwrap() > 0, "{doc}");
        assert!(doc["expires_in_ms"].as_u64().unwrap() > 0, "{doc}");
        assert!(doc["lease"].is_null(), "{doc}");
    }
}

#[tokio::test]
async fn admin_router_of_a_bare_store_uses_a_default_layers_keys() {
    let store = MemoryStore::default();
    let (app, count) = counting_app(IdempotencyLayer::new(store.clone()));
    let server = serve(app.nest("/admin", tower_idempotency::admin::router(store))).await;
    let post = client()
        .post(server.url("/orders"))
        .header("Idempotency-Key", "k-2")
        .header("Authorization", "Bearer t");
    assert_eq!(send(post).await.status, 201);
    let found = send(client().get(server.url("/admin/keys/k-2?scope=Bearer%20t"))).await;
    assert_eq!(found.status, 200, "{}", found.text());
    let listed = send(client().get(server.url("/admin/in-flight"))).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&listed.body).unwrap(),
        Value::Array(vec![])
    );
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn scope_values_a_layers_own_extractor_does_not_read_are_refused() {
    // A scope told by something else than headers: the values must be given headers it reads.
    let layer =
        IdempotencyLayer::new(MemoryStore::default()).with_scope(|parts: &http::request::Parts| {
            match parts.headers.get("x-user") {
                Some(user) => tower_idempotency::Scope::caller(user.as_bytes()),
                None => tower_idempotency::Scope::Global,
            }
        });
    let blind = Admin::for_layer(&layer);
    assert!(
        blind.storage_key("k", &["alice"]).is_err(),
        "values put in Authorization"
    );
    let told = Admin::for_layer(&layer).with_scope_headers([HeaderName::from_static("x-user")]);
    assert_eq!(
        told.storage_key("k", &["alice"]).unwrap(),
        layer.storage_key_for(Some(b"alice"), "k")
    );
    assert_eq!(
        told.storage_key("k", &[] as &[&str]).unwrap(),
        layer.storage_key_for(None, "k")
    );
    assert!(told.storage_key("with space", &[] as &[&str]).is_err());
}

/// A store that offers only the lifecycle's verbs, as a store written before the operator's
/// verbs does.
struct Lifecycle(MemoryStore);

#[async_trait::async_trait]
impl tower_idempotency::Store for Lifecycle {
    async fn begin(
        &self,
        key: &tower_idempotency::StorageKey,
        fingerprint: &tower_idempotency::Fingerprint,
        lease_ttl: std::time::Duration,
    ) -> Result<tower_idempotency::BeginOutcome, tower_idempotency::StoreError> {
        self.0.begin(key, fingerprint, lease_ttl).await
    }
    async fn complete(
        &self,
        key: &tower_idempotency::StorageKey,
        token: tower_idempotency::LeaseToken,
        record: bytes::Bytes,
        ttl: std::time::Duration,
    ) -> Result<bool, tower_idempotency::StoreError> {
        self.0.complete(key, token, record, ttl).await
    }
    async fn release(
        &self,
        key: &tower_idempotency::StorageKey,
        token: tower_idempotency::LeaseToken,
    ) -> Result<bool, tower_idempotency::StoreError> {
        self.0.release(key, token).await
    }
    async fn renew(
        &self,
        key: &tower_idempotency::StorageKey,
        token: tower_idempotency::LeaseToken,
        lease_ttl: std::time::Duration,
    ) -> Result<bool, tower_idempotency::StoreError> {
        self.0.renew(key, token, lease_ttl).await
    }
    async fn wait(
        &self,
        key: &tower_idempotency::StorageKey,
        timeout: std::time::Duration,
    ) -> Result<(), tower_idempotency::StoreError> {
        self.0.wait(key, timeout).await
    }
}

#[tokio::test]
async fn a_store_without_the_operators_verbs_answers_501() {
    let store = Lifecycle(MemoryStore::default());
    assert!(!tower_idempotency::conformance::offers_operator_verbs(&store).await);
    let server =
        serve(axum::Router::new().nest("/admin", tower_idempotency::admin::router(store))).await;
    for req in [
        client().get(server.url("/admin/keys/k")),
        client().delete(server.url("/admin/keys/k")),
        client().get(server.url("/admin/in-flight")),
    ] {
        assert_problem(&send(req).await, 501, "store-unsupported");
    }
}
