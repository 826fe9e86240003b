//! The proxy as a process: configuration, the environment, admin endpoints, logs and signals.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Proxy, Upstream, client, event_count, free_addr, gauge, run_to_exit};

/// Runs the binary with `args` and `env`; it must exit 2 with one line naming `mentions`.
fn fails_with_one_line(args: &[&str], env: &[(&str, &str)], mentions: &str) {
    let (code, out) = run_to_exit(args, env);
    assert_eq!(code, Some(2), "{args:?} {env:?}: {out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?} {env:?}: one line expected, got {out:?}"
    );
    assert!(lines[0].starts_with("idempotency-proxy: "), "{out}");
    assert!(lines[0].contains(mentions), "{args:?} {env:?}: {out}");
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn a_bad_configuration_is_one_line_and_exit_code_2() {
    let up = "http://127.0.0.1:9";
    fails_with_one_line(&[], &[], "--upstream");
    fails_with_one_line(&["--upstream", "ftp://example"], &[], "--upstream");
    fails_with_one_line(&["--upstream", "not a url"], &[], "--upstream");
    fails_with_one_line(&["--upstream", up, "--ttl", "soon"], &[], "--ttl");
    fails_with_one_line(&["--upstream", up, "--lock-ttl", "0s"], &[], "--lock-ttl");
    fails_with_one_line(
        &["--upstream", up, "--max-request-body", "1MB"],
        &[],
        "--max-request-body",
    );
    fails_with_one_line(
        &["--upstream", up, "--on-conflict", "maybe"],
        &[],
        "--on-conflict",
    );
    fails_with_one_line(&["--upstream", up, "--methods", "PO ST"], &[], "--methods");
    fails_with_one_line(&["--upstream", up, "--store", "bogus"], &[], "--store");
    fails_with_one_line(
        &["--upstream", up, "--store-max-bytes", "2MB"],
        &[],
        "--store-max-bytes",
    );
    fails_with_one_line(
        &["--upstream", up, "--store-max-records", "0"],
        &[],
        "--store-max-records",
    );
    // The bounds are the memory store's: Redis has its own (maxmemory).
    fails_with_one_line(
        &["--upstream", up, "--store", "redis://127.0.0.1:9"],
        &[("IDEMPOTENCY_PROXY_STORE_MAX_BYTES", "1GiB")],
        "--store-max-bytes",
    );
    fails_with_one_line(
        &["--upstream", up, "--listen", "localhost"],
        &[],
        "--listen",
    );
    fails_with_one_line(&["--upstream", up, "--bogus-flag"], &[], "--bogus-flag");
    fails_with_one_line(
        &["--upstream", up],
        &[("IDEMPOTENCY_PROXY_WAIT_TIMEOUT", "forever")],
        "--wait-timeout",
    );
    fails_with_one_line(&[], &[("IDEMPOTENCY_PROXY_UPSTREAM", "nope")], "--upstream");

    // An address in use.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    fails_with_one_line(&["--upstream", up, "--listen", &busy_addr], &[], "--listen");
    drop(busy);
    // An address in use by sockets that share their port, as the proxy's workers do: a second
    // proxy on the same address is refused, not let in to take half the connections.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    let shared = tokio::net::TcpSocket::new_v4().unwrap();
    shared.set_reuseport(true).unwrap();
    shared.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let shared_addr = shared.local_addr().unwrap().to_string();
    let shared = shared.listen(8).unwrap();
    fails_with_one_line(
        &["--upstream", up, "--listen", &shared_addr],
        &[],
        "--listen",
    );
    drop(shared);
    fails_with_one_line(&["--upstream", up, "--workers", "0"], &[], "--workers");
    // A record holds a body of at most 4 GiB less one byte: a larger replay limit would store
    // responses no duplicate could read back.
    let any_port = ["--listen", "127.0.0.1:0"];
    for size in ["5GiB", "4GiB", "4294967296"] {
        fails_with_one_line(
            &[
                &["--upstream", up, "--max-response-body", size][..],
                &any_port,
            ]
            .concat(),
            &[],
            "--max-response-body",
        );
    }
    fails_with_one_line(
        &[&["--upstream", up][..], &any_port].concat(),
        &[("IDEMPOTENCY_PROXY_MAX_RESPONSE_BODY", "5GiB")],
        "--max-response-body",
    );
    // The headers that carry the key cannot be fingerprinted.
    fails_with_one_line(
        &[
            &["--upstream", up, "--fingerprint-header", "Idempotency-Key"][..],
            &any_port,
        ]
        .concat(),
        &[],
        "--fingerprint-header",
    );
    fails_with_one_line(
        &[&["--upstream", up][..], &any_port].concat(),
        &[(
            "IDEMPOTENCY_PROXY_FINGERPRINT_HEADER",
            "X-HTTP-Method-Override,X-Idempotent-Key",
        )],
        "--fingerprint-header",
    );
    fails_with_one_line(
        &["--upstream", up, "--release-status", "5xx,6xx"],
        &[],
        "--release-status",
    );
    fails_with_one_line(
        &["--upstream", up],
        &[("IDEMPOTENCY_PROXY_RELEASE_STATUS", "server errors")],
        "--release-status",
    );
    fails_with_one_line(
        &["--upstream", up, "--max-connections", "0"],
        &[],
        "--max-connections",
    );
    fails_with_one_line(
        &["--upstream", up],
        &[("IDEMPOTENCY_PROXY_MAX_IN_FLIGHT", "lots")],
        "--max-in-flight",
    );
    fails_with_one_line(
        &["--upstream", up, "--client-header-timeout", "0s"],
        &[],
        "--client-header-timeout",
    );
    fails_with_one_line(
        &["--upstream", up],
        &[("IDEMPOTENCY_PROXY_CLIENT_BODY_TIMEOUT", "slow")],
        "--client-body-timeout",
    );
    fails_with_one_line(
        &["--upstream", up, "--redis-replica-acks", "1"],
        &[],
        "--redis-replica-acks",
    );
    fails_with_one_line(
        &["--upstream", up, "--redis-replica-acks", "some"],
        &[],
        "--redis-replica-acks",
    );
    fails_with_one_line(
        &["--upstream", up, "--upstream-deadline", "0s"],
        &[],
        "--upstream-deadline",
    );
    fails_with_one_line(
        &["--upstream", up, "--upstream-timeout", "2m"],
        &[("IDEMPOTENCY_PROXY_UPSTREAM_DEADLINE", "1m")],
        "--upstream-deadline",
    );

    fails_with_one_line(
        &[
            "--upstream",
            up,
            "--otlp-endpoint",
            "https://collector:4318",
        ],
        &[],
        "--otlp-endpoint",
    );
    fails_with_one_line(
        &["--upstream", up],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    );

    // A store that does not answer at start-up.
    let redis = format!("redis://{}", free_addr());
    fails_with_one_line(&["--upstream", up, "--store", &redis], &[], "--store");
    let cluster = format!("redis+cluster://{}", free_addr());
    fails_with_one_line(&["--upstream", up, "--store", &cluster], &[], "--store");
}

#[test]
fn help_explains_every_flag() {
    let (code, out) = run_to_exit(&["--help"], &[]);
    assert_eq!(code, Some(0));
    for flag in [
        "--upstream",
        "--listen",
        "--admin-listen",
        "--store",
        "--store-max-bytes",
        "--store-max-records",
        "--ttl",
        "--wait-timeout",
        "--lock-ttl",
        "--on-conflict",
        "--methods",
        "--require-key",
        "--fail-open",
        "--scope-header",
        "--fingerprint-header",
        "--max-request-body",
        "--max-response-body",
        "--upstream-timeout",
        "--upstream-deadline",
        "--log-format",
        "--key-secret",
        "--key-secret-file",
        "--namespace",
        "--release-status",
        "--client-header-timeout",
        "--client-body-timeout",
        "--max-connections",
        "--max-in-flight",
        "--trust-forwarded",
        "--redis-replica-acks",
        "--otlp-endpoint",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "IDEMPOTENCY_PROXY_UPSTREAM",
        "IDEMPOTENCY_PROXY_REDIS_REPLICA_ACKS",
        "IDEMPOTENCY_PROXY_KEY_SECRET",
        "IDEMPOTENCY_PROXY_NAMESPACE",
        "IDEMPOTENCY_PROXY_RELEASE_STATUS",
        "IDEMPOTENCY_PROXY_MAX_CONNECTIONS",
        "IDEMPOTENCY_PROXY_TRUST_FORWARDED",
        "IDEMPOTENCY_PROXY_FINGERPRINT_HEADER",
        "4294967295",
    ] {
        assert!(out.contains(flag), "--help does not mention {flag}");
    }
}

/// Every variable this test sets takes effect, each shown by a request or by what the ready line
/// and `/metrics` report. The flags it leaves unset (the store, TTLs, waits, fail-open, the
/// response limit, replica acks, the key secret file) read their variables the same way, and
/// their effect is tested with the flags themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_configures_each_flag_it_sets() {
    let up = Upstream::start().await;
    let addr = free_addr();
    let admin = free_addr();
    let env = [
        ("IDEMPOTENCY_PROXY_UPSTREAM", up.url()),
        ("IDEMPOTENCY_PROXY_LISTEN", addr.to_string()),
        ("IDEMPOTENCY_PROXY_ADMIN_LISTEN", admin.to_string()),
        ("IDEMPOTENCY_PROXY_ON_CONFLICT", "reject".to_owned()),
        ("IDEMPOTENCY_PROXY_METHODS", "POST,PATCH".to_owned()),
        ("IDEMPOTENCY_PROXY_REQUIRE_KEY", "true".to_owned()),
        (
            "IDEMPOTENCY_PROXY_SCOPE_HEADER",
            "X-Tenant,X-User".to_owned(),
        ),
        ("IDEMPOTENCY_PROXY_MAX_REQUEST_BODY", "16".to_owned()),
        (
            "IDEMPOTENCY_PROXY_FINGERPRINT_HEADER",
            "X-HTTP-Method-Override,X-Variant".to_owned(),
        ),
        ("IDEMPOTENCY_PROXY_UPSTREAM_TIMEOUT", "3s".to_owned()),
        ("IDEMPOTENCY_PROXY_UPSTREAM_DEADLINE", "20s".to_owned()),
        ("IDEMPOTENCY_PROXY_LOG_FORMAT", "json".to_owned()),
        ("IDEMPOTENCY_PROXY_STORE_MAX_BYTES", "3MiB".to_owned()),
        ("IDEMPOTENCY_PROXY_STORE_MAX_RECORDS", "777".to_owned()),
        ("IDEMPOTENCY_PROXY_NAMESPACE", "env-shop".to_owned()),
        (
            "IDEMPOTENCY_PROXY_RELEASE_STATUS",
            "408,409,425,429".to_owned(),
        ),
        ("IDEMPOTENCY_PROXY_CLIENT_HEADER_TIMEOUT", "2s".to_owned()),
        ("IDEMPOTENCY_PROXY_CLIENT_BODY_TIMEOUT", "300ms".to_owned()),
        ("IDEMPOTENCY_PROXY_MAX_CONNECTIONS", "1000".to_owned()),
        ("IDEMPOTENCY_PROXY_MAX_IN_FLIGHT", "2".to_owned()),
        ("IDEMPOTENCY_PROXY_TRUST_FORWARDED", "true".to_owned()),
        ("IDEMPOTENCY_PROXY_KEY_SECRET", "env-secret".to_owned()),
        (
            "IDEMPOTENCY_PROXY_OTLP_ENDPOINT",
            format!("http://{}", free_addr()),
        ),
    ];
    let proxy = Proxy::spawn(Vec::new(), &env, addr, admin).await;
    let c = client();

    // require-key: a keyless POST is a 400; PUT is not a tracked method and passes through.
    let keyless = c.post(proxy.url("/orders")).send().await.unwrap();
    assert_eq!(keyless.status(), 400);
    let put = c
        .put(proxy.url("/orders"))
        .body("keyless put")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    assert_eq!(up.hits("/orders"), 1);

    // max-request-body: 16 bytes.
    let big = c
        .post(proxy.url("/orders"))
        .header("Idempotency-Key", "big")
        .body("x".repeat(17))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);

    // on-conflict reject: a duplicate of a request in flight is a 409 at once.
    let slow = proxy.url("/slow?ms=1500");
    let c1 = c.clone();
    let s1 = slow.clone();
    let first = tokio::spawn(async move {
        c1.post(s1)
            .header("Idempotency-Key", "busy")
            .send()
            .await
            .unwrap()
            .status()
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.hits("/slow") == 0 {
        assert!(Instant::now() < deadline, "the first request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dup = c
        .post(&slow)
        .header("Idempotency-Key", "busy")
        .send()
        .await
        .unwrap();
    assert_eq!(dup.status(), 409);
    assert!(dup.headers().contains_key("retry-after"));

    // max-in-flight 2: with a second keyed request running, a third key is refused, 503.
    let c2 = c.clone();
    let s2 = slow.clone();
    let second = tokio::spawn(async move {
        c2.post(s2)
            .header("Idempotency-Key", "busy-2")
            .send()
            .await
            .unwrap()
            .status()
    });
    while up.hits("/slow") < 2 {
        assert!(
            Instant::now() < deadline,
            "the second request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let third = c
        .post(proxy.url("/orders"))
        .header("Idempotency-Key", "busy-3")
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), 503);
    assert!(third.headers().contains_key("retry-after"));
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(second.await.unwrap(), 200);
    assert_eq!(up.hits("/slow"), 2);
    assert_eq!(up.hits("/orders"), 1);

    // upstream-timeout 3 s: the caller of a slower upstream gets a 504 once it passed, not
    // before (the upstream's answer is still stored for the retry).
    let started = Instant::now();
    let late = c
        .post(proxy.url("/slow?ms=4500"))
        .header("Idempotency-Key", "late")
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 504);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "504 after {:?}, before the upstream timeout",
        started.elapsed()
    );

    // release-status without 5xx: an upstream 500 is stored and replayed.
    for n in 0..2 {
        let failed = c
            .post(proxy.url("/fail"))
            .header("Idempotency-Key", "failing")
            .send()
            .await
            .unwrap();
        assert_eq!(failed.status(), 500);
        assert_eq!(failed.headers().contains_key("idempotent-replayed"), n == 1);
    }
    assert_eq!(up.hits("/fail"), 1);

    // trust-forwarded: a front proxy's https is kept.
    let seen: serde_json::Value = c
        .get(proxy.url("/echo"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["x-forwarded-proto"][0], "https");

    // client-body-timeout: a keyed body that stalls is a 408.
    let stalled = common::raw_request(
        addr,
        b"POST /orders HTTP/1.1\r\nHost: proxy\r\nIdempotency-Key: stalled\r\nContent-Length: 10\r\n\r\nabc",
        None,
    )
    .await;
    assert_eq!(stalled.status, 408);
    // client-header-timeout: a connection that sends nothing is closed.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    common::closed_by_proxy(&mut silent).await;

    // The scope is X-Tenant and X-User; Authorization no longer separates callers.
    for auth in ["Bearer a", "Bearer b"] {
        let res = c
            .post(proxy.url("/orders"))
            .header("Idempotency-Key", "scoped")
            .header("authorization", auth)
            .header("x-tenant", "t1")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    assert_eq!(up.hits("/orders"), 2);

    // The fingerprint headers: the same key with another value of either is a 422.
    let fingerprinted = |name: &'static str, value: &'static str| {
        c.post(proxy.url("/orders"))
            .header("Idempotency-Key", format!("fp-{name}"))
            .header("x-tenant", "t1")
            .header(name, value)
            .send()
    };
    for name in ["X-HTTP-Method-Override", "X-Variant"] {
        assert_eq!(fingerprinted(name, "a").await.unwrap().status(), 201);
        let replay = fingerprinted(name, "a").await.unwrap();
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        assert_eq!(fingerprinted(name, "b").await.unwrap().status(), 422);
    }
    assert_eq!(up.hits("/orders"), 4);

    // The admin endpoints listen where the environment said; logs are JSON lines.
    let health = c.get(proxy.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // The memory store has the bounds the environment gave it.
    let metrics = c.get(proxy.admin_url("/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    let max_bytes = gauge(&metrics, "idempotency_memory_store_max_bytes");
    assert_eq!(max_bytes, Some((3 << 20) as f64));
    let max_records = gauge(&metrics, "idempotency_memory_store_max_records");
    assert_eq!(max_records, Some(777.0));
    let logs = proxy.logs();
    assert!(!logs.is_empty());
    let mut ready = None;
    for line in logs.lines() {
        let line = serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        if line["message"] == "idempotency-proxy ready" {
            ready = Some(line);
        }
    }
    // What the ready line says of the limits and the namespace.
    let ready = ready.unwrap_or_else(|| panic!("no ready line: {logs}"));
    let upstream = ready["upstream"].as_str().unwrap_or_default();
    assert!(upstream.starts_with(&up.url()), "{ready}");
    assert_eq!(ready["namespace"], "env-shop", "{ready}");
    assert_eq!(ready["key_secret"], true, "{ready}");
    assert_eq!(ready["max_connections"], 1000, "{ready}");
    assert_eq!(ready["max_in_flight"], 2, "{ready}");
    assert_eq!(ready["trust_forwarded"], true, "{ready}");
    let otlp = ready["otlp"].as_str().unwrap_or_default();
    assert!(otlp.ends_with("/v1/traces"), "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_count_what_happened() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), &[]).await;
    let c = client();

    let health = c.get(proxy.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let before = proxy.metrics().await;
    assert_eq!(event_count(&before, "executed"), Some(0), "{before}");

    for key in ["m1", "m2"] {
        for _ in 0..3 {
            let res = c
                .post(proxy.url("/orders"))
                .header("Idempotency-Key", key)
                .body("same")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201);
        }
    }
    let mismatch = c
        .post(proxy.url("/orders"))
        .header("Idempotency-Key", "m1")
        .body("different")
        .send()
        .await
        .unwrap();
    assert_eq!(mismatch.status(), 422);
    let failed = c
        .post(proxy.url("/fail"))
        .header("Idempotency-Key", "f1")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    let bad = c
        .post(proxy.url("/orders"))
        .header("Idempotency-Key", "")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    c.get(proxy.url("/orders")).send().await.unwrap();

    let res = c.get(proxy.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    assert_eq!(event_count(&text, "executed"), Some(3), "{text}");
    assert_eq!(event_count(&text, "replayed"), Some(4), "{text}");
    assert_eq!(event_count(&text, "mismatch"), Some(1), "{text}");
    assert_eq!(event_count(&text, "released"), Some(1), "{text}");
    assert_eq!(event_count(&text, "bad_key"), Some(1), "{text}");
    assert_eq!(event_count(&text, "wait_timeout"), Some(0), "{text}");
    assert_eq!(up.hits("/orders"), 3);
    // The latency histogram counted every request: 6 + 1 + 1 + 1 + 1.
    let count_line = text
        .lines()
        .filter(|l| l.starts_with("idempotency_proxy_request_duration_seconds_count"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum::<u64>();
    assert_eq!(count_line, 10, "{text}");
    assert!(text.contains("idempotency_proxy_request_duration_seconds_bucket{"));
    assert!(text.contains("idempotency_proxy_upstream_duration_seconds_bucket{"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_appear_in_the_logs() {
    let up = Upstream::start().await;
    let addr = free_addr();
    let admin = free_addr();
    let args = vec![
        "--upstream".to_owned(),
        up.url(),
        "--listen".to_owned(),
        addr.to_string(),
        "--log-format".to_owned(),
        "json".to_owned(),
        "--upstream-timeout".to_owned(),
        "200ms".to_owned(),
    ];
    let env = [("RUST_LOG", "debug".to_owned())];
    let mut proxy = Proxy::spawn(args, &env, addr, admin).await;
    let c = client();
    let secret = "sekrit-key-4f1d2c";
    for path in ["/orders", "/fail", "/slow?ms=500"] {
        c.post(proxy.url(path))
            .header("Idempotency-Key", secret)
            .send()
            .await
            .unwrap();
        c.post(proxy.url(&format!(
            "{path}{}__idempotent_key={secret}-q",
            if path.contains('?') { "&" } else { "?" }
        )))
        .send()
        .await
        .unwrap();
    }
    proxy.terminate();
    assert!(
        proxy
            .wait_exit(Duration::from_secs(10))
            .await
            .unwrap()
            .success()
    );
    let logs = proxy.logs();
    assert!(
        logs.contains("\"path\":\"/orders\""),
        "the access log is on at debug: {logs}"
    );
    assert!(!logs.contains(secret), "a raw key was logged: {logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_tracked_request_finish_then_exits_0() {
    let up = Upstream::start().await;
    let mut proxy = Proxy::start(&up.url(), &[]).await;
    let c = client();
    let url = proxy.url("/slow?ms=1500");
    let request = tokio::spawn({
        let c = c.clone();
        async move {
            let res = c
                .post(url)
                .header("Idempotency-Key", "in-flight-at-shutdown")
                .send()
                .await
                .unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    });
    // Let the request reach the upstream, then ask the proxy to stop.
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.hits("/slow") == 0 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.terminate();
    // New connections are refused soon, while the request in flight is still running.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(proxy.addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the proxy kept accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "slow run 1");
    let exit = proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("proxy did not exit");
    assert_eq!(exit.code(), Some(0), "{}", proxy.logs());
    assert_eq!(up.hits("/slow"), 1);
}

/// Callers that stopped waiting (past `--upstream-timeout`) or went away: a SIGTERM waits for
/// their upstream calls and stores the answers, so another proxy on the same Redis replays them
/// instead of running them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_requests_whose_callers_left_and_stores_their_answers() {
    let up = Upstream::start().await;
    let redis = common::Backend::redis();
    let mut first = redis
        .proxy(&up.url(), &["--upstream-timeout", "300ms"])
        .await;
    let c = client();
    let impatient = c
        .post(first.url("/slow?ms=1500"))
        .header("Idempotency-Key", "\"impatient\"")
        .send()
        .await
        .unwrap();
    assert_eq!(impatient.status(), 504);
    let gone = tokio::spawn({
        let url = first.url("/slow?ms=1500");
        let c = c.clone();
        async move {
            let _ = c
                .post(url)
                .header("Idempotency-Key", "\"gone\"")
                .send()
                .await;
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.hits("/slow") < 2 {
        assert!(Instant::now() < deadline, "the requests never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gone.abort();
    first.terminate();
    let exit = first
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("proxy did not exit");
    assert_eq!(exit.code(), Some(0), "{}", first.logs());

    let second = redis.proxy(&up.url(), &[]).await;
    for key in ["\"impatient\"", "\"gone\""] {
        let res = c
            .post(second.url("/slow?ms=1500"))
            .header("Idempotency-Key", key)
            .header("Prefer", "wait=0")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{key}: {}", second.logs());
        assert_eq!(res.headers()["idempotent-replayed"], "true");
    }
    assert_eq!(up.hits("/slow"), 2, "each key ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_an_idle_proxy_with_exit_0() {
    let up = Upstream::start().await;
    let mut proxy = Proxy::start(&up.url(), &[]).await;
    // An idle keep-alive connection must not hold the shutdown up.
    let c = client();
    assert_eq!(
        c.get(proxy.url("/orders")).send().await.unwrap().status(),
        201
    );
    let status = std::process::Command::new("kill")
        .args(["-INT", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = proxy
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("proxy did not exit");
    assert_eq!(exit.code(), Some(0), "{}", proxy.logs());
}
