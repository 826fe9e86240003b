//! The official Stripe Python SDK as the client, through the real proxy binary: it sends an
//! `Idempotency-Key` with every POST and retries 409s, 5xx and network errors with the same key,
//! as many SDKs do. A charge must be made once however the upstream fails.
//!
//! Needs `python3` with the `stripe` package (`pip install stripe`; `.ci/run` installs it).

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use common::{DroppingUpstream, Proxy};

/// Creates one charge with the SDK against `api_base`, retrying up to `retries` times, and
/// prints what came of it as one JSON line.
const CHARGE: &str = r#"
import json, sys
import stripe

stripe.api_key = "sk_test_idempotency_proxy"
stripe.api_base = sys.argv[1]
stripe.max_network_retries = int(sys.argv[2])
stripe.enable_telemetry = False
try:
    charge = stripe.Charge.create(amount=1200, currency="eur", source="tok_visa")
    print(json.dumps({"ok": True, "id": charge.id}))
except stripe.StripeError as e:
    print(json.dumps({"ok": False, "status": e.http_status, "error": type(e).__name__}))
"#;

/// Runs [`CHARGE`] and parses its line.
async fn charge(api_base: String, retries: u32) -> serde_json::Value {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("python3")
            .args(["-c", CHARGE, &api_base, &retries.to_string()])
            .env("STRIPE_SUPPRESS_NOTICES", "true")
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}): install python3"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("No module named 'stripe'"),
            "the Stripe SDK is missing: pip install stripe"
        );
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("no result from the SDK ({e}): {stdout}{stderr}"))
    })
    .await
    .unwrap()
}

/// How many POSTs the proxy answered with `status`, from its request-duration histogram.
async fn answered(proxy: &Proxy, status: u16) -> u64 {
    let text = proxy.metrics().await;
    let prefix = format!(
        "idempotency_proxy_request_duration_seconds_count{{method=\"POST\",status=\"{status}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A charges endpoint that takes `delay` to charge, and counts each charge and the keys it saw.
async fn slow_charges(delay: Duration) -> (String, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let charges = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route(
            "/v1/charges",
            post(
                move |State(charges): State<Arc<AtomicU64>>, headers: HeaderMap| async move {
                    assert!(
                        headers.contains_key("idempotency-key"),
                        "the SDK sends a key"
                    );
                    let n = charges.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(delay).await;
                    axum::Json(serde_json::json!({
                        "id": format!("ch_{n}"),
                        "object": "charge",
                        "amount": 1200,
                        "currency": "eur",
                    }))
                },
            ),
        )
        .with_state(charges.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, charges, task)
}

/// A payment endpoint slower than the proxy's timeout: the SDK gets 504, retries with its key,
/// and gets the charge that was made, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_slower_than_the_upstream_timeout_is_made_once() {
    let (upstream, charges, task) = slow_charges(Duration::from_millis(1500)).await;
    let proxy = Proxy::start(&upstream, &["--upstream-timeout", "500ms"]).await;
    let result = charge(proxy.url(""), 5).await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["id"], "ch_1", "the SDK got the charge that was made");
    assert_eq!(charges.load(Ordering::SeqCst), 1, "charged once");
    assert!(
        answered(&proxy, 504).await >= 1,
        "the first attempt timed out"
    );
    task.abort();
}

/// An upstream that charges and then drops the connection: the SDK retries every 502, and each
/// retry learns that the outcome is unknown instead of charging again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_whose_answer_is_lost_is_not_made_again_by_the_sdk_retries() {
    let upstream = DroppingUpstream::start().await;
    let proxy = Proxy::start(&upstream.url(), &[]).await;
    let result = charge(proxy.url(""), 3).await;
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(result["status"], 502, "{result}");
    assert_eq!(upstream.runs(), 1, "charged once");
    assert_eq!(
        answered(&proxy, 502).await,
        4,
        "the first attempt and three retries, all 502"
    );
}
