//! Counts the layer's `idempotency_events_total` by event, through the `metrics` facade; and
//! reads the counters and gauges of a Prometheus text exposition, as the proxy serves it.
//!
//! Install it for the current thread with `metrics::set_default_local_recorder(&events)` and run
//! the test on a current-thread runtime: the server, the layer and the client then all count
//! here, and tests running at the same time on other threads do not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use tower_idempotency::{EVENTS_TOTAL, Event};

/// The events counted so far. Clones share the counts.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<HashMap<String, u64>>>);

impl Events {
    /// How often `event` was counted.
    pub fn get(&self, event: Event) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(event.as_str())
            .copied()
            .unwrap_or(0)
    }
}

struct EventCounter(Events, String);

impl CounterFn for EventCounter {
    fn increment(&self, value: u64) {
        *self.0.0.lock().unwrap().entry(self.1.clone()).or_default() += value;
    }
    fn absolute(&self, value: u64) {
        self.0.0.lock().unwrap().insert(self.1.clone(), value);
    }
}

impl Recorder for Events {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() != EVENTS_TOTAL {
            return Counter::noop();
        }
        match key.labels().find(|l| l.key() == "event") {
            Some(label) => Counter::from_arc(Arc::new(EventCounter(
                self.clone(),
                label.value().to_owned(),
            ))),
            None => Counter::noop(),
        }
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// The value of `idempotency_events_total{event="..."}` in a Prometheus text exposition, or
/// `None` when the exposition has no such line.
pub fn event_count(metrics: &str, event: &str) -> Option<u64> {
    let prefix = format!("{EVENTS_TOTAL}{{event=\"{event}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        // An exporter may print a counter as a float (`3` or `3.0`).
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// The value of the gauge `name` (without labels) in a Prometheus text exposition.
pub fn gauge(metrics: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}
