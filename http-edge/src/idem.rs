//! `Idempotency-Key` handling: the first answer to a (subject, route, key) is stored and
//! replayed for a repeat with the same body; another body is a 409. 429, 503 and 5xx
//! answers are not stored, so a retry after them is a fresh attempt.

use std::future::Future;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use shardmall_actors::domain::idempotency::StoredResponse;
use shardmall_actors::IdemStart;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

pub const HEADER: &str = "idempotency-key";

/// Runs `op` at most once per idempotency key.
///
/// The operation and the recording of its answer run in a task of their own: a client
/// that disconnects mid-request MUST NOT leave an operation done but unrecorded, or its
/// retry would run it again.
pub async fn run<Fut>(
    state: &AppState,
    caller: &Caller,
    route: &str,
    headers: &HeaderMap,
    body: &[u8],
    op: Fut,
) -> Response
where
    Fut: Future<Output = Result<(StatusCode, serde_json::Value), ApiError>> + Send + 'static,
{
    let key = match headers.get(HEADER).map(|v| v.to_str()) {
        None => {
            return ApiError::bad_request("the Idempotency-Key header is required").into_response()
        }
        Some(Err(_)) => {
            return ApiError::bad_request("Idempotency-Key must be visible ASCII").into_response()
        }
        Some(Ok(k)) if k.is_empty() || k.len() > 128 => {
            return ApiError::bad_request("Idempotency-Key must be 1 to 128 characters")
                .into_response()
        }
        Some(Ok(k)) => k.to_owned(),
    };
    let scope = format!("{route}\n{key}");
    let digest = Sha256::digest(body);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let body_hash = u64::from_be_bytes(first);
    match state
        .shop
        .idempotency_begin(&caller.sub, &scope, body_hash)
        .await
    {
        Ok(IdemStart::Replay(stored)) => return replay(stored),
        Ok(IdemStart::Fresh) => {}
        Err(e) => return ApiError::from(e).into_response(),
    }
    let (state, caller) = (state.clone(), caller.clone());
    let task = tokio::spawn(async move {
        let (status, value) = match op.await {
            Ok(ok) => ok,
            Err(err) => {
                let keep =
                    !(err.status.is_server_error() || err.status == StatusCode::TOO_MANY_REQUESTS);
                if keep {
                    let body = serde_json::to_vec(
                        &serde_json::json!({"error": {"code": err.code, "message": err.message}}),
                    )
                    .unwrap_or_default();
                    store(&state, &caller, &scope, err.status, body).await;
                } else {
                    state.shop.idempotency_abort(&caller.sub, &scope).await;
                }
                return err.into_response();
            }
        };
        let body = serde_json::to_vec(&value).unwrap_or_default();
        store(&state, &caller, &scope, status, body.clone()).await;
        json_response(status, body)
    });
    task.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "an idempotent request's task failed");
        ApiError::internal().into_response()
    })
}

async fn store(state: &AppState, caller: &Caller, scope: &str, status: StatusCode, body: Vec<u8>) {
    let response = StoredResponse {
        status: status.as_u16(),
        body,
    };
    if let Err(e) = state
        .shop
        .idempotency_complete(&caller.sub, scope, response)
        .await
    {
        // The operation itself is durable; only its replay record is missing.
        tracing::error!(error = %e, "storing an idempotent response failed");
    }
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut resp = json_response(status, stored.body);
    resp.headers_mut().insert(
        "idempotent-replay",
        axum::http::HeaderValue::from_static("true"),
    );
    resp
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    Response::builder()
        .status(status)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| ApiError::internal().into_response())
}
