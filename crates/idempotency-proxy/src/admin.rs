//! The admin endpoints on `--admin-listen`: `/healthz` and `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_idempotency::Store;

#[derive(Clone)]
struct Admin {
    store: Arc<dyn Store>,
    metrics: PrometheusHandle,
}

/// The admin router.
pub(crate) fn router(store: Arc<dyn Store>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .with_state(Admin { store, metrics })
}

/// 200 when the store answers, 503 otherwise.
async fn healthz(State(admin): State<Admin>) -> impl IntoResponse {
    match crate::store::ping(&*admin.store).await {
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
async fn render_metrics(State(admin): State<Admin>) -> impl IntoResponse {
    crate::store::record_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        admin.metrics.render(),
    )
}
