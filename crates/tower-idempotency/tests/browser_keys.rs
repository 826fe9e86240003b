//! A browser's own `Idempotency-Key` never breaks a page's key.
//!
//! Firefox adds `Idempotency-Key: "<64-bit decimal>"` to form, fetch and XHR POSTs by itself: the
//! same value when one submission is sent again (reload, "resend", a network retry), a new one
//! for every click. A page that chose its own key (a hidden `__idempotent_key` field, the
//! `__idempotent_key` query parameter, `X-Idempotent-Key`) must keep working: its key wins, and
//! the header is ignored and counted (`key_header_ignored`).
//!
//! Through a real axum server on 127.0.0.1:0 and a real HTTP client sending the headers Firefox
//! sends, judged by what a user notices: how often the handler ran, statuses, bodies and
//! `Idempotent-Replayed`.

#![allow(missing_docs, clippy::unwrap_used)]

use idempotency_test_support::events;
use idempotency_test_support::harness;

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use events::Events;
use harness::{Counter, Gate, Reply, assert_problem, client, send, serve};
use http::StatusCode;
use tower_idempotency::Event;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// Two keys of the kind Firefox draws, one per click, as it sends them: RFC 8941 sf-strings
/// holding a decimal number.
const FIREFOX_CLICK_1: &str = "\"8315709230293478211\"";
const FIREFOX_CLICK_2: &str = "\"16805207050847954446\"";
const FIREFOX_CLICK_3: &str = "\"5096663095715378384\"";
const FIREFOX_CLICK_4: &str = "\"9961006964143809380\"";

/// A page's order form fields, with the key the page rendered into its hidden input.
fn order_fields(page_key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("product", "Teapot".to_owned()),
        ("quantity", "2".to_owned()),
        ("__idempotent_key", page_key.to_owned()),
    ]
}

/// The same form as a multipart body, with a boundary of its own, as a browser draws one for
/// every submission.
fn multipart_order(page_key: &str) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new()
        .text("product", "Teapot")
        .text("quantity", "2")
        .text("__idempotent_key", page_key.to_owned())
}

/// A shop whose three order routes (urlencoded form, multipart form, any body) count their
/// executions, wait at `gate`, and answer 201 with a body unique to the execution that shows
/// what the handler received.
fn shop(layer: IdempotencyLayer, gate: Gate) -> (Router, Counter) {
    let count = Counter::default();
    let (c1, c2, c3) = (count.clone(), count.clone(), count.clone());
    let (g1, g2, g3) = (gate.clone(), gate.clone(), gate);
    let router = Router::new()
        .route(
            "/orders",
            post(
                move |axum::Form(fields): axum::Form<Vec<(String, String)>>| async move {
                    let n = c1.hit();
                    g1.pass().await;
                    (StatusCode::CREATED, format!("exec-{n} form {fields:?}"))
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
                    fields.push((name, field.text().await.unwrap()));
                }
                g2.pass().await;
                (
                    StatusCode::CREATED,
                    format!("exec-{n} multipart {fields:?}"),
                )
            }),
        )
        .route(
            "/api/orders",
            post(move |body: Bytes| async move {
                let n = c3.hit();
                g3.pass().await;
                (StatusCode::CREATED, format!("exec-{n} api {}", body.len()))
            }),
        )
        .layer(layer);
    (router, count)
}

fn open_gate() -> Gate {
    let gate = Gate::default();
    gate.open();
    gate
}

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::new(MemoryStore::default())
}

fn assert_fresh(reply: &Reply, n: usize) {
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert!(!reply.replayed(), "an execution is not marked replayed");
    assert!(
        reply.text().starts_with(&format!("exec-{n} ")),
        "expected execution {n}, got {:?}",
        reply.text()
    );
}

fn assert_replay_of(replay: &Reply, original: &Reply) {
    assert_eq!(replay.status, original.status, "{}", replay.text());
    assert_eq!(
        replay.body, original.body,
        "a replay carries the same bytes"
    );
    assert!(
        replay.replayed(),
        "a replay is marked Idempotent-Replayed: true"
    );
}

/// A double click in Firefox: the second submission, with a new browser key and the page's
/// same key, is sent while the first is still running. One order; both answers are its answer.
#[tokio::test(flavor = "current_thread")]
async fn a_double_submitted_form_with_two_firefox_keys_places_one_order() {
    let events = Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let gate = Gate::default();
    let (app, count) = shop(layer(), gate.clone());
    let srv = serve(app).await;
    let c = client();
    let submit = |firefox_key: &'static str| {
        send(
            c.post(srv.url("/orders"))
                .header("Idempotency-Key", firefox_key)
                .form(&order_fields("page-key-1")),
        )
    };

    let first = tokio::spawn(submit(FIREFOX_CLICK_1));
    count.reached(1).await;
    let second = tokio::spawn(submit(FIREFOX_CLICK_2));
    // Let the second submission reach the layer and wait for the first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.open();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());

    assert_fresh(&first, 1);
    assert!(
        first
            .text()
            .contains(r#"("__idempotent_key", "page-key-1")"#),
        "the handler reads the whole form: {}",
        first.text()
    );
    assert_replay_of(&second, &first);
    assert_eq!(count.get(), 1, "one click's order, placed once");
    assert_eq!(events.get(Event::KeyHeaderIgnored), 2);
    assert_eq!(events.get(Event::BadKey), 0);
}

/// "Resend" or a reload of the result: the same browser key and the same page key. A replay.
#[tokio::test(flavor = "current_thread")]
async fn a_resent_form_with_the_same_firefox_key_replays() {
    let events = Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let (app, count) = shop(layer(), open_gate());
    let srv = serve(app).await;
    let c = client();
    let submit = || {
        send(
            c.post(srv.url("/orders"))
                .header("Idempotency-Key", FIREFOX_CLICK_1)
                .form(&order_fields("page-key-2")),
        )
    };

    let first = submit().await;
    assert_fresh(&first, 1);
    let resent = submit().await;
    assert_replay_of(&resent, &first);
    assert_eq!(count.get(), 1);
    assert_eq!(events.get(Event::KeyHeaderIgnored), 2);

    // A new form (a new page key) is a new order, whatever the browser sends.
    let next = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .form(&order_fields("page-key-3")),
    )
    .await;
    assert_fresh(&next, 2);
    assert_eq!(count.get(), 2);
}

/// The same with a multipart form (a file upload form), whose boundary changes on every
/// submission.
#[tokio::test(flavor = "current_thread")]
async fn a_double_submitted_multipart_form_with_two_firefox_keys_places_one_order() {
    let events = Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let (app, count) = shop(layer(), open_gate());
    let srv = serve(app).await;
    let c = client();
    let submit = |firefox_key: &'static str| {
        send(
            c.post(srv.url("/upload"))
                .header("Idempotency-Key", firefox_key)
                .multipart(multipart_order("page-key-mp")),
        )
    };

    let first = submit(FIREFOX_CLICK_1).await;
    assert_fresh(&first, 1);
    assert!(
        first
            .text()
            .contains(r#"("__idempotent_key", "page-key-mp")"#),
        "{}",
        first.text()
    );
    assert_replay_of(&submit(FIREFOX_CLICK_2).await, &first);
    assert_replay_of(&submit(FIREFOX_CLICK_2).await, &first);
    assert_eq!(count.get(), 1);
    assert_eq!(events.get(Event::KeyHeaderIgnored), 3);
}

/// A page key in the query (a form whose `action` carries it) or in `X-Idempotent-Key` (a
/// page's script) wins the same way.
#[tokio::test(flavor = "current_thread")]
async fn a_query_or_x_idempotent_key_page_key_wins_over_firefox_keys() {
    let events = Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let (app, count) = shop(layer(), open_gate());
    let srv = serve(app).await;
    let c = client();

    // A form posted to `/orders?__idempotent_key=...`, without a hidden field.
    let by_query = |firefox_key: &'static str| {
        send(
            c.post(srv.url("/orders?__idempotent_key=page-key-q"))
                .header("Idempotency-Key", firefox_key)
                .form(&[("product", "Mug"), ("quantity", "1")]),
        )
    };
    let first = by_query(FIREFOX_CLICK_1).await;
    assert_fresh(&first, 1);
    assert_replay_of(&by_query(FIREFOX_CLICK_2).await, &first);
    assert_eq!(count.get(), 1);

    // A fetch() that sets X-Idempotent-Key; Firefox adds its own key to it.
    let by_header = |firefox_key: &'static str| {
        send(
            c.post(srv.url("/api/orders"))
                .header("Idempotency-Key", firefox_key)
                .header("X-Idempotent-Key", "page-key-x")
                .header("content-type", "application/json")
                .body(r#"{"product":"Mug","quantity":1}"#),
        )
    };
    let first = by_header(FIREFOX_CLICK_1).await;
    assert_fresh(&first, 2);
    assert_replay_of(&by_header(FIREFOX_CLICK_2).await, &first);
    assert_replay_of(&by_header(FIREFOX_CLICK_1).await, &first);
    assert_eq!(count.get(), 2);
    assert_eq!(events.get(Event::KeyHeaderIgnored), 5);
}

/// Where the browser's key is the only key (a fetch() of a page that chose none), it is the
/// key: a retry after a lost response replays, and the next click (a new browser key) is a
/// new request. Nothing is ignored.
#[tokio::test(flavor = "current_thread")]
async fn a_firefox_key_alone_is_the_key() {
    let events = Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let (app, count) = shop(layer(), open_gate());
    let srv = serve(app).await;
    let c = client();
    let fetch = |firefox_key: &'static str| {
        send(
            c.post(srv.url("/api/orders"))
                .header("Idempotency-Key", firefox_key)
                .header("content-type", "application/json")
                .body(r#"{"product":"Teapot","quantity":1}"#),
        )
    };
    let first = fetch(FIREFOX_CLICK_1).await;
    assert_fresh(&first, 1);
    assert_replay_of(&fetch(FIREFOX_CLICK_1).await, &first);
    assert_eq!(count.get(), 1);
    assert_fresh(&fetch(FIREFOX_CLICK_2).await, 2);

    // The same for a form without a field of its own.
    let form = || {
        send(
            c.post(srv.url("/orders"))
                .header("Idempotency-Key", FIREFOX_CLICK_3)
                .form(&[("product", "Mug"), ("quantity", "3")]),
        )
    };
    let first = form().await;
    assert_fresh(&first, 3);
    assert_replay_of(&form().await, &first);
    let upload = || {
        send(
            c.post(srv.url("/upload"))
                .header("Idempotency-Key", FIREFOX_CLICK_4)
                .multipart(reqwest::multipart::Form::new().text("product", "Mug")),
        )
    };
    let first = upload().await;
    assert_fresh(&first, 4);
    assert_replay_of(&upload().await, &first);
    assert_eq!(count.get(), 4);
    assert_eq!(events.get(Event::KeyHeaderIgnored), 0);
}

/// The ignored header is not part of the fingerprint (headers are not fingerprinted), but the
/// request still is: the page's key with another form is a 422, whatever the browser's key.
#[tokio::test(flavor = "current_thread")]
async fn the_page_key_with_another_form_is_still_a_mismatch() {
    let (app, count) = shop(layer(), open_gate());
    let srv = serve(app).await;
    let c = client();
    let first = send(
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .form(&order_fields("page-key-fp")),
    )
    .await;
    assert_fresh(&first, 1);
    let mut other = order_fields("page-key-fp");
    other[1].1 = "5".to_owned();
    for firefox_key in [FIREFOX_CLICK_1, FIREFOX_CLICK_2] {
        let reply = send(
            c.post(srv.url("/orders"))
                .header("Idempotency-Key", firefox_key)
                .form(&other),
        )
        .await;
        assert_problem(&reply, 422, "key-reused");
    }
    assert_eq!(count.get(), 1);
}

/// An `Idempotency-Key` that is no valid key does not break the page's key either: beside a
/// page key it is ignored (and counted). Alone it is still a 400.
#[tokio::test(flavor = "current_thread")]
async fn an_invalid_idempotency_key_beside_a_page_key_is_ignored_and_alone_is_400() {
    let events = Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let (app, count) = shop(layer(), open_gate());
    let srv = serve(app).await;
    let c = client();
    let mut runs = 0;
    let mut ignored = 0;
    for (n, bad) in [
        "\"unterminated",
        "\"two words\"",
        "\"\"",
        "\"one\", \"two\"",
    ]
    .into_iter()
    .enumerate()
    {
        let form = send(
            c.post(srv.url("/orders"))
                .header("Idempotency-Key", bad)
                .form(&order_fields(&format!("page-form-{n}"))),
        )
        .await;
        let upload = send(
            c.post(srv.url("/upload"))
                .header("Idempotency-Key", bad)
                .multipart(multipart_order(&format!("page-upload-{n}"))),
        )
        .await;
        let query = send(
            c.post(srv.url(&format!("/api/orders?__idempotent_key=page-query-{n}")))
                .header("Idempotency-Key", bad)
                .body("{}"),
        )
        .await;
        let x_header = send(
            c.post(srv.url("/api/orders"))
                .header("Idempotency-Key", bad)
                .header("X-Idempotent-Key", format!("page-x-{n}"))
                .body("{}"),
        )
        .await;
        for reply in [form, upload, query, x_header] {
            runs += 1;
            ignored += 1;
            assert_fresh(&reply, runs);
        }
        assert_eq!(events.get(Event::KeyHeaderIgnored), ignored, "{bad}");

        // Alone, in a form without a field or in an API call: 400, nothing runs.
        let alone = send(
            c.post(srv.url("/orders"))
                .header("Idempotency-Key", bad)
                .form(&[("product", "Mug")]),
        )
        .await;
        assert_problem(&alone, 400, "key-invalid");
        let alone = send(
            c.post(srv.url("/api/orders"))
                .header("Idempotency-Key", bad)
                .body("{}"),
        )
        .await;
        assert_problem(&alone, 400, "key-invalid");
        assert_eq!(count.get(), runs, "{bad}");
    }
}

/// What stays a 400: keys the page itself names that disagree (form field against query or
/// `X-Idempotent-Key`), and a repeated `Idempotency-Key` header, browser key or not.
#[tokio::test(flavor = "current_thread")]
async fn disagreeing_page_keys_and_a_repeated_header_stay_400() {
    let events = Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let (app, count) = shop(layer(), open_gate());
    let srv = serve(app).await;
    let c = client();
    let refused = [
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .header("X-Idempotent-Key", "page-a")
            .form(&order_fields("page-b")),
        c.post(srv.url("/orders?__idempotent_key=page-a"))
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .form(&order_fields("page-b")),
        c.post(srv.url("/upload?__idempotent_key=page-a"))
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .multipart(multipart_order("page-b")),
        c.post(srv.url("/api/orders?__idempotent_key=page-a"))
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .header("X-Idempotent-Key", "page-b")
            .body("{}"),
        // The same page key agreeing across sources is fine (below); a form field twice with
        // two keys is not.
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .form(&[
                ("__idempotent_key", "page-a"),
                ("__idempotent_key", "page-b"),
            ]),
        // A repeated header, even beside a page key.
        c.post(srv.url("/orders"))
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .header("Idempotency-Key", FIREFOX_CLICK_2)
            .form(&order_fields("page-a")),
        c.post(srv.url("/api/orders"))
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .header("X-Idempotent-Key", "page-a")
            .body("{}"),
        c.post(srv.url("/api/orders"))
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .header("Idempotency-Key", FIREFOX_CLICK_2)
            .body("{}"),
    ];
    for req in refused {
        assert_problem(&send(req).await, 400, "key-conflict");
    }
    assert_eq!(count.get(), 0, "a refused key never reaches the handler");
    assert_eq!(events.get(Event::KeyHeaderIgnored), 0);
    assert_eq!(events.get(Event::BadKey), 8);

    // Page sources that agree, beside the browser's key: one key.
    let agree = || {
        send(
            c.post(srv.url("/orders?__idempotent_key=page-c"))
                .header("Idempotency-Key", FIREFOX_CLICK_2)
                .header("X-Idempotent-Key", "page-c")
                .form(&order_fields("page-c")),
        )
    };
    let first = agree().await;
    assert_fresh(&first, 1);
    assert_replay_of(&agree().await, &first);
    assert_eq!(count.get(), 1);
}
