//! The shop in a real Firefox: headless Firefox ESR driven through Marionette, its own remote
//! protocol, with the preference that makes Firefox add an `Idempotency-Key` of its own to form
//! and fetch POSTs (`network.http.idempotencyKey.enabled`).
//!
//! Needs Debian's `firefox-esr` (`.ci/run` installs it; geckodriver is not needed). Set `FIREFOX`
//! to use another binary. Without one the test says so and passes: it skips only when no Firefox
//! is installed. A Firefox that sends no key of its own fails the test, since it would prove
//! nothing.
//!
//! The shop runs in this process, as `idempotency-demo` runs it, behind a small layer that notes
//! the `Idempotency-Key` of every POST, so the test sees what Firefox really sent.

#![allow(clippy::unwrap_used, clippy::zombie_processes)]

mod marionette;

use idempotency_test_support::events;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use events::Events;
use idempotency_demo::Shop;
use idempotency_test_support::harness::{Arrival, Arrivals};
use marionette::Marionette;
use serde_json::json;
use tower_idempotency::Event;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// How long the shop takes to place an order: a double click's second submission leaves while
/// the first is being placed.
const WORK: Duration = Duration::from_millis(400);

/// How long Firefox may take to start on a loaded machine.
const STARTUP: Duration = Duration::from_secs(90);

/// A fresh profile: Marionette on a port of the system's choosing, Firefox's own idempotency
/// keys on, and everything that would reach out to the network off (the machine may have none,
/// and a test must not phone home).
const USER_JS: &str = r#"
user_pref("marionette.port", 0);
user_pref("network.http.idempotencyKey.enabled", true);

user_pref("app.normandy.enabled", false);
user_pref("app.shield.optoutstudies.enabled", false);
user_pref("app.update.auto", false);
user_pref("app.update.checkInstallTime", false);
user_pref("app.update.disabledForTesting", true);
user_pref("app.update.enabled", false);
user_pref("browser.aboutwelcome.enabled", false);
user_pref("browser.discovery.enabled", false);
user_pref("browser.newtabpage.activity-stream.feeds.section.topstories", false);
user_pref("browser.newtabpage.activity-stream.feeds.snippets", false);
user_pref("browser.newtabpage.activity-stream.feeds.telemetry", false);
user_pref("browser.newtabpage.activity-stream.telemetry", false);
user_pref("browser.newtabpage.enabled", false);
user_pref("browser.ping-centre.telemetry", false);
user_pref("browser.region.network.url", "");
user_pref("browser.region.update.enabled", false);
user_pref("browser.safebrowsing.blockedURIs.enabled", false);
user_pref("browser.safebrowsing.downloads.enabled", false);
user_pref("browser.safebrowsing.downloads.remote.enabled", false);
user_pref("browser.safebrowsing.malware.enabled", false);
user_pref("browser.safebrowsing.phishing.enabled", false);
user_pref("browser.safebrowsing.provider.google.updateURL", "");
user_pref("browser.safebrowsing.provider.google4.updateURL", "");
user_pref("browser.safebrowsing.provider.mozilla.updateURL", "");
user_pref("browser.search.geoip.url", "");
user_pref("browser.search.update", false);
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.startup.homepage", "about:blank");
user_pref("browser.startup.homepage_override.mstone", "ignore");
user_pref("browser.startup.page", 0);
user_pref("browser.tabs.warnOnClose", false);
user_pref("browser.urlbar.speculativeConnect.enabled", false);
user_pref("browser.urlbar.suggest.quicksuggest.sponsored", false);
user_pref("captivedetect.canonicalURL", "");
user_pref("datareporting.healthreport.uploadEnabled", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("datareporting.policy.firstRunURL", "");
user_pref("dom.push.connection.enabled", false);
user_pref("dom.push.serverURL", "");
user_pref("extensions.blocklist.enabled", false);
user_pref("extensions.getAddons.cache.enabled", false);
user_pref("extensions.systemAddon.update.enabled", false);
user_pref("extensions.update.enabled", false);
user_pref("geo.provider.network.url", "");
user_pref("identity.fxaccounts.enabled", false);
user_pref("media.gmp-manager.updateEnabled", false);
user_pref("network.captive-portal-service.enabled", false);
user_pref("network.connectivity-service.enabled", false);
user_pref("network.dns.disablePrefetch", true);
user_pref("network.http.speculative-parallel-limit", 0);
user_pref("network.prefetch-next", false);
user_pref("network.proxy.type", 0);
user_pref("network.trr.mode", 5);
user_pref("services.settings.server", "http://127.0.0.1:9/");
user_pref("startup.homepage_welcome_url", "");
user_pref("startup.homepage_welcome_url.additional", "");
user_pref("toolkit.telemetry.archive.enabled", false);
user_pref("toolkit.telemetry.enabled", false);
user_pref("toolkit.telemetry.server", "");
user_pref("toolkit.telemetry.unified", false);
"#;

/// The Firefox to drive: `$FIREFOX`, or `firefox-esr` on the `PATH`.
fn firefox_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FIREFOX") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("firefox-esr"))
        .find(|candidate| candidate.is_file())
}

/// A headless Firefox with a throwaway profile, killed (and its profile removed) when dropped.
struct Firefox {
    child: Child,
    dir: PathBuf,
    /// The Marionette port Firefox chose.
    port: u16,
}

impl Firefox {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("firefox.log")).unwrap_or_default()
    }

    async fn start(binary: &Path) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "shop-firefox-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile).unwrap();
        std::fs::write(profile.join("user.js"), USER_JS).unwrap();
        let log = std::fs::File::create(dir.join("firefox.log")).unwrap();
        let child = Command::new(binary)
            .args(["--headless", "--marionette", "--no-remote", "--profile"])
            .arg(&profile)
            .arg("about:blank")
            .env("MOZ_HEADLESS", "1")
            .env("MOZ_CRASHREPORTER_DISABLE", "1")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("all_proxy")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut firefox = Firefox {
            child,
            dir,
            port: 0,
        };
        // Marionette logs the port it listens on: `... Marionette INFO Listening on port N`.
        let give_up = Instant::now() + STARTUP;
        loop {
            let log = firefox.log();
            if let Some(port) = log
                .split("Listening on port ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|digits| digits.parse().ok())
            {
                firefox.port = port;
                return firefox;
            }
            if let Ok(Some(status)) = firefox.child.try_wait() {
                panic!("Firefox exited at start ({status}):\n{log}");
            }
            assert!(
                Instant::now() < give_up,
                "Marionette did not start in {STARTUP:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Firefox {
    fn drop(&mut self) {
        // Quit asked for it already; a Firefox still running after a failure is killed.
        let give_up = Instant::now() + Duration::from_secs(10);
        while Instant::now() < give_up && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `value` is what Firefox sends: an sf-string of a decimal number, `"8315709230293478211"`.
fn is_firefox_key(value: &str) -> bool {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .is_some_and(|digits| {
            !digits.is_empty() && digits.len() <= 20 && digits.bytes().all(|b| b.is_ascii_digit())
        })
}

/// Asserts that Firefox sent a key of its own with every one of these POSTs, one per
/// submission, as it does.
fn assert_firefox_keys(posts: &[Arrival], what: &str) {
    let keys: Vec<&str> = posts
        .iter()
        .filter_map(|p| p.idempotency_key.as_deref())
        .collect();
    assert!(
        !keys.is_empty(),
        "Firefox sent no Idempotency-Key of its own with {what} ({posts:?}): this test proves \
         nothing about browser keys. Does this Firefox honour network.http.idempotencyKey.enabled?"
    );
    assert_eq!(
        keys.len(),
        posts.len(),
        "Firefox sent its Idempotency-Key with some of {what} only: {posts:?}"
    );
    for key in &keys {
        assert!(
            is_firefox_key(key),
            "{what}: an Idempotency-Key unlike Firefox's: {key}"
        );
    }
    let distinct: HashSet<&&str> = keys.iter().collect();
    assert_eq!(
        distinct.len(),
        keys.len(),
        "{what}: Firefox draws a new key for every submission: {keys:?}"
    );
}

/// Waits until the browser shows an order page, and returns the order's id.
async fn shown_order(browser: &mut Marionette) -> u64 {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        // While the page changes, a look-up may fail in the browser (the document is going
        // away): look again. A broken connection is no such failure.
        match browser.find("#order").await {
            Ok(Some(heading)) => {
                if let Ok(Some(id)) = browser.attribute(&heading, "data-order-id").await {
                    return id.parse().unwrap();
                }
            }
            Ok(None) | Err(marionette::Error::WebDriver { .. }) => {}
            Err(e) => panic!("lost the browser: {e}"),
        }
        if Instant::now() > give_up {
            panic!(
                "the browser never showed an order page: {:?}",
                browser.current_url().await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_double_click_in_firefox_places_one_order() {
    let Some(binary) = firefox_binary() else {
        eprintln!(
            "SKIPPED a_double_click_in_firefox_places_one_order: firefox-esr is not installed \
             (apt-get install firefox-esr, or set FIREFOX)"
        );
        return;
    };
    let started = Instant::now();
    // The server and the layer run on this thread, so the layer counts here.
    let events = Events::default();
    let _local = metrics::set_default_local_recorder(&events);
    let shop = Shop::new(WORK);
    let posts = Arrivals::default();
    let app = posts.wrap(idempotency_demo::app(
        shop.clone(),
        IdempotencyLayer::new(MemoryStore::default()),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let firefox = Firefox::start(&binary).await;
    let mut browser = Marionette::connect(firefox.port)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", firefox.log()));
    let session = browser.new_session().await.unwrap();
    let version = session["capabilities"]["browserVersion"].clone();

    // The order form, double-clicked as a person does: the second click lands while the
    // first submission is being placed.
    browser.navigate(&base).await.unwrap();
    let hidden = browser
        .find(r#"input[name="__idempotent_key"]"#)
        .await
        .unwrap()
        .expect("the order form carries the page's key");
    let page_key = browser.property(&hidden, "value").await.unwrap();
    assert!(
        page_key.as_str().is_some_and(|k| !k.is_empty()),
        "{page_key}"
    );
    let button = browser
        .find("#place-order")
        .await
        .unwrap()
        .expect("the order form has its button");
    browser
        .double_click(&button, Duration::from_millis(80))
        .await
        .unwrap();

    let shown = shown_order(&mut browser).await;
    // Let every submission the browser sent finish on the server.
    tokio::time::sleep(3 * WORK).await;
    let orders = shop.orders().await;
    assert_eq!(
        orders.len(),
        1,
        "a double click in Firefox {version} placed {} orders: {orders:?}",
        orders.len()
    );
    assert_eq!(orders[0].id, shown, "the browser shows the order placed");
    let heading = browser.find("#order").await.unwrap().unwrap();
    assert_eq!(
        browser.text(&heading).await.unwrap(),
        format!("Order #{shown}")
    );

    let submissions = posts.posts_to("/orders");
    assert!(
        submissions.len() >= 2,
        "the double click sent {} submission(s), not two: {submissions:?}",
        submissions.len()
    );
    assert_firefox_keys(&submissions, "the double-clicked form's submissions");
    // Each submission's browser key gave way to the page's key, and only one ran.
    assert_eq!(
        events.get(Event::KeyHeaderIgnored),
        submissions.len() as u64
    );
    assert_eq!(events.get(Event::Executed), 1);
    assert_eq!(events.get(Event::BadKey), 0);

    // A page script that sends its order twice with its own `X-Idempotent-Key` (a retry of one
    // action): Firefox adds a new key of its own each time. One order, and the retry gets the
    // first answer.
    let answers = browser
        .execute_async(
            r#"
            const [key, done] = arguments;
            const send = () => fetch("/api/orders", {
                method: "POST",
                headers: { "Content-Type": "application/json", "X-Idempotent-Key": key },
                body: JSON.stringify({ product: "Mug", quantity: 3 }),
            }).then(async (r) => ({
                status: r.status,
                replayed: r.headers.get("Idempotent-Replayed"),
                body: await r.text(),
            }));
            send().then((a) => send().then((b) => done([a, b]))).catch((e) => done(String(e)));
            "#,
            json!(["page-script-key-1"]),
        )
        .await
        .unwrap();
    let (first, retry) = (&answers[0], &answers[1]);
    assert_eq!(first["status"], 201, "{answers}");
    assert!(first["replayed"].is_null(), "{answers}");
    assert_eq!(retry["status"], 201, "{answers}");
    assert_eq!(retry["replayed"], "true", "{answers}");
    assert_eq!(retry["body"], first["body"], "{answers}");
    assert_eq!(shop.orders().await.len(), 2);
    let fetches = posts.posts_to("/api/orders");
    assert_eq!(fetches.len(), 2, "{fetches:?}");
    assert_firefox_keys(&fetches, "the page script's fetch() calls");
    assert_eq!(
        events.get(Event::KeyHeaderIgnored),
        (submissions.len() + fetches.len()) as u64
    );
    assert_eq!(events.get(Event::Executed), 2);

    browser.quit().await.unwrap();
    drop(firefox);
    server.abort();
    eprintln!(
        "Firefox {version}: the double click sent {} submissions with their own keys; one order. \
         The test took {:.1?}.",
        submissions.len(),
        started.elapsed()
    );
}
