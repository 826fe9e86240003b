//! Logs (tracing) and metrics (Prometheus).

use std::io::IsTerminal;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower_idempotency::{EVENTS_TOTAL, Event};
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;
use crate::proxy::UPSTREAM_DURATION;

/// Histogram of the time from a request's arrival to its response head, by method and status.
pub(crate) const REQUEST_DURATION: &str = "idempotency_proxy_request_duration_seconds";

const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Sends logs to stderr, as text or JSON lines, at the level RUST_LOG sets (default `info`).
pub(crate) fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Installs the Prometheus recorder and keeps it tidy; the handle renders `/metrics`.
pub(crate) fn init_metrics() -> Result<PrometheusHandle, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(UPSTREAM_DURATION.into()), &LATENCY_BUCKETS)
        })
        .map_err(|e| format!("cannot set up metrics: {e}"))?;
    let handle = builder
        .install_recorder()
        .map_err(|e| format!("cannot set up metrics: {e}"))?;
    metrics::describe_counter!(
        EVENTS_TOTAL,
        "What the idempotency layer did with tracked requests, by event."
    );
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from a request's arrival to its response head, by method and status."
    );
    metrics::describe_histogram!(
        UPSTREAM_DURATION,
        metrics::Unit::Seconds,
        "Time until the upstream answered, failed or timed out, by outcome."
    );
    // The library's events, registered at zero so that a scrape shows them before they happen.
    for event in Event::ALL {
        metrics::counter!(EVENTS_TOTAL, "event" => event.as_str()).absolute(0);
    }
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}
