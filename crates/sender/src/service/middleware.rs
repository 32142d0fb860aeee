//! The bearer token on `/api`. The per-request context (correlation id, span named by the
//! route) is `deploy_http::request_context`, shared with the receiver.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::AppState;

/// With `SENDER_API_TOKEN` set, refuses `/api` requests without `Authorization: Bearer <token>`.
pub(super) async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.config().api_token.as_deref().map(str::trim) else {
        return next.run(request).await;
    };
    // The scheme's case does not matter (RFC 7235).
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
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
