//! Streamed packages (`POST /deployment/stream`): the package is sent while it is being made, so
//! its size and BLAKE3 are not known when the request is signed. The signed `manifest` part
//! describes the package without them; a `seal` part after the package carries them, bound to the
//! request by an HMAC over the request's nonce and the manifest's digest (see docs/PROTOCOL.md,
//! "Streamed cold deploys").

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use crate::manifest::{validate_described, ManifestError};
use crate::{Checksum, Compression, DeploymentSpec, PackageManifest};

/// First line of the string a seal signs.
pub const SEAL_ALGORITHM: &str = "DEPLOY-SEAL-BLAKE3";

/// The `manifest` part of a streamed upload: a [`PackageManifest`] without the package's size and
/// checksum (they come last, in the [`Seal`]), with the image id and the deployment required.
/// Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StreamManifest {
    /// Package id (a UUID), chosen by the sender.
    pub package_id: Uuid,
    /// Compression of the package bytes.
    pub compression: Compression,
    /// Docker image id the archive holds, `sha256:` of its config: the load must produce it.
    pub image_id: String,
    /// The only tags the archive may set when loaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_tags: Vec<String>,
    /// Name of the container the package is meant for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// When the stream was started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// What to run once the package is loaded.
    pub deployment: DeploymentSpec,
}

impl StreamManifest {
    /// Parses and validates manifest bytes as received.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > crate::multipart::MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                limit: crate::multipart::MAX_MANIFEST_BYTES,
            });
        }
        let manifest: Self =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks what serde cannot: the image id's form, tag and name forms, the deployment spec.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.image_id.parse::<crate::Sha256Digest>().is_err() {
            return Err(ManifestError::Invalid(format!(
                "image_id {:?} is not sha256: and 64 lowercase hex digits",
                self.image_id
            )));
        }
        validate_described(
            &self.image_tags,
            self.container_name.as_deref(),
            self.created_at.as_deref(),
            Some(&self.deployment),
        )
    }

    /// Serialises the manifest to the bytes that are sent and signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The package as a [`PackageManifest`] once its seal has been verified.
    pub fn sealed(&self, seal: &Seal) -> PackageManifest {
        PackageManifest {
            package_id: self.package_id,
            package_checksum: seal.package_checksum,
            package_size: seal.package_size,
            compression: self.compression,
            image_id: Some(self.image_id.clone()),
            image_tags: self.image_tags.clone(),
            container_name: self.container_name.clone(),
            created_at: self.created_at.clone(),
            original_size: None,
            deployment: Some(self.deployment.clone()),
        }
    }
}

/// The `seal` part, after the package: its size and BLAKE3, and the HMAC that binds them to this
/// request ([`seal_string`]). Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Seal {
    /// BLAKE3 of the package bytes exactly as sent.
    pub package_checksum: Checksum,
    /// Their number.
    pub package_size: u64,
    /// Lowercase hex HMAC-SHA256, under the request's key, of [`seal_string`].
    pub signature: String,
}

/// What a seal signs, five lines joined by `\n` with no trailing newline: [`SEAL_ALGORITHM`], the
/// request's `X-Deploy-Nonce`, the lowercase hex BLAKE3 of the `manifest` part (the request's
/// signed content digest), the package's BLAKE3 and its size in decimal.
pub fn seal_string(
    nonce: &str,
    manifest_digest: &Checksum,
    package_checksum: &Checksum,
    package_size: u64,
) -> String {
    format!("{SEAL_ALGORITHM}\n{nonce}\n{manifest_digest}\n{package_checksum}\n{package_size}")
}

fn mac(key: &[u8], signed: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(signed.as_bytes());
    mac
}

impl Seal {
    /// The seal of a package of `package_size` bytes hashing to `package_checksum`, sent in the
    /// request with `nonce` whose manifest part hashes to `manifest_digest`.
    pub fn sign(
        key: &[u8],
        nonce: &str,
        manifest_digest: &Checksum,
        package_checksum: Checksum,
        package_size: u64,
    ) -> Self {
        let signed = seal_string(nonce, manifest_digest, &package_checksum, package_size);
        Self {
            package_checksum,
            package_size,
            signature: hex::encode(mac(key, &signed).finalize().into_bytes()),
        }
    }

    /// Whether the signature is this seal's under `key` for that request, compared in constant
    /// time.
    pub fn verify(&self, key: &[u8], nonce: &str, manifest_digest: &Checksum) -> bool {
        let mut given = [0u8; 32];
        let well_formed = self.signature.len() == 64
            && self
                .signature
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && hex::decode_to_slice(&self.signature, &mut given).is_ok();
        if !well_formed {
            return false;
        }
        let signed = seal_string(
            nonce,
            manifest_digest,
            &self.package_checksum,
            self.package_size,
        );
        mac(key, &signed).verify_slice(&given).is_ok()
    }

    /// Serialises the seal to the bytes that are sent.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DeploymentSpec {
        serde_json::from_value(serde_json::json!({"container_name": "web"})).expect("a spec")
    }

    #[test]
    fn a_seal_verifies_only_for_its_key_request_and_values() {
        let manifest = Checksum::of(b"manifest");
        let package = Checksum::of(b"package");
        let seal = Seal::sign(b"key", "nonce-0123456789ab", &manifest, package, 7);
        assert!(seal.verify(b"key", "nonce-0123456789ab", &manifest));
        assert!(!seal.verify(b"other", "nonce-0123456789ab", &manifest));
        assert!(!seal.verify(b"key", "nonce-0123456789ac", &manifest));
        assert!(!seal.verify(b"key", "nonce-0123456789ab", &Checksum::of(b"x")));
        let mut longer = seal.clone();
        longer.package_size = 8;
        assert!(!longer.verify(b"key", "nonce-0123456789ab", &manifest));
        let mut upper = seal.clone();
        upper.signature = upper.signature.to_ascii_uppercase();
        assert!(!upper.verify(b"key", "nonce-0123456789ab", &manifest));
    }

    #[test]
    fn the_seal_string_is_five_lines() {
        let s = seal_string("n", &Checksum::of(b"m"), &Checksum::of(b"p"), 42);
        let lines: Vec<&str> = s.split('\n').collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0], SEAL_ALGORITHM);
        assert_eq!(lines[4], "42");
    }

    #[test]
    fn a_stream_manifest_needs_an_image_id_and_a_deployment() {
        let id = format!("sha256:{}", "a".repeat(64));
        let ok = StreamManifest {
            package_id: Uuid::new_v4(),
            compression: Compression::Zstd,
            image_id: id,
            image_tags: vec!["web:v1".into()],
            container_name: None,
            created_at: None,
            deployment: spec(),
        };
        assert_eq!(StreamManifest::from_slice(&ok.to_bytes()), Ok(ok.clone()));
        let mut bad = ok.clone();
        bad.image_id = "web:v1".into();
        assert!(StreamManifest::from_slice(&bad.to_bytes()).is_err());
        let mut value = serde_json::to_value(&ok).expect("json");
        value.as_object_mut().expect("object").remove("deployment");
        assert!(StreamManifest::from_slice(value.to_string().as_bytes()).is_err());
        value["deployment"] = serde_json::json!({"container_name": "web"});
        value["package_size"] = serde_json::json!(1);
        assert!(
            StreamManifest::from_slice(value.to_string().as_bytes()).is_err(),
            "unknown fields are refused"
        );
    }
}
