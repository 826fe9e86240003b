//! The demo binary, started as users start it, against a real HTTP client.

#![allow(clippy::unwrap_used, clippy::zombie_processes)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::future::join_all;

#[path = "../../tower-idempotency/tests/support/mod.rs"]
mod support;

struct Demo {
    child: Child,
    base: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_demo() -> Demo {
    start_demo_with("memory").await
}

async fn start_demo_with(store: &str) -> Demo {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_idempotency-demo"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--work",
            "300ms",
            "--store",
            store,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start idempotency-demo");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client
            .get(format!("{base}/api/orders"))
            .send()
            .await
            .is_ok()
        {
            return Demo { child, base };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("idempotency-demo did not start on {base}");
}

#[tokio::test]
async fn fifty_concurrent_duplicates_create_one_order() {
    let demo = start_demo().await;
    let client = reqwest::Client::new();
    let sends = (0..50).map(|_| {
        client
            .post(format!("{}/api/orders", demo.base))
            .header("Idempotency-Key", "\"order-50\"")
            .json(&serde_json::json!({"product": "Teapot", "quantity": 2}))
            .send()
    });
    let mut bodies = Vec::new();
    let mut replayed = 0;
    for res in join_all(sends).await {
        let res = res.unwrap();
        assert_eq!(res.status(), 201);
        if res
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
        {
            replayed += 1;
        }
        bodies.push(res.bytes().await.unwrap());
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]), "bodies differ");
    assert_eq!(replayed, 49);
    let orders = orders(&client, &demo).await;
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0]["total_cents"], 7800);
}

fn hidden_key(html: &str) -> String {
    let marker = r#"name="__idempotent_key" value=""#;
    let start = html.find(marker).expect("the form carries a key") + marker.len();
    html[start..start + 36].to_string()
}

#[tokio::test]
async fn a_form_posted_twice_places_one_order_and_lands_on_it() {
    let demo = start_demo().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page1 = client
        .get(&demo.base)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let page2 = client
        .get(&demo.base)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let key = hidden_key(&page1);
    assert_ne!(
        key,
        hidden_key(&page2),
        "each page load carries a fresh key"
    );

    let form = [
        ("__idempotent_key", key.as_str()),
        ("product", "Mug"),
        ("quantity", "3"),
    ];
    let (a, b) = tokio::join!(
        client
            .post(format!("{}/orders", demo.base))
            .form(&form)
            .send(),
        client
            .post(format!("{}/orders", demo.base))
            .form(&form)
            .send(),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.status(), 303);
    assert_eq!(b.status(), 303);
    assert_eq!(a.headers()["location"], b.headers()["location"]);
    // A later resubmission (back button, submit again) lands on the same order.
    let c = client
        .post(format!("{}/orders", demo.base))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(c.status(), 303);
    assert_eq!(c.headers()["location"], a.headers()["location"]);
    assert_eq!(c.headers()["idempotent-replayed"], "true");

    let orders = orders(&client, &demo).await;
    assert_eq!(orders.len(), 1);
    let order_page = client
        .get(format!(
            "{}{}",
            demo.base,
            a.headers()["location"].to_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(order_page.contains("Order #1"));
}

async fn orders(client: &reqwest::Client, demo: &Demo) -> Vec<serde_json::Value> {
    client
        .get(format!("{}/api/orders", demo.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn two_instances_sharing_a_redis_create_one_order() {
    let redis = support::RedisServer::start();
    let url = redis.url();
    let (a, b) = tokio::join!(start_demo_with(&url), start_demo_with(&url));
    let client = reqwest::Client::new();
    let sends = (0..20).map(|i| {
        let demo = if i % 2 == 0 { &a } else { &b };
        client
            .post(format!("{}/api/orders", demo.base))
            .header("Idempotency-Key", "\"shared-20\"")
            .json(&serde_json::json!({"product": "Mug", "quantity": 1}))
            .send()
    });
    let mut bodies = Vec::new();
    for res in join_all(sends).await {
        let res = res.unwrap();
        assert_eq!(res.status(), 201);
        bodies.push(res.bytes().await.unwrap());
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]), "bodies differ");
    let placed = orders(&client, &a).await.len() + orders(&client, &b).await.len();
    assert_eq!(placed, 1, "the two instances placed {placed} orders");
}
