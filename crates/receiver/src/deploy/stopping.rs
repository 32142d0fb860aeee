//! Whether a container is still in a stop that a receiver, now gone, asked for: Docker finishes a
//! stop whose caller went away, so reconciliation must not take a container in its stop timeout
//! for one that keeps running.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::models::ContainerInspectResponse;
use bollard::system::EventsOptions;
use bollard::Docker;
use futures::StreamExt;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::containers::{find_container, is_running, STOP_TIMEOUT_SECS};
use crate::docker::map_err;
use crate::error::{ReceiverError, Result};

/// How long a container may still be stopping for a receiver that is gone: Docker carries out a
/// stop whose caller went away, with the timeout that caller gave.
const STOPPING: Duration = Duration::from_secs(STOP_TIMEOUT_SECS.unsigned_abs() + 5);
/// How often a stopping container is looked at.
const STOPPING_POLL: Duration = Duration::from_millis(200);
/// How long listing past events may take.
const EVENTS_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the previous container `c` will still run once a stop that the interrupted deployment
/// may have asked for is over. Docker finishes a stop whose caller died, so a running container
/// may be within its stop timeout and about to exit. Docker's events tell: a stop begins with a
/// `kill` event (the stop signal), which a `die` or a later `start` would follow. When a `kill`
/// is the container's last such event since the deployment began, the container is watched until
/// it exits, at most the stop timeout and a margin.
pub(super) async fn keeps_running(
    docker: &Docker,
    c: &ContainerInspectResponse,
    deployment_started: &str,
) -> Result<bool> {
    if !is_running(c) {
        return Ok(false);
    }
    let id = c.id.as_deref().unwrap_or_default();
    if last_event(docker, id, deployment_started).await?.as_deref() != Some("kill") {
        return Ok(true);
    }
    let deadline = Instant::now() + STOPPING;
    while Instant::now() < deadline {
        tokio::time::sleep(STOPPING_POLL).await;
        match find_container(docker, id).await? {
            Some(now) if is_running(&now) => {}
            _ => {
                tracing::info!(
                    container = id,
                    "the previous container finished a stop asked for before the interruption"
                );
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// The last `kill`, `die` or `start` event of container `id` since a minute before `since` (an
/// RFC 3339 time; the margin is for the engine's clock), up to now.
async fn last_event(docker: &Docker, id: &str, since: &str) -> Result<Option<String>> {
    let timestamp = |t: OffsetDateTime| format!("{}.{:09}", t.unix_timestamp(), t.nanosecond());
    let since = OffsetDateTime::parse(since, &Rfc3339).unwrap_or(OffsetDateTime::UNIX_EPOCH)
        - Duration::from_secs(60);
    let options = EventsOptions {
        since: Some(timestamp(since)),
        until: Some(timestamp(OffsetDateTime::now_utc())),
        filters: HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("container".to_owned(), vec![id.to_owned()]),
            (
                "event".to_owned(),
                vec!["kill".to_owned(), "die".to_owned(), "start".to_owned()],
            ),
        ]),
    };
    let events: Vec<_> =
        tokio::time::timeout(EVENTS_TIMEOUT, docker.events(Some(options)).collect())
            .await
            .map_err(|_| {
                ReceiverError::DockerUnavailable(format!(
                    "Docker did not list the events of container {id} within {} s",
                    EVENTS_TIMEOUT.as_secs()
                ))
            })?;
    let mut last = None;
    for event in events {
        let event = event.map_err(|e| map_err(e, ReceiverError::Internal))?;
        last = event.action.or(last);
    }
    Ok(last)
}
