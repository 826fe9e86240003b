//! The server secret (`IdempotencyLayer::with_key_secret`): storage keys become an HMAC-SHA256
//! of (namespace, scope, key), so a reader of the store cannot test guesses of keys. Through
//! real axum servers on 127.0.0.1:0 sharing one store, and against a real `redis-server`.

#![allow(missing_docs, clippy::unwrap_used)]

use idempotency_test_support::harness;
use idempotency_test_support::recording;
use idempotency_test_support::redis as servers;

use harness::{Reply, TestServer, client, counting_app, send, serve};
use http::StatusCode;
use recording::RecordingStore;
use tower_idempotency::IdempotencyLayer;
use tower_idempotency::StorageKey;

async fn post(srv: &TestServer, key: &str) -> Reply {
    send(
        client()
            .post(srv.url("/orders"))
            .header("Idempotency-Key", format!("\"{key}\""))
            .body("same body"),
    )
    .await
}

/// The storage keys `store` was asked about since `from`, deduplicated.
fn keys_since(store: &RecordingStore, from: usize) -> Vec<StorageKey> {
    let mut keys: Vec<StorageKey> = store.keys()[from..].to_vec();
    keys.dedup();
    keys
}

#[tokio::test]
async fn the_same_key_with_and_without_a_secret_lands_on_different_storage_keys() {
    let store = RecordingStore::default();
    let plain = IdempotencyLayer::new(store.clone());
    let keyed = IdempotencyLayer::new(store.clone()).with_key_secret(b"server secret");
    let (plain_app, plain_count) = counting_app(plain.clone());
    let (keyed_app, keyed_count) = counting_app(keyed.clone());
    let (plain_srv, keyed_srv) = (serve(plain_app).await, serve(keyed_app).await);

    let first = post(&plain_srv, "k-1").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let plain_keys = keys_since(&store, 0);
    assert_eq!(plain_keys, vec![plain.storage_key_for(None, "k-1")]);

    let seen = store.keys().len();
    let other = post(&keyed_srv, "k-1").await;
    assert_eq!(other.status, StatusCode::CREATED);
    assert!(
        !other.replayed(),
        "a layer with a secret does not see plain records"
    );
    let keyed_keys = keys_since(&store, seen);
    assert_eq!(keyed_keys, vec![keyed.storage_key_for(None, "k-1")]);
    assert_ne!(plain_keys, keyed_keys);
    assert_eq!((plain_count.get(), keyed_count.get()), (1, 1));
    assert_eq!(store.len(), 2, "two records, one per storage key");

    // Without a secret the storage key is exactly what it was before secrets existed.
    assert_eq!(
        plain.storage_key_for(None, "k-1"),
        IdempotencyLayer::new(tower_idempotency::MemoryStore::default())
            .storage_key_for(None, "k-1")
    );
}

#[tokio::test]
async fn two_layers_with_the_same_secret_share_records() {
    let store = RecordingStore::default();
    let a = IdempotencyLayer::new(store.clone()).with_key_secret(String::from("shared secret"));
    let b = IdempotencyLayer::new(store.clone()).with_key_secret(b"shared secret");
    assert_eq!(a.storage_key_for(None, "k"), b.storage_key_for(None, "k"));
    let (app_a, count_a) = counting_app(a);
    let (app_b, count_b) = counting_app(b);
    let (srv_a, srv_b) = (serve(app_a).await, serve(app_b).await);

    let original = post(&srv_a, "shared").await;
    assert_eq!(original.status, StatusCode::CREATED);
    let replay = post(&srv_b, "shared").await;
    assert!(
        replay.replayed(),
        "the second layer replays the first's record"
    );
    assert_eq!(replay.body, original.body);
    assert_eq!((count_a.get(), count_b.get()), (1, 0));
}

#[tokio::test]
async fn different_secrets_do_not_share_records() {
    let store = RecordingStore::default();
    let a = IdempotencyLayer::new(store.clone()).with_key_secret("secret a");
    let b = IdempotencyLayer::new(store.clone()).with_key_secret("secret b");
    assert_ne!(a.storage_key_for(None, "k"), b.storage_key_for(None, "k"));
    let (app_a, count_a) = counting_app(a);
    let (app_b, count_b) = counting_app(b);
    let (srv_a, srv_b) = (serve(app_a).await, serve(app_b).await);

    assert_eq!(post(&srv_a, "apart").await.status, StatusCode::CREATED);
    let other = post(&srv_b, "apart").await;
    assert_eq!(other.status, StatusCode::CREATED);
    assert!(!other.replayed(), "another secret is another storage key");
    assert_eq!((count_a.get(), count_b.get()), (1, 1));
}

#[tokio::test]
async fn scopes_and_namespaces_still_separate_keys_under_a_secret() {
    let layer = IdempotencyLayer::new(RecordingStore::default()).with_key_secret("s");
    let k = layer.storage_key_for(None, "k");
    assert_ne!(k, layer.storage_key_for(Some(b"alice"), "k"));
    assert_ne!(
        layer.storage_key_for(Some(b"alice"), "k"),
        layer.storage_key_for(Some(b"bob"), "k")
    );
    assert_ne!(
        k,
        layer
            .clone()
            .with_namespace("ns")
            .storage_key_for(None, "k")
    );

    // The request helper applies the layer's scope extractor (Authorization by default).
    let (parts, ()) = http::Request::post("/orders")
        .header("authorization", "Bearer alice")
        .body(())
        .unwrap()
        .into_parts();
    let scoped = layer.storage_key_for_request(&parts, "k");
    assert_ne!(scoped, Some(k));
    let (anonymous, ()) = http::Request::post("/orders")
        .body(())
        .unwrap()
        .into_parts();
    assert_eq!(layer.storage_key_for_request(&anonymous, "k"), Some(k));
    // A scope the extractor cannot tell has no storage key: the layer refuses such requests.
    let unknown = layer.with_scope(|_: &http::request::Parts| tower_idempotency::Scope::Unknown);
    assert_eq!(unknown.storage_key_for_request(&anonymous, "k"), None);
}

#[test]
fn the_secret_never_shows_in_debug_output() {
    let layer = IdempotencyLayer::new(RecordingStore::default()).with_key_secret("hunter2-secret");
    let shown = format!("{layer:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("key_secret"), "{shown}");
}

/// In Redis, the record lives under the HMAC storage key, and nothing under the plain one: a
/// reader of Redis who hashes a guessed key finds nothing.
#[cfg(feature = "redis")]
#[tokio::test]
async fn in_redis_the_record_lives_under_the_hmac_storage_key() {
    use tower_idempotency::{LeaseToken, RedisStore};

    let redis = servers::RedisServer::start();
    let prefix = format!("k{:x}:", LeaseToken::random().0 as u64);
    let connect = || {
        RedisStore::builder(redis.url())
            .with_prefix(prefix.clone())
            .connect()
    };
    let store = connect().await.unwrap();
    let keyed = IdempotencyLayer::new(store.clone()).with_key_secret("redis secret");
    let plain = IdempotencyLayer::new(store.clone());
    let (app, count) = counting_app(keyed.clone());
    let srv = serve(app).await;

    let first = post(&srv, "guessable-1").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let hmac_key = store.record_key(&keyed.storage_key_for(None, "guessable-1"));
    let plain_key = store.record_key(&plain.storage_key_for(None, "guessable-1"));
    assert_eq!(redis.cli(&["EXISTS", &hmac_key]).trim(), "1");
    assert_eq!(redis.cli(&["EXISTS", &plain_key]).trim(), "0");
    assert_eq!(
        redis.cli(&["DBSIZE"]).trim(),
        "1",
        "one record, nothing else"
    );

    // Another server with the same secret, on its own connection to the same Redis, replays it.
    let (app2, count2) = counting_app(
        IdempotencyLayer::new(connect().await.unwrap()).with_key_secret("redis secret"),
    );
    let srv2 = serve(app2).await;
    let replay = post(&srv2, "guessable-1").await;
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert_eq!((count.get(), count2.get()), (1, 0));
}
