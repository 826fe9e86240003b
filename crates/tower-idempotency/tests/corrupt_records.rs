//! A record that another tool wrote, or that got corrupted in the store, is an error answered
//! with a counted 500 problem (`record-corrupt`): never a panic, never a replay of garbage, never
//! a second run of the handler. Proven against a real `redis-server` started by the test on a
//! free port, through a real axum server on 127.0.0.1:0 and a real HTTP client.

#![cfg(feature = "redis")]
#![allow(missing_docs, clippy::unwrap_used)]

use idempotency_test_support::events;
use idempotency_test_support::harness;
use idempotency_test_support::redis as servers;

use events::Events;
use harness::{Reply, TestServer, assert_problem, client, counting_app, send, serve};
use http::StatusCode;
use tower_idempotency::Event;
use tower_idempotency::{IdempotencyLayer, Problem};
use tower_idempotency::{LeaseToken, RedisStore};

use servers::RedisServer;

/// A layer on `redis` under a prefix of its own, with the store kept apart for key look-ups.
async fn layer_on(redis: &RedisServer) -> (IdempotencyLayer, RedisStore) {
    let store = RedisStore::builder(redis.url())
        .with_prefix(format!("c{:x}:", LeaseToken::random().0 as u64))
        .connect()
        .await
        .unwrap();
    (IdempotencyLayer::new(store.clone()), store)
}

/// A plain Redis connection for writing and reading raw values.
async fn raw(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn get_raw(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

async fn set_raw(conn: &mut redis::aio::MultiplexedConnection, key: &str, value: &[u8]) {
    let () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(conn)
        .await
        .unwrap();
}

/// How a row damages the record under its key.
enum Damage {
    /// Writes these bytes where no request has been yet.
    Write(&'static [u8]),
    /// Runs a request first so that a real record exists, then rewrites its bytes.
    Rewrite(fn(Vec<u8>) -> Vec<u8>),
    /// Stores a Redis hash at the key: another tool's data of another type.
    Hash,
}

struct Row {
    name: &'static str,
    damage: Damage,
}

fn rows() -> Vec<Row> {
    vec![
        Row {
            name: "garbage written by another tool",
            damage: Damage::Write(b"{\"status\": \"done\", \"by\": \"another tool\"}"),
        },
        Row {
            name: "an empty value",
            damage: Damage::Write(b""),
        },
        Row {
            name: "a completed tag followed by garbage",
            damage: Damage::Write(b"Cgarbage that is no record"),
        },
        Row {
            name: "a lease of the wrong length",
            damage: Damage::Write(b"Lshort"),
        },
        Row {
            name: "a truncated valid record",
            damage: Damage::Rewrite(|mut v| {
                v.truncate(v.len() / 2);
                v
            }),
        },
        Row {
            name: "a record with the last byte cut",
            damage: Damage::Rewrite(|mut v| {
                v.pop();
                v
            }),
        },
        Row {
            name: "a record with an unknown version byte",
            damage: Damage::Rewrite(|mut v| {
                // v[0] is the store's tag `C`; the record's own first byte is its version.
                v[1] = 0x7f;
                v
            }),
        },
        Row {
            name: "a record with trailing bytes",
            damage: Damage::Rewrite(|mut v| {
                v.extend_from_slice(b"trailing");
                v
            }),
        },
        Row {
            name: "a record whose header count runs past its end",
            damage: Damage::Rewrite(|mut v| {
                // tag, version, flags, fingerprint [32], status u16, then the header count u16.
                let at = 1 + 2 + 32 + 2;
                v[at..at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
                v
            }),
        },
        Row {
            name: "a lease of this very request without an expiry (SET by hand)",
            damage: Damage::Rewrite(|v| {
                // A lease is `L`, a 16-byte owner token and the request's fingerprint, which a
                // completed record carries after its tag, version and flags bytes. Written back
                // with a plain SET, it has no TTL: nobody would ever release it.
                let mut lease = vec![b'L'];
                lease.extend_from_slice(&[7; 16]);
                lease.extend_from_slice(&v[3..3 + 32]);
                lease
            }),
        },
        Row {
            name: "a lease of another request without an expiry",
            damage: Damage::Write(b"L0123456789abcdef0123456789abcdef0123456789abcdef"),
        },
        Row {
            name: "a Redis hash at the record's key",
            damage: Damage::Hash,
        },
    ]
}

async fn post(srv: &TestServer, key: &str, body: &str) -> Reply {
    send(
        client()
            .post(srv.url("/orders"))
            .header("Idempotency-Key", format!("\"{key}\""))
            .body(body.to_owned()),
    )
    .await
}

/// Runs every row through one server: each damaged key is answered 500 `record-corrupt`, counted
/// once, without running the handler and without touching the stored value; the server keeps
/// serving fresh keys and replays between rows.
async fn run_rows(
    redis: &RedisServer,
    layer: IdempotencyLayer,
    store: RedisStore,
    events: &Events,
) {
    let (app, count) = counting_app(layer.clone());
    let srv = serve(app).await;
    let mut conn = raw(redis).await;

    for (i, row) in rows().into_iter().enumerate() {
        let name = row.name;
        let key = format!("corrupt-{i}");
        let redis_key = store.record_key(&layer.storage_key_for(None, &key));
        let runs_before = count.get();
        match row.damage {
            Damage::Write(bytes) => set_raw(&mut conn, &redis_key, bytes).await,
            Damage::Rewrite(rewrite) => {
                let first = post(&srv, &key, "body").await;
                assert_eq!(
                    first.status,
                    StatusCode::CREATED,
                    "{name}: the original request"
                );
                let stored = get_raw(&mut conn, &redis_key)
                    .await
                    .unwrap_or_else(|| panic!("{name}: no record at {redis_key}"));
                assert_eq!(stored[0], b'C', "{name}: a completed record");
                set_raw(&mut conn, &redis_key, &rewrite(stored)).await;
            }
            Damage::Hash => {
                let () = redis::cmd("HSET")
                    .arg(&redis_key)
                    .arg("status")
                    .arg("done")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        }
        let runs = count.get();
        let stored_before: redis::Value = redis::cmd("DUMP")
            .arg(&redis_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let corrupt_before = events.get(Event::CorruptRecord);
        let store_errors_before = events.get(Event::StoreError);

        for attempt in 1..=2 {
            let reply = post(&srv, &key, "body").await;
            assert_eq!(
                reply.status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "{name}, attempt {attempt}: {}",
                reply.text()
            );
            let json = assert_problem(&reply, 500, "record-corrupt");
            assert_eq!(
                json["type"], "urn:tower-idempotency:problem:record-corrupt",
                "{name}: the problem's type"
            );
            assert_eq!(
                reply.header("cache-control"),
                Some("no-store"),
                "{name}: a problem is not cached"
            );
            assert!(
                !reply.text().contains("garbage") && !reply.text().contains("another tool"),
                "{name}: nothing of the stored value is replayed: {}",
                reply.text()
            );
            assert_eq!(
                count.get(),
                runs,
                "{name}, attempt {attempt}: the handler did not run"
            );
            assert_eq!(
                events.get(Event::CorruptRecord),
                corrupt_before + attempt,
                "{name}, attempt {attempt}: counted as corrupt_record"
            );
        }
        assert_eq!(
            events.get(Event::StoreError),
            store_errors_before,
            "{name}: not counted as an outage"
        );
        let stored_after: redis::Value = redis::cmd("DUMP")
            .arg(&redis_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            stored_after, stored_before,
            "{name}: the layer neither overwrote nor removed the stored value"
        );
        assert!(
            count.get() <= runs_before + 1,
            "{name}: at most the original request ran"
        );

        // The server keeps serving: a fresh key runs, and its duplicate replays.
        let fresh = format!("fresh-{i}");
        let ran = post(&srv, &fresh, "fresh").await;
        assert_eq!(
            ran.status,
            StatusCode::CREATED,
            "{name}: a fresh key still runs"
        );
        assert!(!ran.replayed());
        let again = post(&srv, &fresh, "fresh").await;
        assert!(again.replayed(), "{name}: a fresh key still replays");
        assert_eq!(again.body, ran.body);

        // Removing the record lets the key run again.
        let () = redis::cmd("DEL")
            .arg(&redis_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let healed = post(&srv, &key, "body").await;
        assert_eq!(
            healed.status,
            StatusCode::CREATED,
            "{name}: the key runs once the record is removed"
        );
        assert!(!healed.replayed());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn corrupt_records_are_a_counted_500_problem_and_the_server_keeps_serving() {
    let events = Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let redis = RedisServer::start();
    let (layer, store) = layer_on(&redis).await;
    run_rows(&redis, layer, store, &events).await;
}

/// Fail open is for outages: a corrupt record may stand for a request that completed, so it is
/// refused all the same, and the handler does not run.
#[tokio::test(flavor = "current_thread")]
async fn fail_open_does_not_run_a_request_whose_record_is_corrupt() {
    let events = Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let redis = RedisServer::start();
    let (layer, store) = layer_on(&redis).await;
    let layer = layer.with_fail_open(true);
    run_rows(&redis, layer, store, &events).await;
    assert_eq!(events.get(Event::FailOpen), 0, "never failed open");
}

/// The same with a key secret: the record's Redis key is the one the layer computes.
#[tokio::test(flavor = "current_thread")]
async fn corrupt_records_under_hmac_storage_keys_are_refused_too() {
    let events = Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let redis = RedisServer::start();
    let (layer, store) = layer_on(&redis).await;
    let layer = layer.with_key_secret(b"corrupt-records secret");
    run_rows(&redis, layer, store, &events).await;
}

#[test]
fn the_corrupt_record_problem_is_documented() {
    let p = Problem::CorruptRecord;
    assert_eq!(p.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(p.slug(), "record-corrupt");
    let res = p.to_response();
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert!(res.headers().get("retry-after").is_none());
    assert_eq!(Event::CorruptRecord.as_str(), "corrupt_record");
}
