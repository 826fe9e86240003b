//! The contract through the proxy: a real upstream that counts its executions, the real binary
//! in front of it, and reqwest as the client. Every test runs twice: with the memory store and
//! with a Redis server of its own.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Backend, DroppingUpstream, Proxy, Upstream, client, event_count, gauge};

macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::memory()).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::redis()).await
                }
            )*
        }
    };
}

on_every_store!(
    tracked_post_runs_once_and_the_duplicate_is_replayed_byte_identical,
    concurrent_duplicates_reach_the_upstream_once,
    a_key_reused_for_another_request_is_422,
    get_and_keyless_post_pass_through_every_time,
    upstream_5xx_is_not_stored,
    upstream_down_is_502_problem_json,
    a_connect_failure_releases_the_key,
    a_keyed_request_runs_once_across_the_upstream_timeout,
    a_keyless_request_past_the_upstream_timeout_is_cancelled,
    past_the_upstream_deadline_the_outcome_is_unknown_and_never_rerun,
    an_upstream_that_drops_the_connection_after_the_work_runs_once,
    forwarded_headers_are_added_and_hop_by_hop_headers_stripped,
    scopes_limits_and_required_keys_follow_the_flags,
    a_duplicate_waits_at_most_the_wait_timeout,
    keys_in_form_fields_are_tracked_and_bad_keys_refused,
    fingerprint_headers_follow_the_flag_and_content_encoding_always_counts,
);

const KEY: &str = "Idempotency-Key";

fn is_problem(res: &reqwest::Response) -> bool {
    res.headers()
        .get("content-type")
        .is_some_and(|v| v == "application/problem+json")
}

async fn tracked_post_runs_once_and_the_duplicate_is_replayed_byte_identical(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store.proxy(&up.url(), &[]).await;
    let c = client();
    let send = || {
        c.post(proxy.url("/orders"))
            .header(KEY, "\"order-1\"")
            .header("content-type", "application/json")
            .body(r#"{"item":"tea"}"#)
            .send()
    };

    let first = send().await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_headers = first.headers().clone();
    let first_body = first.bytes().await.unwrap();

    let second = send().await.unwrap();
    assert_eq!(second.status(), 201);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_eq!(second.headers()["x-order-id"], first_headers["x-order-id"]);
    assert_eq!(
        second
            .headers()
            .get_all("x-multi")
            .iter()
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(
        second.headers()["content-type"],
        first_headers["content-type"]
    );
    let second_body = second.bytes().await.unwrap();
    assert_eq!(second_body, first_body, "replay must be byte-identical");
    assert_eq!(up.hits("/orders"), 1);

    // The bare token form and Flask-Idempotent's header name the same key.
    let third = c
        .post(proxy.url("/orders"))
        .header("X-Idempotent-Key", "order-1")
        .header("content-type", "application/json")
        .body(r#"{"item":"tea"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(third.headers()["idempotent-replayed"], "true");
    assert_eq!(third.bytes().await.unwrap(), first_body);
    assert_eq!(up.hits("/orders"), 1);
}

async fn concurrent_duplicates_reach_the_upstream_once(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store.proxy(&up.url(), &[]).await;
    let c = client();
    let url = proxy.url("/slow?ms=600");
    let requests = (0..12).map(|_| {
        let c = c.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let res = c
                .post(url)
                .header(KEY, "burst")
                .body("same")
                .send()
                .await
                .unwrap();
            let replayed = res.headers().contains_key("idempotent-replayed");
            (res.status().as_u16(), replayed, res.text().await.unwrap())
        })
    });
    let mut answers = Vec::new();
    for r in requests {
        answers.push(r.await.unwrap());
    }
    assert_eq!(up.hits("/slow"), 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|(s, _, body)| *s == 200 && body == "slow run 1"),
        "{answers:?}"
    );
    assert_eq!(
        answers.iter().filter(|(_, replayed, _)| !replayed).count(),
        1
    );
}

async fn a_key_reused_for_another_request_is_422(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store.proxy(&up.url(), &[]).await;
    let c = client();
    let first = c
        .post(proxy.url("/orders"))
        .header(KEY, "reused")
        .body("one")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let other = c
        .post(proxy.url("/orders"))
        .header(KEY, "reused")
        .body("two")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 422);
    assert!(is_problem(&other));
    let doc: serde_json::Value = other.json().await.unwrap();
    assert_eq!(doc["status"], 422);
    assert_eq!(up.hits("/orders"), 1);
}

async fn get_and_keyless_post_pass_through_every_time(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store.proxy(&up.url(), &[]).await;
    let c = client();
    for _ in 0..3 {
        let res = c
            .get(proxy.url("/orders"))
            .header(KEY, "ignored-for-get")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        assert!(res.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(up.hits("/orders"), 3);
    for i in 0..2 {
        let res = c
            .post(proxy.url("/orders"))
            .body(format!("keyless {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        assert!(res.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(up.hits("/orders"), 5);
}

async fn upstream_5xx_is_not_stored(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store.proxy(&up.url(), &[]).await;
    let c = client();
    for n in 1..=2 {
        let res = c
            .post(proxy.url("/fail"))
            .header(KEY, "flaky")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 500);
        assert!(res.headers().get("idempotent-replayed").is_none());
        assert_eq!(res.text().await.unwrap(), format!("failure {n}"));
    }
    assert_eq!(up.hits("/fail"), 2);
}

async fn upstream_down_is_502_problem_json(store: Backend) {
    let closed = common::free_addr();
    let proxy = store.proxy(&format!("http://{closed}"), &[]).await;
    let c = client();
    for _ in 0..2 {
        let res = c
            .post(proxy.url("/orders"))
            .header(KEY, "nobody-home")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 502);
        assert!(is_problem(&res));
        let doc: serde_json::Value = res.json().await.unwrap();
        assert_eq!(doc["status"], 502);
        assert!(
            doc["type"]
                .as_str()
                .unwrap()
                .ends_with("upstream-unavailable")
        );
        assert!(doc["title"].is_string() && doc["detail"].is_string());
    }
    let res = c.get(proxy.url("/anything")).send().await.unwrap();
    assert_eq!(res.status(), 502);
}

/// The problem document of a problem+json answer, with its type's last part checked.
async fn problem_of(res: reqwest::Response, status: u16, slug: &str) -> serde_json::Value {
    assert_eq!(res.status(), status);
    assert!(is_problem(&res));
    let doc: serde_json::Value = res.json().await.unwrap();
    assert_eq!(doc["status"], status);
    let ty = doc["type"].as_str().unwrap().to_owned();
    assert!(ty.ends_with(&format!(":{slug}")), "{ty} is not {slug}");
    doc
}

async fn a_connect_failure_releases_the_key(store: Backend) {
    let closed = common::free_addr();
    let proxy = store.proxy(&format!("http://{closed}"), &[]).await;
    let c = client();
    let send = || {
        c.post(proxy.url("/orders"))
            .header(KEY, "\"connect\"")
            .body("x")
    };
    let res = send().send().await.unwrap();
    problem_of(res, 502, "upstream-unavailable").await;
    // The request never reached anyone: once the upstream is up, the same key runs.
    let up = Upstream::start_on(closed).await;
    let res = send().send().await.unwrap();
    assert_eq!(res.status(), 201);
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(up.hits("/orders"), 1);
    let replay = send().send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(up.hits("/orders"), 1);
}

/// Copies of one key sent before, across and after the caller's timeout: the upstream runs
/// once, the first caller gets 504, everyone else the upstream's answer.
async fn a_keyed_request_runs_once_across_the_upstream_timeout(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store
        .proxy(&up.url(), &["--upstream-timeout", "400ms"])
        .await;
    let c = client();
    let send = |c: reqwest::Client, url: String| async move {
        c.post(url)
            .header(KEY, "\"slow-payment\"")
            .body("charge 1200")
            .send()
            .await
            .unwrap()
    };
    let url = proxy.url("/slow?ms=1500");
    let first = tokio::spawn(send(c.clone(), url.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let during = tokio::spawn(send(c.clone(), url.clone()));
    // After the first caller's 504: the upstream call is still running.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = tokio::spawn(send(c.clone(), url.clone()));

    let first = first.await.unwrap();
    assert!(first.headers().contains_key("retry-after"));
    let doc = problem_of(first, 504, "still-running").await;
    assert!(doc["detail"].as_str().unwrap().contains("same key"));
    for res in [during.await.unwrap(), after.await.unwrap()] {
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["idempotent-replayed"], "true");
        assert_eq!(res.text().await.unwrap(), "slow run 1");
    }
    // A retry after the late answer replays it.
    let retry = send(c.clone(), url.clone()).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.text().await.unwrap(), "slow run 1");
    assert_eq!(up.hits("/slow"), 1, "the upstream ran once for one key");
    assert_eq!(
        event_count(&proxy.metrics().await, "late_answer_stored"),
        Some(1)
    );
}

async fn a_keyless_request_past_the_upstream_timeout_is_cancelled(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store
        .proxy(&up.url(), &["--upstream-timeout", "300ms"])
        .await;
    let c = client();
    for _ in 0..2 {
        let res = c.post(proxy.url("/slow?ms=1500")).send().await.unwrap();
        problem_of(res, 504, "upstream-timeout").await;
    }
    // Nothing was stored: each ran.
    assert_eq!(up.hits("/slow"), 2);
    // Within the timeout, the same upstream answers.
    let ok = c
        .post(proxy.url("/slow?ms=10"))
        .header(KEY, "fast-enough")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

async fn past_the_upstream_deadline_the_outcome_is_unknown_and_never_rerun(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store
        .proxy(
            &up.url(),
            &[
                "--upstream-timeout",
                "200ms",
                "--upstream-deadline",
                "600ms",
            ],
        )
        .await;
    let c = client();
    let send = || {
        c.post(proxy.url("/slow?ms=3000"))
            .header(KEY, "\"hung\"")
            .send()
    };
    problem_of(send().await.unwrap(), 504, "still-running").await;
    // A duplicate waits for the deadline, then learns that nobody knows.
    let doc = problem_of(send().await.unwrap(), 502, "outcome-unknown").await;
    assert!(doc["detail"].as_str().unwrap().contains("new key"));
    problem_of(send().await.unwrap(), 502, "outcome-unknown").await;
    assert_eq!(up.hits("/slow"), 1);
    assert_eq!(
        event_count(&proxy.metrics().await, "outcome_unknown"),
        Some(1)
    );
}

/// An upstream that does the work and drops the connection: what an SDK that retries 5xx and
/// network errors with the same key meets. The retry must not charge twice.
async fn an_upstream_that_drops_the_connection_after_the_work_runs_once(store: Backend) {
    let up = DroppingUpstream::start().await;
    let proxy = store.proxy(&up.url(), &[]).await;
    let c = client();
    let send = || {
        c.post(proxy.url("/v1/charges"))
            .header(KEY, "\"charge-7\"")
            .header("content-type", "application/x-www-form-urlencoded")
            .body("amount=1200&currency=eur")
            .send()
    };
    problem_of(send().await.unwrap(), 502, "outcome-unknown").await;
    for _ in 0..3 {
        problem_of(send().await.unwrap(), 502, "outcome-unknown").await;
    }
    assert_eq!(up.runs(), 1, "the upstream ran once for one key");
    // Without a key nothing is stored, and each attempt reaches the upstream.
    for _ in 0..2 {
        let res = c
            .post(proxy.url("/v1/charges"))
            .body("x")
            .send()
            .await
            .unwrap();
        problem_of(res, 502, "upstream-failed").await;
    }
    assert_eq!(up.runs(), 3);
    assert_eq!(
        event_count(&proxy.metrics().await, "outcome_unknown"),
        Some(1)
    );
}

async fn forwarded_headers_are_added_and_hop_by_hop_headers_stripped(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store.proxy(&up.url(), &[]).await;
    let c = client();
    let res = c
        .get(proxy.url("/echo"))
        .header("connection", "x-private")
        .header("x-private", "do not forward")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-custom", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen: serde_json::Value = res.json().await.unwrap();
    // A client's own X-Forwarded-For is not trusted: the proxy writes the caller's address.
    assert_eq!(seen["x-forwarded-for"][0], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"][0], "http");
    assert_eq!(seen["x-forwarded-host"][0], proxy.addr.to_string());
    assert_eq!(seen["host"][0], up.addr.to_string());
    assert_eq!(seen["x-custom"][0], "kept");
    assert!(seen.get("x-private").is_none(), "{seen}");
    assert!(seen.get("proxy-authorization").is_none(), "{seen}");

    let res = c.get(proxy.url("/hop")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("x-hop").is_none(), "{:?}", res.headers());
    assert!(res.headers().get("keep-alive").is_none());
    assert_eq!(res.headers()["x-end-to-end"], "kept");
}

async fn scopes_limits_and_required_keys_follow_the_flags(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store
        .proxy(
            &up.url(),
            &[
                "--scope-header",
                "X-Tenant",
                "--max-request-body",
                "1KiB",
                "--require-key",
            ],
        )
        .await;
    let c = client();
    let post = |tenant: &'static str, body: String| {
        c.post(proxy.url("/orders"))
            .header(KEY, "shared-key")
            .header("x-tenant", tenant)
            .body(body)
            .send()
    };
    // Another scope executes anew.
    assert_eq!(post("a", "x".into()).await.unwrap().status(), 201);
    let again = post("a", "x".into()).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let b = post("b", "x".into()).await.unwrap();
    assert!(b.headers().get("idempotent-replayed").is_none());
    assert_eq!(up.hits("/orders"), 2);
    // A tracked body over the limit is a 413 that never reaches the upstream.
    let big = c
        .post(proxy.url("/orders"))
        .header(KEY, "too-big")
        .body("y".repeat(2048))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    // Keys are required for tracked methods.
    let keyless = c.post(proxy.url("/orders")).body("z").send().await.unwrap();
    assert_eq!(keyless.status(), 400);
    assert!(is_problem(&keyless));
    assert_eq!(up.hits("/orders"), 2);
    // A key in the query is tracked too, and ignored for the fingerprint.
    let q1 = c
        .post(proxy.url("/orders?__idempotent_key=in-query"))
        .body("q")
        .send()
        .await
        .unwrap();
    assert_eq!(q1.status(), 201);
    let q2 = c
        .post(proxy.url("/orders?__idempotent_key=in-query"))
        .body("q")
        .send()
        .await
        .unwrap();
    assert_eq!(q2.headers()["idempotent-replayed"], "true");
    assert_eq!(up.hits("/orders"), 3);
}

async fn a_duplicate_waits_at_most_the_wait_timeout(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store.proxy(&up.url(), &["--wait-timeout", "300ms"]).await;
    let c = client();
    let url = proxy.url("/slow?ms=2000");
    let first = tokio::spawn({
        let c = c.clone();
        let url = url.clone();
        async move {
            let res = c.post(url).header(KEY, "patience").send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while up.hits("/slow") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first request never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let dup = c.post(&url).header(KEY, "patience").send().await.unwrap();
    assert_eq!(dup.status(), 409);
    assert!(is_problem(&dup));
    assert!(dup.headers().contains_key("retry-after"));
    assert_eq!(first.await.unwrap(), (200, "slow run 1".to_owned()));
    // Once the original completed, the duplicate is a replay.
    let later = c.post(&url).header(KEY, "patience").send().await.unwrap();
    assert_eq!(later.headers()["idempotent-replayed"], "true");
    assert_eq!(up.hits("/slow"), 1);
}

async fn keys_in_form_fields_are_tracked_and_bad_keys_refused(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store.proxy(&up.url(), &[]).await;
    let c = client();
    let form = || {
        c.post(proxy.url("/orders"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("product=tea&quantity=2&__idempotent_key=form-key-1")
            .send()
    };
    assert_eq!(form().await.unwrap().status(), 201);
    let again = form().await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(up.hits("/orders"), 1);

    // Two sources naming different keys, a key too long, a non-ASCII key: 400, never upstream.
    let conflicting = c
        .post(proxy.url("/orders?__idempotent_key=b"))
        .header("X-Idempotent-Key", "a")
        .send()
        .await
        .unwrap();
    assert_eq!(conflicting.status(), 400);
    assert!(is_problem(&conflicting));
    let long = c
        .post(proxy.url("/orders"))
        .header(KEY, "k".repeat(256))
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 400);
    let spaced = c
        .post(proxy.url("/orders"))
        .header(KEY, "\"has space\"")
        .send()
        .await
        .unwrap();
    assert_eq!(spaced.status(), 400);
    assert_eq!(up.hits("/orders"), 1);
}

async fn fingerprint_headers_follow_the_flag_and_content_encoding_always_counts(store: Backend) {
    let up = Upstream::start().await;
    let proxy = store
        .proxy(
            &up.url(),
            &["--fingerprint-header", "X-HTTP-Method-Override"],
        )
        .await;
    let c = client();
    let post = |key: &'static str, header: Option<(&'static str, &'static str)>| {
        let req = c
            .post(proxy.url("/orders"))
            .header(KEY, key)
            .body("same bytes");
        match header {
            Some((name, value)) => req.header(name, value),
            None => req,
        }
        .send()
    };
    // The same key and body, asking for a delete instead of an update: refused, never upstream.
    let put = Some(("X-HTTP-Method-Override", "PUT"));
    assert_eq!(post("override", put).await.unwrap().status(), 201);
    let delete = post("override", Some(("X-HTTP-Method-Override", "DELETE")))
        .await
        .unwrap();
    assert_eq!(delete.status(), 422);
    assert!(is_problem(&delete));
    assert_eq!(post("override", None).await.unwrap().status(), 422);
    let again = post("override", put).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(up.hits("/orders"), 1);

    // Content-Encoding counts without a flag: the same bytes, encoded otherwise, are another
    // body.
    let gzip = Some(("Content-Encoding", "gzip"));
    assert_eq!(post("encoded", gzip).await.unwrap().status(), 201);
    assert_eq!(post("encoded", None).await.unwrap().status(), 422);
    let br = post("encoded", Some(("Content-Encoding", "br")))
        .await
        .unwrap();
    assert_eq!(br.status(), 422);
    let again = post("encoded", gzip).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(up.hits("/orders"), 2);
}

/// Keyed requests for 200 KiB responses through a proxy whose memory store may hold 2 MiB: the
/// store never holds more, the oldest stored responses make room for new ones (a retry of the
/// first key runs again), and the newest still replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_keeps_to_its_byte_bound() {
    const MAX: f64 = (2 << 20) as f64;
    let up = Upstream::start().await;
    let proxy = Proxy::start(
        &up.url(),
        &["--store", "memory", "--store-max-bytes", "2MiB"],
    )
    .await;
    let c = client();
    let send = |n: usize| {
        c.post(proxy.url("/sized?kib=200"))
            .header(KEY, format!("\"large-{n}\""))
            .send()
    };
    for n in 0..30 {
        let res = send(n).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("idempotent-replayed").is_none());
        let body = res.bytes().await.unwrap();
        assert_eq!(body.len(), 200 * 1024);
        assert!(body.starts_with(format!("run {}\n", n + 1).as_bytes()));
        let m = proxy.metrics().await;
        let held = gauge(&m, "idempotency_memory_store_bytes").unwrap();
        assert!(held <= MAX, "the store holds {held} bytes after key {n}");
    }
    let m = proxy.metrics().await;
    assert_eq!(gauge(&m, "idempotency_memory_store_max_bytes"), Some(MAX));
    assert_eq!(
        gauge(&m, "idempotency_memory_store_max_records"),
        Some(100_000.0)
    );
    // Ten responses of 200 KiB and their headers fit in 2 MiB.
    let records = gauge(&m, "idempotency_memory_store_records").unwrap();
    assert!((9.0..=10.0).contains(&records), "{records} records held");
    assert_eq!(up.hits("/sized"), 30);

    // The newest replay, byte for byte, without reaching the upstream.
    for n in 21..30 {
        let res = send(n).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["idempotent-replayed"], "true", "key {n}");
        let body = res.bytes().await.unwrap();
        assert!(body.starts_with(format!("run {}\n", n + 1).as_bytes()));
    }
    assert_eq!(up.hits("/sized"), 30);
    // The oldest made room: a retry of the first key runs again.
    let res = send(0).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert!(res.bytes().await.unwrap().starts_with(b"run 31\n"));
    assert_eq!(up.hits("/sized"), 31);
}

/// A response larger than the memory store's whole bound is not kept and evicts nothing: its
/// caller gets it in full, a duplicate gets 409 `response-not-replayable` (it never runs again),
/// and the responses stored before it still replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_larger_than_the_store_bound_runs_once_and_evicts_nothing() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), &["--store-max-bytes", "100KiB"]).await;
    let c = client();
    let send = |path: &'static str, key: &'static str| {
        c.post(proxy.url(path))
            .header(KEY, format!("\"{key}\""))
            .send()
    };
    let small = send("/sized?kib=1", "small").await.unwrap();
    assert_eq!(small.status(), 200);

    let huge = send("/sized?kib=200", "huge").await.unwrap();
    assert_eq!(huge.status(), 200);
    assert_eq!(huge.bytes().await.unwrap().len(), 200 * 1024);
    let again = send("/sized?kib=200", "huge").await.unwrap();
    problem_of(again, 409, "response-not-replayable").await;
    assert_eq!(up.hits("/sized"), 2);

    let replay = send("/sized?kib=1", "small").await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let m = proxy.metrics().await;
    assert_eq!(event_count(&m, "unstorable"), Some(1));
    let held = gauge(&m, "idempotency_memory_store_bytes").unwrap();
    assert!(held <= (100 << 10) as f64, "the store holds {held} bytes");
    assert_eq!(up.hits("/sized"), 2);
}
