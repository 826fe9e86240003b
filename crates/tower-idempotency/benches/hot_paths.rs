//! Criterion micro-benchmarks of the layer's hot pieces: key parsing and storage-key derivation,
//! request fingerprints, the record codec, and `MemoryStore`'s begin/complete. Each reports the
//! time per operation (and, for fingerprints, bytes hashed per second).
//!
//! Run with `cargo bench -p tower-idempotency --bench hot_paths`; append a filter to run some of
//! them, e.g. `cargo bench -p tower-idempotency --bench hot_paths -- memory_store`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::runtime::Runtime;
use tower_idempotency::Fingerprint;
use tower_idempotency::record::{Record, StoredResponse};
use tower_idempotency::{BeginOutcome, StorageKey, Store};
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryStore};

const UUID: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";

/// A typical small JSON request or response body: 60 bytes.
const SMALL_JSON: &[u8] = br#"{"order_id":"ord_10423","item":"book","quantity":2,"paid":1}"#;
const _: () = assert!(SMALL_JSON.len() == 60);

const FP: Fingerprint = Fingerprint([0x5a; 32]);
const LEASE: Duration = Duration::from_secs(30);
/// Longer than any run, so that no record expires mid-benchmark (the TTL does not change the
/// cost of an operation).
const TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// `MemoryStore`'s default bound.
const CAPACITY: u64 = 100_000;
/// `fresh_empty` starts a new, empty store every this many operations, so the store it measures
/// stays far from full (and memory stays bounded however many iterations criterion asks for).
const EMPTY_STORE_BATCH: u64 = 10_000;

/// A JSON-like body of exactly `len` bytes.
fn json_body(len: usize) -> Bytes {
    let pattern = br#"{"id":42,"item":"book","qty":2},"#;
    pattern
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect::<Vec<_>>()
        .into()
}

/// A completed `201 Created` with three headers and `body`.
fn sample_record(body: Bytes) -> Record {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::LOCATION,
        HeaderValue::from_static("/orders/8e03978e-40d5-43e8-bc93-6894a57f9324"),
    );
    headers.insert(
        "x-request-id",
        HeaderValue::from_static("0b6f3c1e-6a8f-4b7e-9b1d-2f4c5a7e9d10"),
    );
    Record {
        fingerprint: FP,
        response: Ok(StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body,
        }),
    }
}

/// A distinct storage key per `n`.
fn storage_key(n: u64) -> StorageKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&n.to_be_bytes());
    StorageKey(k)
}

fn key(c: &mut Criterion) {
    let sfv = format!("\"{UUID}\"");
    assert_eq!(
        IdempotencyKey::from_header_value(sfv.as_bytes())
            .expect("an sf-string key")
            .as_str(),
        UUID
    );
    assert!(IdempotencyKey::from_header_value(UUID.as_bytes()).is_ok());

    // The storage key the store sees: SHA-256, or HMAC-SHA256 with a key secret, of
    // (namespace, scope, key). The scope is the default one, an `Authorization` header.
    let scope: &[u8] = b"Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhY2N0XzQyIn0.c2lnbmF0dXJl";
    let plain = IdempotencyLayer::new(MemoryStore::default());
    let keyed = IdempotencyLayer::new(MemoryStore::default()).with_key_secret([0x42; 32]);

    let mut g = c.benchmark_group("key");
    g.bench_function("parse_sfv", |b| {
        b.iter(|| IdempotencyKey::from_header_value(black_box(sfv.as_bytes())))
    });
    g.bench_function("parse_bare_uuid", |b| {
        b.iter(|| IdempotencyKey::from_header_value(black_box(UUID.as_bytes())))
    });
    g.bench_function("storage_key_sha256", |b| {
        b.iter(|| plain.storage_key_for(black_box(Some(scope)), black_box(UUID)))
    });
    g.bench_function("storage_key_hmac", |b| {
        b.iter(|| keyed.storage_key_for(black_box(Some(scope)), black_box(UUID)))
    });
    g.finish();
}

fn fingerprint(c: &mut Criterion) {
    let large = json_body(16 * 1024);
    let mut g = c.benchmark_group("fingerprint");
    for (name, body) in [("json_60B", SMALL_JSON), ("json_16KiB", &large[..])] {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                Fingerprint::compute(
                    black_box(b"POST"),
                    black_box(b"/orders"),
                    black_box(b"currency=EUR"),
                    black_box(b"application/json"),
                    black_box(body),
                )
            })
        });
    }
    g.finish();
}

fn record_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    for (size, body) in [
        ("60B", Bytes::from_static(SMALL_JSON)),
        ("1KiB", json_body(1024)),
    ] {
        let record = sample_record(body);
        let encoded = record.encode();
        assert_eq!(
            Record::decode(encoded.clone()).expect("a record decodes"),
            record
        );
        g.bench_function(format!("encode_{size}"), |b| {
            b.iter(|| black_box(&record).encode())
        });
        // The clone is a reference-count increment, as when the store hands out a record.
        g.bench_function(format!("decode_{size}"), |b| {
            b.iter(|| Record::decode(black_box(&encoded).clone()))
        });
    }
    g.finish();
}

/// One tracked request's trip through the store: `begin` on a fresh key takes the lease, then
/// `complete` stores the record.
async fn begin_complete(store: &MemoryStore, key: &StorageKey, record: &Bytes) {
    let begin = store
        .begin(key, &FP, LEASE)
        .await
        .expect("the store answers");
    let BeginOutcome::Acquired(token) = begin else {
        panic!("a fresh key takes the lease, got {begin:?}");
    };
    let completed = store
        .complete(key, token, record.clone(), TTL)
        .await
        .expect("the store answers");
    assert!(completed, "the lease owner completes");
}

/// A store of `CAPACITY` records, filled with the completed records of keys `0..CAPACITY`.
fn full_store(rt: &Runtime, record: &Bytes) -> MemoryStore {
    let store = MemoryStore::with_capacity(CAPACITY as usize);
    rt.block_on(async {
        for n in 0..CAPACITY {
            begin_complete(&store, &storage_key(n), record).await;
        }
    });
    let stats = store.stats();
    assert_eq!(
        (stats.len, stats.completed),
        (stats.capacity, stats.capacity)
    );
    store
}

fn memory_store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    let record = &sample_record(Bytes::from_static(SMALL_JSON)).encode();

    let mut g = c.benchmark_group("memory_store");

    // (a) begin on a fresh key + complete, in a store with room: nothing is evicted.
    g.bench_function("fresh_empty", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut elapsed = Duration::ZERO;
            let mut n = 0;
            while n < iters {
                let store = MemoryStore::with_capacity(CAPACITY as usize);
                let end = iters.min(n + EMPTY_STORE_BATCH);
                let start = Instant::now();
                for i in n..end {
                    begin_complete(&store, &storage_key(i), record).await;
                }
                elapsed += start.elapsed();
                n = end;
                // Dropping the store is not timed.
            }
            elapsed
        })
    });

    // (b) The same in a store full of completed records, so that every begin evicts the
    // oldest one: the steady state of a busy server.
    let store = &full_store(&rt, record);
    let mut next = CAPACITY;
    g.bench_function("fresh_at_capacity", |b| {
        b.to_async(&rt).iter(|| {
            let key = storage_key(next);
            next += 1;
            async move { begin_complete(store, &key, record).await }
        })
    });
    assert_eq!(store.stats().len, CAPACITY as usize);

    // (c) begin on a completed key: the replay path. The keys cycle through a full store.
    let store = &full_store(&rt, record);
    let mut next = 0;
    g.bench_function("replay", |b| {
        b.to_async(&rt).iter(|| {
            let key = storage_key(next % CAPACITY);
            next += 1;
            async move {
                match store.begin(&key, &FP, LEASE).await {
                    Ok(BeginOutcome::Completed(stored)) => stored,
                    other => panic!("a completed key replays, got {other:?}"),
                }
            }
        })
    });
    g.finish();
}

criterion_group!(benches, key, fingerprint, record_codec, memory_store);
criterion_main!(benches);
