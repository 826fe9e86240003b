//! The shop in a real browser: headless Chromium driven through chromedriver.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Set
//! `CHROMEDRIVER` to use another driver, and `SHOP_SCREENSHOT=path.png` to save a screenshot of
//! the shop.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use fantoccini::actions::{InputSource, MOUSE_BUTTON_LEFT, MouseActions, PointerAction};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use idempotency_demo::Shop;
use idempotency_test_support::harness::{Arrivals, TestServer, serve};
use idempotency_test_support::process::{KillOnDrop, TempDir, free_port, wait_for_url};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// How long the shop takes to place an order: a double click's second submission leaves while
/// the first is being placed.
const WORK: Duration = Duration::from_millis(400);

struct Session {
    browser: Client,
    base: String,
    shop: Shop,
    /// Every request the shop received, noted before the idempotency layer sees it.
    arrivals: Arrivals,
    _server: TestServer,
    _driver: KillOnDrop,
    _profile: TempDir,
}

async fn session() -> Session {
    // The shop runs in this process, as `idempotency-demo` runs it, so the test sees what
    // reached it and which orders it placed.
    let shop = Shop::new(WORK);
    let arrivals = Arrivals::default();
    let app = idempotency_demo::app(shop.clone(), IdempotencyLayer::new(MemoryStore::default()));
    let server = serve(arrivals.wrap(app)).await;
    let base = format!("http://{}", server.addr);

    let driver_bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let driver_port = free_port();
    let driver = KillOnDrop(
        Command::new(&driver_bin)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {driver_bin} ({e}): install Debian's chromium and chromium-driver"
                )
            }),
    );
    let driver_url = format!("http://127.0.0.1:{driver_port}");
    wait_for_url(&format!("{driver_url}/status")).await;

    let profile = TempDir::new("shop-browser");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=900,760",
                format!("--user-data-dir={}", profile.path().display()),
            ]
        }),
    );
    let browser = ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&driver_url)
        .await
        .expect("open a browser session");
    Session {
        browser,
        base,
        shop,
        arrivals,
        _server: server,
        _driver: driver,
        _profile: profile,
    }
}

/// Waits until the browser shows an order page, and returns the order's id.
async fn shown_order(browser: &Client) -> u64 {
    for _ in 0..200 {
        if let Ok(h) = browser.find(Locator::Css("#order")).await {
            let id = h.attr("data-order-id").await.unwrap().unwrap();
            return id.parse().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the browser never showed an order page: {}",
        browser.current_url().await.unwrap()
    );
}

async fn hidden_key(browser: &Client) -> String {
    let input = browser
        .find(Locator::Css(r#"input[name="__idempotent_key"]"#))
        .await
        .unwrap();
    input.prop("value").await.unwrap().unwrap()
}

#[tokio::test]
async fn double_clicked_place_order_places_one_order() {
    let s = session().await;
    s.browser.goto(&s.base).await.unwrap();
    let button = s.browser.find(Locator::Id("place-order")).await.unwrap();
    let double_click = MouseActions::new("mouse".into())
        .then(PointerAction::MoveToElement {
            element: button,
            duration: None,
            x: 0.0,
            y: 0.0,
        })
        .then(PointerAction::Down {
            button: MOUSE_BUTTON_LEFT,
        })
        .then(PointerAction::Up {
            button: MOUSE_BUTTON_LEFT,
        })
        // A quick human double click: the first submission is on the wire when the second
        // click replaces it.
        .then(PointerAction::Pause {
            duration: Duration::from_millis(80),
        })
        .then(PointerAction::Down {
            button: MOUSE_BUTTON_LEFT,
        })
        .then(PointerAction::Up {
            button: MOUSE_BUTTON_LEFT,
        });
    s.browser.perform_actions(double_click).await.unwrap();

    let shown = shown_order(&s.browser).await;
    // Both clicks reached the shop, and every request the browser sent has been answered.
    let submissions = s.arrivals.settled("/orders", 2).await;
    let orders = s.shop.orders().await;
    assert_eq!(
        orders.len(),
        1,
        "a double click sent {} submissions and placed {} orders: {orders:?}",
        submissions.len(),
        orders.len()
    );
    assert_eq!(orders[0].id, shown);
    s.browser.clone().close().await.unwrap();
}

#[tokio::test]
async fn submit_back_and_submit_again_places_one_order() {
    let s = session().await;
    s.browser.goto(&s.base).await.unwrap();
    let key = hidden_key(&s.browser).await;
    s.browser
        .find(Locator::Css(r#"option[value="Mug"]"#))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    s.browser
        .find(Locator::Id("place-order"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let first = shown_order(&s.browser).await;

    s.browser.back().await.unwrap();
    let button = loop {
        if let Ok(b) = s.browser.find(Locator::Id("place-order")).await {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        hidden_key(&s.browser).await,
        key,
        "going back shows the same form"
    );
    button.click().await.unwrap();
    let second = shown_order(&s.browser).await;
    assert_eq!(
        first, second,
        "the resubmitted form lands on the same order"
    );

    s.arrivals.settled("/orders", 2).await;
    let orders = s.shop.orders().await;
    assert_eq!(
        orders.len(),
        1,
        "submit, back, submit placed {} orders",
        orders.len()
    );
    assert_eq!(orders[0].product, "Mug");

    if let Ok(path) = std::env::var("SHOP_SCREENSHOT") {
        s.browser.goto(&s.base).await.unwrap();
        std::fs::write(path, s.browser.screenshot().await.unwrap()).unwrap();
    }
    s.browser.clone().close().await.unwrap();
}
