//! Untracked requests stream through the proxy both ways with flat memory.
//!
//! The bound is on memory, not time: the proxy's peak resident set (VmHWM in /proc) must stay
//! under 64 MiB while 100 MiB pass through it.

#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use futures_util::StreamExt;

use common::{Proxy, Upstream, client};

const MIB: u64 = 1024 * 1024;
const LIMIT_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_download_and_upload_stream_with_flat_memory() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), &[]).await;
    let c = client();
    let baseline = proxy.peak_rss_kib();

    // Download: GET, 100 MiB.
    let res = c.get(proxy.url("/big?mib=100")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut received: u64 = 0;
    let mut stream = res.bytes_stream();
    while let Some(chunk) = stream.next().await {
        received += chunk.unwrap().len() as u64;
    }
    assert_eq!(received, 100 * MIB);
    let after_download = proxy.peak_rss_kib();

    // Upload: a keyless POST, 100 MiB, sent as it is produced (chunked).
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let body = futures_util::stream::iter(
        (0..100 * 16).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let res = c
        .post(proxy.url("/upload"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), (100 * MIB).to_string());
    let after_upload = proxy.peak_rss_kib();

    println!(
        "proxy peak RSS (VmHWM): at start {baseline} KiB, after 100 MiB download {after_download} KiB, after 100 MiB upload {after_upload} KiB"
    );
    assert!(
        after_download < LIMIT_KIB,
        "download: peak RSS {after_download} KiB"
    );
    assert!(
        after_upload < LIMIT_KIB,
        "upload: peak RSS {after_upload} KiB"
    );
    assert_eq!(up.hits("/big"), 1);
    assert_eq!(up.hits("/upload"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracked_response_above_the_replay_limit_reaches_its_caller_in_full() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), &["--max-response-body", "1MiB"]).await;
    let c = client();
    let res = c
        .post(proxy.url("/big?mib=50"))
        .header("Idempotency-Key", "huge")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut received: u64 = 0;
    let mut stream = res.bytes_stream();
    while let Some(chunk) = stream.next().await {
        received += chunk.unwrap().len() as u64;
    }
    assert_eq!(received, 50 * MIB);
    let peak = proxy.peak_rss_kib();
    println!("proxy peak RSS (VmHWM) after a 50 MiB tracked response: {peak} KiB");
    assert!(peak < LIMIT_KIB, "peak RSS {peak} KiB");

    // The duplicate does not run again: the record says "completed, not replayable".
    let dup = c
        .post(proxy.url("/big?mib=50"))
        .header("Idempotency-Key", "huge")
        .send()
        .await
        .unwrap();
    assert_eq!(dup.status(), 409);
    assert_eq!(up.hits("/big"), 1);
}
