//! The proxy exposed to the internet: slow and greedy clients, services that share a store,
//! request paths and forwarding headers, and which answers are stored. The real binary in front
//! of a real upstream that counts what reaches it; raw TCP wherever a client library would not
//! send what is sent (a trickled body, a stalled head, a path with dot-segments).

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    Backend, DroppingUpstream, Proxy, Upstream, client, closed_by_proxy, event_count, raw_request,
    read_answer,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const KEY: &str = "Idempotency-Key";

/// The head of a keyed POST whose body is `length` bytes.
fn keyed_post(path: &str, key: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: proxy\r\n{KEY}: {key}\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Waits until `path` ran `n` times upstream.
async fn reached(up: &Upstream, path: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while up.hits(path) < n {
        assert!(Instant::now() < deadline, "{path} never ran {n} times");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A GET over a new keep-alive connection, answered: the connection then stays open, idle.
async fn idle_connection(proxy: &Proxy) -> TcpStream {
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(b"GET /orders HTTP/1.1\r\nHost: proxy\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut conn, None).await.status, 201);
    conn
}

// ---------------------------------------------------------------------------------------------
// Slow and greedy clients
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_body_that_does_not_arrive_in_time_is_408_and_never_reaches_the_upstream() {
    let up = Upstream::start().await;
    // Reject mode: a lease left behind would answer the retry 409 at once.
    let proxy = Proxy::start(
        &up.url(),
        &["--client-body-timeout", "300ms", "--on-conflict", "reject"],
    )
    .await;

    // 10 bytes of 100, then nothing.
    let mut stalled = keyed_post("/orders", "\"slow\"", 100).into_bytes();
    stalled.extend_from_slice(b"0123456789");
    let stalled = raw_request(proxy.addr, &stalled, None).await;
    assert_eq!(stalled.status, 408, "{stalled:?}");
    assert_eq!(stalled.problem_slug(), "body-timeout");
    // A 1 MiB body announced, then a byte at a time: it keeps coming, never in full in time.
    let trickled = raw_request(
        proxy.addr,
        keyed_post("/orders", "\"slow\"", 1 << 20).as_bytes(),
        Some(Duration::from_millis(50)),
    )
    .await;
    assert_eq!(trickled.status, 408, "{trickled:?}");
    assert_eq!(trickled.problem_slug(), "body-timeout");
    assert_eq!(up.total_hits(), 0, "the upstream never saw a late body");
    assert_eq!(event_count(&proxy.metrics().await, "body_timeout"), Some(2));

    // The key was left free: the whole request runs once, then replays.
    let c = client();
    let send = || {
        c.post(proxy.url("/orders"))
            .header(KEY, "\"slow\"")
            .body("x".repeat(100))
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let again = send().await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(up.hits("/orders"), 1);

    // A body without a key streams to the upstream and is not timed: slower than the timeout,
    // it arrives whole.
    let keyless = raw_request(
        proxy.addr,
        b"POST /upload HTTP/1.1\r\nHost: proxy\r\nContent-Length: 8\r\n\r\n",
        Some(Duration::from_millis(60)),
    )
    .await;
    assert_eq!(keyless.status, 200, "{keyless:?}");
    assert_eq!(keyless.body, b"8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_no_request_in_time_are_closed_and_free_their_place() {
    let up = Upstream::start().await;
    // One connection at a time: the next is served only once the proxy closed the last.
    let proxy = Proxy::start(
        &up.url(),
        &["--client-header-timeout", "300ms", "--max-connections", "1"],
    )
    .await;
    let next = || async {
        raw_request(
            proxy.addr,
            b"GET /orders HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n",
            None,
        )
        .await
    };

    let stalls: [(&str, &[u8]); 4] = [
        ("nothing at all", b""),
        ("half an HTTP/2 preface", b"PRI * HTTP/2.0\r\n"),
        (
            "half a request head",
            b"POST /orders HTTP/1.1\r\nHost: proxy\r\n",
        ),
        ("a request line cut short", b"POST /ord"),
    ];
    for (what, bytes) in stalls {
        let mut held = TcpStream::connect(proxy.addr).await.unwrap();
        held.write_all(bytes).await.unwrap();
        let answer = next().await;
        assert_eq!(answer.status, 201, "after {what}: {answer:?}");
        closed_by_proxy(&mut held).await;
    }

    // A head trickled in a byte at a time never completes.
    let mut trickled = TcpStream::connect(proxy.addr).await.unwrap();
    trickled
        .write_all(b"GET /orders HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        while trickled.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert_eq!(next().await.status, 201, "after a trickled head");
    trickle.await.unwrap();

    // An HTTP/1.1 keep-alive connection left idle after its request.
    let mut idle = idle_connection(&proxy).await;
    assert_eq!(
        next().await.status,
        201,
        "after an idle HTTP/1.1 connection"
    );
    closed_by_proxy(&mut idle).await;

    // An HTTP/2 connection left idle after its request.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(proxy.url("/orders")).body(()).unwrap();
    let (res, _) = h2.send_request(req, true).unwrap();
    assert_eq!(res.await.unwrap().status(), 201);
    assert_eq!(next().await.status, 201, "after an idle HTTP/2 connection");
    // Only keeps a broken build from hanging the suite.
    let ended = tokio::time::timeout(Duration::from_secs(30), conn).await;
    assert!(ended.is_ok(), "the HTTP/2 connection stayed open");

    // Every stalled connection was closed without reaching the upstream.
    assert_eq!(up.hits("/orders"), 9);
    assert_eq!(up.total_hits(), 9, "{:?}", up.all_hits());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_connections_wait_until_one_closes() {
    let up = Upstream::start().await;
    // Two places for both workers together: the kernel spreads connections over the workers'
    // sockets, and a bound per worker would serve some of the waiting ones below.
    let proxy = Proxy::start(&up.url(), &["--max-connections", "2", "--workers", "2"]).await;
    let first = idle_connection(&proxy).await;
    let second = idle_connection(&proxy).await;
    assert_eq!(up.hits("/orders"), 2);

    // More connections get through TCP's handshake (the kernel's backlog), and their requests
    // wait.
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
        conn.write_all(b"GET /orders HTTP/1.1\r\nHost: proxy\r\n\r\n")
            .await
            .unwrap();
        waiting.push(conn);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        up.hits("/orders"),
        2,
        "a connection past the bound was served"
    );

    // Each connection that closes lets one waiting connection in (which then stays open, idle).
    drop(first);
    reached(&up, "/orders", 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        up.hits("/orders"),
        3,
        "one place freed, one connection served"
    );
    drop(second);
    reached(&up, "/orders", 4).await;
    drop(waiting);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_a_keyed_request_is_503_and_takes_nothing() {
    let up = Upstream::start().await;
    // Reject mode: a lease left behind would answer the retry 409 at once.
    let proxy = Proxy::start(
        &up.url(),
        &["--max-in-flight", "1", "--on-conflict", "reject"],
    )
    .await;
    let c = client();
    let slow = tokio::spawn({
        let c = c.clone();
        let url = proxy.url("/slow?ms=1500");
        async move {
            let res = c.post(url).header(KEY, "\"busy\"").send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    });
    reached(&up, "/slow", 1).await;

    // On another connection, maybe served by another worker: the bound is the process's.
    let other = || {
        client()
            .post(proxy.url("/orders"))
            .header(KEY, "\"other\"")
            .body("x")
            .send()
    };
    let refused = other().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let doc: serde_json::Value = refused.json().await.unwrap();
    assert!(
        doc["type"]
            .as_str()
            .unwrap()
            .ends_with(":too-many-in-flight")
    );
    assert_eq!(up.hits("/orders"), 0);
    // Requests without a key are not counted against the bound.
    let keyless = client()
        .post(proxy.url("/orders"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(keyless.status(), 201);

    assert_eq!(slow.await.unwrap(), (200, "slow run 1".to_owned()));
    // The refused key was left free, and the place is free again.
    let retry = other().await.unwrap();
    assert_eq!(retry.status(), 201);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(up.hits("/orders"), 2);
    assert_eq!(event_count(&proxy.metrics().await, "overloaded"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_may_open_at_most_100_streams_at_once_on_a_connection() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), &[]).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(proxy.url("/orders")).body(()).unwrap();
    let (res, _) = h2.send_request(req, true).unwrap();
    assert_eq!(res.await.unwrap().status(), 201);
    // The proxy's SETTINGS came before its answer.
    assert_eq!(h2.current_max_send_streams(), 100);
}

// ---------------------------------------------------------------------------------------------
// Several services on one store
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_keep_services_that_share_a_redis_apart() {
    let redis = Backend::redis();
    let billing = Upstream::start().await;
    let shipping = Upstream::start().await;
    let c = client();
    let post = |proxy: &Proxy, key: &str| {
        c.post(proxy.url("/orders"))
            .header(KEY, key.to_owned())
            .body("same body")
            .send()
    };

    // Without namespaces, the same path and key sent to two services meet: the second service
    // never runs and its caller gets the first one's answer.
    let billing_proxy = redis.proxy(&billing.url(), &[]).await;
    let shipping_proxy = redis.proxy(&shipping.url(), &[]).await;
    assert_eq!(post(&billing_proxy, "k-1").await.unwrap().status(), 201);
    let met = post(&shipping_proxy, "k-1").await.unwrap();
    assert_eq!(met.headers()["idempotent-replayed"], "true");
    assert_eq!((billing.hits("/orders"), shipping.hits("/orders")), (1, 0));
    drop((billing_proxy, shipping_proxy));

    // With a namespace each, each service runs its own request, and replays its own answer.
    let billing_proxy = redis
        .proxy(&billing.url(), &["--namespace", "billing"])
        .await;
    let shipping_proxy = redis
        .proxy(&shipping.url(), &["--namespace", "shipping"])
        .await;
    for proxy in [&billing_proxy, &shipping_proxy] {
        let first = post(proxy, "k-2").await.unwrap();
        assert_eq!(first.status(), 201);
        assert!(first.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!((billing.hits("/orders"), shipping.hits("/orders")), (2, 1));
    for (proxy, up) in [(&billing_proxy, &billing), (&shipping_proxy, &shipping)] {
        let again = post(proxy, "k-2").await.unwrap();
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        let order: serde_json::Value = again.json().await.unwrap();
        assert_eq!(
            order["order"],
            up.hits("/orders"),
            "its own service's answer"
        );
    }
    assert_eq!((billing.hits("/orders"), shipping.hits("/orders")), (2, 1));

    // A second proxy of the same service, with the same namespace, shares its records.
    let billing_too = redis
        .proxy(&billing.url(), &["--namespace", "billing"])
        .await;
    let shared = post(&billing_too, "k-2").await.unwrap();
    assert_eq!(shared.headers()["idempotent-replayed"], "true");
    assert_eq!(billing.hits("/orders"), 2);
}

// ---------------------------------------------------------------------------------------------
// Paths and forwarding headers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_with_dot_segments_are_400_and_never_reach_the_upstream() {
    let up = Upstream::start().await;
    // Paths are appended to the prefix: `/../secret` would climb out of `/api`.
    let proxy = Proxy::start(&format!("{}/api", up.url()), &[]).await;
    let paths = [
        "/../secret",
        "/./secret",
        "/a/../../secret",
        "/orders/..",
        "/%2e%2e/secret",
        "/%2E%2E/secret",
        "/.%2e/secret",
        "/%2e/secret",
        "/..%2fsecret",
        "/..%2Fsecret",
        "/a%2f..%2f..%2fsecret",
        "/..%5csecret",
        "/..\\secret",
        "/a\\..\\..\\secret",
        "/..;/secret",
    ];
    for (n, path) in paths.iter().enumerate() {
        for method in ["GET", "POST"] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: proxy\r\n{KEY}: \"dots-{n}\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let answer = raw_request(proxy.addr, request.as_bytes(), None).await;
            assert_eq!(answer.status, 400, "{method} {path}: {answer:?}");
            assert_eq!(
                answer.problem_slug(),
                "path-dot-segments",
                "{method} {path}"
            );
        }
    }
    assert_eq!(
        up.total_hits(),
        0,
        "reached the upstream: {:?}",
        up.all_hits()
    );

    // Dots within names are no dot-segments.
    for path in ["/.well-known/x", "/files/a..b", "/v1.2/orders"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n");
        let answer = raw_request(proxy.addr, request.as_bytes(), None).await;
        assert_eq!(answer.status, 404, "{path}: {answer:?}");
        assert_eq!(up.hits(&format!("/api{path}")), 1, "{path}");
    }
}

/// The headers the upstream's `/echo` saw, as JSON: name -> values.
async fn echoed(proxy: &Proxy, headers: &[(&str, &str)]) -> serde_json::Value {
    let mut req = client().get(proxy.url("/echo"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_clients_are_written_anew_unless_trusted() {
    let up = Upstream::start().await;
    let forged = [
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example"),
        ("x-forwarded-port", "443"),
        ("x-forwarded-prefix", "/admin"),
        ("x-real-ip", "203.0.113.7"),
        ("forwarded", "for=203.0.113.7;proto=https"),
    ];

    // Anyone may send these: they are dropped, and written from the connection.
    let proxy = Proxy::start(&up.url(), &[]).await;
    let host = proxy.addr.to_string();
    let own = format!("for=127.0.0.1;host=\"{host}\";proto=http");
    for sent in [&forged[..], &[]] {
        let seen = echoed(&proxy, sent).await;
        assert_eq!(seen["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
        assert_eq!(seen["x-real-ip"], serde_json::json!(["127.0.0.1"]));
        assert_eq!(seen["x-forwarded-proto"], serde_json::json!(["http"]));
        assert_eq!(seen["x-forwarded-host"], serde_json::json!([host]));
        assert_eq!(seen["forwarded"], serde_json::json!([own]));
        assert!(seen.get("x-forwarded-port").is_none(), "{seen}");
        assert!(seen.get("x-forwarded-prefix").is_none(), "{seen}");
    }

    // Behind a front proxy of the operator's: its headers are kept and this hop appended.
    let trusting = Proxy::start(&up.url(), &["--trust-forwarded"]).await;
    let host = trusting.addr.to_string();
    let own = format!("for=127.0.0.1;host=\"{host}\";proto=http");
    let seen = echoed(&trusting, &forged).await;
    assert_eq!(
        seen["x-forwarded-for"],
        serde_json::json!(["203.0.113.7, 127.0.0.1"])
    );
    assert_eq!(seen["x-real-ip"], serde_json::json!(["203.0.113.7"]));
    assert_eq!(
        seen["x-forwarded-proto"],
        serde_json::json!(["https"]),
        "a front proxy's https is never forced to http"
    );
    assert_eq!(
        seen["x-forwarded-host"],
        serde_json::json!(["shop.example"])
    );
    assert_eq!(seen["x-forwarded-port"], serde_json::json!(["443"]));
    assert_eq!(seen["x-forwarded-prefix"], serde_json::json!(["/admin"]));
    assert_eq!(
        seen["forwarded"],
        serde_json::json!([format!("for=203.0.113.7;proto=https, {own}")])
    );
    // With nothing sent, the trusting proxy writes what it knows.
    let seen = echoed(&trusting, &[]).await;
    assert_eq!(seen["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(seen["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(seen["forwarded"], serde_json::json!([own]));
}

// ---------------------------------------------------------------------------------------------
// Which answers are stored
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_status_chooses_which_answers_free_the_key() {
    let up = Upstream::start().await;
    let c = client();
    let post = |proxy: &Proxy, path: &str, key: &str| {
        c.post(proxy.url(path))
            .header(KEY, key.to_owned())
            .body("x")
            .send()
    };

    // As Stripe does: a 5xx answer of the upstream is stored once the endpoint ran.
    let stripe_like = Proxy::start(&up.url(), &["--release-status", "408,409,425,429"]).await;
    let failed = post(&stripe_like, "/fail", "f").await.unwrap();
    assert_eq!(failed.status(), 500);
    assert_eq!(failed.text().await.unwrap(), "failure 1");
    let again = post(&stripe_like, "/fail", "f").await.unwrap();
    assert_eq!(again.status(), 500);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), "failure 1");
    assert_eq!(up.hits("/fail"), 1);

    // A list that frees 404s too.
    let custom = Proxy::start(&up.url(), &["--release-status", "5xx,404"]).await;
    for _ in 0..2 {
        let missing = post(&custom, "/missing", "m").await.unwrap();
        assert_eq!(missing.status(), 404);
        assert!(missing.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(up.hits("/missing"), 2);
    for n in 1..=2 {
        let failed = post(&custom, "/fail", "f").await.unwrap();
        assert_eq!(failed.text().await.unwrap(), format!("failure {}", n + 1));
    }

    // Whatever the list, the proxy's own 502 for an upstream it could not reach frees the key:
    // the request never ran.
    let closed = common::free_addr();
    let unreachable = Proxy::start(
        &format!("http://{closed}"),
        &["--release-status", "408,409,425,429"],
    )
    .await;
    let res = post(&unreachable, "/orders", "c").await.unwrap();
    assert_eq!(res.status(), 502);
    let doc: serde_json::Value = res.json().await.unwrap();
    assert!(
        doc["type"]
            .as_str()
            .unwrap()
            .ends_with(":upstream-unavailable")
    );
    let late = Upstream::start_on(closed).await;
    let ran = post(&unreachable, "/orders", "c").await.unwrap();
    assert_eq!(ran.status(), 201);
    assert!(ran.headers().get("idempotent-replayed").is_none());
    assert_eq!(late.hits("/orders"), 1);

    // And a request whose outcome is unknown never runs again.
    let dropping = DroppingUpstream::start().await;
    let unknown = Proxy::start(&dropping.url(), &["--release-status", "408,409,425,429"]).await;
    for _ in 0..3 {
        let res = post(&unknown, "/v1/charges", "u").await.unwrap();
        assert_eq!(res.status(), 502);
        let doc: serde_json::Value = res.json().await.unwrap();
        assert!(doc["type"].as_str().unwrap().ends_with(":outcome-unknown"));
    }
    assert_eq!(dropping.runs(), 1);
}
