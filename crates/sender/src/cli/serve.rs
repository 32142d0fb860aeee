//! `deploy-sender serve`: builds the service's state, binds, serves until SIGINT or SIGTERM.

use tokio::net::TcpListener;

use crate::config::ServeConfig;
use crate::service::{serve, AppState};
use crate::SenderError;

/// `deploy-sender serve`: builds the state, binds, serves until SIGINT or SIGTERM.
pub(super) async fn run(config: ServeConfig) -> Result<(), SenderError> {
    let bind = config.bind;
    config.check_exposure()?;
    if config.api_token.is_none() && config.open_api && !bind.ip().is_loopback() {
        tracing::warn!(%bind, "serving /api without a token on an address other than loopback (SENDER_OPEN_API)");
    }
    let state = AppState::new(config).await?;
    let listener = TcpListener::bind(bind).await.map_err(|e| {
        SenderError::io(
            format!(
                "cannot listen on {bind}: is another deploy-sender serve (or another service) \
                     using it? Stop it, or choose another address with --bind / SENDER_BIND"
            ),
            e,
        )
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| SenderError::io("cannot read the listening address", e))?;
    tracing::info!(%addr, events = %state.events().sink().destination(), "deploy-sender listening");
    eprintln!("deploy-sender listening on http://{addr} (API docs at /docs)");
    serve(listener, state, shutdown_signal())
        .await
        .map_err(|e| SenderError::io("the HTTP server failed", e))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = ctrl_c.await;
        return;
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
