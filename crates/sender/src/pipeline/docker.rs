//! Connecting to the Docker engine, and turning bollard's errors into the sender's codes.

use bollard::errors::Error as DockerError;
use bollard::{Docker, API_DEFAULT_VERSION};

use crate::SenderError;

/// Where Docker is looked for when `DOCKER_HOST` is not set.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// Seconds bollard waits for each response to start (bodies such as exports may stream longer).
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// Connects to the engine named by `DOCKER_HOST` (or the local socket) and negotiates the API
/// version, so that older engines (20.10 speaks API 1.41) are talked to in their own version.
pub async fn connect() -> Result<Docker, SenderError> {
    let host = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty());
    connect_to(host.as_deref()).await
}

/// Like [`connect`], to an explicit host (`unix:///path`, `tcp://host:port` or `http://...`).
pub async fn connect_to(host: Option<&str>) -> Result<Docker, SenderError> {
    let shown = host.unwrap_or(DEFAULT_DOCKER_HOST);
    let unavailable = |detail: String| {
        SenderError::DockerUnavailable(format!(
            "Docker is not reachable at {shown}: {detail}. Check that the Docker daemon runs, that \
             the socket is mounted and readable by this user, or set DOCKER_HOST"
        ))
    };
    let docker = match host {
        None => Docker::connect_with_local_defaults(),
        Some(h) if h.starts_with("unix://") || h.starts_with('/') => {
            Docker::connect_with_unix(h, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
        }
        Some(h) if h.starts_with("tcp://") || h.starts_with("http://") => {
            Docker::connect_with_http(h, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
        }
        Some(_) => {
            return Err(unavailable(
                "unsupported DOCKER_HOST scheme (use unix://, tcp:// or http://)".into(),
            ))
        }
    }
    .map_err(|e| unavailable(e.to_string()))?;
    docker
        .negotiate_version()
        .await
        .map_err(|e| unavailable(e.to_string()))
}

/// Maps an error of a Docker call: transport failures are `DOCKER_UNAVAILABLE`, a 404 is
/// `NOT_FOUND`, anything else is internal. `what` names the operation and its object.
pub(crate) fn docker_error(what: &str, e: DockerError) -> SenderError {
    match e {
        DockerError::DockerResponseServerError {
            status_code: 404,
            message,
        } => SenderError::NotFound(format!("{what}: {message}")),
        // What we asked for is malformed (an image reference Docker cannot parse, say): the
        // request's fault, not ours.
        DockerError::DockerResponseServerError {
            status_code: 400,
            message,
        } => SenderError::Validation(format!("{what}: {message}")),
        DockerError::HyperResponseError { .. }
        | DockerError::HyperLegacyError { .. }
        | DockerError::IOError { .. }
        | DockerError::RequestTimeoutError
        | DockerError::SocketNotFoundError(_) => SenderError::DockerUnavailable(format!(
            "{what}: the Docker engine stopped answering ({e}); check that the daemon is running"
        )),
        other => SenderError::Internal(format!("{what}: Docker reported: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreachable_docker_says_where_it_tried_and_what_to_check() {
        let err = connect_to(Some("unix:///nonexistent/docker.sock"))
            .await
            .expect_err("no daemon there");
        assert_eq!(err.code(), deploy_protocol::ErrorCode::DockerUnavailable);
        let message = err.to_string();
        assert!(
            message.contains("unix:///nonexistent/docker.sock"),
            "{message}"
        );
        assert!(message.contains("DOCKER_HOST"), "{message}");
    }
}
