//! What a receiver's deployment journal (`GET /deployments`) tells a rollout: the image a
//! container name runs before a host is deployed to, and where the rollout's own deployment on a
//! host stands when nothing saw it end (an interrupted rollout, a host past its deadline).

use std::time::Duration;

use deploy_protocol::api::{DeploymentList, DeploymentRecord, DeploymentStatus};
use deploy_protocol::{ErrorBody, ErrorCode};

use super::report::HostError;
use super::undo::Settled;
use crate::client::ReceiverClient;

/// Longest wait for one journal query.
pub(super) const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// The image the receiver's newest successful deployment of `name` runs, if it can tell.
pub(super) async fn running_image(receiver: &ReceiverClient, name: &str) -> Option<String> {
    journal(receiver, None)
        .await
        .ok()?
        .into_iter()
        .find(|r| r.container_name == name && r.status == DeploymentStatus::Succeeded)
        .map(|r| r.image)
}

/// How often [`settle_interrupted`] asks again while a deployment runs there.
const SETTLE_POLL: Duration = Duration::from_millis(500);

/// How long [`settle_interrupted`] keeps asking a receiver that does not answer (counted from its
/// first failed read in a row; a read that hangs takes up to QUERY_TIMEOUT by itself).
const SETTLE_SILENCE: Duration = Duration::from_secs(10);

/// How long [`settle_interrupted`] looks again before it takes "no deployment of this rollout in
/// the journal" for an answer (a request still on its way there, or waiting for the name's turn,
/// has no record yet).
const SETTLE_NOTHING_FOR: Duration = Duration::from_secs(3);

/// The records one journal read asks for: when as many come back and the rollout's deployment is
/// not among them, the receiver may have more, so the host's state is not known.
const JOURNAL_PAGE: usize = 1000;

/// Where `receiver` stands after a rollout that was interrupted while it deployed there (or
/// rolled it back, or was about to deploy there): its journal's deployment of `name` carrying the
/// rollout's `correlation_id` (unique to the rollout), and any rollback of it, waited for while
/// either still runs (the caller bounds the wait). A receiver that does not answer is asked again
/// for a while before its error is the answer.
pub async fn settle_interrupted(
    receiver: &ReceiverClient,
    name: &str,
    correlation_id: &str,
) -> Result<Settled, HostError> {
    let error = |record: &DeploymentRecord, what: &str| match &record.error {
        Some(e) => HostError {
            code: e.code,
            message: e.message.clone(),
        },
        None => HostError {
            code: ErrorCode::DeployFailed,
            message: format!("{what} {} ended {:?}", record.deployment_id, record.status),
        },
    };
    let mut silent_since: Option<std::time::Instant> = None;
    let mut nothing_since: Option<std::time::Instant> = None;
    let is_ours = |r: &DeploymentRecord| {
        r.container_name == name && r.correlation_id.as_deref() == Some(correlation_id)
    };
    loop {
        // The rollout's own records, asked for by its correlation id (a receiver without that
        // filter answers its newest page, filtered here); when none is there, the newest page
        // whole, which tells whether the journal reaches back to the rollout.
        let records = match journal(receiver, Some(correlation_id)).await {
            Ok(found) if found.iter().any(|r| is_ours(r) && r.rollback_of.is_none()) => Ok(found),
            Ok(_) => journal(receiver, None).await,
            Err(e) => Err(e),
        };
        let records = match records {
            Ok(records) => {
                silent_since = None;
                records
            }
            Err(e) => {
                let since = *silent_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= SETTLE_SILENCE {
                    return Err(e);
                }
                tokio::time::sleep(SETTLE_POLL).await;
                continue;
            }
        };
        let ours: Vec<&DeploymentRecord> = records.iter().filter(|r| is_ours(r)).collect();
        // Newest first: the rollout's own deployment is the newest that is not a rollback.
        let Some(deployment) = ours.iter().find(|r| r.rollback_of.is_none()) else {
            if records.len() >= JOURNAL_PAGE {
                return Err(HostError {
                    code: ErrorCode::Conflict,
                    message: format!(
                        "its receiver's newest {JOURNAL_PAGE} deployments do not include this rollout's: whether it ran there cannot be told (look for correlation id {correlation_id} in its journal)"
                    ),
                });
            }
            let since = *nothing_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= SETTLE_NOTHING_FOR {
                return Ok(Settled::NotStarted);
            }
            tokio::time::sleep(SETTLE_POLL).await;
            continue;
        };
        let undo = ours
            .iter()
            .find(|r| r.rollback_of == Some(deployment.deployment_id));
        match (deployment.status, undo) {
            (_, Some(undo)) if undo.status == DeploymentStatus::Succeeded => {
                return Ok(Settled::RolledBack(Some(undo.image.clone())))
            }
            (_, Some(undo)) if undo.status != DeploymentStatus::InProgress => {
                return Err(error(undo, "its rollback"))
            }
            (DeploymentStatus::Succeeded, None) => {
                return Ok(Settled::Moved {
                    deployment_id: deployment.deployment_id,
                    version_after: deployment.image.clone(),
                })
            }
            (DeploymentStatus::Failed | DeploymentStatus::RolledBack, None) => {
                return Ok(Settled::Failed(error(deployment, "deployment")))
            }
            _ => tokio::time::sleep(SETTLE_POLL).await,
        }
    }
}

/// The journal query's path: the newest [`JOURNAL_PAGE`] records, or those carrying
/// `correlation_id` (percent-encoded: a correlation id is any printable ASCII).
fn journal_query(correlation_id: Option<&str>) -> String {
    let mut query = format!("/deployments?limit={JOURNAL_PAGE}");
    if let Some(id) = correlation_id {
        // RFC 3986's unreserved characters travel as they are (a proxy may decode them).
        const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        let id = percent_encoding::utf8_percent_encode(id, ESCAPED);
        query.push_str(&format!("&correlation_id={id}"));
    }
    query
}

/// The receiver's deployment records, newest first: its newest [`JOURNAL_PAGE`], or with
/// `correlation_id`, those carrying it.
async fn journal(
    receiver: &ReceiverClient,
    correlation_id: Option<&str>,
) -> Result<Vec<DeploymentRecord>, HostError> {
    let failed = |e: reqwest::Error| HostError {
        code: ErrorCode::RemoteUnreachable,
        message: format!(
            "{} cannot be asked for its journal: {}",
            receiver.target().base_url,
            deploy_protocol::display::error_chain(&e)
        ),
    };
    let response = receiver
        .signed_get(&journal_query(correlation_id), None, QUERY_TIMEOUT)
        .await
        .map_err(failed)?;
    let status = response.status().as_u16();
    if status != 200 {
        let body = response.bytes().await.unwrap_or_default();
        return Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(ErrorBody { error }) => HostError {
                code: error.code,
                message: error.message,
            },
            Err(_) => HostError {
                code: ErrorCode::TransferFailed,
                message: format!("the receiver answered {status} to its journal query"),
            },
        });
    }
    let list: DeploymentList = response.json().await.map_err(|e| HostError {
        code: ErrorCode::TransferFailed,
        message: format!("the receiver's journal could not be read: {e}"),
    })?;
    Ok(list.deployments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_is_asked_for_a_correlation_id_percent_encoded() {
        assert_eq!(journal_query(None), "/deployments?limit=1000");
        assert_eq!(
            journal_query(Some("ci#7&x=1 +/%.rollout-a_~")),
            "/deployments?limit=1000&correlation_id=ci%237%26x%3D1%20%2B%2F%25.rollout-a_~"
        );
    }
}
