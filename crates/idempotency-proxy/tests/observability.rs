//! What an operator receives from the proxy: spans at a real OTLP/HTTP receiver, JSON log lines
//! with each keyed request's hash and outcome (and never a key), and the metrics the Grafana
//! dashboard of docs/ queries.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

use common::{Proxy, Upstream, client, free_addr};

/// A span as the receiver decoded it.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: BTreeMap<String, Value>,
    /// The `service.name` of its resource.
    service: Option<String>,
}

impl Received {
    fn str(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key) {
            Some(Value::StringValue(s)) => Some(s),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key) {
            Some(Value::IntValue(n)) => Some(*n),
            _ => None,
        }
    }

    fn double(&self, key: &str) -> Option<f64> {
        match self.attributes.get(key) {
            Some(Value::DoubleValue(n)) => Some(*n),
            _ => None,
        }
    }
}

fn attributes(list: &[KeyValue]) -> BTreeMap<String, Value> {
    list.iter()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?.value?)))
        .collect()
}

#[derive(Clone, Default)]
struct Collected {
    spans: Arc<Mutex<Vec<Received>>>,
    /// Every request body as it arrived, to search for bytes that must never be there.
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

/// An OTLP/HTTP receiver on 127.0.0.1: `POST /v1/traces` with a protobuf
/// `ExportTraceServiceRequest`, as a collector takes it.
struct Receiver {
    addr: SocketAddr,
    collected: Collected,
    task: tokio::task::JoinHandle<()>,
}

async fn export(State(collected): State<Collected>, body: Bytes) -> impl IntoResponse {
    let request = match ExportTraceServiceRequest::decode(body.clone()) {
        Ok(request) => request,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("not a trace export: {e}")).into_response();
        }
    };
    collected.bodies.lock().unwrap().push(body);
    let mut spans = collected.spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource.resource.and_then(|r| {
            attributes(&r.attributes)
                .remove("service.name")
                .and_then(|v| match v {
                    Value::StringValue(s) => Some(s),
                    _ => None,
                })
        });
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(Received {
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent: span.parent_span_id,
                    attributes: attributes(&span.attributes),
                    service: service.clone(),
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse: full success.
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        Vec::new(),
    )
        .into_response()
}

impl Receiver {
    async fn start() -> Self {
        let collected = Collected::default();
        let app = Router::new()
            .route("/v1/traces", routing::post(export))
            .with_state(collected.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            collected,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Received> {
        self.collected.spans.lock().unwrap().clone()
    }

    fn requests(&self) -> Vec<Received> {
        let spans = self.spans();
        spans
            .into_iter()
            .filter(|s| s.name == "idempotency.request")
            .collect()
    }

    /// Whether any body the proxy sent holds `needle`.
    fn received_bytes(&self, needle: &[u8]) -> bool {
        let bodies = self.collected.bodies.lock().unwrap();
        bodies
            .iter()
            .any(|b| b.windows(needle.len()).any(|w| w == needle))
    }

    /// Waits until `n` request spans have arrived (up to a minute, polling).
    async fn wait_for_requests(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.requests().len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} request spans arrived: {:#?}",
                self.requests().len(),
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A proxy in front of `up` with `flags` and `env`.
async fn proxy(up: &Upstream, flags: &[&str], env: &[(&str, String)]) -> Proxy {
    let addr = free_addr();
    let admin = free_addr();
    let mut args = vec![
        "--upstream".to_owned(),
        up.url(),
        "--listen".to_owned(),
        addr.to_string(),
        "--admin-listen".to_owned(),
        admin.to_string(),
    ];
    args.extend(flags.iter().map(|s| s.to_string()));
    Proxy::spawn(args, env, addr, admin).await
}

/// Waits until `path` of `up` has run `n` times.
async fn wait_for_hits(up: &Upstream, path: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.hits(path) < n {
        assert!(Instant::now() < deadline, "{path} did not run {n} times");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A keyed request and its duplicate sent while it runs: the first is the owner, the second
/// waits for it. Both statuses.
async fn owner_and_waiter(proxy: &Proxy, up: &Upstream, path: &str, key: &str) -> (u16, u16) {
    let c = client();
    let url = proxy.url(path);
    let route = path.split('?').next().unwrap();
    let before = up.hits(route);
    let first = {
        let (c, url, key) = (c.clone(), url.clone(), key.to_owned());
        tokio::spawn(async move {
            let res = c.post(url).header("Idempotency-Key", key).send().await;
            res.unwrap().status().as_u16()
        })
    };
    wait_for_hits(up, route, before + 1).await;
    let second = c.post(url).header("Idempotency-Key", key).send().await;
    let second = second.unwrap().status().as_u16();
    (first.await.unwrap(), second)
}

async fn post(proxy: &Proxy, path: &str, key: &str, body: &'static str) -> u16 {
    let res = client()
        .post(proxy.url(path))
        .header("Idempotency-Key", key)
        .body(body)
        .send()
        .await
        .unwrap();
    res.status().as_u16()
}

async fn stop(mut proxy: Proxy) -> String {
    proxy.terminate();
    let status = proxy.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        proxy.logs()
    );
    proxy.logs()
}

fn is_key_hash(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Without `--otlp-endpoint`, the standard `OTEL_EXPORTER_OTLP_ENDPOINT` turns the export on,
/// to its `/v1/traces`, as every OpenTelemetry SDK reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_otlp_variable_turns_the_export_on() {
    let receiver = Receiver::start().await;
    let up = Upstream::start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url()),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned()),
    ];
    let proxy = proxy(&up, &[], &env).await;
    assert_eq!(post(&proxy, "/orders", "env-one", "a").await, 201);
    assert_eq!(post(&proxy, "/orders", "env-one", "a").await, 201);
    stop(proxy).await;
    let outcomes: Vec<_> = receiver
        .requests()
        .iter()
        .map(|s| s.str("idempotency.outcome").map(str::to_owned))
        .collect();
    assert_eq!(
        outcomes,
        [Some("executed".to_owned()), Some("replayed".to_owned())]
    );
}

/// Each keyed request is a span `idempotency.request` with the key's hash, its outcome, its
/// status and its wait; the store's calls and the upstream's run are its children. The batch
/// exporter waits ten minutes between exports here, so the spans arrive by the flush at
/// shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_with_the_keys_hash_and_outcome() {
    let receiver = Receiver::start().await;
    let up = Upstream::start().await;
    let endpoint = receiver.url();
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned())];
    let proxy = proxy(&up, &["--otlp-endpoint", &endpoint], &env).await;

    assert_eq!(post(&proxy, "/orders", "trace-one", "a").await, 201);
    assert_eq!(post(&proxy, "/orders", "trace-one", "a").await, 201);
    assert_eq!(post(&proxy, "/orders", "trace-one", "b").await, 422);
    let (owner, waiter) = owner_and_waiter(&proxy, &up, "/slow?ms=400", "trace-two").await;
    assert_eq!((owner, waiter), (200, 200));
    assert_eq!(post(&proxy, "/fail", "trace-three", "").await, 500);
    // Untracked: no span.
    client().get(proxy.url("/orders")).send().await.unwrap();
    assert_eq!(up.hits("/slow"), 1);

    stop(proxy).await;
    let spans = receiver.spans();
    let requests = receiver.requests();
    assert_eq!(requests.len(), 6, "{spans:#?}");
    for span in &spans {
        assert_eq!(
            span.service.as_deref(),
            Some("idempotency-proxy"),
            "{span:?}"
        );
    }

    let by_outcome = |outcome: &str| -> Vec<&Received> {
        let matches = requests
            .iter()
            .filter(|s| s.str("idempotency.outcome") == Some(outcome));
        matches.collect()
    };
    let executed = by_outcome("executed");
    assert_eq!(executed.len(), 3, "{requests:#?}");
    let [replayed] = by_outcome("replayed")[..] else {
        panic!("one replay: {requests:#?}")
    };
    let [mismatch] = by_outcome("mismatch")[..] else {
        panic!("one mismatch: {requests:#?}")
    };
    let [waited] = by_outcome("waited")[..] else {
        panic!("one waited: {requests:#?}")
    };
    for span in &requests {
        let hash = span.str("idempotency.key_hash").unwrap_or_default();
        assert!(is_key_hash(hash), "{span:?}");
        assert_eq!(span.str("http.request.method"), Some("POST"), "{span:?}");
    }
    let hash = |s: &Received| s.str("idempotency.key_hash").unwrap().to_owned();
    // The same key has the same hash; another key another.
    assert_eq!(hash(replayed), hash(mismatch));
    assert_ne!(hash(replayed), hash(waited));
    let hashes: BTreeSet<_> = requests.iter().map(hash).collect();
    assert_eq!(hashes.len(), 3, "{requests:#?}");

    assert_eq!(
        replayed.int("http.response.status_code"),
        Some(201),
        "{replayed:?}"
    );
    assert_eq!(mismatch.int("http.response.status_code"), Some(422));
    assert_eq!(waited.int("http.response.status_code"), Some(200));
    assert!(
        waited
            .double("idempotency.wait_seconds")
            .is_some_and(|w| w > 0.0),
        "{waited:?}"
    );
    assert!(replayed.double("idempotency.wait_seconds").is_none());

    let children = |parent: &Received| -> Vec<&Received> {
        spans
            .iter()
            .filter(|s| s.parent == parent.span_id && s.trace_id == parent.trace_id)
            .collect()
    };
    let names = |parent: &Received| -> BTreeSet<String> {
        children(parent).iter().map(|s| s.name.clone()).collect()
    };
    for span in &requests {
        assert!(names(span).contains("idempotency.store.begin"), "{span:?}");
        for begin in children(span) {
            if begin.name == "idempotency.store.begin" {
                let result = begin.str("idempotency.store.result");
                assert!(
                    matches!(result, Some("acquired" | "completed" | "in_flight")),
                    "{begin:?}"
                );
            }
        }
    }
    for owner in &executed {
        let names = names(owner);
        assert!(names.contains("idempotency.handler"), "{names:?}");
        match owner.int("http.response.status_code") {
            Some(500) => {
                assert!(names.contains("idempotency.store.release"), "{names:?}");
                assert_eq!(owner.str("idempotency.lease"), Some("released"));
            }
            Some(201 | 200) => {
                assert!(names.contains("idempotency.store.complete"), "{names:?}");
                assert_eq!(owner.str("idempotency.lease"), Some("stored"));
            }
            other => panic!("unexpected status {other:?}: {owner:?}"),
        }
    }
    assert!(
        names(waited).contains("idempotency.store.wait"),
        "{waited:?}"
    );
    assert_eq!(
        names(replayed),
        BTreeSet::from(["idempotency.store.begin".to_owned()])
    );

    for key in ["trace-one", "trace-two", "trace-three"] {
        assert!(
            !receiver.received_bytes(key.as_bytes()),
            "{key} was exported"
        );
    }
}

/// With JSON logs at `debug` (the layer at `trace`) and traces exported every 50 ms, keys sent
/// every way a key can come (and to the admin routes), and the caller's scope, appear in no log
/// line and in no byte the receiver got; the hash and outcome of each keyed request do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_or_span_holds_a_raw_key() {
    let receiver = Receiver::start().await;
    let up = Upstream::start().await;
    let endpoint = receiver.url();
    let env = [
        ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
        ("RUST_LOG", "debug,tower_idempotency=trace".to_owned()),
    ];
    let flags = [
        "--otlp-endpoint",
        &endpoint,
        "--log-format",
        "json",
        "--upstream-timeout",
        "200ms",
        "--admin-token",
        "admin-token-9",
    ];
    let proxy = proxy(&up, &flags, &env).await;
    let c = client();
    let secret = "sekrit-4f1d2c9a";
    let scope = "Bearer scope-sekrit-77e1";
    let mut tracked = 0;

    // In the header, as an sf-string and bare, in X-Idempotent-Key, in the query, in a form.
    for (n, path) in ["/orders", "/fail", "/slow?ms=400"].into_iter().enumerate() {
        let sep = if path.contains('?') { '&' } else { '?' };
        let requests = [
            c.post(proxy.url(path))
                .header("Idempotency-Key", format!("\"{secret}-h{n}\"")),
            c.post(proxy.url(path))
                .header("Idempotency-Key", format!("{secret}-b{n}"))
                .header("Authorization", scope),
            c.post(proxy.url(path))
                .header("X-Idempotent-Key", format!("{secret}-x{n}")),
            c.post(proxy.url(&format!("{path}{sep}__idempotent_key={secret}-q{n}"))),
            c.post(proxy.url(path))
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(format!("item=1&__idempotent_key={secret}-f{n}")),
        ];
        for request in requests {
            request.send().await.unwrap();
            tracked += 1;
        }
    }
    // A replay, a mismatch, a waiter.
    assert_eq!(
        post(&proxy, "/orders", &format!("{secret}-b0"), "").await,
        201
    );
    assert_eq!(
        post(&proxy, "/orders", &format!("{secret}-b0"), "other").await,
        422
    );
    let waiting = owner_and_waiter(&proxy, &up, "/slow?ms=150", &format!("{secret}-w")).await;
    assert_eq!(waiting, (200, 200));
    tracked += 4;
    // A key that is refused (a space is not allowed): 400, and a span and line whose outcome is
    // `rejected`, with no key hash: the key was never taken.
    let bad = c
        .post(proxy.url("/orders"))
        .header("Idempotency-Key", format!("{secret} bad"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let rejected = 1;

    // An operator looks a key up and forgets it: the admin routes take the raw key too.
    let admin = |method: reqwest::Method, query: &str| {
        let url = proxy.admin_url(&format!("/keys/{secret}-b0?{query}"));
        c.request(method, url)
            .header("Authorization", "Bearer admin-token-9")
            .send()
    };
    let scope_query = "scope=Bearer%20scope-sekrit-77e1";
    let found = admin(reqwest::Method::GET, &format!("{scope_query}&body=1"))
        .await
        .unwrap();
    assert_eq!(found.status(), 200);
    let found = found.text().await.unwrap();
    assert!(!found.contains(secret), "{found}");
    let forgotten = admin(reqwest::Method::DELETE, scope_query).await.unwrap();
    assert_eq!(forgotten.status(), 204);
    let listed = c
        .get(proxy.admin_url("/in-flight"))
        .header("Authorization", "Bearer admin-token-9")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);

    // Exported while the proxy runs, not only at shutdown.
    receiver.wait_for_requests(tracked + rejected).await;
    let logs = stop(proxy).await;

    let requests = receiver.requests();
    assert_eq!(requests.len(), tracked + rejected, "{requests:#?}");
    let (refused, keyed): (Vec<_>, Vec<_>) = requests
        .iter()
        .partition(|s| s.str("idempotency.outcome") == Some("rejected"));
    assert_eq!(refused.len(), rejected, "{requests:#?}");
    assert!(
        refused[0].str("idempotency.key_hash").is_none(),
        "{refused:?}"
    );
    for span in &keyed {
        assert!(
            is_key_hash(span.str("idempotency.key_hash").unwrap_or_default()),
            "{span:?}"
        );
        assert!(span.str("idempotency.outcome").is_some(), "{span:?}");
    }
    for needle in [secret, scope, "scope-sekrit"] {
        assert!(
            !receiver.received_bytes(needle.as_bytes()),
            "{needle} was exported"
        );
        assert!(!logs.contains(needle), "{needle} was logged: {logs}");
    }

    // Every line is JSON; each keyed request has its line, with its key's hash and outcome.
    let mut request_lines = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let doc: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        if doc["message"] == "tracked request" {
            request_lines += 1;
            let hash = doc["idempotency.key_hash"].as_str();
            if doc["idempotency.outcome"] == "rejected" {
                assert!(hash.is_none(), "{line}");
            } else {
                assert!(is_key_hash(hash.unwrap_or_default()), "{line}");
            }
            assert!(doc["idempotency.outcome"].is_string(), "{line}");
            assert!(doc["http.response.status_code"].is_u64(), "{line}");
        }
    }
    assert_eq!(request_lines, tracked + rejected, "{logs}");
}

/// JSON logs at the default level (no RUST_LOG) have the line of each keyed request; text logs
/// at the default level say nothing per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_a_line_per_keyed_request_and_text_logs_none() {
    let up = Upstream::start().await;
    let no_rust_log = [("RUST_LOG", String::new())];
    let json = proxy(&up, &["--log-format", "json"], &no_rust_log).await;
    let text = proxy(&up, &[], &no_rust_log).await;
    for proxy in [&json, &text] {
        assert_eq!(post(proxy, "/orders", "line-1", "a").await, 201);
        assert_eq!(post(proxy, "/orders", "line-1", "a").await, 201);
        assert_eq!(post(proxy, "/orders", "line-1", "b").await, 422);
        client().get(proxy.url("/orders")).send().await.unwrap();
    }
    let json = stop(json).await;
    let text = stop(text).await;

    let outcomes: Vec<String> = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|doc| doc["message"] == "tracked request")
        .map(|doc| {
            assert!(
                is_key_hash(doc["idempotency.key_hash"].as_str().unwrap()),
                "{doc}"
            );
            doc["idempotency.outcome"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(outcomes, ["executed", "replayed", "mismatch"], "{json}");
    assert!(!json.contains("line-1"), "{json}");

    // The start and the stop; nothing per request.
    for line in text.lines() {
        assert!(
            ["admin endpoints", "ready", "shutting down", "stopped"]
                .iter()
                .any(|m| line.contains(m)),
            "{text}"
        );
    }
    assert!(text.contains("idempotency-proxy ready"), "{text}");
}

/// Every metric name in every query of docs/grafana-dashboard.json is one a running proxy
/// exports on /metrics once it has served keyed requests; and docs/operations.md describes
/// every metric family it exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_metrics_the_proxy_exports() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    let dashboard = std::fs::read_to_string(docs.join("grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let operations = std::fs::read_to_string(docs.join("operations.md")).unwrap();

    let up = Upstream::start().await;
    // A short lock TTL, so that a slow request renews its lease.
    let proxy = proxy(&up, &["--lock-ttl", "300ms"], &[]).await;
    assert_eq!(post(&proxy, "/orders", "dash-1", "a").await, 201);
    assert_eq!(post(&proxy, "/orders", "dash-1", "a").await, 201);
    assert_eq!(post(&proxy, "/fail", "dash-2", "").await, 500);
    let waiting = owner_and_waiter(&proxy, &up, "/slow?ms=500", "dash-3").await;
    assert_eq!(waiting, (200, 200));
    let metrics = proxy.metrics().await;
    stop(proxy).await;

    let samples: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let families: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert!(
        families.contains("idempotency_wait_duration_seconds"),
        "{metrics}"
    );

    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "a query that names no metric of the proxy: {expr}"
        );
        for name in names {
            assert!(
                samples.contains(name.as_str()),
                "the dashboard queries {name}, which /metrics does not export: {expr}\n{metrics}"
            );
        }
    }
    for family in &families {
        assert!(
            operations.contains(&format!("`{family}`")),
            "docs/operations.md does not describe {family}"
        );
    }
}

/// Every `expr` in a Grafana dashboard, at any depth.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The metric names in a PromQL expression: every identifier that starts with `idempotency_`
/// (label names and functions never do).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("idempotency_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}
