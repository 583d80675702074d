//! `Idempotency-Key` handling: the first answer to a (subject, route, key) is stored and
//! replayed for a repeat with the same body; another body is a 409. 429, 503 and 5xx
//! answers are not stored, so a retry after them is a fresh attempt.

use std::future::Future;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use shardmall_actors::domain::campaign::IdemTag;
use shardmall_actors::domain::idempotency::StoredResponse;
use shardmall_actors::domain::order::Order;
use shardmall_actors::{AnswerInFrame, IdemStart};

use crate::auth::Caller;
use crate::dto::{json_response, order_json};
use crate::error::ApiError;
use crate::AppState;

pub const HEADER: &str = "idempotency-key";

/// Runs `op`, an operation whose result is an order, at most once per idempotency key,
/// answering `status` with the order's JSON.
///
/// `op` gets the answer to record with its last write when it can (ADR 0015: the order
/// and its recorded answer become durable together); otherwise the answer is recorded
/// after it. The operation and the recording of its answer run in a task of their own: a
/// client that disconnects mid-request MUST NOT leave an operation done but unrecorded, or
/// its retry would run it again.
pub async fn run<Op, Fut>(
    state: &AppState,
    caller: &Caller,
    route: &str,
    headers: &HeaderMap,
    body: &[u8],
    status: StatusCode,
    op: Op,
) -> Response
where
    Op: FnOnce(AnswerInFrame) -> Fut,
    Fut: Future<Output = Result<Order, ApiError>> + Send + 'static,
{
    let key = match key_of(headers) {
        Ok(Some(k)) => k.to_owned(),
        Ok(None) => return ApiError::idempotency_key_required().into_response(),
        Err(e) => return e.into_response(),
    };
    let scope = format!("{route}\n{key}");
    let digest = Sha256::digest(body);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let body_hash = u64::from_be_bytes(first);
    let begun = match state
        .shop
        .idempotency_begin(&caller.sub, &scope, body_hash)
        .await
    {
        Ok(IdemStart::Replay(stored)) => return replay(stored),
        Ok(IdemStart::Fresh(begun)) => begun,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let answer = AnswerInFrame::new(&caller.sub, &scope, status.as_u16(), order_json);
    let recorded = answer.recorded();
    let op = op(answer);
    let (state, caller) = (state.clone(), caller.clone());
    let task = tokio::spawn(async move {
        let response = match op.await {
            Ok(order) => match recorded.get() {
                // Recorded with the order: answer exactly what a repeat will get.
                Some(stored) => json_response(status, stored.body.clone()),
                None => {
                    let body = order_json(&order);
                    store(&state, &caller, &scope, status, body.clone()).await;
                    json_response(status, body)
                }
            },
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
                err.into_response()
            }
        };
        // The key's start record was answered early (it precedes the operation's records
        // in the log): no answer leaves before it is durable.
        match begun.durable().await {
            Ok(()) => response,
            Err(e) => ApiError::from(e).into_response(),
        }
    });
    task.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "an idempotent request's task failed");
        ApiError::internal().into_response()
    })
}

/// The request's `Idempotency-Key`, checked: `None` when it has none.
pub fn key_of(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    match headers.get(HEADER).map(|v| v.to_str()) {
        None => Ok(None),
        Some(Err(_)) => Err(ApiError::bad_request(
            "Idempotency-Key must be visible ASCII",
        )),
        Some(Ok(k)) if k.is_empty() || k.len() > 128 => Err(ApiError::bad_request(
            "Idempotency-Key must be 1 to 128 characters",
        )),
        Some(Ok(k)) => Ok(Some(k)),
    }
}

/// An idempotency key as an entity that decides the request itself keeps it (a
/// campaign's buy, ADR 0012): a 128-bit hash of (subject, route, key) and a 64-bit hash
/// of the body. Keys are scoped by (subject, route) as everywhere else.
pub fn tag(caller: &Caller, route: &str, key: &str, body: &[u8]) -> IdemTag {
    use xxhash_rust::xxh3::{xxh3_128, xxh3_64};
    let mut scope = Vec::with_capacity(caller.sub.len() + route.len() + key.len() + 2);
    scope.extend_from_slice(caller.sub.as_bytes());
    scope.push(b'\n');
    scope.extend_from_slice(route.as_bytes());
    scope.push(b'\n');
    scope.extend_from_slice(key.as_bytes());
    IdemTag {
        key: xxh3_128(&scope),
        body: xxh3_64(body),
    }
}

/// Marks an answer as the replay of an earlier one.
pub fn mark_replayed(resp: &mut Response) {
    resp.headers_mut().insert(
        "idempotent-replay",
        axum::http::HeaderValue::from_static("true"),
    );
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
    mark_replayed(&mut resp);
    resp
}
