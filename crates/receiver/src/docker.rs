//! The Docker engine connection. The receiver starts and serves without Docker; the first call
//! that needs it negotiates the API version (the engine may be older than bollard's default) and
//! calls made while Docker is unreachable answer DOCKER_UNAVAILABLE.

use std::time::Duration;

use bollard::Docker;
use tokio::sync::RwLock;

use crate::error::{ReceiverError, Result};

/// Long enough for a multi-GiB `docker load`; the stages have their own deadlines.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a ping may take before Docker counts as unreachable.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one answer of [`DockerHandle::version`] serves: `/health` is open to any client in
/// the allowlist, and a flood of it must not become a flood of calls to the engine.
const VERSION_REUSE: Duration = Duration::from_secs(1);

/// The engine set by configuration, for messages of calls that have no handle at hand (the
/// process runs one receiver; tests that run several in one process may see another's).
static CONFIGURED_HOST: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// The configured engine, else `DOCKER_HOST`, else the local socket.
fn shown_host() -> String {
    CONFIGURED_HOST
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into())
}

/// A lazily negotiated Docker client.
#[derive(Debug)]
pub struct DockerHandle {
    host: Option<String>,
    negotiated: RwLock<Option<Docker>>,
    /// The last answer of [`DockerHandle::version`] and when it came; held while asking, so
    /// that callers meanwhile wait for that answer instead of asking again.
    last_version: tokio::sync::Mutex<Option<(std::time::Instant, Option<String>)>>,
}

impl DockerHandle {
    /// A handle that connects on first use, to `host` (`unix://PATH` or `tcp://HOST:PORT`), or
    /// without one to `DOCKER_HOST` (default the local unix socket).
    pub fn new(host: Option<String>) -> Self {
        let host = host.filter(|h| !h.is_empty());
        if let Some(h) = &host {
            *CONFIGURED_HOST
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(h.clone());
        }
        Self {
            host,
            negotiated: RwLock::new(None),
            last_version: tokio::sync::Mutex::new(None),
        }
    }

    /// Where Docker is looked for, for messages.
    pub fn host(&self) -> String {
        self.host.clone().unwrap_or_else(shown_host)
    }

    fn connect(&self) -> std::result::Result<Docker, bollard::errors::Error> {
        match self.host.as_deref() {
            Some(host) if host.starts_with("unix://") => {
                Docker::connect_with_unix(host, 120, bollard::API_DEFAULT_VERSION)
            }
            Some(host) => Docker::connect_with_http(host, 120, bollard::API_DEFAULT_VERSION),
            None => Docker::connect_with_defaults(),
        }
    }

    /// The negotiated client, or DOCKER_UNAVAILABLE with what to check.
    pub async fn client(&self) -> Result<Docker> {
        if let Some(docker) = self.negotiated.read().await.as_ref() {
            return Ok(docker.clone());
        }
        let mut slot = self.negotiated.write().await;
        if let Some(docker) = slot.as_ref() {
            return Ok(docker.clone());
        }
        let unavailable = |e: String| {
            ReceiverError::DockerUnavailable(format!(
                "Docker is not reachable at {}: {e} (is the engine running and the socket mounted and readable by this user?)",
                self.host()
            ))
        };
        let docker = self
            .connect()
            .map_err(|e| unavailable(e.to_string()))?
            .with_timeout(DOCKER_TIMEOUT);
        let docker = tokio::time::timeout(PING_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| unavailable("no answer within 3 s".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        *slot = Some(docker.clone());
        Ok(docker)
    }

    /// The engine version when Docker answers a ping (asked at most once per
    /// [`VERSION_REUSE`]: calls meanwhile get the same answer), `None` otherwise.
    pub async fn version(&self) -> Option<String> {
        let mut last = self.last_version.lock().await;
        if let Some((at, version)) = last.as_ref() {
            if at.elapsed() < VERSION_REUSE {
                return version.clone();
            }
        }
        let version = self.ask_version().await;
        *last = Some((std::time::Instant::now(), version.clone()));
        version
    }

    /// Pings the engine. A ping that fails drops the negotiated client so the next call
    /// negotiates again (the engine may have been upgraded); one that only takes longer than
    /// [`PING_TIMEOUT`] (an engine busy with a large load) keeps it, for the deployments using it.
    async fn ask_version(&self) -> Option<String> {
        let docker = self.client().await.ok()?;
        match tokio::time::timeout(PING_TIMEOUT, docker.version()).await {
            Ok(Ok(v)) => Some(v.version.unwrap_or_else(|| "unknown".into())),
            Ok(Err(_)) => {
                *self.negotiated.write().await = None;
                None
            }
            Err(_) => None,
        }
    }
}

impl Default for DockerHandle {
    /// The engine of `DOCKER_HOST`.
    fn default() -> Self {
        Self::new(None)
    }
}

/// Maps a bollard error from a call that needed the engine: connection-level failures are
/// DOCKER_UNAVAILABLE, anything the engine answered goes through `otherwise`.
///
/// A connection refused or lost mid-request surfaces as hyper's legacy client error (bollard
/// wraps every transport failure of `request()` in it), not as an I/O error.
pub fn map_err(
    e: bollard::errors::Error,
    otherwise: impl FnOnce(String) -> ReceiverError,
) -> ReceiverError {
    use bollard::errors::Error as E;
    match e {
        E::HyperLegacyError { .. }
        | E::HyperResponseError { .. }
        | E::IOError { .. }
        | E::RequestTimeoutError
        | E::SocketNotFoundError(_) => ReceiverError::DockerUnavailable(format!(
            "Docker at {} failed mid-call: {} (is the engine running and its socket reachable?)",
            shown_host(),
            causes(&e)
        )),
        E::DockerResponseServerError {
            status_code: 404,
            message,
        } => ReceiverError::NotFound(message),
        E::DockerResponseServerError { message, .. } => otherwise(message),
        other => otherwise(other.to_string()),
    }
}

/// An error and its causes, `: `-joined: hyper's own message ("client error (SendRequest)") only
/// says which call failed, its cause says why ("connection closed before message completed").
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
