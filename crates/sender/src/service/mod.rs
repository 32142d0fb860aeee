//! The REST service (`deploy-sender serve`): the application with its middleware, and [`serve`]
//! for a bound listener. Handlers in [`routes`] extract, call [`operations`], and map.
//!
//! - `state`: [`AppState`], everything a request may need.
//! - `middleware`: correlation id and request span, bearer token.
//! - `routes/`: the route table and OpenAPI document, one file per resource; `error` how failures
//!   answer.
//! - `operations/`: package, transfer and publish: the pipeline plus events, metrics and jobs.
//! - `jobs`, `events`, `metrics`: asynchronous jobs, lifecycle events, Prometheus metrics.

use std::future::Future;

use axum::Router;
use tokio::net::TcpListener;

mod error;
mod jobs;
mod metrics;
mod middleware;
mod operations;
mod routes;
mod state;

pub use state::AppState;

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    routes::router(state).layer(axum::middleware::from_fn(deploy_http::request_context))
}

/// Serves `state` on `listener` until `shutdown` resolves, then finishes requests in flight and
/// gives the event sink a moment to deliver what is left.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let result = axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(shutdown)
        .await;
    state.events().close().await;
    result
}
