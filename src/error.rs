//! HTTP errors: one enum, each variant one status and one stable `code`, rendered as
//! `{"error":{"code":"...","message":"..."}}`.

use actix_web::{http::StatusCode, HttpResponse, ResponseError};
use serde_json::json;

use crate::auth::AuthError;

/// Every error an HTTP endpoint answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `bad_request`.
    #[error("{0}")]
    BadRequest(String),
    /// 401 `unauthorized`.
    #[error("{0}")]
    Unauthorized(String),
    /// 403 `forbidden`.
    #[error("{0}")]
    Forbidden(String),
    /// 404 `not_found`.
    #[error("{0}")]
    NotFound(String),
    /// 408 `request_timeout`.
    #[error("{0}")]
    RequestTimeout(String),
    /// 409 `conflict`.
    #[error("{0}")]
    Conflict(String),
    /// 412 `precondition_failed` (a tus request without `Tus-Resumable: 1.0.0`).
    #[error("{0}")]
    PreconditionFailed(String),
    /// 413 `payload_too_large`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415 `unsupported_media_type`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429 `quota_exceeded`: a per-tenant quota.
    #[error("{0}")]
    QuotaExceeded(String),
    /// 507 `insufficient_storage`: the server's disk.
    #[error("{0}")]
    InsufficientStorage(String),
    /// 503 `unavailable`.
    #[error("{0}")]
    Unavailable(String),
    /// 500 `internal`.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::Conflict(_) => "conflict",
            ApiError::PreconditionFailed(_) => "precondition_failed",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::InsufficientStorage(_) => "insufficient_storage",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<crate::quota::Exceeded> for ApiError {
    fn from(e: crate::quota::Exceeded) -> Self {
        if e.is_disk() {
            ApiError::InsufficientStorage(e.to_string())
        } else {
            ApiError::QuotaExceeded(e.to_string())
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::Unauthorized(format!("{e} ({})", e.reason()))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::QuotaExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized(_)) {
            res.insert_header(("WWW-Authenticate", "Bearer"));
        }
        res.json(json!({ "error": { "code": self.code(), "message": self.to_string() } }))
    }
}
