//! The clients: many keys, each sent several times at once across both proxies, each copy
//! retried the way docs/clients.md tells a client to (409: wait `Retry-After`, same key; 5xx or
//! a network error: back off, same key), and every response recorded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use crate::rng::Rng;
use crate::upstream::{UPSTREAM_MARK, VIA};

/// At most this many attempts per logical request.
const MAX_ATTEMPTS: usize = 40;
/// A logical request gives up after this long.
const GIVE_UP_AFTER: Duration = Duration::from_secs(40);

/// What one HTTP attempt got.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    /// An HTTP response.
    Response {
        /// Status code.
        status: u16,
        /// `Idempotent-Replayed: true`.
        replayed: bool,
        /// `Content-Type`.
        content_type: String,
        /// `Retry-After`, when present.
        retry_after: Option<String>,
        /// Whether the upstream made it (passed through), rather than the proxy.
        from_upstream: bool,
        /// The body.
        body: Bytes,
    },
    /// No response: connection refused or reset, or the client's own timeout.
    Transport {
        /// What went wrong.
        error: String,
        /// The client gave up waiting (its timeout), rather than the connection failing.
        timed_out: bool,
    },
}

/// One HTTP attempt.
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    /// Index of the proxy it went to (0 = A, 1 = B).
    pub(crate) proxy: usize,
    /// When it was sent.
    pub(crate) start: Instant,
    /// When its answer (or failure) was complete.
    pub(crate) end: Instant,
    /// What came back.
    pub(crate) answer: Answer,
}

impl Attempt {
    /// How long it took.
    pub(crate) fn duration(&self) -> Duration {
        self.end - self.start
    }

    /// The status, body and content type of a 2xx answer.
    pub(crate) fn success(&self) -> Option<(u16, &Bytes, &str, bool)> {
        match &self.answer {
            Answer::Response {
                status,
                body,
                content_type,
                replayed,
                ..
            } if (200..300).contains(status) => Some((*status, body, content_type, *replayed)),
            _ => None,
        }
    }
}

/// One copy of a key's request, with all its attempts until it got a 2xx or gave up.
#[derive(Debug, Clone)]
pub(crate) struct Logical {
    /// The attempts, in order.
    pub(crate) attempts: Vec<Attempt>,
    /// Sent by the final sweep, after every fault.
    pub(crate) sweep: bool,
}

/// Everything sent for one key.
#[derive(Debug, Clone)]
pub(crate) struct KeyRecord {
    /// The idempotency key.
    pub(crate) key: String,
    /// The copies.
    pub(crate) logicals: Vec<Logical>,
}

/// Where the clients send: the two proxies' base URLs.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `http://host:port` of each proxy.
    pub(crate) bases: [String; 2],
    /// The client, shared.
    pub(crate) client: reqwest::Client,
}

/// The request body of a key: the same for every copy (else the proxy answers 422).
fn body_for(key: &str) -> String {
    format!(
        "{{\"key\":\"{key}\",\"amount_cents\":{}}}",
        crate::rng::hash(7, key) % 100_000
    )
}

/// How one copy is sent.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SendOptions {
    /// Part of the final sweep.
    pub(crate) sweep: bool,
    /// Sends `Prefer: wait=N`: this copy waits at most N seconds for the original, then gets a
    /// 409 and retries after `Retry-After`.
    pub(crate) prefer_wait: Option<u64>,
}

/// Sends one copy of `key`'s request to `proxy`, retrying until a 2xx or the budget ends.
pub(crate) async fn logical(
    target: Arc<Target>,
    key: String,
    mut proxy: usize,
    copy: SendOptions,
    seed: u64,
) -> Logical {
    let body = body_for(&key);
    let first = Instant::now();
    let mut attempts = Vec::new();
    let mut rng = Rng::new(seed);
    for n in 0..MAX_ATTEMPTS {
        let attempt = send(&target, &key, &body, proxy, copy.prefer_wait).await;
        let next = match &attempt.answer {
            Answer::Response { status, .. } if (200..300).contains(status) => None,
            Answer::Response {
                status: 409,
                retry_after,
                ..
            } => {
                let secs = retry_after
                    .as_deref()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1);
                Some(Duration::from_secs(secs.min(3)))
            }
            Answer::Response { status, .. } if *status >= 500 => Some(backoff(n, &mut rng)),
            // 4xx other than 409: nothing to retry (the checker flags it).
            Answer::Response { .. } => None,
            Answer::Transport { .. } => {
                // This proxy may be down: a client with two addresses tries the other.
                proxy = 1 - proxy;
                Some(backoff(n, &mut rng))
            }
        };
        attempts.push(attempt);
        match next {
            Some(delay) if first.elapsed() + delay < GIVE_UP_AFTER => {
                tokio::time::sleep(delay).await
            }
            _ => break,
        }
    }
    Logical {
        attempts,
        sweep: copy.sweep,
    }
}

/// 100 ms doubling to 1 s, times 0.5 to 1.5.
fn backoff(n: usize, rng: &mut Rng) -> Duration {
    let base = 100u64 << n.min(4);
    let ms = base.min(1000) * (50 + rng.below(101)) / 100;
    Duration::from_millis(ms)
}

async fn send(
    target: &Target,
    key: &str,
    body: &str,
    proxy: usize,
    prefer_wait: Option<u64>,
) -> Attempt {
    let start = Instant::now();
    let mut req = target
        .client
        .post(format!("{}/pay", target.bases[proxy]))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .header(VIA, if proxy == 0 { "A" } else { "B" })
        .body(body.to_owned());
    if let Some(n) = prefer_wait {
        req = req.header("prefer", format!("wait={n}"));
    }
    let result = req.send().await;
    let answer = match result {
        Ok(res) => {
            let status = res.status().as_u16();
            let h = res.headers();
            let text = |name: &str| {
                h.get(name)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            };
            let replayed = text("idempotent-replayed").is_some_and(|v| v == "true");
            let content_type = text("content-type").unwrap_or_default();
            let retry_after = text("retry-after");
            let from_upstream = h.contains_key(UPSTREAM_MARK);
            match res.bytes().await {
                Ok(body) => Answer::Response {
                    status,
                    replayed,
                    content_type,
                    retry_after,
                    from_upstream,
                    body,
                },
                Err(e) => Answer::Transport {
                    timed_out: e.is_timeout(),
                    error: format!("status {status}, body failed: {}", chain(&e)),
                },
            }
        }
        Err(e) => Answer::Transport {
            timed_out: e.is_timeout(),
            error: chain(&e),
        },
    };
    Attempt {
        proxy,
        start,
        end: Instant::now(),
        answer,
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// One key's traffic: 2 to 4 copies split across both proxies, most sent at once, some a little
/// later (so that they find the outcome stored and replay it); one in six asks to wait at most
/// a second (`Prefer: wait=1`), so that slow originals give it a 409.
async fn one_key(target: Arc<Target>, key: String, seed: u64) -> KeyRecord {
    let mut rng = Rng::new(seed);
    let copies = 2 + rng.below(3) as usize;
    let first = rng.below(2) as usize;
    let mut set = JoinSet::new();
    for i in 0..copies {
        // Alternate, so that both proxies always see the key.
        let proxy = (first + i) % 2;
        let delay = if rng.chance(1, 4) {
            Duration::from_millis(150 + rng.below(450))
        } else {
            Duration::from_millis(rng.below(30))
        };
        let copy = SendOptions {
            sweep: false,
            prefer_wait: rng.chance(1, 6).then_some(1),
        };
        let target = target.clone();
        let key = key.clone();
        let s = rng.next_u64();
        set.spawn(async move {
            tokio::time::sleep(delay).await;
            logical(target, key, proxy, copy, s).await
        });
    }
    let mut logicals = Vec::with_capacity(copies);
    while let Some(done) = set.join_next().await {
        logicals.push(joined(done));
    }
    KeyRecord { key, logicals }
}

/// Runs keys `k000000`, `k000001`, ... with `concurrency` keys in flight until `until`, then
/// waits for the keys in flight. Every key's record is returned.
pub(crate) async fn run(
    target: Arc<Target>,
    seed: u64,
    concurrency: usize,
    until: Instant,
) -> Vec<KeyRecord> {
    let mut rng = Rng::new(seed ^ 0x10AD);
    let mut set = JoinSet::new();
    let mut out = Vec::new();
    let mut next = 0u64;
    while Instant::now() < until {
        while set.len() < concurrency.max(1) {
            let key = format!("k{next:06}");
            next += 1;
            set.spawn(one_key(target.clone(), key, rng.next_u64()));
        }
        tokio::select! {
            done = set.join_next() => {
                if let Some(done) = done {
                    out.push(joined(done));
                }
            }
            _ = tokio::time::sleep_until(until.into()) => {}
        }
    }
    while let Some(done) = set.join_next().await {
        out.push(joined(done));
    }
    out
}

/// After every fault: one more copy of every key, alternating proxies, so that every key's
/// stored outcome is read back at least once.
pub(crate) async fn sweep(
    target: Arc<Target>,
    keys: Vec<String>,
    concurrency: usize,
) -> Vec<(String, Logical)> {
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(keys.len());
    for (i, key) in keys.into_iter().enumerate() {
        if set.len() >= concurrency.max(1)
            && let Some(done) = set.join_next().await
        {
            out.push(joined(done));
        }
        let target = target.clone();
        set.spawn(async move {
            let copy = SendOptions {
                sweep: true,
                prefer_wait: None,
            };
            let l = logical(target, key.clone(), i % 2, copy, i as u64).await;
            (key, l)
        });
    }
    while let Some(done) = set.join_next().await {
        out.push(joined(done));
    }
    out
}

/// A task's result; a task that panicked panics here too, so that no record goes missing
/// silently (the process guards still kill every child on the way out).
pub(crate) fn joined<T>(done: Result<T, tokio::task::JoinError>) -> T {
    match done {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("a client task was cancelled: {e}"),
    }
}
