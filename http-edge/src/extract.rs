//! Extractors that turn every malformed request into the API's JSON error shape.

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

/// Reads the whole body: 413 past the body limit, 408 when it has not arrived within the
/// edge's body-read timeout (a client sending its body a byte at a time holds a request
/// in flight for no longer than that), 400 when the connection fails meanwhile.
async fn read_body(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    // Most bodies arrive with their headers: the timer is registered only if the read
    // has to wait.
    match tokio::time::timeout(
        state.limits.body_read_timeout,
        Bytes::from_request(req, state),
    )
    .await
    {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::payload_too_large())
        }
        Ok(Err(_)) => Err(ApiError::bad_request("the request body could not be read")),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time",
        )),
    }
}

/// A JSON body: 413 past the body limit, 408 if it is too slow to arrive (see
/// [`read_body`]), 400 for anything that is not the expected shape.
pub struct ApiJson<T>(pub T, pub Bytes);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let bytes = read_body(req, state).await?;
        if !is_json {
            return Err(ApiError::bad_request(
                "Content-Type must be application/json",
            ));
        }
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
        Ok(ApiJson(value, bytes))
    }
}

/// The raw body (for signature checks), with the same 413 and 408 as [`ApiJson`].
pub struct RawBody(pub Bytes);

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        read_body(req, state).await.map(RawBody)
    }
}

/// Query parameters; 400 when they do not parse.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
    }
}

/// The `Idempotency-Key` header alone (extracting the whole `HeaderMap` would copy every
/// header of the request). Never rejects: the handler reports a malformed key where it
/// checks the rest of the request, as [`crate::idem::key_of`] does.
pub struct IdemKeyHeader(pub Result<Option<String>, ApiError>);

impl<S: Send + Sync> FromRequestParts<S> for IdemKeyHeader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(IdemKeyHeader(
            crate::idem::key_of(&parts.headers).map(|k| k.map(str::to_owned)),
        ))
    }
}

/// One id from the path, checked against the id format.
pub struct IdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::bad_request("invalid path"))?;
        crate::validate::id("path id", &id)?;
        Ok(IdPath(id))
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        // The scheme name is case-insensitive (RFC 7235).
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
        let claims = state.jwt.verify(token.trim(), now_secs())?;
        Ok(Caller {
            sub: claims.sub,
            role: claims.role,
        })
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
