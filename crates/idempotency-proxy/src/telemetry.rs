//! Logs and traces (tracing, with an OTLP exporter when asked) and metrics (Prometheus).

use std::io::IsTerminal;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tower_idempotency::{
    EVENTS_TOTAL, Event, LEASES_HELD, OWNER_DURATION, RECORD_BYTES, REQUEST_TARGET, STORE_DURATION,
    WAIT_DURATION,
};
use tracing::subscriber::Interest;
use tracing::{Event as TracingEvent, Metadata, span};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::prelude::*;

use crate::cli::{LogFormat, OtlpEndpoint};
use crate::proxy::UPSTREAM_DURATION;

/// Histogram of the time from a request's arrival to its response head, by method and status.
pub(crate) const REQUEST_DURATION: &str = "idempotency_proxy_request_duration_seconds";

const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Waits reach `--wait-timeout` (60 s by default).
const WAIT_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Owners may run until `--upstream-deadline` (10 minutes by default).
const OWNER_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 600.0,
];

/// A memory store answers in microseconds, a networked one in a millisecond or so.
const STORE_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// From an empty response's record to the largest `--max-response-body` kept.
const SIZE_BUCKETS: [f64; 10] = [
    256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
];

/// The log filter when RUST_LOG is not set. Text logs say nothing per request; JSON logs add
/// the line that ends each keyed request, with its key's hash and outcome.
fn default_log_filter(format: LogFormat) -> String {
    match format {
        LogFormat::Text => "info".to_owned(),
        LogFormat::Json => format!("info,{REQUEST_TARGET}=debug"),
    }
}

/// The exporter's own state, flushed and stopped when dropped.
pub(crate) struct Tracing {
    provider: Option<SdkTracerProvider>,
}

/// How long the exit waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

impl Drop for Tracing {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            tracing::warn!(error = %e, "could not send the last spans");
        }
    }
}

/// Sends logs to stderr, as text or JSON lines, at the level RUST_LOG sets (default `info`;
/// with JSON, also the line of each keyed request), and, with `otlp`, the layer's spans to an
/// OTLP/HTTP endpoint. The error is one line for the operator.
pub(crate) fn init(format: LogFormat, otlp: Option<&OtlpEndpoint>) -> Result<Tracing, String> {
    // An empty RUST_LOG is no RUST_LOG; one that does not parse falls back to the default.
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(directives).ok(),
        _ => None,
    }
    .unwrap_or_else(|| EnvFilter::new(default_log_filter(format)));
    let ansi = std::io::stderr().is_terminal();
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.with_filter(Fresh(filter)).boxed(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_filter(Fresh(filter))
            .boxed(),
    };
    let (provider, traces) = match otlp {
        None => (None, None),
        Some(endpoint) => {
            let provider = tracer_provider(endpoint)?;
            let tracer = provider.tracer("idempotency-proxy");
            // The layer's spans at DEBUG, whatever RUST_LOG says; events at INFO and above
            // inside them go along as span events.
            let filter = Targets::new()
                .with_default(LevelFilter::INFO)
                .with_target("tower_idempotency", LevelFilter::DEBUG);
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(Fresh(filter));
            (Some(provider), Some(layer))
        }
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| format!("cannot set up logs: {e}"))?;
    Ok(Tracing { provider })
}

/// A per-layer filter that never lets a callsite skip it.
///
/// Per-layer filters hand their verdict to their layer through a thread-local that the next
/// span or event reads. A callsite every filter always enables skips the filters, and reads
/// whatever the last unrelated check left there: after a `tracing::enabled!` (or a
/// `log::log_enabled!` through tracing-log) that one filter refused, the span is lost to that
/// layer (tokio-rs/tracing#2519), and with it a request's span and its children's parent. So
/// an enabled callsite is "sometimes" here, and every span and event asks the filters afresh;
/// a disabled one still costs nothing.
struct Fresh<F>(F);

impl<S, F: Filter<S>> Filter<S> for Fresh<F> {
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        self.0.enabled(meta, cx)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        match self.0.callsite_enabled(meta) {
            interest if interest.is_always() => Interest::sometimes(),
            interest => interest,
        }
    }

    fn event_enabled(&self, event: &TracingEvent<'_>, cx: &Context<'_, S>) -> bool {
        self.0.event_enabled(event, cx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.0.max_level_hint()
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_new_span(attrs, id, ctx)
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.0.on_record(id, values, ctx)
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_enter(id, ctx)
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_exit(id, ctx)
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.0.on_close(id, ctx)
    }
}

/// The tracer provider that batches spans and sends them to `endpoint`, as protobuf.
fn tracer_provider(endpoint: &OtlpEndpoint) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint.as_str())
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the service; without them, the
    // binary's name.
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let resource = if named {
        detected
    } else {
        Resource::builder()
            .with_service_name("idempotency-proxy")
            .build()
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Installs the Prometheus recorder and keeps it tidy; the handle renders `/metrics`.
pub(crate) fn init_metrics() -> Result<PrometheusHandle, String> {
    // Every histogram has buckets: one without them would be rendered as a summary.
    let buckets: [(&str, &[f64]); 6] = [
        (REQUEST_DURATION, &LATENCY_BUCKETS),
        (UPSTREAM_DURATION, &LATENCY_BUCKETS),
        (WAIT_DURATION, &WAIT_BUCKETS),
        (OWNER_DURATION, &OWNER_BUCKETS),
        (STORE_DURATION, &STORE_BUCKETS),
        (RECORD_BYTES, &SIZE_BUCKETS),
    ];
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in buckets {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
            .map_err(|e| format!("cannot set up metrics: {e}"))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| format!("cannot set up metrics: {e}"))?;
    describe();
    // The library's events, registered at zero so that a scrape shows them before they happen.
    for event in Event::ALL {
        metrics::counter!(EVENTS_TOTAL, "event" => event.as_str()).absolute(0);
    }
    metrics::gauge!(LEASES_HELD).set(0.0);
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

/// The help text of every metric the proxy and its layer export (the memory store's gauges are
/// described where the store is opened).
fn describe() {
    use metrics::Unit;
    metrics::describe_counter!(
        EVENTS_TOTAL,
        "What the idempotency layer did with tracked requests, by event."
    );
    metrics::describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from a request's arrival to its response head, by method and status."
    );
    metrics::describe_histogram!(
        UPSTREAM_DURATION,
        Unit::Seconds,
        "Time until the upstream answered, failed or timed out, by outcome."
    );
    metrics::describe_histogram!(
        WAIT_DURATION,
        Unit::Seconds,
        "How long duplicates waited for the request in flight with their key."
    );
    metrics::describe_histogram!(
        OWNER_DURATION,
        Unit::Seconds,
        "How long lease owners held their key: the upstream's run and the write of its outcome."
    );
    metrics::describe_histogram!(
        STORE_DURATION,
        Unit::Seconds,
        "Round-trip time of the store's calls, by verb (begin, complete, release, renew)."
    );
    metrics::describe_histogram!(
        RECORD_BYTES,
        Unit::Bytes,
        "Size of each record written for a completed request."
    );
    metrics::describe_gauge!(
        LEASES_HELD,
        "Leases this process holds: keyed requests running upstream as the owner of their key."
    );
}
