//! [`Event`]: what the layer counts, and the histograms and gauge it keeps, through the
//! `metrics` facade. Every key is static, so that recording allocates nothing, and each
//! thread keeps the handles it registered (see [`with_handles`]).

use std::cell::RefCell;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};

/// Something the layer did with a request, counted through the `metrics` facade.
///
/// Every event increments the counter [`EVENTS_TOTAL`] (`idempotency_events_total`) with the
/// label `event` set to [`Event::as_str`]. Without a recorder installed this costs next to
/// nothing.
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
    /// The outcome of a tracked request cannot be known: the inner service said it may have
    /// acted but gave no answer to keep (the proxy's upstream connection broke after the request
    /// was sent, or its `--upstream-deadline` passed), or the response body failed after its
    /// status was sent. An unreplayable record is stored, so the request never runs again for
    /// this key; duplicates get 502 `outcome-unknown`.
    OutcomeUnknown,
    /// An outcome was stored after its caller had stopped waiting for it (the caller went away,
    /// or its caller timeout passed): the retry replays it instead of running again.
    LateAnswerStored,
    /// An `Idempotency-Key` header that disagreed with a key the page itself chose (form field,
    /// query parameter or `X-Idempotent-Key`), or was no valid key beside one, was ignored:
    /// browsers add a header of their own. The request went on under the page's key.
    KeyHeaderIgnored,
    /// A completion or release failed for want of the store and was tried again.
    StoreRetried,
    /// A request was refused because its scope could not be told (the scope extractor answered
    /// "unknown"): 500 `scope-unavailable`, the handler not run.
    ScopeUnavailable,
    /// A tracked request's body did not arrive in full in time (408): no lease was taken.
    BodyTimeout,
    /// A tracked request was refused because too many tracked requests were running at once
    /// (503 with `Retry-After`): no lease was taken.
    Overloaded,
    /// A response was stored as not replayable because the record format cannot hold it (too
    /// many headers, or a header or body too long), or because it does not fit in a
    /// `MemoryStore`'s bound on bytes beside the requests in flight: duplicates get 409, nothing
    /// runs twice.
    Unstorable,
    /// A completed record was stored, but fewer replicas acknowledged it in time than the
    /// store requires (`RedisStoreBuilder::with_replica_acks`): a failover now could lose it.
    NotReplicated,
    /// An operator forgot a completed record (the admin API's `DELETE /keys/{key}`): the next
    /// request with its key runs.
    Forgotten,
    /// An operator forgot a request in flight, by force: its owner's outcome is not kept, and
    /// the next request with its key runs, perhaps while the first still does.
    ForgottenInFlight,
}

/// The counter's name.
pub const EVENTS_TOTAL: &str = "idempotency_events_total";

/// Each event's label, its static key (so that counting allocates nothing), and the list of
/// them all, from one table.
macro_rules! events {
    ($($event:ident => $label:literal),* $(,)?) => {
        impl Event {
            /// Every event, in the order they are documented.
            pub const ALL: [Event; [$(Event::$event),*].len()] = [$(Event::$event),*];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Event::$event => $label,)*
                }
            }
        }

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

events! {
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
    OutcomeUnknown => "outcome_unknown",
    LateAnswerStored => "late_answer_stored",
    KeyHeaderIgnored => "key_header_ignored",
    StoreRetried => "store_retried",
    ScopeUnavailable => "scope_unavailable",
    BodyTimeout => "body_timeout",
    Overloaded => "overloaded",
    Unstorable => "unstorable",
    NotReplicated => "not_replicated",
    Forgotten => "forgotten",
    ForgottenInFlight => "forgotten_in_flight",
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Counts `event` once under [`EVENTS_TOTAL`].
pub(crate) fn count(event: Event) {
    with_handles(|handles, recorder| {
        handles.events[event as usize]
            .get_or_insert_with(|| recorder.register_counter(key(event), &METADATA))
            .increment(1);
    });
}

/// Histogram of how long duplicates waited for the request in flight with their key, in
/// seconds: from the first time a duplicate found the key in flight until it replayed the
/// response, took the lease over, gave up (409) or failed. No labels.
pub const WAIT_DURATION: &str = "idempotency_wait_duration_seconds";

/// Histogram of how long lease owners held their lease, in seconds: from taking the lease to
/// the end of their work, the handler's run and the write of its outcome (completion or
/// release). A handler whose caller went away is observed when it ends. No labels.
pub const OWNER_DURATION: &str = "idempotency_owner_duration_seconds";

/// Histogram of the store's round-trip time per call, in seconds, by the label `verb`:
/// `begin`, `complete`, `release` or `renew` (the time a duplicate spends in `wait` is
/// [`WAIT_DURATION`]). Calls that failed are observed too.
pub const STORE_DURATION: &str = "idempotency_store_duration_seconds";

/// Histogram of the size of each record written by a completion, in bytes: the encoded
/// response (status, kept headers, body) or the short record of an unreplayable one. No labels.
pub const RECORD_BYTES: &str = "idempotency_record_bytes";

/// Gauge of the leases this process holds: requests whose handler runs (or whose outcome is
/// being written) as the owner of their key. No labels.
pub const LEASES_HELD: &str = "idempotency_leases_held";

/// A store verb, as the layer calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    Begin,
    Complete,
    Release,
    Renew,
    Wait,
}

static WAIT_KEY: Key = Key::from_static_name(WAIT_DURATION);
static OWNER_KEY: Key = Key::from_static_name(OWNER_DURATION);
static RECORD_KEY: Key = Key::from_static_name(RECORD_BYTES);
static LEASES_KEY: Key = Key::from_static_name(LEASES_HELD);

/// Each histogram the layer observes, as an index into [`Handles::histograms`].
#[derive(Clone, Copy)]
enum Observed {
    Wait,
    Owner,
    Record,
    /// A timed verb: any but [`Verb::Wait`].
    Store(Verb),
}

impl Observed {
    const COUNT: usize = 7;

    fn index(self) -> usize {
        match self {
            Observed::Wait => 0,
            Observed::Owner => 1,
            Observed::Record => 2,
            // Wait, the last verb, has no histogram: the index stays below COUNT.
            Observed::Store(verb) => 3 + verb as usize,
        }
    }

    fn key(self) -> Option<&'static Key> {
        match self {
            Observed::Wait => Some(&WAIT_KEY),
            Observed::Owner => Some(&OWNER_KEY),
            Observed::Record => Some(&RECORD_KEY),
            Observed::Store(verb) => store_key(verb),
        }
    }
}

/// The store-duration key of each timed verb.
macro_rules! store_keys {
    ($($verb:ident => $label:literal),* $(,)?) => {
        fn store_key(verb: Verb) -> Option<&'static Key> {
            $(
                #[allow(non_upper_case_globals)]
                static $verb: Key = {
                    static LABELS: [Label; 1] = [Label::from_static_parts("verb", $label)];
                    Key::from_static_parts(STORE_DURATION, &LABELS)
                };
            )*
            match verb {
                $(Verb::$verb => Some(&$verb),)*
                Verb::Wait => None,
            }
        }
    };
}

store_keys! {
    Begin => "begin",
    Complete => "complete",
    Release => "release",
    Renew => "renew",
}

/// The handles one thread registered with the recorder in use, each on first use.
///
/// Registering a handle is a lookup in the recorder's registry (a hash and a lock), which a
/// fresh key would otherwise pay seven times; a handle kept costs an index. The recorder is
/// told apart by its address: when another one is in use (a test's local recorder, a global one
/// installed after the first requests), the thread's handles are dropped and registered anew
/// with it.
struct Handles {
    recorder: usize,
    events: [Option<Counter>; Event::ALL.len()],
    histograms: [Option<Histogram>; Observed::COUNT],
    leases: Option<Gauge>,
}

impl Handles {
    fn new(recorder: usize) -> Self {
        Self {
            recorder,
            events: [const { None }; Event::ALL.len()],
            histograms: [const { None }; Observed::COUNT],
            leases: None,
        }
    }
}

thread_local! {
    static HANDLES: RefCell<Option<Handles>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's handles for the recorder in use, and that recorder to register
/// the missing ones with. Where the thread keeps none (it is ending, or this is a call from
/// inside a recorder), `f` gets handles of its own, used once.
fn with_handles<T>(f: impl FnOnce(&mut Handles, &dyn Recorder) -> T) -> T {
    metrics::with_recorder(|recorder| {
        let id = std::ptr::from_ref(recorder).cast::<()>().addr();
        let mut f = Some(f);
        let kept = HANDLES.try_with(|cell| {
            let mut kept = cell.try_borrow_mut().ok()?;
            let handles = kept.get_or_insert_with(|| Handles::new(id));
            if handles.recorder != id {
                *handles = Handles::new(id);
            }
            f.take().map(|f| f(handles, recorder))
        });
        match (kept, f) {
            (Ok(Some(out)), _) => out,
            (_, Some(f)) => f(&mut Handles::new(id), recorder),
            (_, None) => unreachable!("`f` runs once, and its result is returned"),
        }
    })
}

fn observe(what: Observed, value: f64) {
    let Some(key) = what.key() else {
        return;
    };
    with_handles(|handles, recorder| {
        handles.histograms[what.index()]
            .get_or_insert_with(|| recorder.register_histogram(key, &METADATA))
            .record(value);
    });
}

/// Observes a duplicate's wait, in seconds, in [`WAIT_DURATION`].
pub(crate) fn observe_wait(seconds: f64) {
    observe(Observed::Wait, seconds);
}

/// Observes how long an owner held its lease, in seconds, in [`OWNER_DURATION`].
pub(crate) fn observe_owner(seconds: f64) {
    observe(Observed::Owner, seconds);
}

/// Observes a record's size, in bytes, in [`RECORD_BYTES`].
pub(crate) fn observe_record_bytes(bytes: usize) {
    observe(Observed::Record, bytes as f64);
}

/// Observes a store call's round trip, in seconds, in [`STORE_DURATION`]; a wait is not one.
pub(crate) fn observe_store(verb: Verb, seconds: f64) {
    observe(Observed::Store(verb), seconds);
}

/// Adds `delta` (one lease taken: 1, one ended: -1) to [`LEASES_HELD`].
pub(crate) fn leases_held(delta: f64) {
    with_handles(|handles, recorder| {
        handles
            .leases
            .get_or_insert_with(|| recorder.register_gauge(&LEASES_KEY, &METADATA))
            .increment(delta);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_counts_under_its_own_label() {
        assert_eq!(Event::ALL.len(), 23);
        for event in Event::ALL {
            let key = key(event);
            assert_eq!(key.name(), EVENTS_TOTAL);
            let labels: Vec<_> = key.labels().map(|l| (l.key(), l.value())).collect();
            assert_eq!(labels, [("event", event.as_str())]);
        }
    }

    #[test]
    fn each_timed_verb_has_its_own_label() {
        for (verb, label) in [
            (Verb::Begin, "begin"),
            (Verb::Complete, "complete"),
            (Verb::Release, "release"),
            (Verb::Renew, "renew"),
        ] {
            let key = store_key(verb).unwrap();
            assert_eq!(key.name(), STORE_DURATION);
            let labels: Vec<_> = key.labels().map(|l| (l.key(), l.value())).collect();
            assert_eq!(labels, [("verb", label)]);
        }
        assert!(store_key(Verb::Wait).is_none());
    }
}
