//! The operator's view, against the real proxy binary: the key routes on `--admin-listen`
//! (`GET`/`DELETE /keys/{key}`, `GET /in-flight`) behind `--admin-token`, with the memory and
//! the Redis store, and the `idempotency-proxy keys` commands against Redis and PostgreSQL.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{BIN, Backend, Proxy, Upstream, client};
use idempotency_test_support::events::gauge;
use idempotency_test_support::postgres::PgServer;
use idempotency_test_support::process::proxy_env;
use reqwest::StatusCode;
use serde_json::Value;

const TOKEN: &str = "admin-t0ken";
/// A key no output may show: records are found and reported by their hash.
const KEY: &str = "order-key-7c1e";

async fn keyed_post(proxy: &Proxy, path: &str, key: &str, auth: &str) -> reqwest::Response {
    client()
        .post(proxy.url(path))
        .header("Idempotency-Key", key)
        .header("Authorization", auth)
        .body("{\"sku\":\"teapot\"}")
        .send()
        .await
        .unwrap()
}

async fn admin_get(proxy: &Proxy, path: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let res = client()
        .get(proxy.admin_url(path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let text = res.text().await.unwrap();
    assert!(
        !text.contains(KEY),
        "the raw key in an admin answer: {text}"
    );
    assert!(
        !text.contains("alice"),
        "a raw scope in an admin answer: {text}"
    );
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

async fn admin_delete(proxy: &Proxy, path: &str) -> (StatusCode, Value) {
    let res = client()
        .delete(proxy.admin_url(path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Polls `GET /keys/{key}` until its state is `state`.
async fn until_state(proxy: &Proxy, path: &str, state: &str) -> Value {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, doc) = admin_get(proxy, path).await;
        if status == StatusCode::OK && doc["state"] == state {
            return doc;
        }
        assert!(Instant::now() < give_up, "never {state}: {status} {doc}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_problem(status: StatusCode, doc: &Value, want: StatusCode, slug: &str) {
    assert_eq!(status, want, "{doc}");
    assert_eq!(doc["status"], want.as_u16(), "{doc}");
    assert_eq!(
        doc["type"],
        format!("urn:tower-idempotency:problem:{slug}"),
        "{doc}"
    );
}

// ---------------------------------------------------------------------------------------------
// Authentication

#[tokio::test]
async fn without_a_token_the_key_routes_are_off_and_health_stays_open() {
    let upstream = Upstream::start().await;
    let proxy = Backend::memory().proxy(&upstream.url(), &[]).await;
    for path in ["/keys/abc", "/in-flight"] {
        let res = client().get(proxy.admin_url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }
    let res = client()
        .get(proxy.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_key_routes_answer_401_without_the_token() {
    let upstream = Upstream::start().await;
    let proxy = Backend::memory()
        .proxy(&upstream.url(), &["--admin-token", TOKEN])
        .await;
    for auth in [None, Some("Bearer wrong"), Some("Basic YWRtaW4tdDBrZW4=")] {
        for (method, path) in [
            (reqwest::Method::GET, "/keys/abc"),
            (reqwest::Method::DELETE, "/keys/abc"),
            (reqwest::Method::GET, "/in-flight"),
        ] {
            let mut req = client().request(method.clone(), proxy.admin_url(path));
            if let Some(auth) = auth {
                req = req.header("Authorization", auth);
            }
            let res = req.send().await.unwrap();
            assert_eq!(
                res.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} {auth:?}"
            );
            assert!(res.headers().contains_key("www-authenticate"));
            assert_eq!(res.headers()["content-type"], "application/problem+json");
            let doc: Value = res.json().await.unwrap();
            assert_problem(
                StatusCode::UNAUTHORIZED,
                &doc,
                StatusCode::UNAUTHORIZED,
                "admin-unauthorized",
            );
        }
    }
    // The scheme is case-insensitive; the token is not.
    let res = client()
        .get(proxy.admin_url("/keys/abc"))
        .header("Authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::NOT_FOUND,
        "a valid token, no record"
    );
    let res = client()
        .get(proxy.admin_url("/keys/abc"))
        .header("Authorization", format!("Bearer {}", TOKEN.to_uppercase()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // Health and metrics need no token.
    for path in ["/healthz", "/metrics"] {
        let res = client().get(proxy.admin_url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn the_admin_token_may_come_from_a_file() {
    let dir = idempotency_test_support::process::TempDir::new("admin-token");
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    let upstream = Upstream::start().await;
    let proxy = Backend::memory()
        .proxy(
            &upstream.url(),
            &["--admin-token-file", path.to_str().unwrap()],
        )
        .await;
    let (status, _, doc) = admin_get(&proxy, "/keys/nothing-here").await;
    assert_problem(status, &doc, StatusCode::NOT_FOUND, "no-record");
    let res = client()
        .get(proxy.admin_url("/keys/nothing-here"))
        .bearer_auth(&TOKEN[..TOKEN.len() - 1])
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::UNAUTHORIZED,
        "a prefix is not the token"
    );
    std::fs::write(&path, "\n").unwrap();
    let (code, out) = common::run_to_exit(
        &[
            "--upstream",
            "http://127.0.0.1:9",
            "--admin-listen",
            "127.0.0.1:0",
            "--admin-token-file",
            path.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("holds no admin token"), "{out}");
}

#[tokio::test]
async fn an_admin_token_without_an_admin_listener_is_a_configuration_error() {
    let (code, out) = common::run_to_exit(
        &["--upstream", "http://127.0.0.1:9", "--admin-token", TOKEN],
        &[],
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--admin-listen"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Inspect and forget, memory and Redis

async fn inspect_and_forget_a_completed_key(backend: Backend) {
    let upstream = Upstream::start().await;
    let proxy = backend
        .proxy(
            &upstream.url(),
            &[
                "--admin-token",
                TOKEN,
                "--namespace",
                "shop",
                "--key-secret",
                "k3y-s3cret",
            ],
        )
        .await;
    let res = keyed_post(&proxy, "/orders", KEY, "Bearer alice").await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let path = format!("/keys/{KEY}?scope=Bearer%20alice");

    let (status, _, doc) = admin_get(&proxy, &path).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(doc["state"], "completed");
    assert_eq!(doc["status"], 201);
    assert_eq!(doc["fingerprint"].as_str().unwrap().len(), 64);
    assert_eq!(doc["key_hash"].as_str().unwrap().len(), 16);
    assert!(doc["size"].as_u64().unwrap() > 0);
    assert!(doc["expires_in_ms"].as_u64().unwrap() <= 240_000);
    assert!(doc["lease"].is_null());
    assert!(
        doc.get("body").is_none(),
        "the body shows only with ?body=1"
    );
    // Another caller's scope, or the global scope, holds no record of this key.
    for other in [
        format!("/keys/{KEY}"),
        format!("/keys/{KEY}?scope=Bearer%20bob"),
    ] {
        let (status, _, doc) = admin_get(&proxy, &other).await;
        assert_problem(status, &doc, StatusCode::NOT_FOUND, "no-record");
    }
    let (_, _, with_body) = admin_get(&proxy, &format!("{path}&body=1")).await;
    assert!(
        with_body["body"].as_str().unwrap().contains("\"order\":1"),
        "{with_body}"
    );
    assert!(
        with_body["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "x-order-id" && h[1] == "1")
    );

    // A replay before the forget; the same key runs again after it.
    let res = keyed_post(&proxy, "/orders", KEY, "Bearer alice").await;
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let (status, _) = admin_delete(&proxy, &path).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, doc) = admin_get(&proxy, &path).await;
    assert_problem(status, &doc, StatusCode::NOT_FOUND, "no-record");
    let (status, doc) = admin_delete(&proxy, &path).await;
    assert_problem(status, &doc, StatusCode::NOT_FOUND, "no-record");
    let res = keyed_post(&proxy, "/orders", KEY, "Bearer alice").await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(res.headers()["x-order-id"], "2");
    assert_eq!(
        upstream.hits("/orders"),
        2,
        "the forgotten key ran again, once"
    );
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("idempotency_events_total{event=\"forgotten\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn memory_inspect_and_forget_a_completed_key() {
    inspect_and_forget_a_completed_key(Backend::memory()).await;
}

#[tokio::test]
async fn redis_inspect_and_forget_a_completed_key() {
    inspect_and_forget_a_completed_key(Backend::redis()).await;
}

async fn forgetting_a_key_in_flight_needs_force(backend: Backend) {
    let upstream = Upstream::start().await;
    let proxy = backend
        .proxy(&upstream.url(), &["--admin-token", TOKEN])
        .await;
    let slow = {
        let url = proxy.url("/slow?ms=3000");
        tokio::spawn(async move {
            client()
                .post(url)
                .header("Idempotency-Key", KEY)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let path = format!("/keys/{KEY}");
    let doc = until_state(&proxy, &path, "in_flight").await;
    assert!(doc["status"].is_null());
    assert_eq!(doc["lease"]["renewals"], 0);
    assert_eq!(doc["lease"]["owner"].as_str().unwrap().len(), 36);
    let (status, _, listed) = admin_get(&proxy, "/in-flight?limit=10").await;
    assert_eq!(status, StatusCode::OK);
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["key_hash"], doc["key_hash"]);
    assert_eq!(listed[0]["owner"], doc["lease"]["owner"]);
    let held = |metrics: &str| gauge(metrics, "idempotency_leases_held");
    assert_eq!(held(&proxy.metrics().await), Some(1.0), "the owner's lease");

    let (status, problem) = admin_delete(&proxy, &path).await;
    assert_problem(status, &problem, StatusCode::CONFLICT, "request-in-flight");
    assert_eq!(
        until_state(&proxy, &path, "in_flight").await["key_hash"],
        doc["key_hash"]
    );
    let (status, _) = admin_delete(&proxy, &format!("{path}?force=1")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // Forgotten: the same key runs again, beside the first, which is still running.
    let again = client()
        .post(proxy.url("/slow?ms=10"))
        .header("Idempotency-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.text().await.unwrap(), "slow run 2");
    assert_eq!(upstream.hits("/slow"), 2);
    // The first owner's late outcome is refused as a lost lease: the record is the second's.
    let _ = slow.await.unwrap();
    let replay = client()
        .post(proxy.url("/slow?ms=10"))
        .header("Idempotency-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.text().await.unwrap(), "slow run 2");
    assert_eq!(upstream.hits("/slow"), 2);
    let metrics = proxy.metrics().await;
    assert_eq!(
        held(&metrics),
        Some(0.0),
        "a lease held after both owners ended"
    );
    assert!(
        metrics.contains("idempotency_events_total{event=\"lease_lost\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("idempotency_events_total{event=\"forgotten_in_flight\"} 1"),
        "{metrics}"
    );
    let (_, _, listed) = admin_get(&proxy, "/in-flight").await;
    assert_eq!(listed, Value::Array(vec![]));
}

#[tokio::test]
async fn memory_forgetting_a_key_in_flight_needs_force() {
    forgetting_a_key_in_flight_needs_force(Backend::memory()).await;
}

#[tokio::test]
async fn redis_forgetting_a_key_in_flight_needs_force() {
    forgetting_a_key_in_flight_needs_force(Backend::redis()).await;
}

#[tokio::test]
async fn scope_values_stand_for_each_scope_header_in_order() {
    let upstream = Upstream::start().await;
    let proxy = Backend::memory()
        .proxy(
            &upstream.url(),
            &[
                "--admin-token",
                TOKEN,
                "--scope-header",
                "X-Tenant",
                "--scope-header",
                "Authorization",
            ],
        )
        .await;
    let res = client()
        .post(proxy.url("/orders"))
        .header("Idempotency-Key", KEY)
        .header("X-Tenant", "acme")
        .header("Authorization", "Bearer alice")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let (status, _, doc) = admin_get(
        &proxy,
        &format!("/keys/{KEY}?scope=acme&scope=Bearer%20alice"),
    )
    .await;
    assert_eq!(
        (status, doc["state"].as_str()),
        (StatusCode::OK, Some("completed"))
    );
    for other in [
        format!("/keys/{KEY}?scope=Bearer%20alice&scope=acme"),
        format!("/keys/{KEY}?scope=acme"),
        format!("/keys/{KEY}"),
    ] {
        let (status, _, doc) = admin_get(&proxy, &other).await;
        assert_problem(status, &doc, StatusCode::NOT_FOUND, "no-record");
    }
    let (status, _, doc) = admin_get(&proxy, &format!("/keys/{KEY}?scope=a&scope=b&scope=c")).await;
    assert_problem(status, &doc, StatusCode::BAD_REQUEST, "bad-admin-request");
    // A path that is no key, and a method the routes do not take: problems too.
    for (method, path) in [
        (reqwest::Method::GET, "/keys/%FF"),
        (reqwest::Method::GET, "/keys/with%20space"),
        (reqwest::Method::POST, "/keys/abc"),
        (reqwest::Method::PUT, "/in-flight"),
    ] {
        let res = client()
            .request(method.clone(), proxy.admin_url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert!(
            res.status().is_client_error(),
            "{method} {path}: {}",
            res.status()
        );
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn the_in_flight_list_pages_with_a_link_to_the_next() {
    let upstream = Upstream::start().await;
    let proxy = Backend::memory()
        .proxy(&upstream.url(), &["--admin-token", TOKEN])
        .await;
    let slow: Vec<_> = (0..3)
        .map(|i| {
            let url = proxy.url("/slow?ms=2000");
            tokio::spawn(async move {
                client()
                    .post(url)
                    .header("Idempotency-Key", format!("page-{i}"))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    let give_up = Instant::now() + Duration::from_secs(10);
    while upstream.hits("/slow") < 3 {
        assert!(Instant::now() < give_up);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seen = Vec::new();
    let mut path = "/in-flight?limit=2".to_owned();
    loop {
        let (status, headers, page) = admin_get(&proxy, &path).await;
        assert_eq!(status, StatusCode::OK);
        let page = page.as_array().unwrap();
        assert!(page.len() <= 2);
        seen.extend(
            page.iter()
                .map(|l| l["storage_key"].as_str().unwrap().to_owned()),
        );
        match headers.get("link") {
            Some(link) => {
                let link = link.to_str().unwrap();
                let next = link.strip_prefix('<').unwrap().split('>').next().unwrap();
                path = format!("/in-flight{next}");
            }
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "listed in key order, each once");
    assert_eq!(seen.len(), 3);
    for bad in [
        "/in-flight?limit=0",
        "/in-flight?limit=x",
        "/in-flight?after=zz",
    ] {
        let (status, _, doc) = admin_get(&proxy, bad).await;
        assert_problem(status, &doc, StatusCode::BAD_REQUEST, "bad-admin-request");
    }
    for task in slow {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
}

// ---------------------------------------------------------------------------------------------
// The `keys` commands, against the store directly

/// Runs `idempotency-proxy keys ...` to its end: its exit code, stdout and stderr.
async fn keys(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = std::iter::once("keys".to_owned())
        .chain(args.iter().map(|s| s.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(&args).stdin(std::process::Stdio::null());
        proxy_env(&mut cmd, std::iter::empty::<(&str, &str)>());
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

async fn the_keys_commands_inspect_forget_and_list(store: &str) {
    let upstream = Upstream::start().await;
    let flags = ["--namespace", "shop", "--key-secret", "k3y-s3cret"];
    let mut proxy_flags = vec!["--store", store];
    proxy_flags.extend(flags);
    let proxy = Proxy::start(&upstream.url(), &proxy_flags).await;
    let res = keyed_post(&proxy, "/orders", KEY, "Bearer alice").await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let with = |cmd: &[&'static str]| -> Vec<&str> {
        let mut all: Vec<&str> = cmd.to_vec();
        all.extend(["--store", store]);
        all.extend(flags);
        all
    };

    let (code, out, err) = keys(&with(&["inspect", KEY, "--scope", "Bearer alice"])).await;
    assert_eq!(code, 0, "{out}{err}");
    let doc: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(doc["state"], "completed");
    assert_eq!(doc["status"], 201);
    assert!(doc["expires"].is_string(), "{doc}");
    assert!(doc["size"].as_u64().unwrap() > 0, "{doc}");
    assert!(doc.get("body").is_none(), "the body without --body: {doc}");
    assert!(!out.contains(KEY));
    let (code, out, err) = keys(&with(&[
        "inspect",
        KEY,
        "--scope",
        "Bearer alice",
        "--body",
    ]))
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let doc: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        !doc["body"].as_str().unwrap().is_empty() && doc["headers"].is_array(),
        "{doc}"
    );
    // Without the scope, or without the proxies' secret, the record is not found: exit 1.
    let (code, _, err) = keys(&with(&["inspect", KEY])).await;
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = keys(&[
        "inspect",
        KEY,
        "--scope",
        "Bearer alice",
        "--store",
        store,
        "--namespace",
        "shop",
    ])
    .await;
    assert_eq!(code, 1, "{err}");

    let (code, out, err) = keys(&with(&["forget", KEY, "--scope", "Bearer alice"])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap()["forgotten"],
        true
    );
    let (code, _, _) = keys(&with(&["inspect", KEY, "--scope", "Bearer alice"])).await;
    assert_eq!(code, 1);
    let res = keyed_post(&proxy, "/orders", KEY, "Bearer alice").await;
    assert!(res.headers().get("idempotent-replayed").is_none());
    assert_eq!(upstream.hits("/orders"), 2, "the forgotten key ran again");

    // In flight: listed, left in place without --force (exit 2), forgotten with it, and the
    // forced forget logged with the key's hash.
    let slow = {
        let url = proxy.url("/slow?ms=3000");
        tokio::spawn(async move {
            client()
                .post(url)
                .header("Idempotency-Key", "slow-key")
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let give_up = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let (code, out, err) = keys(&with(&["in-flight"])).await;
        assert_eq!(code, 0, "{err}");
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if !lines.is_empty() {
            break lines;
        }
        assert!(Instant::now() < give_up, "never listed in flight");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(listed.len(), 1, "{listed:?}");
    let lease = &listed[0];
    assert_eq!(lease["owner"].as_str().unwrap().len(), 36, "{lease}");
    assert!(
        lease["age_ms"].is_number() && lease["renewals"].is_number(),
        "{lease}"
    );
    let (code, out, err) = keys(&with(&["forget", "slow-key"])).await;
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap()["state"],
        "in_flight"
    );
    let (code, out, err) = keys(&with(&["forget", "slow-key", "--force"])).await;
    assert_eq!(code, 0, "{out}{err}");
    let hash = serde_json::from_str::<Value>(out.trim()).unwrap()["key_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        err.lines()
            .any(|l| l.contains("WARN") && l.contains("forced") && l.contains(&hash)),
        "no warning of the forced forget with key hash {hash}: {err}"
    );
    assert!(
        !err.contains("slow-key"),
        "the raw key in a log line: {err}"
    );
    // A key with no record: forget says so with exit 1.
    let (code, _, err) = keys(&with(&["forget", "never-sent"])).await;
    assert_eq!(code, 1, "{err}");
    let _ = slow.await.unwrap();

    // Usage and store errors: exit 2.
    let (code, _, err) = keys(&["inspect"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = keys(&["inspect", KEY, "--store", "memory"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("memory"), "{err}");
    let (code, _, err) = keys(&["inspect", KEY, "--store", "redis://127.0.0.1:1"]).await;
    assert_eq!(code, 2, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_commands_on_redis() {
    let server = common::redis::RedisServer::start();
    the_keys_commands_inspect_forget_and_list(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_commands_on_postgres() {
    let pg = PgServer::start();
    the_keys_commands_inspect_forget_and_list(&pg.url()).await;
}
