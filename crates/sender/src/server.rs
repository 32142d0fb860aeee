//! The REST service (`deploy-sender serve`): its configuration, the application with its
//! middleware (correlation id, request span, bearer token), and `serve` for a bound listener.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::config::{ReceiverConfig, StoreConfig};
use crate::routes::error::{ApiError, CORRELATION_ID};
use crate::state::AppState;
use crate::SenderError;

/// Settings of `deploy-sender serve`. Every field is a flag and an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "SENDER_BIND", default_value = "127.0.0.1:8000")]
    pub bind: SocketAddr,
    /// Bearer token every `/api` request must carry (`Authorization: Bearer <token>`); unset: no
    /// token is asked for (bind to loopback then).
    #[arg(long, env = "SENDER_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Package store.
    #[command(flatten)]
    pub store: StoreConfig,
    /// Default receiver (`--to` / DEFAULT_RECEIVER_URL) and the HMAC key to sign with.
    #[command(flatten)]
    pub receiver: ReceiverConfig,
    /// State directory (event outbox); default `<PACKAGE_DIR>/.state`.
    #[arg(long, env = "SENDER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Kafka bootstrap servers for lifecycle events; unset: events stay in the local outbox.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: Option<String>,
    /// Kafka topic for lifecycle events.
    #[arg(long, env = "KAFKA_TOPIC", default_value = deploy_protocol::events::DEFAULT_TOPIC)]
    pub kafka_topic: String,
    /// Uploads to receivers running at once, over all requests.
    #[arg(long, env = "MAX_CONCURRENT_TRANSFERS", default_value_t = 5)]
    pub max_concurrent_transfers: usize,
    /// zstd worker threads per packaging job (default: one per core).
    #[arg(long, env = "DEPLOY_ZSTD_WORKERS")]
    pub zstd_workers: Option<u32>,
    /// Finished jobs kept for `GET /api/v1/jobs/{id}`.
    #[arg(long, env = "SENDER_JOB_HISTORY", default_value_t = 200)]
    pub job_history: usize,
}

impl ServeConfig {
    /// A configuration for a package directory, with every other setting at its default
    /// (loopback on an ephemeral port, no token, no receiver, no Kafka): for tests and embedding.
    pub fn for_dir(package_dir: impl Into<PathBuf>) -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_token: None,
            store: StoreConfig {
                package_dir: package_dir.into(),
                ..StoreConfig::default()
            },
            receiver: ReceiverConfig::default(),
            state_dir: None,
            kafka_bootstrap_servers: None,
            kafka_topic: deploy_protocol::events::DEFAULT_TOPIC.into(),
            max_concurrent_transfers: 5,
            zstd_workers: None,
            job_history: 200,
        }
    }

    /// The state directory in effect.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.store.package_dir.join(".state"))
    }
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    crate::routes::router(state).layer(axum::middleware::from_fn(request_context))
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

/// `deploy-sender serve`: builds the state, binds, serves until SIGINT or SIGTERM.
pub async fn run(config: ServeConfig) -> Result<(), SenderError> {
    let bind = config.bind;
    let state = AppState::new(config).await?;
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|e| {
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

/// Per-request context: correlation id (from `X-Correlation-Id` or made up), a span named by the
/// matched route (low cardinality), and the id echoed on the response.
async fn request_context(request: Request, next: Next) -> Response {
    let correlation_id = request
        .headers()
        .get(deploy_protocol::envelope::HEADER_CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::routes::error::is_valid_correlation_id(v))
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
pub(crate) async fn require_token(
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
