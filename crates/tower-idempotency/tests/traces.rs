//! The layer's spans, as any `tracing` subscriber sees them: one per tracked request with its
//! key's hash and outcome, the store's calls and the handler as its children, never a raw key;
//! and nothing at all under a filter at `info`.

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use tower::{ServiceExt, service_fn};
use tower_idempotency::{Idempotency, IdempotencyBody, MemoryStore, REQUEST_TARGET};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Clone, Default)]
struct Captured {
    name: &'static str,
    parent: Option<&'static str>,
    fields: BTreeMap<String, String>,
}

/// Every span (by id) and event a subscriber saw, with their fields as text.
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<(u64, Captured)>>>,
    events: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let parent = ctx.span(id).and_then(|s| s.parent()).map(|p| p.name());
        let mut span = Captured {
            name: attrs.metadata().name(),
            parent,
            ..Captured::default()
        };
        attrs.record(&mut Fields(&mut span.fields));
        self.spans.lock().unwrap().push((id.into_u64(), span));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut spans = self.spans.lock().unwrap();
        if let Some((_, span)) = spans.iter_mut().rev().find(|(i, _)| *i == id.into_u64()) {
            values.record(&mut Fields(&mut span.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        fields.insert("target".into(), event.metadata().target().into());
        self.events.lock().unwrap().push(fields);
    }
}

type Service = Idempotency<
    tower::util::ServiceFn<
        fn(
            Request<IdempotencyBody<String>>,
        ) -> std::future::Ready<Result<Response<String>, Infallible>>,
    >,
>;

fn service() -> Service {
    fn created(
        _: Request<IdempotencyBody<String>>,
    ) -> std::future::Ready<Result<Response<String>, Infallible>> {
        std::future::ready(Ok(Response::builder()
            .status(201)
            .body("made".into())
            .unwrap()))
    }
    Idempotency::new(service_fn(created as fn(_) -> _), MemoryStore::default())
}

/// Sends a keyed POST to `path` with a scope, and answers its status.
async fn post<S>(service: &S, path: &str, key: &str, body: &str) -> u16
where
    S: tower::Service<Request<String>, Response = Response<IdempotencyBody<String>>>
        + Clone
        + Send
        + 'static,
    S::Error: fmt::Debug,
    S::Future: Send,
{
    let req = Request::post(path)
        .header("idempotency-key", key)
        .header("authorization", "Bearer scope-secret-31")
        .body(body.to_owned())
        .unwrap();
    service
        .clone()
        .oneshot(req)
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A subscriber that captures everything at `level`, the default while the guard lives.
fn capturing(level: LevelFilter) -> (Capture, tracing::subscriber::DefaultGuard) {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone().with_filter(level));
    (capture, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn a_subscriber_sees_each_tracked_request_with_its_keys_hash_and_never_the_key() {
    let (capture, _default) = capturing(LevelFilter::DEBUG);
    let service = service();
    let key = "raw-key-a1b2c3";
    assert_eq!(post(&service, "/orders", key, "a").await, 201);
    assert_eq!(post(&service, "/orders", key, "a").await, 201);
    assert_eq!(post(&service, "/orders", key, "b").await, 422);
    drop(_default);

    let spans = capture.spans.lock().unwrap().clone();
    let requests: Vec<&Captured> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "idempotency.request")
        .collect();
    let outcomes: Vec<&str> = requests
        .iter()
        .map(|s| s.fields["idempotency.outcome"].as_str())
        .collect();
    assert_eq!(outcomes, ["executed", "replayed", "mismatch"]);
    let hash = &requests[0].fields["idempotency.key_hash"];
    assert_eq!(hash.len(), 16);
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    for span in &requests {
        assert_eq!(&span.fields["idempotency.key_hash"], hash);
    }
    assert_eq!(requests[0].fields["idempotency.lease"], "stored");
    assert_eq!(requests[1].fields["http.response.status_code"], "201");

    let children = |name: &str| {
        spans
            .iter()
            .filter(|(_, s)| s.name == name)
            .map(|(_, s)| s.parent)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        children("idempotency.store.begin"),
        [Some("idempotency.request"); 3]
    );
    assert_eq!(
        children("idempotency.store.complete"),
        [Some("idempotency.request")]
    );
    assert_eq!(
        children("idempotency.handler"),
        [Some("idempotency.request")]
    );

    let events = capture.events.lock().unwrap().clone();
    let ends: Vec<_> = events
        .iter()
        .filter(|e| e["target"] == REQUEST_TARGET)
        .collect();
    assert_eq!(ends.len(), 3, "{events:?}");
    for end in &ends {
        assert_eq!(&end["idempotency.key_hash"], hash);
        assert_eq!(end["message"], "tracked request");
    }

    let everything = format!("{spans:?}{events:?}");
    assert!(!everything.contains(key), "{everything}");
    assert!(!everything.contains("scope-secret"), "{everything}");
}

#[tokio::test]
async fn a_subscriber_at_info_gets_no_span_and_no_event() {
    let (capture, _default) = capturing(LevelFilter::INFO);
    let service = service();
    assert_eq!(post(&service, "/orders", "k", "a").await, 201);
    assert_eq!(post(&service, "/orders", "k", "a").await, 201);
    drop(_default);
    assert!(capture.spans.lock().unwrap().is_empty());
    assert!(capture.events.lock().unwrap().is_empty());
}

/// A handler that answers 201, after 300 ms on `/slow`.
async fn slow_or_not(
    req: Request<IdempotencyBody<String>>,
) -> Result<Response<String>, Infallible> {
    if req.uri().path() == "/slow" {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    Ok(Response::builder().status(201).body("made".into()).unwrap())
}

/// The outcomes of the request spans a subscriber saw, in the order the spans were made.
fn outcomes(capture: &Capture) -> Vec<String> {
    let spans = capture.spans.lock().unwrap();
    spans
        .iter()
        .filter(|(_, s)| s.name == "idempotency.request")
        .map(|(_, s)| s.fields["idempotency.outcome"].clone())
        .collect()
}

/// The other ways a tracked request ends, each named on its span: a duplicate refused while
/// the first runs (`conflict`), a duplicate that waited past its bound (`wait_timeout`), a key
/// the layer refuses (`rejected`), a store that cannot be reached (`store_error`).
#[tokio::test]
async fn each_way_a_request_ends_is_its_spans_outcome() {
    use tower::Layer;
    use tower_idempotency::{IdempotencyLayer, MAX_KEY_LEN, OnConflict};

    let (capture, _default) = capturing(LevelFilter::DEBUG);

    // A duplicate while the first runs, refused at once, then one that waits too little.
    for (layer, outcome, status) in [
        (
            IdempotencyLayer::new(MemoryStore::default()).with_on_conflict(OnConflict::Reject),
            "conflict",
            409,
        ),
        (
            IdempotencyLayer::new(MemoryStore::default())
                .with_wait_timeout(std::time::Duration::from_millis(20)),
            "wait_timeout",
            409,
        ),
    ] {
        let service = layer.layer(service_fn(slow_or_not));
        let first = {
            let service = service.clone();
            tokio::spawn(async move { post(&service, "/slow", "dup", "").await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let duplicate = post(&service, "/slow", "dup", "").await;
        assert_eq!(first.await.unwrap(), 201);
        assert_eq!(duplicate, status, "{outcome}");
        assert_eq!(outcomes(&capture), ["executed", outcome]);
        capture.spans.lock().unwrap().clear();
    }

    // A key longer than the layer takes.
    let service = IdempotencyLayer::new(MemoryStore::default()).layer(service_fn(slow_or_not));
    let long = "k".repeat(MAX_KEY_LEN + 1);
    assert_eq!(post(&service, "/orders", &long, "").await, 400);
    assert_eq!(outcomes(&capture), ["rejected"]);
    capture.spans.lock().unwrap().clear();

    // A store that cannot be reached: the request is not run.
    let store = idempotency_test_support::recording::RecordingStore::new(MemoryStore::default());
    store.fail_always("begin");
    let service = IdempotencyLayer::new(store).layer(service_fn(slow_or_not));
    assert_eq!(post(&service, "/orders", "k", "").await, 503);
    assert_eq!(outcomes(&capture), ["store_error"]);
    drop(_default);
    let everything = format!("{:?}", capture.spans.lock().unwrap());
    assert!(!everything.contains(&long), "{everything}");
}
