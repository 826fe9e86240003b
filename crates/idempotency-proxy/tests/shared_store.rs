//! Several proxies sharing one Redis (or Redis Cluster): duplicates split across them still
//! run once, a crashed proxy's lease expires, a stopped proxy's outcome is replayed by another,
//! and an unavailable Redis fails closed (or open, when asked).

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis::{RedisCluster, RedisServer};
use common::{Proxy, Upstream, client, event_count};
use idempotency_test_support::postgres::PgServer;

/// Waits until the upstream has started `path` at least `n` times.
async fn until_hits(up: &Upstream, path: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.hits(path) < n {
        assert!(
            Instant::now() < deadline,
            "{path} never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `n` concurrent duplicates, alternating between the proxies; all get the same answer and
/// the upstream runs once.
async fn duplicates_across(proxies: &[&Proxy], up: &Upstream, key: &str, n: usize) {
    let c = client();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let url = proxies[i % proxies.len()].url("/slow?ms=700");
            let c = c.clone();
            let key = key.to_owned();
            tokio::spawn(async move {
                let res = c
                    .post(url)
                    .header("Idempotency-Key", key)
                    .body("same body")
                    .send()
                    .await
                    .unwrap();
                (res.status().as_u16(), res.text().await.unwrap())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(up.hits("/slow"), 1, "{answers:?}");
    assert!(
        answers.iter().all(|(s, b)| *s == 200 && b == "slow run 1"),
        "{answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_redis_run_concurrent_duplicates_once() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let a = Proxy::start(&up.url(), &["--store", &redis.url()]).await;
    let b = Proxy::start(&up.url(), &["--store", &redis.url()]).await;
    duplicates_across(&[&a, &b], &up, "split-burst", 20).await;
    // A later duplicate through either proxy is a replay.
    for p in [&a, &b] {
        let res = client()
            .post(p.url("/slow?ms=700"))
            .header("Idempotency-Key", "split-burst")
            .body("same body")
            .send()
            .await
            .unwrap();
        assert_eq!(res.headers()["idempotent-replayed"], "true");
    }
    assert_eq!(up.hits("/slow"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_a_redis_cluster_run_concurrent_duplicates_once() {
    let cluster = RedisCluster::start();
    let up = Upstream::start().await;
    let a = Proxy::start(&up.url(), &["--store", &cluster.url()]).await;
    let b = Proxy::start(&up.url(), &["--store", &cluster.url()]).await;
    duplicates_across(&[&a, &b], &up, "cluster-burst", 20).await;
    let health = client().get(a.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

/// Two proxy processes on one PostgreSQL: 50 concurrent duplicates split across them run the
/// upstream once. The records outlive both: a third proxy started afterwards replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_postgres_run_fifty_concurrent_duplicates_once() {
    let pg = PgServer::start();
    let up = Upstream::start().await;
    let a = Proxy::start(&up.url(), &["--store", &pg.url()]).await;
    let b = Proxy::start(&up.url(), &["--store", &pg.url()]).await;
    duplicates_across(&[&a, &b], &up, "pg-burst", 50).await;
    drop((a, b));
    let later = Proxy::start(&up.url(), &["--store", &pg.url()]).await;
    let res = client()
        .post(later.url("/slow?ms=700"))
        .header("Idempotency-Key", "pg-burst")
        .body("same body")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(res.text().await.unwrap(), "slow run 1");
    assert_eq!(up.hits("/slow"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxy_s_lease_expires_and_a_retry_elsewhere_succeeds() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut a = Proxy::start(&up.url(), &["--store", &redis.url(), "--lock-ttl", "2s"]).await;
    let b = Proxy::start(&up.url(), &["--store", &redis.url(), "--lock-ttl", "2s"]).await;
    let c = client();
    let url_a = a.url("/slow?ms=1000");
    // A's lease is granted after this, and lives at least its 2 s from then.
    let sent = Instant::now();
    let orphan = tokio::spawn({
        let c = c.clone();
        async move {
            c.post(url_a)
                .header("Idempotency-Key", "crash")
                .send()
                .await
        }
    });
    until_hits(&up, "/slow", 1).await;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert!(
        orphan.await.unwrap().is_err(),
        "the killed proxy cannot answer"
    );

    // The retry through the other proxy waits for the dead lease to expire, then runs again
    // (at least once after a crash, as documented).
    let started = Instant::now();
    let res = c
        .post(b.url("/slow?ms=1000"))
        .header("Idempotency-Key", "crash")
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "slow run 2");
    assert!(took < Duration::from_secs(8), "the retry took {took:?}");
    // It ran only once the dead lease had expired: 2 s after A took it at the earliest, then
    // the upstream's 1 s.
    assert!(
        sent.elapsed() >= Duration::from_secs(2 + 1),
        "the retry ran before the dead proxy's lease expired ({:?} after the first send)",
        sent.elapsed()
    );
    assert_eq!(up.hits("/slow"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_and_another_proxy_replays_its_outcome() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let mut a = Proxy::start(&up.url(), &["--store", &redis.url()]).await;
    let b = Proxy::start(&up.url(), &["--store", &redis.url()]).await;
    let c = client();
    let url_a = a.url("/slow?ms=1500");
    let first = tokio::spawn({
        let c = c.clone();
        async move {
            let res = c
                .post(url_a)
                .header("Idempotency-Key", "graceful")
                .body("payload")
                .send()
                .await
                .unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    });
    until_hits(&up, "/slow", 1).await;
    a.terminate();
    let (status, body) = first.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "slow run 1");
    let exit = a
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("proxy did not exit");
    assert_eq!(exit.code(), Some(0), "{}", a.logs());

    let replay = c
        .post(b.url("/slow?ms=1500"))
        .header("Idempotency-Key", "graceful")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.text().await.unwrap(), "slow run 1");
    assert_eq!(up.hits("/slow"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_or_open_and_healthz_says_so() {
    let mut redis = RedisServer::start();
    let up = Upstream::start().await;
    let closed = Proxy::start(&up.url(), &["--store", &redis.url()]).await;
    let open = Proxy::start(&up.url(), &["--store", &redis.url(), "--fail-open"]).await;
    let c = client();
    assert_eq!(
        c.get(closed.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    redis.kill();

    let health = c.get(closed.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    let refused = c
        .post(closed.url("/orders"))
        .header("Idempotency-Key", "while-down")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(up.hits("/orders"), 0);
    // Untracked requests do not need the store.
    assert_eq!(
        c.get(closed.url("/orders")).send().await.unwrap().status(),
        201
    );

    let passed = c
        .post(open.url("/orders"))
        .header("Idempotency-Key", "while-down")
        .send()
        .await
        .unwrap();
    assert_eq!(passed.status(), 201);
    assert_eq!(up.hits("/orders"), 2);
    let metrics = open.metrics().await;
    assert_eq!(event_count(&metrics, "fail_open"), Some(1), "{metrics}");
    assert!(
        event_count(&metrics, "store_error").unwrap() >= 1,
        "{metrics}"
    );

    // Redis comes back (empty): the proxy recovers without a restart.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = c
            .get(closed.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "healthz stayed {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `--redis-replica-acks` (or `IDEMPOTENCY_PROXY_REDIS_REPLICA_ACKS`): on a primary with one
/// replica, a new request's lease and its stored response are each acknowledged with a `WAIT`,
/// and are on the replica once the proxy answers. Asking for more replicas than there are
/// refuses new requests (503) without reaching the upstream; a replay still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_acks_are_asked_for_through_the_flag_and_the_environment() {
    let primary = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    // The replica's link is up, and the primary calls it online, before the primary streams
    // writes to it: after a diskless sync the stream starts on the replica's first
    // acknowledgement, up to a second later, and a `WAIT` before that counts no replica. So
    // wait until a write has reached the replica, then until its removal has.
    primary.cli(&["SET", "replica-probe", "1"]);
    while replica.cli(&["GET", "replica-probe"]).trim() != "1" {
        assert!(Instant::now() < deadline, "the replica never synced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    primary.cli(&["DEL", "replica-probe"]);
    while !replica.cli(&["GET", "replica-probe"]).trim().is_empty() {
        assert!(Instant::now() < deadline, "the replica never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let up = Upstream::start().await;
    let (addr, admin) = (common::free_addr(), common::free_addr());
    let args = ["--upstream", &up.url(), "--listen", &addr.to_string()]
        .iter()
        .map(|s| s.to_string())
        .chain(["--admin-listen".to_owned(), admin.to_string()])
        .collect();
    let acked = Proxy::spawn(
        args,
        &[
            ("IDEMPOTENCY_PROXY_STORE", primary.url()),
            ("IDEMPOTENCY_PROXY_REDIS_REPLICA_ACKS", "1".to_owned()),
        ],
        addr,
        admin,
    )
    .await;
    let c = client();
    let post = |proxy: &Proxy, key: &str| {
        c.post(proxy.url("/orders"))
            .header("Idempotency-Key", key)
            .body("one teapot")
            .send()
    };
    let waits = |server: &RedisServer| server.command_calls().get("wait").copied().unwrap_or(0);

    let before = waits(&primary);
    let first = post(&acked, "acked").await.unwrap();
    assert!(first.status().is_success(), "{}", first.status());
    let body = first.text().await.unwrap();
    assert_eq!(
        waits(&primary) - before,
        2,
        "one WAIT for the lease, one for the record"
    );
    assert_eq!(up.hits("/orders"), 1);
    let on_replica = replica.cli(&["KEYS", "*"]);
    assert_eq!(
        on_replica.lines().count(),
        1,
        "the record is on the replica: {on_replica}"
    );
    let again = post(&acked, "acked").await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), body);

    let strict = Proxy::start(
        &up.url(),
        &["--store", &primary.url(), "--redis-replica-acks", "2"],
    )
    .await;
    let refused = post(&strict, "strict").await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(
        up.hits("/orders"),
        1,
        "a lease not acknowledged runs nothing"
    );
    let replayed = post(&strict, "acked").await.unwrap();
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(replayed.text().await.unwrap(), body);
}
