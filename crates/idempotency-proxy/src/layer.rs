//! How the flags shape the idempotency layer: the one place that turns [`Args`] into an
//! [`IdempotencyLayer`] over the store `--store` opened.

use std::sync::Arc;

use tower_idempotency::{IdempotencyLayer, OnConflict, Store};

use crate::cli::{Args, ConflictMode, ReleaseStatus};

/// The layer every worker serves through (each a clone: the clones share the store, the bound
/// on requests in flight and the background work). The error is one line for the operator.
pub(crate) fn from_args(args: &Args, store: Arc<dyn Store>) -> Result<IdempotencyLayer, String> {
    let release = ReleaseStatus::new(&args.release_status);
    let layer = IdempotencyLayer::from_shared(store)
        .with_ttl(args.ttl)
        .with_lock_ttl(args.lock_ttl)
        .with_wait_timeout(args.wait_timeout)
        .with_on_conflict(match args.on_conflict {
            ConflictMode::Wait => OnConflict::Wait,
            ConflictMode::Reject => OnConflict::Reject,
        })
        .with_methods(args.methods.iter().cloned())
        .with_require_key(args.require_key)
        .with_fail_open(args.fail_open)
        .with_scope_headers(args.keys.scope_header.iter().cloned())
        .with_max_request_body(args.max_request_body)
        .with_max_response_body(args.max_response_body)
        // The caller of a keyed request waits for the upstream as long as an untracked one;
        // the upstream call itself goes on until --upstream-deadline.
        .with_caller_timeout(args.upstream_timeout)
        .with_namespace(args.keys.namespace.clone())
        .with_request_body_timeout(args.client_body_timeout)
        // One bound for the process: every worker's clone of the layer shares it.
        .with_max_in_flight(args.max_in_flight as usize)
        .with_storable(move |status| !release.releases(status))
        .with_fingerprint_headers(args.fingerprint_header.iter().cloned())
        .map_err(|e| format!("--fingerprint-header: {e}"))?;
    Ok(match args.keys.key_secret() {
        Some(secret) => layer.with_key_secret(secret.bytes()),
        None => layer,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::convert::Infallible;
    use std::fmt::Debug;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, ServiceExt};
    use tower_idempotency::{IdempotencyBody, MemoryStore, Problem};

    use super::*;

    fn args(flags: &[&str]) -> Args {
        Args::with_upstream(flags).unwrap()
    }

    fn layer(flags: &[&str]) -> IdempotencyLayer {
        from_args(&args(flags), Arc::new(MemoryStore::default())).unwrap()
    }

    /// Whether the layer shows `setting` (`name: value`) among its options, as its `Debug`
    /// writes them (which never shows the key secret itself).
    #[track_caller]
    fn shows(layer: &IdempotencyLayer, setting: &str) {
        let settings = format!("{layer:?}");
        assert!(
            settings.contains(&format!(" {setting},"))
                || settings.contains(&format!(" {setting} ")),
            "`{setting}` is not among {settings}"
        );
    }

    /// The storage key of a keyed POST carrying `headers`.
    fn storage_key(layer: &IdempotencyLayer, headers: &[(&str, &str)]) -> impl Eq + Debug + use<> {
        let mut req = Request::post("/orders");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        layer.storage_key_for_request(&parts, "key-1").unwrap()
    }

    #[test]
    fn the_defaults_are_the_flags_defaults() {
        let layer = layer(&[]);
        for setting in [
            "ttl: 240s",
            "lock_ttl: 30s",
            "wait_timeout: 60s",
            "on_conflict: Wait",
            "require_key: false",
            "fail_open: false",
            "max_request_body: 1048576",
            "max_response_body: 1048576",
            "namespace: \"\"",
            "caller_timeout: Some(60s)",
            "request_body_timeout: Some(30s)",
            "max_in_flight: Some(4096)",
            "key_secret: None",
            "methods: [POST, PUT, PATCH, DELETE]",
            "fingerprint_headers: []",
        ] {
            shows(&layer, setting);
        }
    }

    #[test]
    fn each_flag_sets_its_option_of_the_layer() {
        let layer = layer(&[
            "--ttl",
            "5m",
            "--lock-ttl",
            "12s",
            "--wait-timeout",
            "3s",
            "--on-conflict",
            "reject",
            "--methods",
            "post,patch",
            "--require-key",
            "--fail-open",
            "--fingerprint-header",
            "X-HTTP-Method-Override",
            "--max-request-body",
            "2KiB",
            "--max-response-body",
            "3MiB",
            "--namespace",
            "billing",
            "--upstream-timeout",
            "7s",
            "--client-body-timeout",
            "4s",
            "--max-in-flight",
            "12",
            "--key-secret",
            "s3cret",
        ]);
        for setting in [
            "ttl: 300s",
            "lock_ttl: 12s",
            "wait_timeout: 3s",
            "on_conflict: Reject",
            "methods: [POST, PATCH]",
            "require_key: true",
            "fail_open: true",
            "fingerprint_headers: [\"x-http-method-override\"]",
            "max_request_body: 2048",
            "max_response_body: 3145728",
            "namespace: \"billing\"",
            "caller_timeout: Some(7s)",
            "request_body_timeout: Some(4s)",
            "max_in_flight: Some(12)",
        ] {
            shows(&layer, setting);
        }
        shows(&layer, "key_secret: Some(\"..\")");
        assert!(
            !format!("{layer:?}").contains("s3cret"),
            "the secret is never shown"
        );
    }

    #[test]
    fn the_layer_runs_over_the_store_it_is_given() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let layer = from_args(&args(&[]), store.clone()).unwrap();
        assert!(Arc::ptr_eq(layer.store(), &store));
    }

    #[test]
    fn scope_headers_namespace_and_key_secret_shape_the_storage_key() {
        let tenant = |t| [("x-tenant", t)];
        // By default the scope is Authorization: another header does not part callers.
        let plain = layer(&[]);
        assert_eq!(
            storage_key(&plain, &tenant("a")),
            storage_key(&plain, &tenant("b"))
        );
        assert_ne!(
            storage_key(&plain, &[("authorization", "Bearer a")]),
            storage_key(&plain, &[("authorization", "Bearer b")])
        );
        let scoped = layer(&["--scope-header", "X-Tenant"]);
        assert_ne!(
            storage_key(&scoped, &tenant("a")),
            storage_key(&scoped, &tenant("b"))
        );
        assert_eq!(
            storage_key(&scoped, &[("authorization", "Bearer a"), ("x-tenant", "a")]),
            storage_key(&scoped, &[("authorization", "Bearer b"), ("x-tenant", "a")]),
            "only the scope headers named scope"
        );

        let namespaced = layer(&["--namespace", "billing"]);
        assert_ne!(storage_key(&plain, &[]), storage_key(&namespaced, &[]));

        let secret = layer(&["--key-secret", "s3cret"]);
        assert_ne!(storage_key(&plain, &[]), storage_key(&secret, &[]));
        let dir = std::env::temp_dir().join(format!("proxy-layer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "s3cret\n").unwrap();
        let from_file = layer(&["--key-secret-file", file.to_str().unwrap()]);
        assert_eq!(storage_key(&secret, &[]), storage_key(&from_file, &[]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fingerprint_header_the_layer_refuses_is_a_configuration_error() {
        // The flag's parser refuses the key headers first; the layer's own check stands behind
        // it for any name that reaches it.
        let mut a = args(&[]);
        a.fingerprint_header = vec![http::HeaderName::from_static("idempotency-key")];
        let e = from_args(&a, Arc::new(MemoryStore::default())).unwrap_err();
        assert!(e.starts_with("--fingerprint-header: "), "{e}");
    }

    /// How many times a keyed POST reaches a service that answers `status`, sent twice with one
    /// key through the layer the flags make.
    async fn runs_for_two_sends(flags: &[&str], status: StatusCode) -> usize {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let service = tower::service_fn(move |_req: Request<IdempotencyBody<Full<Bytes>>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let res = Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from_static(b"answer")))
                    .unwrap();
                Ok::<_, Infallible>(res)
            }
        });
        let stack = layer(flags).layer(service);
        for _ in 0..2 {
            let req = Request::post("/orders")
                .header("idempotency-key", "\"k-1\"")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            let res = stack.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), status);
            res.into_body().collect().await.unwrap();
        }
        runs.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn release_statuses_decide_which_answers_are_stored() {
        // By default a 5xx frees the key, and a 201 is stored and replayed.
        assert_eq!(runs_for_two_sends(&[], StatusCode::CREATED).await, 1);
        assert_eq!(
            runs_for_two_sends(&[], StatusCode::INTERNAL_SERVER_ERROR).await,
            2
        );
        // Stripe's list stores a 500 and frees a 429.
        let stripe = ["--release-status", "408,409,425,429"];
        assert_eq!(
            runs_for_two_sends(&stripe, StatusCode::INTERNAL_SERVER_ERROR).await,
            1
        );
        assert_eq!(
            runs_for_two_sends(&stripe, StatusCode::TOO_MANY_REQUESTS).await,
            2
        );
        // A class frees a 404 that the default list stores.
        assert_eq!(runs_for_two_sends(&[], StatusCode::NOT_FOUND).await, 1);
        assert_eq!(
            runs_for_two_sends(&["--release-status", "4xx"], StatusCode::NOT_FOUND).await,
            2
        );
    }

    #[tokio::test]
    async fn require_key_and_methods_decide_which_requests_are_refused() {
        let service = tower::service_fn(|_req: Request<IdempotencyBody<Full<Bytes>>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        });
        let keyless = |method: &str| {
            Request::builder()
                .method(method)
                .uri("/orders")
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        let strict = layer(&["--require-key", "--methods", "POST"]).layer(service);
        let res = strict.clone().oneshot(keyless("POST")).await.unwrap();
        assert_eq!(res.status(), 400);
        let doc = res.into_body().collect().await.unwrap().to_bytes();
        let expected = Problem::BadKey(tower_idempotency::KeyError::Missing).to_json();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&doc).unwrap(),
            expected
        );
        // PUT is not tracked with --methods POST, so its missing key is no error.
        let res = strict.oneshot(keyless("PUT")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
}
