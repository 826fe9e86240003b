//! Counts the layer's `idempotency_events_total` by event, through the `metrics` facade.
//!
//! Install it for the current thread with `metrics::set_default_local_recorder(&events)` and run
//! the test on a current-thread runtime: the server, the layer and the client then all count
//! here, and tests running at the same time on other threads do not.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

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
