//! HTTP plumbing the receiver and the sender's REST service share: the per-request context
//! middleware ([`request_context`]) and the correlation id of the request being served
//! ([`correlation_id`]).
//!
//! It lives in its own crate because both services need it and it needs axum and tokio, which
//! the protocol crate (the wire contract, free of any runtime) must not depend on.

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use deploy_protocol::envelope::{is_valid_correlation_id, HEADER_CORRELATION_ID};
use tracing::Instrument;

tokio::task_local! {
    /// The correlation id of the request being served (set by [`request_context`]).
    static CORRELATION_ID: String;
}

/// The current request's correlation id, when called inside a request.
pub fn correlation_id() -> Option<String> {
    CORRELATION_ID.try_with(Clone::clone).ok()
}

/// Runs `work` with `id` as the correlation id (for a request that names its own, e.g. in its
/// body).
pub async fn with_correlation_id<F: std::future::Future>(id: String, work: F) -> F::Output {
    CORRELATION_ID.scope(id, work).await
}

/// Per-request context: the correlation id (taken from `X-Correlation-Id` when valid, else made
/// up), a span named by the matched route (low cardinality) with the id as a field, one log line
/// for the response, and the id echoed on the response unless a handler set one.
///
/// Layer it with `axum::middleware::from_fn(request_context)` outside the router, so that the
/// matched route is known.
pub async fn request_context(request: Request, next: Next) -> Response {
    let correlation_id = request
        .headers()
        .get(HEADER_CORRELATION_ID)
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
            elapsed_ms = deploy_protocol::display::millis(started.elapsed()),
            "response"
        );
    });
    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        response
            .headers_mut()
            .entry(HEADER_CORRELATION_ID)
            .or_insert(value);
    }
    response
}
