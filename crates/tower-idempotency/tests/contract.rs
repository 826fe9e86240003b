//! The idempotency contract (which requests, scope and fingerprint, lifecycle, errors), rule by
//! rule, through a real axum server on 127.0.0.1:0 and a real HTTP client. Every handler counts
//! its executions; every test names the rule it proves and fails when that rule breaks.

#![allow(missing_docs, clippy::unwrap_used)]

use idempotency_test_support::events;
use idempotency_test_support::harness;
use idempotency_test_support::recording::RecordingStore;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::StreamExt;
use harness::{
    CancelProbe, Counter, Gate, Reply, assert_problem, assert_retry_after, client, counting_app,
    gated_app, send, serve,
};
use http::{HeaderValue, Method, StatusCode, header};
use tower_idempotency::Event;
use tower_idempotency::Fingerprint;
use tower_idempotency::{BeginOutcome, LeaseToken, StorageKey};
use tower_idempotency::{
    ConfigError, HeaderScope, IdempotencyLayer, MemoryStore, OnConflict, Scope, Store, StoreError,
};

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::new(MemoryStore::default())
}

/// A layer whose duplicates wait 5 s at most: where a test relies on a lease being released,
/// a lease left behind shows as a 409 at once, not as a run after the 30 s lock expires.
fn quick_waits() -> IdempotencyLayer {
    layer().with_wait_timeout(Duration::from_secs(5))
}

/// Asserts the reply is the handler's own first answer: 201, `exec-N ...`, not a replay.
fn assert_fresh(reply: &Reply, n: usize) {
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert!(!reply.replayed(), "an execution is not marked replayed");
    assert!(
        reply.text().starts_with(&format!("exec-{n} ")) || reply.text() == format!("exec-{n}"),
        "expected execution {n}, got {:?}",
        reply.text()
    );
}

/// Asserts `replay` repeats `original` byte for byte and is marked replayed.
fn assert_replay_of(replay: &Reply, original: &Reply) {
    assert_eq!(replay.status, original.status);
    assert_eq!(
        replay.body, original.body,
        "a replay carries the same bytes"
    );
    assert!(
        replay.replayed(),
        "a replay is marked Idempotent-Replayed: true"
    );
}

// ---------------------------------------------------------------------------------------------
// Which requests are tracked: key sources
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn key_from_idempotency_key_sf_string() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/orders")).body("x");

    let first = send(post().header("Idempotency-Key", "\"abc\"")).await;
    assert_fresh(&first, 1);
    let second = send(post().header("Idempotency-Key", "\"abc\"")).await;
    assert_replay_of(&second, &first);
    assert_eq!(count.get(), 1);

    // Another key is another request.
    let other = send(post().header("Idempotency-Key", "\"abd\"")).await;
    assert_fresh(&other, 2);
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn bare_key_and_sf_string_are_one_key() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/orders")).body("x");

    let quoted = send(post().header("Idempotency-Key", "\"abc\"")).await;
    assert_fresh(&quoted, 1);
    let bare = send(post().header("Idempotency-Key", "abc")).await;
    assert_replay_of(&bare, &quoted);
    // A bare UUID (not an sf-token: it may start with a digit) is a key too.
    let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let bare_uuid = send(post().header("Idempotency-Key", uuid)).await;
    assert_fresh(&bare_uuid, 2);
    let quoted_uuid = send(post().header("Idempotency-Key", format!("\"{uuid}\""))).await;
    assert_replay_of(&quoted_uuid, &bare_uuid);
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn key_from_x_idempotent_key_header() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let post = |k: &str| {
        c.post(srv.url("/orders"))
            .header("X-Idempotent-Key", k)
            .body("x")
    };

    let first = send(post("seed-key-1")).await;
    assert_fresh(&first, 1);
    assert_replay_of(&send(post("seed-key-1")).await, &first);
    assert_eq!(count.get(), 1);
    assert_fresh(&send(post("seed-key-2")).await, 2);
    // Flask-Idempotent's header and the draft's header name one key.
    let draft = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "\"seed-key-1\"")
            .body("x"),
    )
    .await;
    assert_replay_of(&draft, &first);
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn key_from_query_parameter() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();

    let first = send(c.post(srv.url("/orders?a=1&__idempotent_key=q1")).body("x")).await;
    assert_fresh(&first, 1);
    let again = send(c.post(srv.url("/orders?a=1&__idempotent_key=q1")).body("x")).await;
    assert_replay_of(&again, &first);
    assert_eq!(count.get(), 1);
    // The key parameter is not part of the fingerprint: the same request naming its key in a
    // header is a duplicate.
    let by_header = send(
        c.post(srv.url("/orders?a=1"))
            .header("Idempotency-Key", "q1")
            .body("x"),
    )
    .await;
    assert_replay_of(&by_header, &first);
    assert_fresh(
        &send(c.post(srv.url("/orders?a=1&__idempotent_key=q2")).body("x")).await,
        2,
    );
    assert_eq!(count.get(), 2);
}

/// Answers with the form fields the handler received, so a test sees the body arrived intact.
fn form_app(layer: IdempotencyLayer) -> (Router, Counter) {
    let count = Counter::default();
    let (c1, c2) = (count.clone(), count.clone());
    let router = Router::new()
        .route(
            "/form",
            post(
                move |axum::Form(fields): axum::Form<Vec<(String, String)>>| async move {
                    let n = c1.hit();
                    (StatusCode::CREATED, format!("exec-{n} {fields:?}"))
                },
            ),
        )
        .route(
            "/upload",
            post(move |mut multipart: axum::extract::Multipart| async move {
                let n = c2.hit();
                let mut fields = Vec::new();
                while let Some(field) = multipart.next_field().await.unwrap() {
                    let name = field.name().unwrap_or_default().to_owned();
                    let file = field.file_name().map(str::to_owned);
                    let data = field.bytes().await.unwrap();
                    fields.push((name, file, data.len()));
                }
                (StatusCode::CREATED, format!("exec-{n} {fields:?}"))
            }),
        )
        .layer(layer);
    (router, count)
}

#[tokio::test]
async fn key_from_urlencoded_form_field() {
    let (app, count) = form_app(layer());
    let srv = serve(app).await;
    let c = client();
    let form = |key: &'static str| {
        c.post(srv.url("/form"))
            .form(&[("item", "book"), ("__idempotent_key", key)])
    };

    let first = send(form("f1")).await;
    assert_fresh(&first, 1);
    // The handler still reads the whole form.
    assert!(
        first.text().contains(r#"("item", "book")"#),
        "{}",
        first.text()
    );
    assert!(first.text().contains(r#"("__idempotent_key", "f1")"#));
    assert_replay_of(&send(form("f1")).await, &first);
    assert_eq!(count.get(), 1);
    assert_fresh(&send(form("f2")).await, 2);
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn key_from_multipart_form_field() {
    let (app, count) = form_app(layer());
    let srv = serve(app).await;
    let c = client();
    // Like a browser, the client draws a fresh boundary for every submission: a double-submitted
    // upload form differs in its raw bytes but is the same request.
    let form = |key: &'static str| {
        let form = reqwest::multipart::Form::new()
            .text("item", "book")
            .text("__idempotent_key", key)
            .part(
                "file",
                reqwest::multipart::Part::bytes(vec![0u8, 0xff, 0x10, 0x80])
                    .file_name("a.bin")
                    .mime_str("application/octet-stream")
                    .unwrap(),
            );
        c.post(srv.url("/upload")).multipart(form)
    };

    let first = send(form("m1")).await;
    assert_fresh(&first, 1);
    assert!(
        first.text().contains(r#"("file", Some("a.bin"), 4)"#),
        "the handler reads the whole multipart body: {}",
        first.text()
    );
    let second = send(form("m1")).await;
    assert_replay_of(&second, &first);
    assert_eq!(count.get(), 1);
    assert_fresh(&send(form("m2")).await, 2);
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn multipart_with_other_content_under_the_same_key_is_a_mismatch() {
    let (app, count) = form_app(layer());
    let srv = serve(app).await;
    let c = client();
    let form = |item: &'static str| {
        let form = reqwest::multipart::Form::new()
            .text("item", item)
            .text("__idempotent_key", "m-same");
        c.post(srv.url("/upload")).multipart(form)
    };
    assert_fresh(&send(form("book")).await, 1);
    assert_problem(&send(form("lamp")).await, 422, "key-reused");
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn tracked_methods_are_post_put_patch_delete() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    for (i, method) in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE]
        .into_iter()
        .enumerate()
    {
        let key = format!("m-{method}");
        let req = || {
            c.request(method.clone(), srv.url("/orders"))
                .header("Idempotency-Key", &key)
        };
        let first = send(req()).await;
        assert_fresh(&first, i + 1);
        assert_replay_of(&send(req()).await, &first);
        assert_eq!(count.get(), i + 1, "{method} is tracked");
    }
}

#[tokio::test]
async fn methods_are_configurable() {
    let (app, count) = counting_app(layer().with_methods([Method::POST]));
    let srv = serve(app).await;
    let c = client();
    for _ in 0..2 {
        let r = send(c.put(srv.url("/orders")).header("Idempotency-Key", "k")).await;
        assert_eq!(r.status, StatusCode::CREATED);
        assert!(!r.replayed());
    }
    assert_eq!(count.get(), 2, "PUT is not tracked when only POST is");
}

// ---------------------------------------------------------------------------------------------
// Bad keys: 400 problem+json, the handler never runs
// ---------------------------------------------------------------------------------------------

async fn assert_bad_key(req: reqwest::RequestBuilder, slug: &str, count: &Counter) {
    let reply = send(req).await;
    assert_problem(&reply, 400, slug);
    assert_eq!(count.get(), 0, "a bad key never reaches the handler");
}

#[tokio::test]
async fn empty_key_is_400() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/orders")).body("x");
    assert_bad_key(
        post().header("Idempotency-Key", "\"\""),
        "key-invalid",
        &count,
    )
    .await;
    assert_bad_key(post().header("Idempotency-Key", ""), "key-invalid", &count).await;
    assert_bad_key(post().header("X-Idempotent-Key", ""), "key-invalid", &count).await;
    assert_bad_key(
        c.post(srv.url("/orders?__idempotent_key=")).body("x"),
        "key-invalid",
        &count,
    )
    .await;
    assert_bad_key(
        c.post(srv.url("/orders"))
            .form(&[("__idempotent_key", ""), ("item", "book")]),
        "key-invalid",
        &count,
    )
    .await;
}

#[tokio::test]
async fn key_longer_than_255_is_400_and_255_is_fine() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/orders")).body("x");
    let long = "k".repeat(256);
    assert_bad_key(
        post().header("Idempotency-Key", format!("\"{long}\"")),
        "key-invalid",
        &count,
    )
    .await;
    assert_bad_key(
        post().header("Idempotency-Key", &long),
        "key-invalid",
        &count,
    )
    .await;
    assert_bad_key(
        post().header("X-Idempotent-Key", &long),
        "key-invalid",
        &count,
    )
    .await;
    assert_bad_key(
        c.post(srv.url(&format!("/orders?__idempotent_key={long}")))
            .body("x"),
        "key-invalid",
        &count,
    )
    .await;

    let max = "k".repeat(255);
    let ok = send(post().header("Idempotency-Key", format!("\"{max}\""))).await;
    assert_fresh(&ok, 1);
}

#[tokio::test]
async fn non_visible_ascii_key_is_400() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/orders")).body("x");
    // A space after sf unquoting.
    assert_bad_key(
        post().header("Idempotency-Key", "\"a b\""),
        "key-invalid",
        &count,
    )
    .await;
    // A tab inside a bare value.
    assert_bad_key(
        post().header("Idempotency-Key", "a\tb"),
        "key-invalid",
        &count,
    )
    .await;
    // Bytes above 0x7E, sent raw in a header (obs-text).
    let latin = HeaderValue::from_bytes(b"caf\xe9").unwrap();
    assert_bad_key(
        post().header("X-Idempotent-Key", latin.clone()),
        "key-invalid",
        &count,
    )
    .await;
    assert_bad_key(
        post().header("Idempotency-Key", latin),
        "key-invalid",
        &count,
    )
    .await;
    // Percent-encoded UTF-8 in the query.
    assert_bad_key(
        c.post(srv.url("/orders?__idempotent_key=caf%C3%A9"))
            .body("x"),
        "key-invalid",
        &count,
    )
    .await;
    // A control character in a form field.
    assert_bad_key(
        c.post(srv.url("/orders"))
            .form(&[("__idempotent_key", "a\u{1}b")]),
        "key-invalid",
        &count,
    )
    .await;
}

#[tokio::test]
async fn malformed_sf_string_is_400() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/orders")).body("x");
    // Unterminated, a bad escape, trailing garbage, a bad parameter, an inner list.
    for bad in [
        "\"abc",
        "\"a\\qb\"",
        "\"abc\" junk",
        "\"a\";p=\"unterminated",
        "(\"a\" \"b\")",
    ] {
        assert_bad_key(post().header("Idempotency-Key", bad), "key-invalid", &count).await;
    }
}

#[tokio::test]
async fn sf_string_escapes_and_parameters_are_parsed() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/orders")).body("x");
    // `"a\"b\\c"` unquotes to the key `a"b\c`, which Flask-Idempotent's header carries as it is.
    let quoted = send(post().header("Idempotency-Key", r#""a\"b\\c""#)).await;
    assert_fresh(&quoted, 1);
    assert_replay_of(
        &send(post().header("X-Idempotent-Key", r#"a"b\c"#)).await,
        &quoted,
    );
    // Parameters on the item are not part of the key.
    let plain = send(post().header("Idempotency-Key", "\"p1\"")).await;
    assert_fresh(&plain, 2);
    assert_replay_of(
        &send(post().header("Idempotency-Key", "\"p1\";v=2")).await,
        &plain,
    );
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn repeated_idempotency_key_header_is_400() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    // reqwest sends each value on its own header line.
    let req = c
        .post(srv.url("/orders"))
        .header("Idempotency-Key", "\"dup\"")
        .header("Idempotency-Key", "\"dup\"")
        .body("x");
    assert_bad_key(req, "key-conflict", &count).await;
    let req = c
        .post(srv.url("/orders"))
        .header("Idempotency-Key", "\"one\"")
        .header("Idempotency-Key", "\"two\"")
        .body("x");
    assert_bad_key(req, "key-conflict", &count).await;
}

#[tokio::test]
async fn two_sources_with_different_keys_are_400() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    assert_bad_key(
        c.post(srv.url("/orders?__idempotent_key=b"))
            .header("X-Idempotent-Key", "a"),
        "key-conflict",
        &count,
    )
    .await;
    assert_bad_key(
        c.post(srv.url("/orders"))
            .header("X-Idempotent-Key", "a")
            .form(&[("__idempotent_key", "b")]),
        "key-conflict",
        &count,
    )
    .await;
    assert_bad_key(
        c.post(srv.url("/orders?__idempotent_key=a"))
            .multipart(reqwest::multipart::Form::new().text("__idempotent_key", "b")),
        "key-conflict",
        &count,
    )
    .await;

    // An `Idempotency-Key` that disagrees with a key the page chose is ignored: the page's key
    // wins (browsers add a key of their own; see tests/browser_keys.rs).
    let page_wins = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "\"a\"")
            .header("X-Idempotent-Key", "b")
            .body("x"),
    )
    .await;
    assert_fresh(&page_wins, 1);
    let same_page_key = send(
        c.post(srv.url("/orders?__idempotent_key=b"))
            .header("Idempotency-Key", "c")
            .body("x"),
    )
    .await;
    assert_replay_of(&same_page_key, &page_wins);

    // Sources that agree name one key.
    let agree = send(
        c.post(srv.url("/orders?__idempotent_key=same"))
            .header("Idempotency-Key", "\"same\"")
            .header("X-Idempotent-Key", "same")
            .body("x"),
    )
    .await;
    assert_fresh(&agree, 2);
}

#[tokio::test]
async fn require_key_refuses_keyless_requests() {
    let (app, count) = counting_app(layer().with_require_key(true));
    let srv = serve(app).await;
    let c = client();
    assert_bad_key(c.post(srv.url("/orders")).body("x"), "key-required", &count).await;
    // A form without the key field is keyless too.
    assert_bad_key(
        c.post(srv.url("/orders")).form(&[("item", "book")]),
        "key-required",
        &count,
    )
    .await;
    // Methods that are not covered still pass.
    let get = send(c.get(srv.url("/orders"))).await;
    assert_fresh(&get, 1);
    let keyed = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "k")
            .body("x"),
    )
    .await;
    assert_fresh(&keyed, 2);
}

// ---------------------------------------------------------------------------------------------
// Pass-through
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn get_with_a_key_passes_through() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    for n in 1..=3 {
        let r = send(c.get(srv.url("/orders")).header("Idempotency-Key", "\"g\"")).await;
        assert_fresh(&r, n);
    }
    // Untouched, key or not: even a key that would be refused on a POST.
    let r = send(
        c.get(srv.url("/orders"))
            .header("Idempotency-Key", "\"a b\""),
    )
    .await;
    assert_fresh(&r, 4);
    assert_eq!(count.get(), 4);
}

#[tokio::test]
async fn keyless_post_passes_through_untouched() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    for n in 1..=3 {
        let r = send(c.post(srv.url("/orders")).body("hello")).await;
        assert_fresh(&r, n);
        assert!(r.text().ends_with(" POST /orders 5"), "{}", r.text());
    }
    // A keyless form is read for a key, then handed on whole.
    let (app, count2) = form_app(layer());
    let srv2 = serve(app).await;
    for n in 1..=2 {
        let r = send(c.post(srv2.url("/form")).form(&[("item", "book")])).await;
        assert_fresh(&r, n);
        assert!(r.text().contains(r#"("item", "book")"#), "{}", r.text());
    }
    assert_eq!(count.get(), 3);
    assert_eq!(count2.get(), 2);
}

// ---------------------------------------------------------------------------------------------
// Scope, storage key, fingerprint
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn fingerprint_mismatch_on_body_is_422() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let post = |body: &'static str| {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "fp")
            .body(body)
    };
    let first = send(post("one")).await;
    assert_fresh(&first, 1);
    let json = assert_problem(&send(post("two")).await, 422, "key-reused");
    assert!(
        !json.to_string().contains("exec-1"),
        "a problem never reveals the stored response"
    );
    assert_eq!(count.get(), 1);
    // The record is intact: the original request still replays.
    assert_replay_of(&send(post("one")).await, &first);
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn fingerprint_mismatch_on_path_is_422() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let first = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "fp")
            .body("one"),
    )
    .await;
    assert_fresh(&first, 1);
    let other = send(
        c.post(srv.url("/other"))
            .header("Idempotency-Key", "fp")
            .body("one"),
    )
    .await;
    assert_problem(&other, 422, "key-reused");
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn fingerprint_covers_method_query_and_content_type() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let first = send(
        c.post(srv.url("/orders?a=1"))
            .header("Idempotency-Key", "fp")
            .header("Content-Type", "text/plain")
            .body("one"),
    )
    .await;
    assert_fresh(&first, 1);
    let variants = [
        c.put(srv.url("/orders?a=1"))
            .header("Content-Type", "text/plain")
            .body("one"),
        c.post(srv.url("/orders?a=2"))
            .header("Content-Type", "text/plain")
            .body("one"),
        c.post(srv.url("/orders?a=1"))
            .header("Content-Type", "application/json")
            .body("one"),
    ];
    for req in variants {
        assert_problem(
            &send(req.header("Idempotency-Key", "fp")).await,
            422,
            "key-reused",
        );
    }
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn fingerprint_mismatch_while_in_flight_is_422() {
    let gate = Gate::default();
    let (app, count) = gated_app(layer(), gate.clone());
    let srv = serve(app).await;
    let c = client();
    let first = {
        let req = c
            .post(srv.url("/slow"))
            .header("Idempotency-Key", "k")
            .body("one");
        tokio::spawn(send(req))
    };
    count.reached(1).await;
    let other = send(
        c.post(srv.url("/slow"))
            .header("Idempotency-Key", "k")
            .body("two"),
    )
    .await;
    assert_problem(&other, 422, "key-reused");
    gate.open();
    assert_fresh(&first.await.unwrap(), 1);
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn fingerprint_covers_content_encoding() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    // The same bytes mean another body under another encoding.
    let post = |encoding: Option<&'static str>| {
        let req = c
            .post(srv.url("/orders"))
            .header("Idempotency-Key", "enc")
            .header("Content-Type", "application/json")
            .body(&b"\x1f\x8b\x08\x00same bytes"[..]);
        match encoding {
            Some(e) => req.header("Content-Encoding", e),
            None => req,
        }
    };
    let gzip = send(post(Some("gzip"))).await;
    assert_fresh(&gzip, 1);
    for other in [None, Some("br"), Some("gzip, gzip")] {
        assert_problem(&send(post(other)).await, 422, "key-reused");
    }
    assert_replay_of(&send(post(Some("gzip"))).await, &gzip);
    assert_eq!(count.get(), 1);

    // Without Content-Encoding the fingerprint is what it always was.
    let plain = || {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "plain")
            .body("x")
    };
    let first = send(plain()).await;
    assert_fresh(&first, 2);
    assert_replay_of(&send(plain()).await, &first);
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn fingerprint_headers_are_configurable_and_never_the_key_headers() {
    let over = http::HeaderName::from_static("x-http-method-override");
    let (app, count) = counting_app(layer().with_fingerprint_headers([over.clone()]).unwrap());
    let srv = serve(app).await;
    let c = client();
    let post = |method: Option<&'static str>| {
        let req = c
            .post(srv.url("/orders"))
            .header("Idempotency-Key", "override")
            .body("x");
        match method {
            Some(m) => req.header("X-HTTP-Method-Override", m),
            None => req,
        }
    };
    let put = send(post(Some("PUT"))).await;
    assert_fresh(&put, 1);
    // The same key asking for a delete is another request, not a replay of the put.
    assert_problem(&send(post(Some("DELETE"))).await, 422, "key-reused");
    assert_problem(&send(post(None)).await, 422, "key-reused");
    assert_replay_of(&send(post(Some("PUT"))).await, &put);
    assert_eq!(count.get(), 1);
    // Headers not named do not count.
    let other = || {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "unnamed")
            .body("x")
    };
    let first = send(other().header("X-Other", "1")).await;
    assert_fresh(&first, 2);
    assert_replay_of(&send(other().header("X-Other", "2")).await, &first);

    // The headers that carry the key are refused at configuration.
    for name in ["idempotency-key", "x-idempotent-key"] {
        let name = http::HeaderName::from_static(name);
        let refused = layer().with_fingerprint_headers([over.clone(), name.clone()]);
        assert_eq!(
            refused.err(),
            Some(ConfigError::KeyHeaderInFingerprint(name))
        );
    }
}

/// The fingerprinted form of a multipart body of text fields: the fields, length-prefixed.
fn canonical_text_fields(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |part: &[u8]| {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    };
    put(b"multipart fields v1");
    for (name, value) in fields {
        put(b"1");
        put(name.as_bytes());
        put(b"0"); // no file name
        put(b"0"); // no content type
        put(value.as_bytes());
    }
    out
}

#[tokio::test]
async fn a_multipart_body_without_a_boundary_is_400_and_never_passes_for_a_parsed_one() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let form = c
        .post(srv.url("/orders"))
        .header("Idempotency-Key", "mp")
        .header("Content-Type", "multipart/form-data; boundary=XYZ")
        .body("--XYZ\r\nContent-Disposition: form-data; name=\"item\"\r\n\r\nbook\r\n--XYZ--\r\n");
    let first = send(form).await;
    assert_fresh(&first, 1);
    // Without a boundary the body cannot be parsed. Its raw bytes, made to look like the
    // fields of the form above, must not replay it (nor run).
    let forged = c
        .post(srv.url("/orders"))
        .header("Idempotency-Key", "mp")
        .header("Content-Type", "multipart/form-data")
        .body(canonical_text_fields(&[("item", "book")]));
    assert_problem(&send(forged).await, 400, "form-malformed");
    let plain = c
        .post(srv.url("/orders"))
        .header("Idempotency-Key", "mp-2")
        .header("Content-Type", "multipart/form-data")
        .body("item=book");
    assert_problem(&send(plain).await, 400, "form-malformed");
    assert_eq!(count.get(), 1);
    // Without a key, the handler judges it.
    let keyless = c
        .post(srv.url("/orders"))
        .header("Content-Type", "multipart/form-data")
        .body("item=book");
    assert_fresh(&send(keyless).await, 2);
}

#[tokio::test]
async fn scopes_are_separate_by_authorization() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let post = |auth: Option<&'static str>| {
        let req = c
            .post(srv.url("/orders"))
            .header("Idempotency-Key", "shared-key")
            .body("x");
        match auth {
            Some(a) => req.header("Authorization", a),
            None => req,
        }
    };
    let alice = send(post(Some("Bearer alice"))).await;
    assert_fresh(&alice, 1);
    let bob = send(post(Some("Bearer bob"))).await;
    assert_fresh(&bob, 2);
    let anonymous = send(post(None)).await;
    assert_fresh(&anonymous, 3);
    assert_eq!(count.get(), 3);

    assert_replay_of(&send(post(Some("Bearer alice"))).await, &alice);
    assert_replay_of(&send(post(Some("Bearer bob"))).await, &bob);
    assert_replay_of(&send(post(None)).await, &anonymous);
    assert_eq!(count.get(), 3);
}

#[tokio::test]
async fn scope_headers_and_global_scope_are_configurable() {
    let (app, count) =
        counting_app(layer().with_scope_headers([http::HeaderName::from_static("x-tenant")]));
    let srv = serve(app).await;
    let c = client();
    let post = |tenant: &'static str, auth: &'static str| {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "k")
            .header("X-Tenant", tenant)
            .header("Authorization", auth)
            .body("x")
    };
    let a = send(post("a", "one")).await;
    assert_fresh(&a, 1);
    // Authorization is no longer the scope: the same tenant replays.
    assert_replay_of(&send(post("a", "two")).await, &a);
    assert_fresh(&send(post("b", "one")).await, 2);
    assert_eq!(count.get(), 2);

    let (app, count) = counting_app(layer().with_global_scope());
    let srv = serve(app).await;
    let post = |auth: &'static str| {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "k")
            .header("Authorization", auth)
            .body("x")
    };
    let first = send(post("one")).await;
    assert_replay_of(&send(post("two")).await, &first);
    assert_eq!(count.get(), 1);
}

/// Who the authentication middleware says the caller is.
#[derive(Clone)]
struct UserId(u64);

/// An authentication middleware: `X-Api-Key` names the user, who goes into the request's
/// extensions; any other request is a 401.
async fn authenticate(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, StatusCode> {
    let user = match req.headers().get("x-api-key").map(|v| v.as_bytes()) {
        Some(b"alice-secret") => UserId(1),
        Some(b"bob-secret") => UserId(2),
        _ => return Err(StatusCode::UNAUTHORIZED),
    };
    req.extensions_mut().insert(user);
    Ok(next.run(req).await)
}

/// The scope is the user the authentication middleware found; without one it is unknown.
fn user_scope(parts: &http::request::Parts) -> Scope {
    parts
        .extensions
        .get::<UserId>()
        .map_or(Scope::Unknown, |user| Scope::caller(user.0.to_be_bytes()))
}

/// Answers with the caller's user id and the execution number.
fn user_app() -> (Router, Counter) {
    let count = Counter::default();
    let c = count.clone();
    let router = Router::new().route(
        "/orders",
        post(move |req: axum::extract::Request| {
            let c = c.clone();
            async move {
                let n = c.hit();
                let user = req.extensions().get::<UserId>().map_or(0, |u| u.0);
                (
                    StatusCode::CREATED,
                    format!("exec-{n} receipt of user {user}"),
                )
            }
        }),
    );
    (router, count)
}

#[tokio::test]
async fn a_scope_from_an_auth_layer_that_runs_first_keeps_users_apart() {
    let (router, count) = user_app();
    // The layer added last runs first: authentication, then idempotency.
    let app = router
        .layer(layer().with_scope(user_scope))
        .layer(axum::middleware::from_fn(authenticate));
    let srv = serve(app).await;
    let c = client();
    let post = |api_key: &'static str| {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "same-key")
            .header("X-Api-Key", api_key)
            .body("same body")
    };
    let alice = send(post("alice-secret")).await;
    assert_fresh(&alice, 1);
    assert!(alice.text().ends_with("user 1"), "{}", alice.text());
    // Bob sends Alice's key and body: he runs a request of his own, never gets her receipt.
    let bob = send(post("bob-secret")).await;
    assert_fresh(&bob, 2);
    assert!(bob.text().ends_with("user 2"), "{}", bob.text());
    assert_replay_of(&send(post("alice-secret")).await, &alice);
    assert_replay_of(&send(post("bob-secret")).await, &bob);
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn an_auth_layer_that_runs_after_the_layer_is_a_500_scope_unavailable_not_a_leak() {
    let events = events::Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let store = RecordingStore::default();
    let (router, count) = user_app();
    // The wrong order: idempotency runs first, before any user is known.
    let app = router
        .layer(axum::middleware::from_fn(authenticate))
        .layer(IdempotencyLayer::new(store.clone()).with_scope(user_scope));
    let srv = serve(app).await;
    let c = client();
    let post = |api_key: &'static str| {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "same-key")
            .header("X-Api-Key", api_key)
            .body("same body")
    };
    for api_key in ["alice-secret", "bob-secret", "alice-secret"] {
        let reply = send(post(api_key)).await;
        let json = assert_problem(&reply, 500, "scope-unavailable");
        assert!(!json.to_string().contains("receipt"), "{json}");
    }
    assert_eq!(count.get(), 0, "the handler never ran");
    assert_eq!(store.total_calls(), 0, "the store was never asked");
    assert_eq!(events.get(Event::ScopeUnavailable), 3);
    // Requests without a key are not tracked, so their scope does not matter.
    let keyless = send(c.post(srv.url("/orders")).header("X-Api-Key", "bob-secret")).await;
    assert_fresh(&keyless, 1);
}

/// The layer keeps the handles it registered with a recorder, but a request counts with the
/// recorder in use when it runs: one set for a while, then another, each sees its own requests.
#[tokio::test]
async fn each_recorder_counts_the_requests_made_while_it_is_in_use() {
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let post = |key: &str| {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", format!("\"{key}\""))
            .body("one")
    };
    let (first, second) = (events::Events::default(), events::Events::default());
    {
        let _local = metrics::set_default_local_recorder(&first);
        assert_fresh(&send(post("first")).await, 1);
        assert!(send(post("first")).await.replayed());
    }
    {
        let _local = metrics::set_default_local_recorder(&second);
        assert_fresh(&send(post("second")).await, 2);
    }
    let counted = |e: &events::Events| (e.get(Event::Executed), e.get(Event::Replayed));
    assert_eq!(counted(&first), (1, 1));
    assert_eq!(counted(&second), (1, 0));
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn header_scopes_without_their_headers_are_global_or_refused_as_configured() {
    // The default: a caller without Authorization is anonymous, in the global scope.
    let (app, count) = counting_app(layer());
    let srv = serve(app).await;
    let c = client();
    let anonymous = || {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "anon")
            .body("x")
    };
    let first = send(anonymous()).await;
    assert_fresh(&first, 1);
    assert_replay_of(&send(anonymous()).await, &first);
    assert_eq!(count.get(), 1);

    // A header an authentication gateway always sets: a request without it is refused.
    let gateway =
        HeaderScope::new([http::HeaderName::from_static("x-user-id")]).unknown_when_absent();
    let (app, count) = counting_app(layer().with_scope(gateway));
    let srv = serve(app).await;
    let post = |user: Option<&'static str>| {
        let req = c
            .post(srv.url("/orders"))
            .header("Idempotency-Key", "gw")
            .header("Authorization", "Bearer shared")
            .body("x");
        match user {
            Some(u) => req.header("X-User-Id", u),
            None => req,
        }
    };
    assert_problem(&send(post(None)).await, 500, "scope-unavailable");
    let one = send(post(Some("1"))).await;
    assert_fresh(&one, 1);
    assert_fresh(&send(post(Some("2"))).await, 2);
    assert_replay_of(&send(post(Some("1"))).await, &one);
    assert_problem(&send(post(None)).await, 500, "scope-unavailable");
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn store_never_sees_the_raw_key_or_scope() {
    let spy = RecordingStore::default();
    let (app, count) = counting_app(IdempotencyLayer::new(spy.clone()));
    let srv = serve(app).await;
    let c = client();
    let key = format!("secret-key-{}", "z".repeat(200));
    for auth in ["Bearer token-alice-42", "Bearer token-bob-77"] {
        let r = send(
            c.post(srv.url("/orders"))
                .header("Idempotency-Key", &key)
                .header("Authorization", auth)
                .body("x"),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    assert_eq!(count.get(), 2);
    // Everything the store was given: the storage keys and the records.
    let seen: Vec<Vec<u8>> = (spy.keys().iter().map(|k| k.0.to_vec()))
        .chain(spy.records().iter().map(|r| r.to_vec()))
        .collect();
    let keys: HashSet<&Vec<u8>> = seen.iter().filter(|s| s.len() == 32).collect();
    assert_eq!(keys.len(), 2, "one fixed-size storage key per scope");
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    for blob in seen.iter() {
        assert!(
            !contains(blob, b"secret-key"),
            "the raw key reached the store"
        );
        assert!(
            !contains(blob, b"token-alice"),
            "the scope reached the store"
        );
        assert!(!contains(blob, b"token-bob"), "the scope reached the store");
    }
}

#[tokio::test]
async fn namespaces_separate_services_sharing_a_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let (app_a, count_a) =
        counting_app(IdempotencyLayer::from_shared(store.clone()).with_namespace("billing"));
    let (app_b, count_b) =
        counting_app(IdempotencyLayer::from_shared(store.clone()).with_namespace("shipping"));
    let (app_a2, count_a2) =
        counting_app(IdempotencyLayer::from_shared(store).with_namespace("billing"));
    let (a, b, a2) = (serve(app_a).await, serve(app_b).await, serve(app_a2).await);
    let c = client();
    let post = |srv: &harness::TestServer| {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "k")
            .body("x")
    };
    let first = send(post(&a)).await;
    assert_fresh(&first, 1);
    assert_fresh(&send(post(&b)).await, 1);
    // Another instance of the same service shares its records.
    assert_replay_of(&send(post(&a2)).await, &first);
    assert_eq!((count_a.get(), count_b.get(), count_a2.get()), (1, 1, 0));
}

// ---------------------------------------------------------------------------------------------
// Replay fidelity
// ---------------------------------------------------------------------------------------------

const OLD_DATE: &str = "Mon, 01 Jan 2001 00:00:00 GMT";
const BINARY: &[u8] = &[
    0x00, 0x9f, 0x92, 0x96, 0xff, 0xfe, 0xc3, 0x28, b'\r', b'\n', 0x80,
];

#[tokio::test]
async fn replay_keeps_status_body_and_headers_but_not_cookies_or_date() {
    let count = Counter::default();
    let c2 = count.clone();
    let app = Router::new()
        .route(
            "/bin",
            post(move || async move {
                c2.hit();
                let mut res = http::Response::new(Body::from(BINARY));
                *res.status_mut() = StatusCode::CREATED;
                let h = res.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                h.insert(header::LOCATION, HeaderValue::from_static("/orders/7"));
                h.append("x-multi", HeaderValue::from_static("one"));
                h.append("x-multi", HeaderValue::from_static("two"));
                h.append("x-multi", HeaderValue::from_static("one"));
                h.insert("x-raw", HeaderValue::from_bytes(b"\xfftok\x80en").unwrap());
                h.append(
                    header::SET_COOKIE,
                    HeaderValue::from_static("session=s1; Path=/"),
                );
                h.append(header::SET_COOKIE, HeaderValue::from_static("other=o"));
                h.insert(header::DATE, HeaderValue::from_static(OLD_DATE));
                h.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
                h.insert("x-hop", HeaderValue::from_static("1"));
                res
            }),
        )
        .layer(layer());
    let srv = serve(app).await;
    let c = client();
    let post = || {
        c.post(srv.url("/bin"))
            .header("Idempotency-Key", "fidelity")
    };

    let first = send(post()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(&first.body[..], BINARY);
    assert!(!first.replayed());
    // The first caller gets every header the handler set.
    assert_eq!(first.headers.get_all(header::SET_COOKIE).iter().count(), 2);
    assert_eq!(first.header("date"), Some(OLD_DATE));
    assert_eq!(first.header("x-hop"), Some("1"));

    let replay = send(post()).await;
    assert_eq!(count.get(), 1);
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(&replay.body[..], BINARY, "the body survives byte for byte");
    assert!(replay.replayed());
    assert_eq!(
        replay.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(replay.header("location"), Some("/orders/7"));
    let multi: Vec<_> = replay.headers.get_all("x-multi").iter().collect();
    assert_eq!(
        multi,
        ["one", "two", "one"],
        "repeated headers survive, in order"
    );
    assert_eq!(
        replay.headers.get("x-raw").unwrap().as_bytes(),
        b"\xfftok\x80en",
        "non-UTF-8 header values survive byte for byte"
    );
    assert!(
        replay.headers.get(header::SET_COOKIE).is_none(),
        "Set-Cookie is another caller's session and is never replayed"
    );
    let date = replay.header("date").expect("a replay carries a Date");
    assert_ne!(
        date, OLD_DATE,
        "a replay gets a fresh Date, not the stored one"
    );
    assert!(
        replay.headers.get("x-hop").is_none(),
        "headers named in Connection are hop-by-hop and not stored"
    );
    assert!(first.headers.get("idempotent-replayed").is_none());
}

#[tokio::test]
async fn empty_and_json_bodies_replay() {
    let count = Counter::default();
    let (c1, c2) = (count.clone(), count.clone());
    let app = Router::new()
        .route(
            "/empty",
            axum::routing::delete(move || async move {
                c1.hit();
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/json",
            post(
                move |axum::Json(v): axum::Json<serde_json::Value>| async move {
                    let n = c2.hit();
                    (
                        StatusCode::CREATED,
                        axum::Json(serde_json::json!({"exec": n, "got": v})),
                    )
                },
            ),
        )
        .layer(layer());
    let srv = serve(app).await;
    let c = client();
    let empty = || c.delete(srv.url("/empty")).header("Idempotency-Key", "e");
    let e1 = send(empty()).await;
    assert_eq!(e1.status, StatusCode::NO_CONTENT);
    let e2 = send(empty()).await;
    assert_eq!(e2.status, StatusCode::NO_CONTENT);
    assert!(e2.replayed() && e2.body.is_empty());

    let json = || {
        c.post(srv.url("/json"))
            .header("Idempotency-Key", "j")
            .json(&serde_json::json!({"sku": "A-1", "qty": 2}))
    };
    let j1 = send(json()).await;
    assert_eq!(j1.status, StatusCode::CREATED);
    let j2 = send(json()).await;
    assert_replay_of(&j2, &j1);
    assert_eq!(j2.header("content-type"), Some("application/json"));
    assert_eq!(count.get(), 2);
}

// ---------------------------------------------------------------------------------------------
// Storable outcomes
// ---------------------------------------------------------------------------------------------

/// `/status/{code}` counts and answers `code` with `exec-N`.
fn status_app(layer: IdempotencyLayer) -> (Router, Counter) {
    let count = Counter::default();
    let c = count.clone();
    let router = Router::new()
        .route(
            "/status/{code}",
            post(
                move |axum::extract::Path(code): axum::extract::Path<u16>| async move {
                    let n = c.hit();
                    (StatusCode::from_u16(code).unwrap(), format!("exec-{n}"))
                },
            ),
        )
        .layer(layer);
    (router, count)
}

#[tokio::test]
async fn server_errors_and_retry_statuses_are_released() {
    let (app, count) = status_app(quick_waits());
    let srv = serve(app).await;
    let c = client();
    let mut expected = 0;
    for code in [500u16, 502, 503, 408, 409, 425, 429] {
        for _ in 0..2 {
            expected += 1;
            let r = send(
                c.post(srv.url(&format!("/status/{code}")))
                    .header("Idempotency-Key", format!("k-{code}")),
            )
            .await;
            assert_eq!(r.status.as_u16(), code);
            assert_eq!(r.text(), format!("exec-{expected}"), "{code} runs again");
            assert!(!r.replayed(), "a {code} is never replayed");
        }
    }
    assert_eq!(count.get(), expected);
}

#[tokio::test]
async fn a_500_then_success_is_stored_on_the_retry() {
    let count = Counter::default();
    let c = count.clone();
    let app = Router::new()
        .route(
            "/flaky",
            post(move || async move {
                match c.hit() {
                    1 => (StatusCode::INTERNAL_SERVER_ERROR, "exec-1".to_owned()),
                    2 => (StatusCode::TOO_MANY_REQUESTS, "exec-2".to_owned()),
                    n => (StatusCode::CREATED, format!("exec-{n}")),
                }
            }),
        )
        .layer(quick_waits());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/flaky")).header("Idempotency-Key", "retry");
    assert_eq!(send(post()).await.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(send(post()).await.status, StatusCode::TOO_MANY_REQUESTS);
    let ok = send(post()).await;
    assert_fresh(&ok, 3);
    assert_replay_of(&send(post()).await, &ok);
    assert_eq!(count.get(), 3);
}

#[tokio::test]
async fn client_errors_like_404_are_stored() {
    let (app, count) = status_app(layer());
    let srv = serve(app).await;
    let c = client();
    for (i, code) in [404u16, 400, 422, 302].into_iter().enumerate() {
        let post = || {
            c.post(srv.url(&format!("/status/{code}")))
                .header("Idempotency-Key", format!("k-{code}"))
        };
        let first = send(post()).await;
        assert_eq!(first.status.as_u16(), code);
        assert!(!first.replayed());
        let again = send(post()).await;
        assert_replay_of(&again, &first);
        assert_eq!(count.get(), i + 1, "a {code} is stored and replayed");
    }
}

#[tokio::test]
async fn storable_predicate_is_configurable() {
    let (app, count) = status_app(quick_waits().with_storable(|s| s.is_success()));
    let srv = serve(app).await;
    let c = client();
    let post = || {
        c.post(srv.url("/status/404"))
            .header("Idempotency-Key", "p")
    };
    send(post()).await;
    let again = send(post()).await;
    assert!(!again.replayed());
    assert_eq!(count.get(), 2);
}

#[tokio::test]
async fn a_response_marked_not_run_releases_the_key_whatever_the_predicate() {
    let count = Counter::default();
    let c = count.clone();
    // Every status is storable here; only the mark frees the key.
    let app = Router::new()
        .route(
            "/gateway/{mark}",
            post(
                move |axum::extract::Path(mark): axum::extract::Path<String>| async move {
                    let n = c.hit();
                    let mut res = (StatusCode::BAD_GATEWAY, format!("exec-{n}")).into_response();
                    if mark == "not-run" {
                        res.extensions_mut().insert(tower_idempotency::NotRun);
                    }
                    res
                },
            ),
        )
        .layer(quick_waits().with_storable(|_| true));
    let srv = serve(app).await;
    let c = client();
    let post = |path: &str| c.post(srv.url(path)).header("Idempotency-Key", "gw");
    for n in 1..=2 {
        let r = send(post("/gateway/not-run")).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            r.text(),
            format!("exec-{n}"),
            "a request that did not run runs again"
        );
        assert!(!r.replayed());
    }
    // Unmarked, the same status is stored, as the predicate says.
    let c2 = client();
    let other = || {
        c2.post(srv.url("/gateway/ran"))
            .header("Idempotency-Key", "gw-ran")
    };
    let first = send(other()).await;
    assert_eq!(first.text(), "exec-3");
    assert_replay_of(&send(other()).await, &first);
    assert_eq!(count.get(), 3);
}

// ---------------------------------------------------------------------------------------------
// In flight: wait, wait timeout, reject, Prefer: wait
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn duplicates_wait_for_the_request_in_flight() {
    let gate = Gate::default();
    let store = RecordingStore::default();
    let (app, count) = gated_app(IdempotencyLayer::new(store.clone()), gate.clone());
    let srv = serve(app).await;
    let c = client();
    let post = || {
        c.post(srv.url("/slow"))
            .header("Idempotency-Key", "w")
            .body("x")
    };
    let first = tokio::spawn(send(post()));
    count.reached(1).await;
    let dups: Vec<_> = (0..5).map(|_| tokio::spawn(send(post()))).collect();
    // Every duplicate has asked the store to wait.
    store.waiters(5).await;
    assert!(
        dups.iter().all(|d| !d.is_finished()),
        "duplicates wait while the original runs (no 409, no second run)"
    );
    gate.open();
    let first = first.await.unwrap();
    assert_fresh(&first, 1);
    for d in dups {
        assert_replay_of(&d.await.unwrap(), &first);
    }
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn wait_timeout_is_409_with_retry_after() {
    let gate = Gate::default();
    let (app, count) = gated_app(
        layer().with_wait_timeout(Duration::from_millis(300)),
        gate.clone(),
    );
    let srv = serve(app).await;
    let c = client();
    let post = || {
        c.post(srv.url("/slow"))
            .header("Idempotency-Key", "wt")
            .body("x")
    };
    let first = tokio::spawn(send(post()));
    count.reached(1).await;
    let dup = send(post()).await;
    let json = assert_problem(&dup, 409, "wait-timeout");
    assert!(!json.to_string().contains("exec-"));
    assert_retry_after(&dup);
    assert_eq!(count.get(), 1);
    gate.open();
    let first = first.await.unwrap();
    assert_fresh(&first, 1);
    assert_replay_of(&send(post()).await, &first);
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn reject_mode_is_an_immediate_409_with_retry_after() {
    let gate = Gate::default();
    // A long wait timeout: were reject mode to wait, the 409 would say wait-timeout, and only
    // after a minute.
    let (app, count) = gated_app(
        layer()
            .with_on_conflict(OnConflict::Reject)
            .with_retry_after(Duration::from_secs(3)),
        gate.clone(),
    );
    let srv = serve(app).await;
    let c = client();
    let post = || {
        c.post(srv.url("/slow"))
            .header("Idempotency-Key", "rj")
            .body("x")
    };
    let first = tokio::spawn(send(post()));
    count.reached(1).await;
    let dup = send(post()).await;
    assert_problem(&dup, 409, "request-in-flight");
    assert_eq!(dup.header("retry-after"), Some("3"));
    assert_eq!(count.get(), 1);
    gate.open();
    let first = first.await.unwrap();
    assert_fresh(&first, 1);
    // Once completed, reject mode replays like wait mode.
    assert_replay_of(&send(post()).await, &first);
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn prefer_wait_shortens_the_wait() {
    let gate = Gate::default();
    // The layer would wait a minute; the client asks for one second.
    let (app, count) = gated_app(layer(), gate.clone());
    let srv = serve(app).await;
    let c = client();
    let post = || {
        c.post(srv.url("/slow"))
            .header("Idempotency-Key", "pw")
            .body("x")
    };
    let first = tokio::spawn(send(post()));
    count.reached(1).await;
    let dup = send(post().header("Prefer", "respond-async, wait=1")).await;
    assert_problem(&dup, 409, "wait-timeout");
    assert_retry_after(&dup);
    assert!(!first.is_finished(), "the original is still running");
    gate.open();
    assert_fresh(&first.await.unwrap(), 1);
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn prefer_wait_never_lengthens_the_wait() {
    let gate = Gate::default();
    let (app, count) = gated_app(
        layer().with_wait_timeout(Duration::from_millis(300)),
        gate.clone(),
    );
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/slow")).header("Idempotency-Key", "pw");
    let first = tokio::spawn(send(post()));
    count.reached(1).await;
    // Asking for 25 s gets the layer's 300 ms: the 409 comes while the original still runs.
    let dup = send(post().header("Prefer", "wait=25")).await;
    assert_problem(&dup, 409, "wait-timeout");
    assert!(!first.is_finished());
    gate.open();
    assert_fresh(&first.await.unwrap(), 1);
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn waiting_is_pushed_by_the_store_not_polled() {
    let spy = RecordingStore::default();
    let gate = Gate::default();
    let (app, count) = gated_app(IdempotencyLayer::new(spy.clone()), gate.clone());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/slow")).header("Idempotency-Key", "push");
    let first = tokio::spawn(send(post()));
    count.reached(1).await;
    let dup = tokio::spawn(send(post()));
    spy.reached("wait", 1).await;
    // Half a second in which a polling waiter would ask the store again and again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gate.open();
    let first = first.await.unwrap();
    assert_replay_of(&dup.await.unwrap(), &first);
    // The original's begin, the duplicate's first begin, and one more once woken. A layer that
    // polled the store while waiting would call begin again and again for half a second.
    let begins = spy.count("begin");
    assert!(begins <= 4, "{begins} calls to begin: the waiter polls");
}

#[tokio::test]
async fn waiters_take_over_a_released_lease_and_one_runs() {
    let gate = Gate::default();
    let store = RecordingStore::default();
    let count = Counter::default();
    let (c, g) = (count.clone(), gate.clone());
    let app = Router::new()
        .route(
            "/once-fails",
            post(move || async move {
                let n = c.hit();
                g.pass().await;
                if n == 1 {
                    (StatusCode::SERVICE_UNAVAILABLE, format!("exec-{n}"))
                } else {
                    (StatusCode::CREATED, format!("exec-{n}"))
                }
            }),
        )
        .layer(IdempotencyLayer::new(store.clone()).with_wait_timeout(Duration::from_secs(5)));
    let srv = serve(app).await;
    let c = client();
    let post = || {
        c.post(srv.url("/once-fails"))
            .header("Idempotency-Key", "rel")
    };
    let first = tokio::spawn(send(post()));
    count.reached(1).await;
    let waiters: Vec<_> = (0..4).map(|_| tokio::spawn(send(post()))).collect();
    store.waiters(4).await;
    gate.open();
    assert_eq!(first.await.unwrap().status, StatusCode::SERVICE_UNAVAILABLE);
    let mut replies = Vec::new();
    for w in waiters {
        replies.push(w.await.unwrap());
    }
    assert_eq!(count.get(), 2, "one waiter took the released lease and ran");
    let runner: Vec<_> = replies.iter().filter(|r| !r.replayed()).collect();
    assert_eq!(runner.len(), 1);
    assert_fresh(runner[0], 2);
    for r in &replies {
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.text(), "exec-2", "the other waiters got its response");
    }
}

#[tokio::test]
async fn the_lease_is_renewed_while_a_slow_handler_runs() {
    let gate = Gate::default();
    let store = RecordingStore::default();
    // Leases of 1.5 s, renewed every 500 ms, and a handler that runs past four renewals: only
    // renewal keeps the duplicate waiting. (A renewal may come a second late on a loaded
    // machine without the lease running out.)
    let (app, count) = gated_app(
        IdempotencyLayer::new(store.clone()).with_lock_ttl(Duration::from_millis(1500)),
        gate.clone(),
    );
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/slow")).header("Idempotency-Key", "renew");
    let first = tokio::spawn(send(post()));
    count.reached(1).await;
    let dup = tokio::spawn(send(post()));
    store.reached("wait", 1).await;
    store.reached("renew", 4).await;
    assert!(!dup.is_finished(), "the duplicate still waits");
    gate.open();
    let first = first.await.unwrap();
    assert_fresh(&first, 1);
    assert_replay_of(&dup.await.unwrap(), &first);
    assert_eq!(count.get(), 1, "a renewed lease is never taken over");
}

// ---------------------------------------------------------------------------------------------
// TTL
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn completed_records_expire_after_the_ttl() {
    // Long enough for the replay to land within it on a loaded machine.
    let ttl = Duration::from_secs(2);
    let (app, count) = counting_app(layer().with_ttl(ttl));
    let srv = serve(app).await;
    let c = client();
    let post = || {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "ttl")
            .body("x")
    };
    let sent = tokio::time::Instant::now();
    let first = send(post()).await;
    assert_fresh(&first, 1);
    assert_replay_of(&send(post()).await, &first);
    // Replays until the record expires, then a new run; never before the TTL is over.
    let after = loop {
        let reply = send(post()).await;
        if !reply.replayed() {
            break reply;
        }
        assert_replay_of(&reply, &first);
        assert!(
            sent.elapsed() < ttl + Duration::from_secs(10),
            "the record never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(sent.elapsed() >= ttl, "the record expired before its TTL");
    assert_fresh(&after, 2);
    assert_eq!(count.get(), 2);
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn request_body_over_the_limit_is_413() {
    let (app, count) = counting_app(layer().with_max_request_body(1024));
    let srv = serve(app).await;
    let c = client();
    // Declared by Content-Length.
    let r = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "big")
            .body(vec![b'a'; 2048]),
    )
    .await;
    assert_problem(&r, 413, "request-too-large");
    // Chunked, no length declared.
    let chunks = futures_util::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'b'; 512]))),
    );
    let r = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "big-chunked")
            .body(reqwest::Body::wrap_stream(chunks)),
    )
    .await;
    assert_problem(&r, 413, "request-too-large");
    // A form body too large to look for a key in.
    let r = send(
        c.post(srv.url("/orders"))
            .form(&[("__idempotent_key", "f"), ("pad", &"p".repeat(2048))]),
    )
    .await;
    assert_problem(&r, 413, "request-too-large");
    assert_eq!(count.get(), 0);
    // At the limit is fine.
    let r = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "big")
            .body(vec![b'a'; 1024]),
    )
    .await;
    assert_fresh(&r, 1);
}

#[tokio::test]
async fn a_ttl_and_lease_of_forever_are_kept_not_a_panic() {
    let (app, count) = counting_app(layer().with_ttl(Duration::MAX).with_lock_ttl(Duration::MAX));
    let srv = serve(app).await;
    let c = client();
    let first = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "forever"),
    )
    .await;
    assert_eq!(first.status, 201);
    let again = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "forever"),
    )
    .await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn forms_over_the_limit_are_413_wherever_their_key_is() {
    let (app, count) = counting_app(layer().with_max_request_body(1024));
    let srv = serve(app).await;
    let c = client();
    let pad = "p".repeat(4096);
    // The key past the limit: a duplicate must not run again, so the form is refused.
    for _ in 0..2 {
        let r = send(
            c.post(srv.url("/orders"))
                .form(&[("pad", pad.as_str()), ("__idempotent_key", "late")]),
        )
        .await;
        assert_problem(&r, 413, "request-too-large");
    }
    // A multipart upload whose hidden key comes after the file.
    let part = reqwest::multipart::Part::bytes(vec![b'z'; 8192]).file_name("big.bin");
    let r = send(
        c.post(srv.url("/orders")).multipart(
            reqwest::multipart::Form::new()
                .part("file", part)
                .text("__idempotent_key", "late-mp"),
        ),
    )
    .await;
    assert_problem(&r, 413, "request-too-large");
    assert_eq!(count.get(), 0);

    // Without the form source, a large keyless form passes through untouched, every time.
    let only_headers = tower_idempotency::KeySources::only([
        tower_idempotency::KeySource::IdempotencyKeyHeader,
        tower_idempotency::KeySource::XIdempotentKeyHeader,
    ]);
    let (app, count) = counting_app(
        layer()
            .with_max_request_body(1024)
            .with_key_sources(only_headers),
    );
    let srv = serve(app).await;
    let form = [("item", "book"), ("pad", pad.as_str())];
    for n in 1..=2 {
        let r = send(c.post(srv.url("/orders")).form(&form)).await;
        assert_eq!(r.status, 201);
        assert!(!r.replayed());
        assert!(r.text().starts_with(&format!("exec-{n} POST /orders ")));
    }
    assert_eq!(count.get(), 2);
}

fn big_payload() -> Vec<u8> {
    (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[tokio::test]
async fn large_response_reaches_the_first_caller_and_duplicates_get_409() {
    let count = Counter::default();
    let c = count.clone();
    let app = Router::new()
        .route(
            "/export",
            post(move || async move {
                c.hit();
                // Streamed in 4 KiB chunks: the layer reads past its limit, then must hand on the
                // rest as it comes.
                let chunks: Vec<Result<Bytes, std::io::Error>> = big_payload()
                    .chunks(4096)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                (
                    StatusCode::CREATED,
                    [(header::CONTENT_TYPE, "application/octet-stream")],
                    Body::from_stream(futures_util::stream::iter(chunks)),
                )
            }),
        )
        .layer(layer().with_max_response_body(10_000));
    let srv = serve(app).await;
    let c = client();
    let post = || {
        c.post(srv.url("/export"))
            .header("Idempotency-Key", "large")
    };

    let first = send(post()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    assert_eq!(first.body.len(), big_payload().len());
    assert!(
        first.body == big_payload(),
        "the first caller gets every byte"
    );

    let dup = send(post()).await;
    let json = assert_problem(&dup, 409, "response-not-replayable");
    assert!(dup.body.len() < 1000, "{json}");
    assert_eq!(
        count.get(),
        1,
        "a large response never runs the handler twice"
    );
    assert_problem(&send(post()).await, 409, "response-not-replayable");
    assert_eq!(count.get(), 1);
}

/// One raw HTTP/1.1 exchange, for responses with more headers than an HTTP client reads: the
/// status and every header line of the answer, and its body.
async fn raw_post(addr: std::net::SocketAddr, path: &str, key: &str) -> (u16, Vec<String>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nIdempotency-Key: {key}\r\nContent-Length: 0\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    (status, lines.map(str::to_owned).collect(), body.to_owned())
}

#[tokio::test]
async fn a_response_with_more_headers_than_a_record_holds_is_not_replayable_never_cut() {
    // A record counts headers in 16 bits.
    const HEADERS: usize = 70_000;
    let events = events::Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let count = Counter::default();
    let c = count.clone();
    let app = Router::new()
        .route(
            "/many",
            post(move || {
                let c = c.clone();
                async move {
                    let n = c.hit();
                    let mut res = http::Response::new(Body::from(format!("exec-{n}")));
                    *res.status_mut() = StatusCode::CREATED;
                    for _ in 0..HEADERS {
                        res.headers_mut()
                            .append("x-many", HeaderValue::from_static("1"));
                    }
                    res
                }
            }),
        )
        .layer(layer());
    let srv = serve(app).await;

    let (status, headers, body) = raw_post(srv.addr, "/many", "many").await;
    assert_eq!(status, 201);
    assert_eq!(body, "exec-1");
    let many = headers.iter().filter(|h| h.as_str() == "x-many: 1").count();
    assert_eq!(many, HEADERS, "the first caller gets every header");

    for _ in 0..2 {
        let (status, headers, body) = raw_post(srv.addr, "/many", "many").await;
        assert_eq!(
            status, 409,
            "a duplicate is refused, not replayed without headers: {body}"
        );
        assert!(
            headers
                .iter()
                .any(|h| h.as_str() == "content-type: application/problem+json"),
            "{headers:?}"
        );
        assert!(body.contains("response-not-replayable"), "{body}");
        assert!(!headers.iter().any(|h| h.starts_with("x-many")));
    }
    assert_eq!(count.get(), 1, "nothing runs twice");
    assert_eq!(events.get(Event::Unstorable), 1);
}

// ---------------------------------------------------------------------------------------------
// Disconnects, panics, crashes, lost leases
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_client_that_disconnects_does_not_cancel_the_handler() {
    let gate = Gate::default();
    let probe = CancelProbe::default();
    // A short lock: were the handler cancelled with its caller, the retry would find the lease
    // expired soon and run the handler a second time.
    let (app, count) = gated_app(
        layer().with_lock_ttl(Duration::from_millis(600)),
        gate.clone(),
    );
    let srv = serve(probe.wrap(app)).await;
    let c = client();
    let post = || c.post(srv.url("/slow")).header("Idempotency-Key", "gone");

    let caller = tokio::spawn(send(post()));
    count.reached(1).await;
    caller.abort();
    let _ = caller.await;
    // The server saw its caller go: the request's future was dropped unanswered.
    probe.cancelled().await;
    gate.open();

    let retry = send(post()).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "the retry gets the stored outcome");
    assert_eq!(retry.text(), "exec-1");
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_and_releases_the_lease() {
    let count = Counter::default();
    let c = count.clone();
    let app = Router::new()
        .route(
            "/panic",
            post(move || async move {
                let n = c.hit();
                if n == 1 {
                    panic!("handler panics on purpose (contract test)");
                }
                (StatusCode::CREATED, format!("exec-{n}"))
            }),
        )
        .route("/health", get(|| async { "ok" }))
        .layer(quick_waits());
    let srv = serve(app).await;
    let c = client();
    let post = || c.post(srv.url("/panic")).header("Idempotency-Key", "boom");

    let failed = send(post()).await;
    let json = assert_problem(&failed, 500, "handler-failed");
    assert!(!json.to_string().contains("on purpose"));
    assert_eq!(count.get(), 1);

    // The server keeps serving, on the same and on new connections.
    let health = send(c.get(srv.url("/health"))).await;
    assert_eq!(health.text(), "ok");
    let health = send(client().get(srv.url("/health"))).await;
    assert_eq!(health.text(), "ok");

    // The lease was released: the retry runs, and is then stored.
    let retry = send(post()).await;
    assert_fresh(&retry, 2);
    assert_replay_of(&send(post()).await, &retry);
    assert_eq!(count.get(), 2);
}

/// A server on its own runtime, standing for another process that shares the store.
struct OtherProcess {
    addr: std::net::SocketAddr,
}

impl OtherProcess {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn spawn_on(rt: &tokio::runtime::Runtime, app: Router) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr }
    }
}

#[tokio::test]
async fn a_lease_whose_process_died_is_taken_over() {
    let store = MemoryStore::default();
    // Process A: a short lock, and a handler that would run forever.
    let count_a = Counter::default();
    let ca = count_a.clone();
    let app_a = Router::new()
        .route(
            "/pay",
            post(move || async move {
                ca.hit();
                std::future::pending::<()>().await;
                (StatusCode::CREATED, "from A")
            }),
        )
        .layer(IdempotencyLayer::new(store.clone()).with_lock_ttl(Duration::from_millis(500)));
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a = OtherProcess::spawn_on(&rt_a, app_a);

    // Process B: same store, same route.
    let count_b = Counter::default();
    let cb = count_b.clone();
    let app_b = Router::new()
        .route(
            "/pay",
            post(move || async move {
                let n = cb.hit();
                (StatusCode::CREATED, format!("from B, exec-{n}"))
            }),
        )
        .layer(IdempotencyLayer::new(store.clone()));
    let b = serve(app_b).await;

    let c = client();
    let to_a = tokio::spawn(
        c.post(a.url("/pay"))
            .header("Idempotency-Key", "crash")
            .send(),
    );
    count_a.reached(1).await;
    // Process A dies mid-handler: every task of its runtime, lease renewal included, is gone,
    // and its lease is neither completed nor released.
    rt_a.shutdown_background();
    assert!(
        to_a.await.unwrap().is_err(),
        "A's caller lost its connection"
    );

    // B's duplicate finds the lease in flight, waits, and takes it over once it expires.
    let post_b = || c.post(b.url("/pay")).header("Idempotency-Key", "crash");
    let taken = send(post_b()).await;
    assert_eq!(taken.status, StatusCode::CREATED);
    assert!(!taken.replayed());
    assert_eq!(taken.text(), "from B, exec-1");
    assert_eq!((count_a.get(), count_b.get()), (1, 1));
    assert_replay_of(&send(post_b()).await, &taken);
    assert_eq!(count_b.get(), 1);
}

#[tokio::test]
async fn a_late_owner_whose_lease_was_taken_over_cannot_store() {
    let store = MemoryStore::default();
    // What process A asks of the store it shares with B.
    let store_a = RecordingStore::new(store.clone());
    // Process A freezes mid-handler (a stop-the-world pause): its one thread blocks, so its lease
    // is not renewed and expires.
    let (unfreeze, frozen) = std::sync::mpsc::channel::<()>();
    let frozen = Arc::new(Mutex::new(frozen));
    let count_a = Counter::default();
    let ca = count_a.clone();
    let app_a = Router::new()
        .route(
            "/pay",
            post(move || async move {
                ca.hit();
                frozen.lock().unwrap().recv().unwrap();
                (StatusCode::CREATED, "from A")
            }),
        )
        .layer(IdempotencyLayer::new(store_a.clone()).with_lock_ttl(Duration::from_millis(300)));
    let rt_a = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = OtherProcess::spawn_on(&rt_a, app_a);
    let (stop_a, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread_a = std::thread::spawn(move || {
        rt_a.block_on(async {
            let _ = stopped.await;
        });
    });

    // Process B takes the expired lease over and is still running when A wakes up.
    let gate_b = Gate::default();
    let count_b = Counter::default();
    let (cb, gb) = (count_b.clone(), gate_b.clone());
    let app_b = Router::new()
        .route(
            "/pay",
            post(move || async move {
                let n = cb.hit();
                gb.pass().await;
                (StatusCode::CREATED, format!("from B, exec-{n}"))
            }),
        )
        .layer(IdempotencyLayer::new(store.clone()));
    let b = serve(app_b).await;

    let c = client();
    let to_a = tokio::spawn(send(
        c.post(a.url("/pay")).header("Idempotency-Key", "late"),
    ));
    count_a.reached(1).await;
    let post_b = || c.post(b.url("/pay")).header("Idempotency-Key", "late");
    let to_b = tokio::spawn(send(post_b()));
    count_b.reached(1).await;

    // A wakes up and finishes while B owns the lease. A's caller still gets A's answer, but the
    // store refuses A's completion.
    unfreeze.send(()).unwrap();
    let from_a = to_a.await.unwrap();
    assert_eq!(from_a.status, StatusCode::CREATED);
    assert_eq!(from_a.text(), "from A");
    assert!(!from_a.replayed());
    store_a.refusals("complete", 1).await;
    assert_eq!(
        store_a.count("complete"),
        1,
        "A tried to store its response once"
    );

    gate_b.open();
    let taken = to_b.await.unwrap();
    assert_eq!(taken.text(), "from B, exec-1");
    assert!(!taken.replayed());
    for url in [b.url("/pay"), a.url("/pay")] {
        let again = send(c.post(url).header("Idempotency-Key", "late")).await;
        assert_replay_of(&again, &taken);
    }
    assert_eq!((count_a.get(), count_b.get()), (1, 1));
    let _ = stop_a.send(());
    thread_a.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Bounded store, store unavailable
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_store_full_of_leases_is_503() {
    let gate = Gate::default();
    let (app, count) = gated_app(
        IdempotencyLayer::new(MemoryStore::with_capacity(1)),
        gate.clone(),
    );
    let srv = serve(app).await;
    let c = client();
    let post = |k: &'static str| c.post(srv.url("/slow")).header("Idempotency-Key", k);
    let first = tokio::spawn(send(post("k1")));
    count.reached(1).await;
    let full = send(post("k2")).await;
    assert_problem(&full, 503, "store-unavailable");
    assert_retry_after(&full);
    assert_eq!(count.get(), 1, "a new key is refused, never run untracked");
    gate.open();
    assert_fresh(&first.await.unwrap(), 1);
    // Completed records make room.
    assert_fresh(&send(post("k2")).await, 2);
}

#[tokio::test]
async fn a_store_whose_bytes_are_full_of_leases_is_503() {
    let gate = Gate::default();
    let store = MemoryStore::with_max_bytes(tower_idempotency::MemoryStore::LEASE_BYTES);
    let (app, count) = gated_app(IdempotencyLayer::new(store), gate.clone());
    let srv = serve(app).await;
    let c = client();
    let post = |k: &'static str| c.post(srv.url("/slow")).header("Idempotency-Key", k);
    let first = tokio::spawn(send(post("k1")));
    count.reached(1).await;
    let full = send(post("k2")).await;
    assert_problem(&full, 503, "store-unavailable");
    assert_retry_after(&full);
    assert_eq!(count.get(), 1, "a new key is refused, never run untracked");
    gate.open();
    // Its response does not fit beside nothing: it reaches its caller, and is kept unreplayable.
    assert_fresh(&first.await.unwrap(), 1);
    let again = send(post("k1")).await;
    assert_problem(&again, 409, "response-not-replayable");
    assert_eq!(count.get(), 1, "never run twice");
}

/// A backend that is down.
struct DownStore;

fn down() -> StoreError {
    StoreError::Unavailable("connection refused".into())
}

#[async_trait]
impl Store for DownStore {
    async fn begin(
        &self,
        _: &StorageKey,
        _: &Fingerprint,
        _: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        Err(down())
    }
    async fn complete(
        &self,
        _: &StorageKey,
        _: LeaseToken,
        _: Bytes,
        _: Duration,
    ) -> Result<bool, StoreError> {
        Err(down())
    }
    async fn release(&self, _: &StorageKey, _: LeaseToken) -> Result<bool, StoreError> {
        Err(down())
    }
    async fn renew(&self, _: &StorageKey, _: LeaseToken, _: Duration) -> Result<bool, StoreError> {
        Err(down())
    }
    async fn wait(&self, _: &StorageKey, _: Duration) -> Result<(), StoreError> {
        Err(down())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Err(down())
    }
}

#[tokio::test]
async fn store_unavailable_fails_closed_with_503() {
    let (app, count) = counting_app(IdempotencyLayer::new(DownStore));
    let srv = serve(app).await;
    let c = client();
    let r = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "k")
            .body("x"),
    )
    .await;
    assert_problem(&r, 503, "store-unavailable");
    assert_retry_after(&r);
    assert_eq!(count.get(), 0);
    // Requests the layer does not track never touch the store.
    assert_fresh(&send(c.post(srv.url("/orders")).body("x")).await, 1);
}

#[tokio::test]
async fn store_unavailable_with_fail_open_runs_untracked() {
    let (app, count) = counting_app(IdempotencyLayer::new(DownStore).with_fail_open(true));
    let srv = serve(app).await;
    let c = client();
    for n in 1..=2 {
        let r = send(
            c.post(srv.url("/orders"))
                .header("Idempotency-Key", "k")
                .body("hello"),
        )
        .await;
        assert_fresh(&r, n);
        assert!(
            r.text().ends_with(" 5"),
            "the body reaches the handler whole"
        );
    }
    assert_eq!(count.get(), 2);
}

// ---------------------------------------------------------------------------------------------
// Slow bodies and the bound on requests in flight
// ---------------------------------------------------------------------------------------------

/// A keyed POST of a 100-byte body to `/orders`, with `extra` headers.
fn keyed_head(key: &str, extra: &str) -> String {
    format!(
        "POST /orders HTTP/1.1\r\nHost: test\r\nIdempotency-Key: {key}\r\nContent-Length: 100{extra}"
    )
}

#[tokio::test]
async fn a_tracked_body_that_does_not_arrive_in_time_is_408_and_takes_no_lease() {
    // Reject mode: a lease left behind would answer the retry 409 at once.
    let (app, count) = counting_app(
        layer()
            .with_request_body_timeout(Duration::from_millis(300))
            .with_on_conflict(OnConflict::Reject),
    );
    let srv = serve(app).await;

    // A body that stops after 10 of its 100 bytes.
    let stalled =
        harness::slow_request(srv.addr, &keyed_head("\"slow\"", ""), b"0123456789", None).await;
    assert_eq!(stalled.status, 408, "{stalled:?}");
    assert!(stalled.problem_type().ends_with(":body-timeout"));
    // A body that keeps coming, a byte at a time, but not in full in time.
    let trickled = harness::slow_request(
        srv.addr,
        &keyed_head("\"slow\"", ""),
        b"",
        Some(Duration::from_millis(50)),
    )
    .await;
    assert_eq!(trickled.status, 408, "{trickled:?}");
    // A form body read for its key is timed the same way.
    let form = harness::slow_request(
        srv.addr,
        "POST /orders HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100",
        b"__idempotent_key=form-slow&a=",
        None,
    )
    .await;
    assert_eq!(form.status, 408, "{form:?}");
    assert_eq!(count.get(), 0, "the handler never saw a late body");

    // The key was never taken: the whole request runs, then replays.
    let c = client();
    let post = || {
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", "\"slow\"")
            .body("x".repeat(100))
    };
    let full = send(post()).await;
    assert_fresh(&full, 1);
    assert_replay_of(&send(post()).await, &full);
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn the_body_timeout_leaves_untracked_streams_alone() {
    let (app, count) = counting_app(layer().with_request_body_timeout(Duration::from_millis(100)));
    let srv = serve(app).await;
    // A keyless body that takes longer than the timeout streams to the handler whole.
    let slow = harness::slow_request(
        srv.addr,
        "POST /orders HTTP/1.1\r\nHost: test\r\nContent-Length: 6",
        b"",
        Some(Duration::from_millis(50)),
    )
    .await;
    assert_eq!(slow.status, 201, "{slow:?}");
    assert_eq!(String::from_utf8_lossy(&slow.body), "exec-1 POST /orders 6");
    assert_eq!(count.get(), 1);
}

#[tokio::test]
async fn past_max_in_flight_a_tracked_request_is_503_and_takes_nothing() {
    let gate = Gate::default();
    // Reject mode: a lease left behind would answer the retry 409 at once.
    let (app, count) = gated_app(
        layer()
            .with_max_in_flight(1)
            .with_on_conflict(OnConflict::Reject),
        gate.clone(),
    );
    let srv = serve(app).await;
    let c = client();
    let post = |key: &str| {
        c.post(srv.url("/slow"))
            .header("Idempotency-Key", key.to_owned())
    };

    let first = tokio::spawn(send(post("first")));
    count.reached(1).await;
    let refused = send(post("second")).await;
    assert_problem(&refused, 503, "too-many-in-flight");
    assert_retry_after(&refused);
    assert_eq!(count.get(), 1, "a refused request does not run");
    // Requests without a key are not counted against the bound.
    let keyless = tokio::spawn(send(c.post(srv.url("/slow"))));
    count.reached(2).await;

    gate.open();
    assert_fresh(&first.await.unwrap(), 1);
    assert_eq!(keyless.await.unwrap().status, StatusCode::CREATED);
    // The refused key was left free, and the place of the first is free again.
    let second = send(post("second")).await;
    assert_fresh(&second, 3);
    assert_replay_of(&send(post("second")).await, &second);
    assert_eq!(count.get(), 3);
}

#[tokio::test]
async fn a_request_whose_caller_left_keeps_its_place_until_its_outcome_is_stored() {
    let gate = Gate::default();
    let probe = CancelProbe::default();
    let layer = layer().with_max_in_flight(1);
    let (app, count) = gated_app(layer.clone(), gate.clone());
    let srv = serve(probe.wrap(app)).await;
    let c = client();
    let post = |key: &str| {
        c.post(srv.url("/slow"))
            .header("Idempotency-Key", key.to_owned())
    };

    let caller = tokio::spawn(send(post("left")));
    count.reached(1).await;
    caller.abort();
    let _ = caller.await;
    probe.cancelled().await;
    // The handler runs on without its caller, and keeps its place.
    let refused = send(post("other")).await;
    assert_problem(&refused, 503, "too-many-in-flight");

    gate.open();
    layer.drain().await;
    let retry = send(post("left")).await;
    assert!(retry.replayed(), "the outcome was stored: {}", retry.text());
    assert_fresh(&send(post("other")).await, 2);
    assert_eq!(count.get(), 2);
}

// ---------------------------------------------------------------------------------------------
// Exactly once under load: many keys, many duplicates each, one execution per key
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_under_load() {
    const KEYS: usize = 200;
    const DUPLICATES: usize = 10;
    let count = Counter::default();
    let c = count.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move |body: Bytes| async move {
                let n = c.hit();
                // Long enough that duplicates overlap the original.
                tokio::time::sleep(Duration::from_millis(5)).await;
                (
                    StatusCode::CREATED,
                    format!("{} exec-{n} {}", String::from_utf8_lossy(&body), uuid()),
                )
            }),
        )
        .layer(layer());
    let srv = serve(app).await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();

    // Each key's duplicates are sent together, so most of them meet the original in flight.
    let requests = (0..KEYS).flat_map(|k| (0..DUPLICATES).map(move |_| k));
    let replies: Vec<(usize, Reply)> = futures_util::stream::iter(requests)
        .map(|k| {
            let req = c
                .post(srv.url("/orders"))
                .header("Idempotency-Key", format!("load-{k}"))
                .body(format!("order {k}"));
            async move { (k, send(req).await) }
        })
        .buffer_unordered(200)
        .collect()
        .await;

    assert_eq!(replies.len(), KEYS * DUPLICATES);
    assert_eq!(count.get(), KEYS, "exactly one execution per key");
    let mut by_key: HashMap<usize, Vec<Reply>> = HashMap::new();
    for (k, r) in replies {
        by_key.entry(k).or_default().push(r);
    }
    let mut bodies = HashSet::new();
    for (k, rs) in &by_key {
        assert_eq!(rs.len(), DUPLICATES);
        for r in rs {
            assert_eq!(r.status, StatusCode::CREATED, "key {k}: {}", r.text());
            assert_eq!(r.body, rs[0].body, "key {k}: every response identical");
        }
        assert!(rs[0].text().starts_with(&format!("order {k} exec-")));
        let originals = rs.iter().filter(|r| !r.replayed()).count();
        assert_eq!(originals, 1, "key {k}: one original, the rest replays");
        bodies.insert(rs[0].body.clone());
    }
    assert_eq!(bodies.len(), KEYS, "every key ran its own execution");
}

fn uuid() -> String {
    tower_idempotency::idempotent_key()
}
