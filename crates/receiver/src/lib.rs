//! `deploy-receiver`: the daemon on the target host. It authenticates uploads (IP allowlist, HMAC),
//! streams and verifies packages into its store, and (with Docker) loads and runs them.

pub mod archive;
pub mod auth;
pub mod config;
pub mod deploy;
pub mod docker;
pub mod error;
pub mod events;
pub mod health;
pub mod journal;
pub mod load;
pub mod metrics;
pub mod nonces;
pub mod routes;
pub mod spool;
pub mod state;
pub mod store;
pub mod v2;

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tracing::Instrument;

pub use config::Config;
pub use state::AppState;

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    routes::router(state).layer(middleware::from_fn(request_context))
}

/// Serves `state` on `listener` until `shutdown` resolves, then finishes requests in flight and
/// gives Kafka a moment (at most `events::SHUTDOWN_FLUSH`) for the lifecycle events not yet taken.
///
/// This is `axum::serve` with a header read timeout (HEADER_READ_TIMEOUT_SECS), which axum's
/// server cannot set: without it a client sending its headers a byte at a time would hold a
/// connection (and a task) forever. Bodies have their own limits in `spool`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::spawn(deploy::reconcile::run(state.clone()));
    let header_timeout = Duration::from_secs(state.config().header_read_timeout_secs.max(1));
    let events = state.events().clone();
    let app = app(state);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service =
            app.clone()
                .map_request(move |mut request: Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request.map(Body::new)
                });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    events.close(events::SHUTDOWN_FLUSH).await;
    Ok(())
}

/// What an operator should fix in this configuration.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if config.allowed_networks.is_empty() {
        out.push("ALLOWED_NETWORKS is not set: any address may try to authenticate".into());
    }
    if config.bind.ip().is_unspecified() {
        out.push(
            "bound to all interfaces without TLS: put a TLS reverse proxy in front (docs/OPERATIONS.md)"
                .into(),
        );
    }
    // The example files (.env.example, deploy/config/*.env.example) hold `change-me-...` values.
    let weak = |s: &str| s.len() < 32 || s.contains("change-me") || s.contains("example");
    if config
        .hmac_secret
        .as_deref()
        .is_some_and(|s| !s.is_empty() && weak(s))
    {
        out.push("DEPLOY_HMAC_SECRET is short or an example value: use 32+ random bytes (openssl rand -hex 32)".into());
    }
    let weak_ids: Vec<&str> = (config.hmac_keys.as_deref().unwrap_or_default().split(','))
        .filter_map(|entry| entry.split_once('='))
        .filter(|(_, secret)| weak(secret.trim()))
        .map(|(id, _)| id.trim())
        .collect();
    if !weak_ids.is_empty() {
        out.push(format!(
            "DEPLOY_HMAC_KEYS: key {} is short or an example value: use 32+ random bytes (openssl rand -hex 32)",
            weak_ids.join(", ")
        ));
    }
    out
}

/// Per-request context: correlation id (taken from `X-Correlation-Id` or made), a span named by
/// the matched route (low cardinality), and the id echoed on the response.
async fn request_context(request: Request, next: Next) -> Response {
    let correlation_id = request
        .headers()
        .get(deploy_protocol::envelope::HEADER_CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let span = tracing::info_span!("request", method = %request.method(), route = %route, correlation_id = %correlation_id);
    let started = std::time::Instant::now();
    let mut response = error::CORRELATION_ID
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
            .insert(deploy_protocol::envelope::HEADER_CORRELATION_ID, value);
    }
    response
}
