//! Operations: health, readiness, metrics, the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::OpenApi;

use crate::dto::Health;
use crate::error::ApiError;
use crate::AppState;

#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(get, path = "/readyz", responses((status = 200, body = Health), (status = 503, body = crate::error::ErrorBody)))]
pub async fn readyz(State(st): State<AppState>) -> Response {
    // A failed log acknowledges no write until the process restarts: take the node out
    // of rotation and say why.
    if let Some(why) = st.shop.wal().failure() {
        return ApiError::unavailable(format!("the write-ahead log failed: {why}")).into_response();
    }
    if st.shop.is_ready() && st.cluster.is_ready() && !st.shutting_down.is_cancelled() {
        Json(Health { status: "ready" }).into_response()
    } else {
        ApiError::unavailable("recovering or shutting down").into_response()
    }
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition")))]
pub async fn metrics(State(st): State<AppState>) -> Response {
    let body = crate::metrics::render(&st).await;
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}

pub async fn openapi() -> Response {
    Json(crate::ApiDoc::openapi()).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

#[utoipa::path(get, path = "/dashboard", responses((status = 200, description = "An HTML page of this node's live figures")))]
pub async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../dashboard.html"))
}
