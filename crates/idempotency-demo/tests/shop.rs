//! The demo binary, started as users start it, against a real HTTP client.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::future::join_all;

use idempotency_test_support::harness::get_text;
use idempotency_test_support::process::{KillOnDrop, free_port, wait_for_url};
use idempotency_test_support::redis as servers;

use idempotency_test_support::events;

struct Demo {
    _child: KillOnDrop,
    base: String,
}

async fn start_demo() -> Demo {
    start_demo_with("memory").await
}

async fn start_demo_with(store: &str) -> Demo {
    start_demo_in(store, &[]).await
}

async fn start_demo_in(store: &str, extra: &[&str]) -> Demo {
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
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start idempotency-demo");
    let base = format!("http://127.0.0.1:{port}");
    let child = KillOnDrop(child);
    wait_for_url(&format!("{base}/api/orders")).await;
    Demo {
        _child: child,
        base,
    }
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

/// The `Location` of a placed order names a route that answers the order, to the first caller
/// and to a replay alike; an order that does not exist is a 404 problem.
#[tokio::test]
async fn the_location_of_a_placed_order_answers_the_order() {
    let demo = start_demo().await;
    let client = reqwest::Client::new();
    let place = || {
        client
            .post(format!("{}/api/orders", demo.base))
            .header("Idempotency-Key", "\"order-located\"")
            .json(&serde_json::json!({"product": "Mug", "quantity": 2}))
            .send()
    };
    let placed = place().await.unwrap();
    assert_eq!(placed.status(), 201);
    let location = placed.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(location, "/api/orders/1");
    let created: serde_json::Value = placed.json().await.unwrap();
    let replayed = place().await.unwrap();
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(replayed.headers()["location"], location.as_str());

    let found = client
        .get(format!("{}{location}", demo.base))
        .send()
        .await
        .unwrap();
    assert_eq!(found.status(), 200);
    assert_eq!(found.headers()["content-type"], "application/json");
    let order: serde_json::Value = found.json().await.unwrap();
    assert_eq!(order, created);
    assert_eq!(order["total_cents"], 2400);

    let missing = client
        .get(format!("{}/api/orders/2", demo.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    let problem: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(problem["status"], 404);
    assert_eq!(problem["title"], "Not Found");
    assert_eq!(orders(&client, &demo).await.len(), 1);
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
    let page1 = get_text(&client, &demo.base).await;
    let page2 = get_text(&client, &demo.base).await;
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

/// Two keys of the kind Firefox adds to every form POST by itself, one per click: RFC 8941
/// sf-strings holding a decimal number.
const FIREFOX_CLICK_1: &str = "\"8315709230293478211\"";
const FIREFOX_CLICK_2: &str = "\"16805207050847954446\"";

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The order form of a freshly loaded page, as the browser posts it: the hidden key first.
async fn order_form(client: &reqwest::Client, base: &str) -> Vec<(&'static str, String)> {
    let page = get_text(client, base).await;
    vec![
        ("__idempotent_key", hidden_key(&page)),
        ("product", "Teapot".to_owned()),
        ("quantity", "2".to_owned()),
    ]
}

/// A double click on "Place order" in Firefox: the second submission leaves while the first is
/// being placed, with a browser key of its own beside the page's same key. One order, and both
/// submissions land on it, as in any other browser.
#[tokio::test]
async fn a_double_click_in_firefox_places_one_order_and_both_land_on_it() {
    let demo = start_demo().await;
    let client = no_redirects();
    let form = order_form(&client, &demo.base).await;
    let submit = |firefox_key: &'static str| {
        client
            .post(format!("{}/orders", demo.base))
            .header("Idempotency-Key", firefox_key)
            .form(&form)
            .send()
    };
    let (first, second) = tokio::join!(submit(FIREFOX_CLICK_1), async {
        tokio::time::sleep(Duration::from_millis(80)).await;
        submit(FIREFOX_CLICK_2).await
    });
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first.status(), 303, "{:?}", first.text().await);
    assert_eq!(second.status(), 303, "{:?}", second.text().await);
    assert_eq!(first.headers()["location"], "/orders/1");
    assert_eq!(second.headers()["location"], "/orders/1");
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(second.headers()["idempotent-replayed"], "true");

    let orders = orders(&client, &demo).await;
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(orders[0]["product"], "Teapot");
    let page = get_text(&client, &format!("{}/orders/1", demo.base)).await;
    assert!(page.contains("Order #1"), "{page}");
}

/// Firefox sends one submission again with the same browser key (and the page's same key):
/// the stored answer is replayed, and no second order is placed.
#[tokio::test]
async fn a_firefox_resend_replays_the_order() {
    let demo = start_demo().await;
    let client = no_redirects();
    let form = order_form(&client, &demo.base).await;
    let submit = || {
        client
            .post(format!("{}/orders", demo.base))
            .header("Idempotency-Key", FIREFOX_CLICK_1)
            .form(&form)
            .send()
    };
    let first = submit().await.unwrap();
    assert_eq!(first.status(), 303, "{:?}", first.text().await);
    let resent = submit().await.unwrap();
    assert_eq!(resent.status(), 303);
    assert_eq!(resent.headers()["location"], first.headers()["location"]);
    assert_eq!(resent.headers()["idempotent-replayed"], "true");
    assert_eq!(orders(&client, &demo).await.len(), 1);
}

/// The shop in this process, to read the layer's counters: every submission's browser key was
/// ignored for the page's, and counted.
#[tokio::test(flavor = "current_thread")]
async fn browser_keys_that_give_way_to_the_page_key_are_counted() {
    use tower_idempotency::Event;

    let events = events::Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let shop = idempotency_demo::Shop::new(Duration::from_millis(50));
    let app = idempotency_demo::app(
        shop.clone(),
        tower_idempotency::IdempotencyLayer::new(tower_idempotency::MemoryStore::default()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = no_redirects();
    let form = order_form(&client, &base).await;
    for firefox_key in [FIREFOX_CLICK_1, FIREFOX_CLICK_2, FIREFOX_CLICK_2] {
        let res = client
            .post(format!("{base}/orders"))
            .header("Idempotency-Key", firefox_key)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 303);
        assert_eq!(res.headers()["location"], "/orders/1");
    }
    assert_eq!(shop.orders().await.len(), 1);
    assert_eq!(events.get(Event::KeyHeaderIgnored), 3);
    assert_eq!(events.get(Event::Executed), 1);
    assert_eq!(events.get(Event::Replayed), 2);
    assert_eq!(events.get(Event::BadKey), 0);
    server.abort();
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
    let redis = servers::RedisServer::start();
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

/// `--store-max-records 2`: the memory store keeps the two newest orders' responses; the oldest
/// made room, so its retry places a new order.
#[tokio::test]
async fn the_memory_store_keeps_to_the_bounds_the_flags_give() {
    let demo = start_demo_in(
        "memory",
        &["--store-max-records", "2", "--store-max-bytes", "1MiB"],
    )
    .await;
    let client = reqwest::Client::new();
    let place = |key: &'static str| {
        client
            .post(format!("{}/api/orders", demo.base))
            .header("Idempotency-Key", format!("\"{key}\""))
            .json(&serde_json::json!({"product": "Teapot", "quantity": 1}))
            .send()
    };
    for key in ["first", "second", "third"] {
        assert_eq!(place(key).await.unwrap().status(), 201);
    }
    let third = place("third").await.unwrap();
    assert_eq!(third.headers()["idempotent-replayed"], "true");
    let first = place("first").await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(orders(&client, &demo).await.len(), 4);
}

#[tokio::test]
async fn shops_with_their_own_namespace_on_one_redis_never_share_an_order() {
    let redis = servers::RedisServer::start();
    let url = redis.url();
    let (tea, mugs) = tokio::join!(
        start_demo_in(&url, &["--namespace", "tea-shop"]),
        start_demo_in(&url, &["--namespace", "mug-shop"])
    );
    let client = reqwest::Client::new();
    let place = |demo: &Demo| {
        client
            .post(format!("{}/api/orders", demo.base))
            .header("Idempotency-Key", "\"same-key\"")
            .json(&serde_json::json!({"product": "Teapot", "quantity": 1}))
            .send()
    };
    for demo in [&tea, &mugs] {
        let res = place(demo).await.unwrap();
        assert_eq!(res.status(), 201);
        assert!(res.headers().get("idempotent-replayed").is_none());
        let again = place(demo).await.unwrap();
        assert_eq!(again.headers()["idempotent-replayed"], "true");
    }
    assert_eq!(
        orders(&client, &tea).await.len(),
        1,
        "the tea shop placed its order"
    );
    assert_eq!(
        orders(&client, &mugs).await.len(),
        1,
        "the mug shop placed its own"
    );
}

/// `--store postgres://...`: 20 concurrent duplicates place one order, kept in PostgreSQL; the
/// shop restarted on the same database lists it, replays its key with the same order, and
/// numbers the next order after it. A keyless order (a plain transaction) is kept too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_orders_survive_a_restart_and_keys_still_replay() {
    let pg = idempotency_test_support::postgres::PgServer::start();
    let client = reqwest::Client::new();
    let place = |demo: &Demo, key: Option<&str>| {
        let mut req = client
            .post(format!("{}/api/orders", demo.base))
            .json(&serde_json::json!({"product": "Teapot", "quantity": 1}));
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        req.send()
    };
    let demo = start_demo_with(&pg.url()).await;
    let first = join_all((0..20).map(|_| place(&demo, Some("\"pg-order\"")))).await;
    let mut bodies = Vec::new();
    for res in first {
        let res = res.unwrap();
        assert_eq!(res.status(), 201);
        bodies.push(res.text().await.unwrap());
    }
    assert!(bodies.iter().all(|b| *b == bodies[0]), "{bodies:?}");
    assert_eq!(orders(&client, &demo).await.len(), 1);
    drop(demo);

    let demo = start_demo_with(&pg.url()).await;
    let listed = orders(&client, &demo).await;
    assert_eq!(listed.len(), 1, "the order did not survive the restart");
    let again = place(&demo, Some("\"pg-order\"")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), bodies[0]);
    let keyless = place(&demo, None).await.unwrap();
    assert_eq!(keyless.status(), 201);
    let keyless: serde_json::Value = keyless.json().await.unwrap();
    assert_eq!(keyless["id"], 2);
    assert_eq!(orders(&client, &demo).await.len(), 2);
    let rows = pg.psql("SELECT count(*) FROM shop_orders");
    assert_eq!(rows.trim(), "2");
}
