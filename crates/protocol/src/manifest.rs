//! The package manifest: the first, signed part of every upload. It binds the package bytes to
//! the signature through `package_checksum` and `package_size`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Checksum, DeploymentSpec};

/// How the package bytes are compressed (the archive inside is always `docker save` format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip.
    Gzip,
    /// Zstandard.
    #[default]
    Zstd,
    /// Uncompressed tar.
    None,
}

impl Compression {
    /// The file name suffix of a package with this compression.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Gzip => "tar.gz",
            Compression::Zstd => "tar.zst",
            Compression::None => "tar",
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gzip" | "gz" => Ok(Compression::Gzip),
            "zstd" | "zst" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            other => Err(format!(
                "unknown compression {other:?}: use gzip, zstd or none"
            )),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The manifest part of an upload. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PackageManifest {
    /// Package id (a UUID), chosen by the sender.
    pub package_id: Uuid,
    /// BLAKE3 of the package bytes exactly as uploaded.
    pub package_checksum: Checksum,
    /// Size of the package bytes exactly as uploaded; greater than zero.
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub package_size: u64,
    /// Compression of the package bytes.
    pub compression: Compression,
    /// Docker image id of the packaged image, e.g. `sha256:c9d3...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// The only tags the archive may set when loaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_tags: Vec<String>,
    /// Name of the container the package is meant for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// When the package was made (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Uncompressed size of the archive, when the sender knows it (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_size: Option<u64>,
    /// For `/deployment/full`: what to run once the package is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentSpec>,
}

/// Why a manifest was refused. All map to `VALIDATION_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The manifest is larger than the limit.
    #[error("manifest is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Not valid JSON, a missing or unknown field, or a field of the wrong form.
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

impl PackageManifest {
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

    /// Checks what serde cannot: sizes, tag and name forms, the deployment spec.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.package_size == 0 {
            return Err(ManifestError::Invalid(
                "package_size must be greater than zero".into(),
            ));
        }
        validate_described(
            &self.image_tags,
            self.container_name.as_deref(),
            self.created_at.as_deref(),
            self.deployment.as_ref(),
        )
    }

    /// Serialises the manifest to the bytes that are sent and signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The checks every package description shares (a [`PackageManifest`] and a streamed package's
/// [`StreamManifest`](crate::stream::StreamManifest)): tag and name forms, the time, the spec.
pub(crate) fn validate_described(
    image_tags: &[String],
    container_name: Option<&str>,
    created_at: Option<&str>,
    deployment: Option<&DeploymentSpec>,
) -> Result<(), ManifestError> {
    let invalid = |m: String| Err(ManifestError::Invalid(m));
    if image_tags.len() > 64 {
        return invalid("at most 64 image_tags".into());
    }
    for tag in image_tags {
        if !is_valid_image_reference(tag) {
            return invalid(format!(
                "image tag {tag:?} is not a valid name:tag reference"
            ));
        }
    }
    if let Some(name) = container_name {
        if !is_valid_container_name(name) {
            return invalid(format!(
                "container_name {name:?} must match [a-zA-Z0-9][a-zA-Z0-9_.-]{{0,127}}"
            ));
        }
    }
    if let Some(created_at) = created_at {
        if !is_rfc3339(created_at) {
            return invalid(format!(
                "created_at {created_at:?} is not an RFC 3339 time (2025-10-25T12:00:00Z)"
            ));
        }
    }
    if let Some(spec) = deployment {
        spec.validate().map_err(ManifestError::Invalid)?;
    }
    Ok(())
}

/// Whether `s` is an RFC 3339 date-time: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)`, with
/// fields in range (a leap second `:60` allowed), at most 64 characters.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = b.get(range)?;
        digits.iter().all(u8::is_ascii_digit).then(|| {
            digits
                .iter()
                .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
        })
    };
    if s.len() > 64 || b.len() < 20 {
        return false;
    }
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        num(0..4),
        num(5..7),
        num(8..10),
        num(11..13),
        num(14..16),
        num(17..19),
    ) else {
        return false;
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    let separators = b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't')
        && b[13] == b':'
        && b[16] == b':';
    if !separators || day == 0 || day > days || hour > 23 || minute > 59 || second > 60 {
        return false;
    }
    let mut rest = &b[19..];
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return false;
        }
        rest = &fraction[n..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            let all = [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit());
            all && (h1 - b'0') * 10 + (h2 - b'0') <= 23 && (m1 - b'0') * 10 + (m2 - b'0') <= 59
        }
        _ => false,
    }
}

/// Whether `name` is a Docker container name: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 128 characters.
pub fn is_valid_container_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
        && name.len() <= 128
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `reference` is an image reference `[registry/]name[:tag]` with a tag, as Docker accepts:
/// lower-case path components, a tag of `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`. Digests are not allowed.
pub fn is_valid_image_reference(reference: &str) -> bool {
    if reference.len() > 255 || reference.contains('@') {
        return false;
    }
    let (name, tag) = match reference.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => return false,
    };
    let tag_ok = {
        let mut b = tag.bytes();
        matches!(b.next(), Some(c) if c.is_ascii_alphanumeric() || c == b'_')
            && tag.len() <= 128
            && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    };
    let components: Vec<&str> = name.split('/').collect();
    let path_char =
        |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-');
    // A registry host (first of several components, with a dot or port, or `localhost`) may hold
    // upper case and a port; every other component is lower case.
    let is_host = |part: &str| {
        components.len() > 1 && (part.contains('.') || part.contains(':') || part == "localhost")
    };
    let name_ok = components.iter().enumerate().all(|(i, part)| {
        !part.is_empty()
            && if i == 0 && is_host(part) {
                part.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':'))
            } else {
                part.bytes().all(path_char)
            }
    });
    tag_ok && name_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "package_id": "643f58f6-4f40-4ecf-921f-0001187a7fd6",
            "package_checksum": "4aab45689d1790f080f90ec0c755e60ac5735fc47a667e149f0a6316434cdea4",
            "package_size": 43022336,
            "compression": "gzip",
            "image_id": "sha256:c9d3139cf7912388cd14e0f682711e343adf064cb521bb682ec8db4c09488822",
            "image_tags": ["omninode-test-deployment:v1.0.0"],
            "container_name": "omninode-test-deployment",
            "created_at": "2025-10-25T12:00:00Z"
        })
    }

    fn parse(v: &serde_json::Value) -> Result<PackageManifest, ManifestError> {
        PackageManifest::from_slice(&serde_json::to_vec(v).expect("json"))
    }

    #[test]
    fn design_example_parses() {
        let m = parse(&sample()).expect("valid");
        assert_eq!(m.compression, Compression::Gzip);
        assert_eq!(m.image_tags, ["omninode-test-deployment:v1.0.0"]);
    }

    #[test]
    fn refuses_unknown_fields_bad_uuid_bad_checksum_zero_size_bad_compression() {
        let mut v = sample();
        v["surprise"] = serde_json::json!(1);
        assert!(parse(&v).is_err());
        for (field, value) in [
            ("package_id", serde_json::json!("not-a-uuid")),
            ("package_checksum", serde_json::json!("ABCD")),
            ("package_size", serde_json::json!(0)),
            ("compression", serde_json::json!("brotli")),
            ("image_tags", serde_json::json!(["UPPER:tag"])),
            ("container_name", serde_json::json!("../etc")),
        ] {
            let mut v = sample();
            v[field] = value;
            assert!(parse(&v).is_err(), "{field} should be refused");
        }
        for field in [
            "package_id",
            "package_checksum",
            "package_size",
            "compression",
        ] {
            let mut v = sample();
            v.as_object_mut().expect("object").remove(field);
            assert!(parse(&v).is_err(), "missing {field} should be refused");
        }
    }

    #[test]
    fn oversize_manifest_is_refused() {
        let big = vec![b' '; crate::multipart::MAX_MANIFEST_BYTES + 1];
        assert!(matches!(
            PackageManifest::from_slice(&big),
            Err(ManifestError::TooLarge { .. })
        ));
    }

    #[test]
    fn image_references() {
        for ok in [
            "a:b",
            "omninode-test-deployment:v1.0.0",
            "localhost:5000/x/y:1",
            "deploy-e2e/web:v2",
        ] {
            assert!(is_valid_image_reference(ok), "{ok}");
        }
        for bad in ["a", "A:b", "a:", "a:b/c", "a@sha256:00", ":x", "a//b:c"] {
            assert!(!is_valid_image_reference(bad), "{bad}");
        }
    }

    #[test]
    fn created_at_must_be_rfc3339() {
        for good in [
            "2025-10-25T12:00:00Z",
            "2024-02-29T23:59:60.123+02:00",
            "2025-10-25t12:00:00z",
            "2025-10-25T12:00:00.5-05:30",
        ] {
            assert!(is_rfc3339(good), "{good}");
        }
        for bad in [
            "",
            "yesterday",
            "2025-10-25",
            "2025-10-25 12:00:00Z",
            "2025-02-29T12:00:00Z",
            "2025-13-01T12:00:00Z",
            "2025-10-25T24:00:00Z",
            "2025-10-25T12:00:00",
            "2025-10-25T12:00:00.Z",
            "2025-10-25T12:00:00+2:00",
            "2025-10-25T12:00:00Z\n",
            "+2025-10-25T12:00:00Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad:?}");
        }
    }
}
