//! The proxy's HTTP server: accepts connections until a signal, then drains.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_idempotency::{Idempotency, IdempotencyBody, IdempotencyLayer};

use crate::proxy::{ClientAddr, InFlight, Proxy, ProxyBody};
use crate::telemetry::REQUEST_DURATION;

/// The full stack a request goes through.
pub(crate) type Stack = Idempotency<Proxy>;

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Every request in flight finished.
    Clean,
    /// The shutdown timeout passed first.
    TimedOut,
}

/// Serves `stack` on `listener` until `shutdown` resolves, then stops accepting and waits up to
/// `grace` for connections, upstream calls in flight, and the outcomes `layer` still stores for
/// callers that went away.
pub(crate) async fn serve(
    listener: TcpListener,
    stack: Stack,
    layer: &IdempotencyLayer,
    in_flight: Arc<InFlight>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> Drained {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let stack = stack.clone();
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(ClientAddr(peer));
                    handle(stack.clone(), req)
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let drain = async {
        graceful.shutdown().await;
        // Upstream calls whose caller went away, or stopped waiting, still run; their outcomes
        // are stored after, and a write that failed for want of the store is retried.
        layer.drain().await;
        in_flight.idle().await;
    };
    match tokio::time::timeout(grace, drain).await {
        Ok(()) => Drained::Clean,
        Err(_) => Drained::TimedOut,
    }
}

async fn handle(
    stack: Stack,
    req: Request<Incoming>,
) -> Result<Response<IdempotencyBody<ProxyBody>>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    // Kept only when it will be logged.
    let path = tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().path().to_owned());
    let res = stack.oneshot(req).await?;
    let elapsed = started.elapsed();
    let status = res.status();
    request_duration(&method, status).record(elapsed.as_secs_f64());
    // The query is left out: it may carry an idempotency key.
    if let Some(path) = path {
        tracing::debug!(
            method = method_label(&method),
            path,
            status = status.as_u16(),
            replayed = res.headers().contains_key("idempotent-replayed"),
            elapsed_ms = elapsed.as_millis() as u64,
            "request"
        );
    }
    Ok(res)
}

/// The request-duration histogram for a method and status. Handles are kept per thread, so a
/// request costs no registry lookup and no label allocation once its kind has been seen.
fn request_duration(method: &Method, status: StatusCode) -> metrics::Histogram {
    thread_local! {
        static HANDLES: RefCell<HashMap<(&'static str, u16), metrics::Histogram>> =
            RefCell::new(HashMap::new());
    }
    let method = method_label(method);
    HANDLES.with_borrow_mut(|handles| {
        handles
            .entry((method, status.as_u16()))
            .or_insert_with(|| {
                let status = status.as_str().to_owned();
                metrics::histogram!(REQUEST_DURATION, "method" => method, "status" => status)
            })
            .clone()
    })
}

/// The method as a metric label, from a fixed set so that labels stay few.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
