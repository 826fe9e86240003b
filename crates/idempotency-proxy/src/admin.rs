//! The admin endpoints on `--admin-listen`: `/healthz` and `/metrics`, open; and with
//! `--admin-token`, the operator's key routes of [`tower_idempotency::admin`]
//! (`GET`/`DELETE /keys/{key}`, `GET /in-flight`), behind `Authorization: Bearer TOKEN`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use sha2::{Digest, Sha256};
use tower_idempotency::admin::Admin;
use tower_idempotency::{ProblemDetails, Store};

#[derive(Clone)]
struct Health {
    store: Arc<dyn Store>,
    metrics: PrometheusHandle,
}

/// The admin router; `keys` are the operator's routes with the token they need, when one is
/// configured.
pub(crate) fn router(
    store: Arc<dyn Store>,
    metrics: PrometheusHandle,
    keys: Option<(Admin, Vec<u8>)>,
) -> Router {
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .with_state(Health { store, metrics });
    let app = match keys {
        Some((admin, token)) => open.merge(
            admin
                .router()
                .layer(middleware::from_fn_with_state(Arc::new(token), bearer)),
        ),
        None => open,
    };
    app.fallback(not_found)
}

/// Lets a request through only with `Authorization: Bearer TOKEN`; 401 otherwise.
async fn bearer(State(token): State<Arc<Vec<u8>>>, request: Request, next: Next) -> Response {
    // The scheme is case-insensitive (RFC 9110 11.1), the token is not.
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|v| &v[7..]);
    if given.is_some_and(|given| same(given, &token)) {
        return next.run(request).await;
    }
    let mut res = problem(
        StatusCode::UNAUTHORIZED,
        "admin-unauthorized",
        "Admin token required",
        "the key routes need `Authorization: Bearer TOKEN`, the token of --admin-token",
    );
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"idempotency-proxy admin\""),
    );
    res
}

/// Compares the SHA-256 digests, in time that depends on neither where the tokens differ nor
/// the length of the right one.
fn same(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |diff, (x, y)| diff | (x ^ y))
        == 0
}

async fn not_found() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "the admin endpoints are /healthz and /metrics, and with --admin-token /keys/{key} and /in-flight",
    )
}

fn problem(status: StatusCode, slug: &str, title: &'static str, detail: &'static str) -> Response {
    ProblemDetails::own(status, slug, title)
        .with_detail(detail)
        .with_no_store()
        .into_response()
}

/// 200 when the store answers, 503 otherwise.
async fn healthz(State(health): State<Health>) -> impl IntoResponse {
    match crate::store::ping(&*health.store).await {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(e) => {
            tracing::warn!(error = %e, "health check: the store does not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable\n".to_owned(),
            )
        }
    }
}

/// The Prometheus text exposition.
async fn render_metrics(State(health): State<Health>) -> impl IntoResponse {
    crate::store::record_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        health.metrics.render(),
    )
}

/// The operator's view of the layer's keys: the same namespace, key secret and scope headers.
pub(crate) fn keys(layer: &tower_idempotency::IdempotencyLayer, args: &crate::cli::Args) -> Admin {
    Admin::for_layer(layer).with_scope_headers(args.keys.scope_header.iter().cloned())
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3creT"));
        assert!(!same(b"s3cret", b"s3cre"));
        assert!(!same(b"", b"x"));
    }
}
