//! What the layer counts, through the `metrics` facade.
//!
//! Every event increments the counter `idempotency_events_total` with the label `event` set to
//! [`Event::as_str`]. Without a recorder installed this costs next to nothing.

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

pub(crate) fn record(event: Event) {
    metrics::counter!(EVENTS_TOTAL, "event" => event.as_str()).increment(1);
}
