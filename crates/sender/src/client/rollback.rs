//! Rollbacks: `POST /deployments/{id}/rollback`, which runs again what the receiver ran before
//! that deployment (or removes the container when there was nothing), answered with what it did.

use deploy_protocol::api::{DeploymentRecord, RollbackResponse};
use deploy_protocol::display::error_chain;
use deploy_protocol::{ErrorBody, ErrorCode};
use reqwest::Method;
use uuid::Uuid;

use super::ReceiverClient;
use crate::SenderError;

impl ReceiverClient {
    /// Rolls back `deployment` on this receiver. A re-run of the earlier release that failed is
    /// [`SenderError::Deployment`] (its record); a refusal is [`SenderError::Remote`]. Bounded by
    /// the HTTP client's timeouts only: the re-run health-checks the earlier release, so the
    /// caller bounds the wait (a fleet rollout, by its rollback deadline).
    pub async fn rollback(
        &self,
        deployment: Uuid,
        correlation_id: Option<&str>,
    ) -> Result<RollbackResponse, SenderError> {
        let url = self
            .target
            .url(&format!("/deployments/{deployment}/rollback"));
        let unreachable = |e: reqwest::Error| SenderError::RemoteUnreachable {
            url: url.to_string(),
            detail: error_chain(&e),
        };
        let response = self
            .signed(Method::POST, url.clone(), b"", correlation_id)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(unreachable)?;
        if status == 200 {
            return serde_json::from_slice(&body).map_err(|e| {
                SenderError::TransferFailed(format!(
                    "{} answered a rollback without a rollback answer ({e}): is it a deploy-receiver that can roll back?",
                    self.target.base_url
                ))
            });
        }
        // A re-run that failed answers its record, whose error carries the code.
        if let Ok(record) = serde_json::from_slice::<DeploymentRecord>(&body) {
            if record.error.is_some() {
                return Err(SenderError::Deployment(Box::new(record)));
            }
        }
        Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(ErrorBody { error }) => SenderError::Remote {
                status,
                code: error.code,
                message: error.message,
            },
            Err(_) => SenderError::Remote {
                status,
                code: ErrorCode::TransferFailed,
                message: format!(
                    "{} answered {status}: {}",
                    self.target.base_url,
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ),
            },
        })
    }
}
