//! One error type for every refusal the edge answers, always in the JSON shape
//! `{"error":{"code":"...","message":"..."}}` with the status API.md gives the code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shardmall_actors::ShopError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u32>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 400 `idempotency_key_required`: a POST marked (idem) in API.md came without an
    /// `Idempotency-Key`.
    pub fn idempotency_key_required() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "idempotency_key_required",
            "the Idempotency-Key header is required",
        )
    }

    pub fn payload_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than the limit",
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
        e.retry_after = Some(1);
        e
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

impl From<ShopError> for ApiError {
    fn from(e: ShopError) -> Self {
        let status = match &e {
            ShopError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ShopError::NotFound(_) => StatusCode::NOT_FOUND,
            ShopError::AmountMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ShopError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ShopError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            ShopError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::CONFLICT,
        };
        match &e {
            ShopError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                ApiError::internal()
            }
            ShopError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "unavailable");
                ApiError::unavailable("the service is temporarily unavailable; retry shortly")
            }
            ShopError::Overloaded(_) => {
                let mut err = ApiError::new(status, e.code(), e.to_string());
                err.retry_after = Some(1);
                err
            }
            _ => ApiError::new(status, e.code(), e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
