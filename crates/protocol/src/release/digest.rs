//! `sha256:<hex>` digests (image ids, diffIDs, chain IDs) and the chain-ID rule of the OCI image spec.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A SHA-256 digest written `sha256:` + 64 lowercase hex characters: an image id (the sha256 of
/// the config bytes), a layer's diffID (the sha256 of its uncompressed tar) or a chain ID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest([u8; 32]);

/// Why a string is not a `sha256:<hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a digest is \"sha256:\" and 64 lowercase hex characters, got {0:?}")]
pub struct DigestError(pub String);

impl Sha256Digest {
    /// The digest of these bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Wraps a finished hasher.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self(hasher.finalize().into())
    }

    /// The 64 lowercase hex characters, without the `sha256:` prefix (a blob's file name in an
    /// OCI layout).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// The chain IDs of an ordered list of diffIDs (OCI image spec, config.md):
/// ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)), each ID in
/// its `sha256:<hex>` text form.
pub fn chain_ids(diff_ids: &[Sha256Digest]) -> Vec<Sha256Digest> {
    let mut out: Vec<Sha256Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => *diff_id,
            Some(parent) => Sha256Digest::of(format!("{parent} {diff_id}").as_bytes()),
        };
        out.push(next);
    }
    out
}

impl FromStr for Sha256Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DigestError(s.chars().take(80).collect());
        let hex_part = s.strip_prefix("sha256:").ok_or_else(err)?;
        let ok = hex_part.len() == 64
            && hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(err());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| err())?;
        Ok(Self(out))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest(sha256:{})", self.hex())
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Sha256Digest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^sha256:[0-9a-f]{64}$"))
            .description(Some(
                "sha256:<64 lowercase hex>: an image id, diffID or chain ID",
            ))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Sha256Digest {}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Sha256Digest {
        s.parse().expect("digest")
    }

    #[test]
    fn parses_only_the_canonical_spelling() {
        let ok = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(d(&ok).to_string(), ok);
        for bad in [
            "ab".repeat(32),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha512:{}", "ab".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            format!("sha256: {}", "ab".repeat(32)),
        ] {
            assert!(bad.parse::<Sha256Digest>().is_err(), "{bad}");
        }
    }

    /// Known answer, computed independently with Python's hashlib (docs/PROTOCOL.md, "Protocol v2").
    #[test]
    fn chain_ids_known_answer() {
        let a = Sha256Digest::of(b"layer-a");
        let b = Sha256Digest::of(b"layer-b");
        let c = Sha256Digest::of(b"layer-c");
        let chain = chain_ids(&[a, b, c]);
        assert_eq!(chain[0], a);
        assert_eq!(
            chain[1],
            Sha256Digest::of(format!("{a} {b}").as_bytes()),
            "ChainID(L1) = sha256(ChainID(L0) + \" \" + DiffID(L1))"
        );
        assert_eq!(
            chain[2],
            Sha256Digest::of(format!("{} {c}", chain[1]).as_bytes())
        );
        let hex: Vec<String> = chain.iter().map(ToString::to_string).collect();
        assert_eq!(
            hex,
            [
                "sha256:589f0d58b9053a4ff7329b8fdb4f9dd120e29354c086ad0b3b10733f6cfd6de3",
                "sha256:267c5fd16af60e52927fabf0a36a31f3b5a2069347f7f00c7bd7f93f6ebc01f4",
                "sha256:82c0ed5f6c15be9b9180a8c04b9f2c676d74af6db13c711f5bb47a0fa43b56df",
            ]
        );
        assert!(chain_ids(&[]).is_empty());
    }
}
