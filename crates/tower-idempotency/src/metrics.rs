//! What the layer counts, through the `metrics` facade.
//!
//! Every event increments the counter `idempotency_events_total` with the label `event` set to
//! [`Event::as_str`]. Without a recorder installed this costs next to nothing.

use metrics::{Key, Label, Level, Metadata};

/// Something the layer did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Event {
    /// A tracked request ran its handler as the lease owner.
    Executed,
    /// A stored response was replayed.
    Replayed,
    /// A duplicate waited for the request in flight.
    Waited,
    /// A duplicate's wait ran out (409).
    WaitTimeout,
    /// A duplicate was refused at once in reject mode (409).
    Conflict,
    /// A key was reused with another request (422).
    Mismatch,
    /// A lease was released without a stored outcome (error status, handler error or panic).
    Released,
    /// A completion was refused because the lease had passed to another owner.
    LeaseLost,
    /// The store failed to answer.
    StoreError,
    /// A request ran untracked because the store failed and `fail_open` is on.
    FailOpen,
    /// A request was refused for its key (400).
    BadKey,
    /// The store held a record under the request's key that could not be read: corrupt,
    /// truncated, of an unknown version, or written by another tool (500, `record-corrupt`).
    /// The handler did not run and nothing was replayed.
    CorruptRecord,
}

impl Event {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Executed => "executed",
            Event::Replayed => "replayed",
            Event::Waited => "waited",
            Event::WaitTimeout => "wait_timeout",
            Event::Conflict => "conflict",
            Event::Mismatch => "mismatch",
            Event::Released => "released",
            Event::LeaseLost => "lease_lost",
            Event::StoreError => "store_error",
            Event::FailOpen => "fail_open",
            Event::BadKey => "bad_key",
            Event::CorruptRecord => "corrupt_record",
        }
    }
}

/// The counter's name.
pub const EVENTS_TOTAL: &str = "idempotency_events_total";

/// One static key per event, so counting allocates nothing.
macro_rules! event_keys {
    ($($event:ident => $label:literal),* $(,)?) => {
        fn key(event: Event) -> &'static Key {
            $(
                #[allow(non_upper_case_globals)]
                static $event: Key = {
                    static LABELS: [Label; 1] = [Label::from_static_parts("event", $label)];
                    Key::from_static_parts(EVENTS_TOTAL, &LABELS)
                };
            )*
            match event {
                $(Event::$event => &$event,)*
            }
        }
    };
}

event_keys! {
    Executed => "executed",
    Replayed => "replayed",
    Waited => "waited",
    WaitTimeout => "wait_timeout",
    Conflict => "conflict",
    Mismatch => "mismatch",
    Released => "released",
    LeaseLost => "lease_lost",
    StoreError => "store_error",
    FailOpen => "fail_open",
    BadKey => "bad_key",
    CorruptRecord => "corrupt_record",
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

pub(crate) fn record(event: Event) {
    metrics::with_recorder(|recorder| recorder.register_counter(key(event), &METADATA))
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_counts_under_its_own_label() {
        for event in [
            Event::Executed,
            Event::Replayed,
            Event::Waited,
            Event::WaitTimeout,
            Event::Conflict,
            Event::Mismatch,
            Event::Released,
            Event::LeaseLost,
            Event::StoreError,
            Event::FailOpen,
            Event::BadKey,
            Event::CorruptRecord,
        ] {
            let key = key(event);
            assert_eq!(key.name(), EVENTS_TOTAL);
            let labels: Vec<_> = key.labels().map(|l| (l.key(), l.value())).collect();
            assert_eq!(labels, [("event", event.as_str())]);
        }
    }
}
