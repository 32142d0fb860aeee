//! The signed release manifest: the image config verbatim, and per layer its diffID and the blob
//! that carries it.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{chain_ids, Sha256Digest};
use crate::manifest::{is_valid_image_reference, ManifestError};
use crate::{Checksum, Compression, DeploymentSpec};

/// Largest accepted release manifest, in bytes (JSON as sent).
pub const MAX_RELEASE_MANIFEST_BYTES: usize = 1024 * 1024;
/// Most layers one release may have (Docker's own limit is lower).
pub const MAX_RELEASE_LAYERS: usize = 256;

/// `POST /deployment/v2/releases`: the signed description of one image and what to do with it.
/// Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReleaseManifest {
    /// Release id (a UUID), chosen by the sender.
    pub release_id: Uuid,
    /// The image id: `sha256:` of the config bytes.
    pub image_id: Sha256Digest,
    /// The image config bytes, verbatim, in standard base64 (with padding).
    #[serde(with = "base64_bytes")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Byte))]
    pub config: Vec<u8>,
    /// The layers, bottom first; their diffIDs equal the config's `rootfs.diff_ids` in order.
    pub layers: Vec<LayerEntry>,
    /// The only tags the load may set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_tags: Vec<String>,
    /// When the release was made (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// For `/deploy`: what to run once the image is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentSpec>,
}

/// One layer of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LayerEntry {
    /// sha256 of the layer's uncompressed tar.
    pub diff_id: Sha256Digest,
    /// The compressed blob that carries it.
    pub blob: BlobRef,
    /// Size of the uncompressed layer tar, when the sender knows it. The receiver checks it for
    /// the layers it receives and needs it for the OCI manifest of layers it omits (their size
    /// is in the OCI descriptor); without it an omitted layer's descriptor carries the size of a
    /// received copy, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncompressed_size: Option<u64>,
}

/// A layer blob as it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    /// BLAKE3 of the blob bytes (its name on the wire).
    pub blake3: Checksum,
    /// Size of the blob bytes; greater than zero.
    pub size: u64,
    /// How the layer tar is compressed inside the blob.
    pub compression: Compression,
}

/// The part of an image config the manifest is checked against.
#[derive(Deserialize)]
struct ConfigRootFs {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    diff_ids: Vec<Sha256Digest>,
}

impl ReleaseManifest {
    /// Parses and validates manifest bytes as received.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_RELEASE_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                limit: MAX_RELEASE_MANIFEST_BYTES,
            });
        }
        let manifest: Self =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks what serde cannot: the config hashes to `image_id`, its `rootfs.diff_ids` are the
    /// layers' diffIDs in order, sizes are positive, tags and the deployment spec are valid.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |m: String| Err(ManifestError::Invalid(m));
        if Sha256Digest::of(&self.config) != self.image_id {
            return invalid(format!(
                "the config's sha256 is {}, not the image_id {}",
                Sha256Digest::of(&self.config),
                self.image_id
            ));
        }
        let config: ConfigRootFs = match serde_json::from_slice(&self.config) {
            Ok(c) => c,
            Err(e) => return invalid(format!("config is not an image config with rootfs: {e}")),
        };
        if config.rootfs.kind != "layers" {
            return invalid(format!(
                "config rootfs.type is {:?}, not \"layers\"",
                config.rootfs.kind
            ));
        }
        if self.layers.len() > MAX_RELEASE_LAYERS {
            return invalid(format!("at most {MAX_RELEASE_LAYERS} layers"));
        }
        if !config.rootfs.diff_ids.iter().eq(self.diff_ids().iter()) {
            return invalid(
                "layers' diff_ids differ from the config's rootfs.diff_ids (same order required)"
                    .into(),
            );
        }
        if let Some(layer) = self.layers.iter().find(|l| l.blob.size == 0) {
            return invalid(format!(
                "blob size of layer {} must be greater than zero",
                layer.diff_id
            ));
        }
        if self.image_tags.len() > 64 {
            return invalid("at most 64 image_tags".into());
        }
        if let Some(tag) = self
            .image_tags
            .iter()
            .find(|t| !is_valid_image_reference(t))
        {
            return invalid(format!(
                "image tag {tag:?} is not a valid name:tag reference"
            ));
        }
        if let Some(spec) = &self.deployment {
            spec.validate().map_err(ManifestError::Invalid)?;
        }
        Ok(())
    }

    /// The layers' diffIDs, bottom first.
    pub fn diff_ids(&self) -> Vec<Sha256Digest> {
        self.layers.iter().map(|l| l.diff_id).collect()
    }

    /// The layers' chain IDs, bottom first.
    pub fn chain_ids(&self) -> Vec<Sha256Digest> {
        chain_ids(&self.diff_ids())
    }

    /// The entry of the layer carried by this blob, if the release names it.
    pub fn blob(&self, blake3: &Checksum) -> Option<&BlobRef> {
        self.layers
            .iter()
            .map(|l| &l.blob)
            .find(|b| b.blake3 == *blake3)
    }

    /// Serialises the manifest to the bytes that are sent and signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

mod base64_bytes {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| serde::de::Error::custom(format!("config is not standard base64: {e}")))
    }
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
mod tests;
