//! A small HTTP/1.1 load generator: keep-alive connections, each sending requests back to back
//! for a fixed time, latencies in an HDR histogram.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Makes the `n`-th request of connection `conn`.
pub(crate) type MakeRequest = Arc<dyn Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync>;

/// What one load run measured.
#[derive(Debug, Clone)]
pub(crate) struct Stats {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) elapsed: Duration,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

impl Stats {
    pub(crate) fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// Several runs of one row as one: all their requests over all their time, and the
    /// percentiles of all their latencies together.
    pub(crate) fn merged(runs: Vec<(Stats, Histogram<u64>)>) -> Stats {
        let mut hist =
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        let (mut requests, mut errors, mut elapsed) = (0, 0, Duration::ZERO);
        for (stats, h) in runs {
            requests += stats.requests;
            errors += stats.errors;
            elapsed += stats.elapsed;
            hist.add(h).expect("same bounds");
        }
        Stats {
            requests,
            errors,
            elapsed,
            p50: Duration::from_micros(hist.value_at_quantile(0.5)),
            p99: Duration::from_micros(hist.value_at_quantile(0.99)),
        }
    }
}

/// Sends requests from `connections` keep-alive connections for `duration`.
pub(crate) async fn run(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    make: MakeRequest,
) -> Stats {
    run_with_histogram(addr, connections, duration, make)
        .await
        .0
}

/// [`run`], with the latencies it recorded.
pub(crate) async fn run_with_histogram(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    make: MakeRequest,
) -> (Stats, Histogram<u64>) {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(connections);
    for conn in 0..connections {
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            connection(addr, conn, deadline, make).await
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let (mut requests, mut errors) = (0, 0);
    for t in tasks {
        if let Ok((h, r, e)) = t.await {
            hist.add(h).expect("same bounds");
            requests += r;
            errors += e;
        }
    }
    let stats = Stats {
        requests,
        errors,
        elapsed: start.elapsed(),
        p50: Duration::from_micros(hist.value_at_quantile(0.5)),
        p99: Duration::from_micros(hist.value_at_quantile(0.99)),
    };
    (stats, hist)
}

async fn connection(
    addr: SocketAddr,
    conn: usize,
    deadline: Instant,
    make: MakeRequest,
) -> (Histogram<u64>, u64, u64) {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut n = 0u64;
    'reconnect: while Instant::now() < deadline {
        let Ok(stream) = TcpStream::connect(addr).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, driver)) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            errors += 1;
            continue;
        };
        tokio::spawn(driver);
        while Instant::now() < deadline {
            if sender.ready().await.is_err() {
                // The server closed the connection (gunicorn's sync workers close after every
                // response): open another one, which is part of what that server costs.
                continue 'reconnect;
            }
            let req = make(conn, n);
            n += 1;
            let sent = Instant::now();
            match sender.send_request(req).await {
                Ok(res) => {
                    let status = res.status();
                    let closes = res
                        .headers()
                        .get(http::header::CONNECTION)
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                    let body = res.into_body().collect().await;
                    if body.is_ok() && (status.is_success() || status.is_redirection()) {
                        ok += 1;
                        let _ = hist.record(sent.elapsed().as_micros().max(1) as u64);
                    } else {
                        errors += 1;
                    }
                    if closes {
                        continue 'reconnect;
                    }
                }
                Err(_) => {
                    errors += 1;
                    continue 'reconnect;
                }
            }
        }
    }
    (hist, ok, errors)
}

/// Sends `count` requests one after another on one connection.
pub(crate) async fn run_count(addr: SocketAddr, make: MakeRequest, count: u64) -> Stats {
    let start = Instant::now();
    let (mut ok, mut errors) = (0, 0);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    for n in 0..count {
        let sent = Instant::now();
        match send_one(addr, make(0, n)).await {
            Some(_) => {
                ok += 1;
                let _ = hist.record(sent.elapsed().as_micros().max(1) as u64);
            }
            None => errors += 1,
        }
    }
    Stats {
        requests: ok,
        errors,
        elapsed: start.elapsed(),
        p50: Duration::from_micros(hist.value_at_quantile(0.5)),
        p99: Duration::from_micros(hist.value_at_quantile(0.99)),
    }
}

/// Opens a keep-alive HTTP/1.1 connection.
pub(crate) async fn connect(
    addr: SocketAddr,
) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(driver);
    Some(sender)
}

/// Sends one request on a new connection; returns when its whole response arrived, with the
/// body, or `None` on any failure.
pub(crate) async fn send_one(addr: SocketAddr, req: Request<Full<Bytes>>) -> Option<Bytes> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (mut sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(driver);
    let res = sender.send_request(req).await.ok()?;
    if !(res.status().is_success() || res.status().is_redirection()) {
        return None;
    }
    res.into_body().collect().await.ok().map(|c| c.to_bytes())
}
