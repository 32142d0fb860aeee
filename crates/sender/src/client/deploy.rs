//! Deployments: a package sent to `/deployment/full` with the deployment spec in its manifest,
//! answered with the receiver's record of what it did.

use std::path::Path;

use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use deploy_protocol::display::millis;
use deploy_protocol::PackageManifest;
use serde::Serialize;

use super::{Endpoint, ReceiverClient};
use crate::SenderError;

/// The transfer as the sender saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferStats {
    /// Package bytes sent.
    pub bytes: u64,
    /// From the start of the request to the receiver's answer: upload *and* the whole deployment.
    pub request_duration_ms: u64,
}

impl ReceiverClient {
    /// Streams the package at `path` to `/deployment/full`, `manifest` holding the deployment
    /// spec, and returns the receiver's record of a successful deployment. A deployment that ran
    /// and failed is [`SenderError::Deployment`] (the record, with the receiver's code); a refusal
    /// before it ran is [`SenderError::Remote`]. `on_sent` hears the package bytes sent so far.
    pub async fn deploy(
        &self,
        path: &Path,
        manifest: &PackageManifest,
        correlation_id: Option<&str>,
        on_sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<(TransferStats, DeploymentRecord), SenderError> {
        let outcome = self
            .upload(path, manifest)
            .to(Endpoint::Full)
            .correlation_id(correlation_id)
            .on_progress(on_sent)
            .send()
            .await?;
        let record: DeploymentRecord =
            serde_json::from_value(outcome.response).map_err(|e| {
                SenderError::TransferFailed(format!(
                    "{} answered {} without a deployment record ({e}): is it a deploy-receiver of protocol v1?",
                    self.target().endpoint_url(Endpoint::Full),
                    outcome.status
                ))
            })?;
        if record.status != DeploymentStatus::Succeeded {
            return Err(SenderError::Deployment(Box::new(record)));
        }
        Ok((
            TransferStats {
                bytes: outcome.bytes,
                request_duration_ms: millis(outcome.duration),
            },
            record,
        ))
    }
}
