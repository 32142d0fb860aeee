//! How the service answers errors: every failure is `{"error": {code, message, correlation_id}}`
//! with its code's one status, axum's own rejections included (through [`ApiJson`],
//! [`ApiQuery`] and [`ApiPath`], which turn them into `VALIDATION_ERROR`).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use deploy_protocol::{ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;

use crate::SenderError;

pub(super) use deploy_http::correlation_id;

#[derive(Debug, thiserror::Error)]
pub(super) enum ApiError {
    /// A failure of the library (its code passes through).
    #[error(transparent)]
    Sender(#[from] SenderError),
    /// Missing or wrong bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// An explicitly published event could not even be recorded in the outbox.
    #[error("the event was not recorded: {0}")]
    EventNotRecorded(#[from] deploy_events::EventError),
}

impl ApiError {
    /// Shorthand for a `VALIDATION_ERROR`.
    pub(super) fn validation(message: impl Into<String>) -> Self {
        ApiError::Sender(SenderError::Validation(message.into()))
    }

    /// The stable code of this error.
    pub(super) fn code(&self) -> ErrorCode {
        match self {
            ApiError::Sender(e) => e.code(),
            ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            // The client's own mistake: retrying it never helps.
            ApiError::EventNotRecorded(deploy_events::EventError::TooLarge { .. }) => {
                ErrorCode::ValidationError
            }
            ApiError::EventNotRecorded(_) => ErrorCode::KafkaPublishFailed,
        }
    }

    /// The body as sent, with the current correlation id.
    pub(super) fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string(), correlation_id())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.code();
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(code = %code, error = %self, "request failed");
        } else {
            tracing::info!(code = %code, error = %self, "request refused");
        }
        (status, Json(self.body())).into_response()
    }
}

/// Shorthand for handler results.
pub(super) type ApiResult<T> = Result<T, ApiError>;

/// `Json<T>` whose rejections (bad JSON, wrong content type, wrong fields) are `VALIDATION_ERROR`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::validation(json_rejection_message(&rejection))),
        }
    }
}

fn json_rejection_message(rejection: &JsonRejection) -> String {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "the body must be JSON with `Content-Type: application/json`".into()
        }
        other => format!("invalid JSON body: {}", other.body_text()),
    }
}

/// `Query<T>` whose rejections are `VALIDATION_ERROR`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|e: QueryRejection| {
                ApiError::validation(format!("invalid query: {}", e.body_text()))
            })
    }
}

/// `Path<T>` whose rejections (e.g. an id that is not a UUID) are `VALIDATION_ERROR`.
#[derive(Debug, Clone, Copy)]
pub(super) struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|e: PathRejection| {
                ApiError::validation(format!("invalid path: {}", e.body_text()))
            })
    }
}
