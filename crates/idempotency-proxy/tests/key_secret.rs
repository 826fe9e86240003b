//! `--key-secret`, `IDEMPOTENCY_PROXY_KEY_SECRET` and `--key-secret-file`: proxies sharing a
//! Redis and a secret share their records under HMAC storage keys; a proxy without the secret
//! (or with another) does not see them, and no record sits under the plain hash of a key.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use common::redis::RedisServer;
use common::{Proxy, Upstream, client, free_addr};
use tower_idempotency::RedisStore;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

const SECRET: &str = "a proxy secret of some length";

async fn post(proxy: &Proxy, key: &str) -> (u16, bool, String) {
    let res = client()
        .post(proxy.url("/orders"))
        .header("Idempotency-Key", format!("\"{key}\""))
        .body("same body")
        .send()
        .await
        .unwrap();
    let replayed = res.headers().contains_key("idempotent-replayed");
    (res.status().as_u16(), replayed, res.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_with_one_secret_share_records_under_hmac_keys() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let store = redis.url();

    // A reads the secret from a file (with the trailing newline an editor leaves), B from the
    // environment, C has none.
    let dir = std::env::temp_dir().join(format!("proxy-key-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let a = Proxy::start(
        &up.url(),
        &[
            "--store",
            &store,
            "--key-secret-file",
            file.to_str().unwrap(),
        ],
    )
    .await;
    let (addr, admin) = (free_addr(), free_addr());
    let b = Proxy::spawn(
        vec![
            "--upstream".into(),
            up.url(),
            "--listen".into(),
            addr.to_string(),
            "--admin-listen".into(),
            admin.to_string(),
            "--store".into(),
            store.clone(),
        ],
        &[("IDEMPOTENCY_PROXY_KEY_SECRET", SECRET.to_owned())],
        addr,
        admin,
    )
    .await;
    let c = Proxy::start(&up.url(), &["--store", &store]).await;

    let first = post(&a, "pay-1").await;
    assert_eq!((first.0, first.1), (201, false));
    let from_b = post(&b, "pay-1").await;
    assert_eq!(from_b, (201, true, first.2.clone()), "B replays A's record");
    let from_c = post(&c, "pay-1").await;
    assert_eq!(
        (from_c.0, from_c.1),
        (201, false),
        "C, without the secret, runs anew"
    );
    assert_eq!(up.hits("/orders"), 2);

    // The record lives under the HMAC of the key, computed with the library; the plain hash
    // holds C's record only, which is what a reader of Redis could find by guessing.
    let keys = RedisStore::connect(&store).await.unwrap();
    let keyed = IdempotencyLayer::new(MemoryStore::default()).with_key_secret(SECRET);
    let plain = IdempotencyLayer::new(MemoryStore::default());
    let hmac_key = keys.record_key(&keyed.storage_key_for(None, "pay-1"));
    let plain_key = keys.record_key(&plain.storage_key_for(None, "pay-1"));
    assert_ne!(hmac_key, plain_key);
    assert_eq!(redis.cli(&["EXISTS", &hmac_key]).trim(), "1");
    assert_eq!(redis.cli(&["EXISTS", &plain_key]).trim(), "1");
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "2");

    // The secret never shows in the logs.
    for proxy in [&a, &b] {
        assert!(!proxy.logs().contains(SECRET), "{}", proxy.logs());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bad_key_secret_is_one_line_and_exit_code_2() {
    let up = "http://127.0.0.1:9";
    let missing = std::env::temp_dir().join("no-such-dir-for-a-key-secret/secret");
    for (args, mentions) in [
        (vec!["--upstream", up, "--key-secret", ""], "--key-secret"),
        (
            vec![
                "--upstream",
                up,
                "--key-secret-file",
                missing.to_str().unwrap(),
            ],
            "--key-secret-file",
        ),
        (
            vec![
                "--upstream",
                up,
                "--key-secret",
                "a",
                "--key-secret-file",
                "/dev/null",
            ],
            "--key-secret",
        ),
    ] {
        let (code, out) = common::run_to_exit(&args, &[]);
        assert_eq!(code, Some(2), "{args:?}: {out}");
        assert_eq!(out.lines().count(), 1, "{args:?}: {out}");
        assert!(out.contains(mentions), "{args:?}: {out}");
    }
}
