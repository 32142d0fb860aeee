//! BLAKE3 checksums as they travel: 64 lowercase hex characters.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A BLAKE3 digest, always rendered as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Checksum([u8; 32]);

/// Why a string is not a checksum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a checksum is 64 lowercase hex characters (BLAKE3), got {0:?}")]
pub struct ChecksumError(pub String);

impl Checksum {
    /// The checksum of these bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The checksum of zero bytes: the content digest of an empty body.
    pub fn empty() -> Self {
        Self::of(b"")
    }

    /// Wraps a finished hasher.
    pub fn from_hasher(hasher: &blake3::Hasher) -> Self {
        Self(*hasher.finalize().as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, as on the wire.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for Checksum {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl FromStr for Checksum {
    type Err = ChecksumError;

    /// Accepts exactly 64 lowercase hex characters; upper case is refused so that one digest has
    /// one spelling (it is signed as text).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(ChecksumError(s.chars().take(80).collect()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ChecksumError(s.to_owned()))?;
        Ok(Self(out))
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Checksum({})", self.to_hex())
    }
}

impl Serialize for Checksum {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Checksum {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[0-9a-f]{64}$"))
            .description(Some("Lowercase hex BLAKE3 digest"))
            .examples([serde_json::json!(
                "4aab45689d1790f080f90ec0c755e60ac5735fc47a667e149f0a6316434cdea4"
            )])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Checksum {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_digest_is_the_published_constant() {
        assert_eq!(
            Checksum::empty().to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn parse_refuses_upper_case_short_and_non_hex() {
        let good = Checksum::empty().to_hex();
        assert!(good.parse::<Checksum>().is_ok());
        assert!(good.to_uppercase().parse::<Checksum>().is_err());
        assert!(good[..63].parse::<Checksum>().is_err());
        assert!(format!("{}g", &good[..63]).parse::<Checksum>().is_err());
    }
}
