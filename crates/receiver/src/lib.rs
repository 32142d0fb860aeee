//! `deploy-receiver`: the daemon on the target host. It authenticates uploads (IP allowlist, HMAC),
//! streams and verifies packages into its store, and (with Docker) loads and runs them.

pub mod archive;
pub mod auth;
pub mod authorities;
pub mod config;
pub mod connections;
pub mod deadline;
pub mod deploy;
pub mod docker;
pub mod error;
pub mod events;
pub mod images;
pub mod journal;
pub mod load;
pub mod metrics;
pub mod nonces;
pub mod routes;
pub mod spool;
pub mod state;
pub mod store;
pub mod stream;
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
    routes::router(state.clone())
        .layer(middleware::from_fn_with_state(
            state,
            deadline::body_deadline,
        ))
        .layer(middleware::from_fn(deploy_http::request_context))
}

/// Largest request head (request line and headers) a connection may send: larger ones are
/// answered 431 and closed. hyper's own default (about 400 KiB) times a few hundred slow clients
/// would be more memory than the whole receiver needs.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Most header lines in one request.
pub const MAX_HEADERS: usize = 64;

/// Serves `state` on `listener` until `shutdown` resolves, then finishes requests in flight and
/// gives Kafka a moment (at most `events::SHUTDOWN_FLUSH`) for the lifecycle events not yet taken.
///
/// This is `axum::serve` with what axum's server cannot set: a header read timeout
/// (HEADER_READ_TIMEOUT_SECS; without it a client sending its headers a byte at a time would hold
/// a connection, and a task, forever), a bounded request head ([`MAX_REQUEST_HEAD`],
/// [`MAX_HEADERS`]), and connection limits ([`connections`]). Bodies have their deadline in
/// [`deadline`]. A stop waits at most SHUTDOWN_GRACE_SECS for requests in flight.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::spawn(deploy::reconcile::run(state.clone()));
    let header_timeout = Duration::from_secs(state.config().header_read_timeout_secs.max(1));
    let grace = Duration::from_secs(state.config().shutdown_grace_secs);
    let connections = connections::Connections::new(
        state.config().max_connections,
        state.config().max_connections_per_ip,
    );
    let events = state.events().clone();
    let deployments = state.deployment_tasks().clone();
    let state_bind = state.config().bind;
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
        let Some(admitted) = connections.admit(peer.ip()) else {
            tracing::debug!(%peer, "connection limit reached and every connection authenticated: closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(state_bind);
        let mark = admitted.mark.clone();
        let service =
            app.clone()
                .map_request(move |mut request: Request<hyper::body::Incoming>| {
                    let extensions = request.extensions_mut();
                    extensions.insert(ConnectInfo(peer));
                    extensions.insert(connections::Local(local));
                    extensions.insert(mark.clone());
                    request.map(Body::new)
                });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_REQUEST_HEAD)
            .max_headers(MAX_HEADERS)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                },
                () = admitted.evicted.notified() => {
                    tracing::debug!(%peer, "connection closed to make room for a newer one");
                }
            }
            drop(admitted);
        });
    }
    drop(listener);
    // Requests in flight, then deployments whose client went away (they run in tasks of their
    // own), within one grace period.
    deployments.close();
    let drained = async {
        graceful.shutdown().await;
        deployments.wait().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            deployments_running = deployments.len(),
            "requests or deployments still in flight after SHUTDOWN_GRACE_SECS: their connections are closed, and a deployment cut off is settled at the next start"
        );
    }
    events.close(events::SHUTDOWN_FLUSH).await;
    Ok(())
}

/// What an operator should fix in this configuration.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if config.allowed_networks == Some(config::AllowedNetworks::Any) {
        out.push("ALLOWED_NETWORKS=any: any address may try to authenticate".into());
    }
    if config.accept_unbound_signatures {
        out.push("ACCEPT_UNBOUND_SIGNATURES is on: a request signed in the older form can be replayed to any receiver sharing its key; turn it off once every sender signs the authority".into());
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
