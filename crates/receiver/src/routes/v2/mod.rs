//! Protocol v2 routes (`/deployment/v2/...`): inventory, releases, blobs. They sit in the same
//! route table as v1, behind the same allowlist, and authenticate with the same envelope.

pub mod blobs;
pub mod inventory;
pub mod releases;

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::auth::{authenticate, read_small_body};
use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// A signed JSON body of at most `LIMIT` bytes, verified and parsed (v2 bodies may be larger
/// than v1's: a release manifest up to 1 MiB, an inventory of thousands of chain IDs).
#[derive(Debug)]
pub struct SignedJson<T, const LIMIT: usize>(pub T);

impl<T: DeserializeOwned, const LIMIT: usize> FromRequest<AppState> for SignedJson<T, LIMIT> {
    type Rejection = ReceiverError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self> {
        let (parts, body) = request.into_parts();
        let bytes = read_small_body(state, &parts, body, LIMIT).await?;
        authenticate(state, &parts, &deploy_protocol::Checksum::of(&bytes))?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| ReceiverError::Validation(format!("invalid JSON body: {e}")))?;
        Ok(SignedJson(value))
    }
}
