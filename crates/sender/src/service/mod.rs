//! The REST service (`deploy-sender serve`): the application with its middleware, and [`serve`]
//! for a bound listener. Handlers in [`routes`] extract, call [`operations`], and map.
//!
//! - `state`: [`AppState`], everything a request may need.
//! - `middleware`: correlation id and request span, bearer token.
//! - `routes/`: the route table and OpenAPI document, one file per resource; `error` how failures
//!   answer.
//! - `operations/`: package, transfer and publish: the pipeline plus events, metrics and jobs.
//! - `jobs`, `events`, `metrics`: asynchronous jobs, lifecycle events, Prometheus metrics.

use std::future::{Future, IntoFuture};
use std::time::Duration;

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

/// Serves `state` on `listener` until `shutdown` resolves. Then open event streams end, and
/// requests in flight and running jobs get SENDER_SHUTDOWN_GRACE_SECS to finish (what is still
/// running after it is cut off and logged; a running rollout is found INTERRUPTED by the next
/// start); last the event sink gets a moment to deliver what is left.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stopping = state.stopping().clone();
    let signal = {
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            stopping.cancel();
        }
    };
    let server = axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(signal)
        .into_future();
    tokio::pin!(server);
    let result = tokio::select! {
        result = &mut server => Some(result),
        () = stopping.cancelled() => None,
    };
    let grace = Duration::from_secs(state.config().shutdown_grace_secs);
    let deadline = tokio::time::Instant::now() + grace;
    let result = match result {
        Some(result) => result,
        None => {
            tracing::info!(
                grace_secs = grace.as_secs(),
                "stopping: finishing the requests and jobs in flight"
            );
            match tokio::time::timeout_at(deadline, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        grace_secs = grace.as_secs(),
                        "requests still open after the grace period are cut off"
                    );
                    Ok(())
                }
            }
        }
    };
    let cut = state.jobs().settle(deadline).await;
    if cut > 0 {
        tracing::warn!(
            jobs = cut,
            grace_secs = grace.as_secs(),
            "jobs still running after the grace period are cut off: their results are lost"
        );
    }
    state.events().close().await;
    result
}
