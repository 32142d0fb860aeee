//! Middleware of the service: the per-request context (correlation id, span named by the route)
//! and the bearer token on `/api`.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::error::{is_valid_correlation_id, ApiError, CORRELATION_ID};
use super::state::AppState;

/// Per-request context: correlation id (from `X-Correlation-Id` or made up), a span named by the
/// matched route (low cardinality), and the id echoed on the response.
pub(super) async fn request_context(request: Request, next: Next) -> Response {
    let correlation_id = request
        .headers()
        .get(deploy_protocol::envelope::HEADER_CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_valid_correlation_id(v))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let span = tracing::info_span!("request", method = %request.method(), route = %route, correlation_id = %correlation_id);
    let started = std::time::Instant::now();
    let mut response = CORRELATION_ID
        .scope(correlation_id.clone(), next.run(request))
        .instrument(span.clone())
        .await;
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "response"
        );
    });
    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        response
            .headers_mut()
            .entry(deploy_protocol::envelope::HEADER_CORRELATION_ID)
            .or_insert(value);
    }
    response
}

/// With `SENDER_API_TOKEN` set, refuses `/api` requests without `Authorization: Bearer <token>`.
pub(super) async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.config().api_token.as_deref() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Comparing BLAKE3 digests (whose `==` is constant-time) rather than the strings keeps the
    // time taken independent of where, and whether in length, the token differs.
    let valid =
        given.is_some_and(|t| blake3::hash(t.as_bytes()) == blake3::hash(expected.as_bytes()));
    if valid {
        next.run(request).await
    } else {
        let why = if given.is_some() {
            "the bearer token is not valid"
        } else {
            "this API needs `Authorization: Bearer <token>` (SENDER_API_TOKEN)"
        };
        ApiError::Unauthorized(why.into()).into_response()
    }
}
