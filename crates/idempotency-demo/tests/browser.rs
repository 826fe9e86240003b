//! The shop in a real browser: headless Chromium driven through chromedriver.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Set
//! `CHROMEDRIVER` to use another driver, and `SHOP_SCREENSHOT=path.png` to save a screenshot of
//! the shop.

#![allow(clippy::unwrap_used, clippy::zombie_processes)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::actions::{InputSource, MOUSE_BUTTON_LEFT, MouseActions, PointerAction};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for(url: &str) {
    for _ in 0..400 {
        if reqwest::get(url).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{url} did not come up");
}

struct Session {
    browser: Client,
    base: String,
    _demo: Proc,
    _driver: Proc,
    _profile: tempdir::Dir,
}

mod tempdir {
    /// A throwaway browser profile folder.
    pub(crate) struct Dir(pub(crate) std::path::PathBuf);
    impl Dir {
        pub(crate) fn new() -> Self {
            let p = std::env::temp_dir().join(format!("shop-browser-{}", uuid_like()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn uuid_like() -> String {
        use std::time::{SystemTime, UNIX_EPOCH};
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!("{}-{t}", std::process::id())
    }
}

async fn session() -> Session {
    let demo_port = free_port();
    let demo = Proc(
        Command::new(env!("CARGO_BIN_EXE_idempotency-demo"))
            .args([
                "--listen",
                &format!("127.0.0.1:{demo_port}"),
                "--work",
                "400ms",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start idempotency-demo"),
    );
    let base = format!("http://127.0.0.1:{demo_port}");

    let driver_bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let driver_port = free_port();
    let driver = Proc(
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
    wait_for(&format!("{driver_url}/status")).await;
    wait_for(&format!("{base}/api/orders")).await;

    let profile = tempdir::Dir::new();
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
                format!("--user-data-dir={}", profile.0.display()),
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
        _demo: demo,
        _driver: driver,
        _profile: profile,
    }
}

async fn orders(base: &str) -> Vec<serde_json::Value> {
    reqwest::get(format!("{base}/api/orders"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
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

/// Lets every request the browser sent finish on the server.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1200)).await;
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
    settle().await;
    let orders = orders(&s.base).await;
    assert_eq!(
        orders.len(),
        1,
        "a double click placed {} orders: {orders:?}",
        orders.len()
    );
    assert_eq!(orders[0]["id"], shown);
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

    settle().await;
    let orders = orders(&s.base).await;
    assert_eq!(
        orders.len(),
        1,
        "submit, back, submit placed {} orders",
        orders.len()
    );
    assert_eq!(orders[0]["product"], "Mug");

    if let Ok(path) = std::env::var("SHOP_SCREENSHOT") {
        s.browser.goto(&s.base).await.unwrap();
        std::fs::write(path, s.browser.screenshot().await.unwrap()).unwrap();
    }
    s.browser.clone().close().await.unwrap();
}
