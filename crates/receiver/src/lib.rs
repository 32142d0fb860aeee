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
use axum::extract::{ConnectInfo, Request};
use axum::middleware;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

pub use config::Config;
pub use state::AppState;

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    routes::router(state).layer(middleware::from_fn(deploy_http::request_context))
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
