//! The HMAC request envelope of protocol v1: canonical string (bound to the authority the client
//! addressed), signing, constant-time verification against a key ring, and the timestamp skew
//! check. Nonce replay and which authorities a receiver answers to are the receiver's (they need
//! state and configuration).

use std::collections::BTreeMap;
use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Checksum;

/// Header carrying the key id.
pub const HEADER_KEY_ID: &str = "x-deploy-key-id";
/// Header carrying the Unix time in seconds.
pub const HEADER_TIMESTAMP: &str = "x-deploy-timestamp";
/// Header carrying the single-use nonce.
pub const HEADER_NONCE: &str = "x-deploy-nonce";
/// Header carrying the lowercase hex HMAC-SHA256.
pub const HEADER_SIGNATURE: &str = "x-deploy-signature";
/// Optional header echoed in responses, logs and events.
pub const HEADER_CORRELATION_ID: &str = "x-correlation-id";
/// First line of the canonical string.
pub const ALGORITHM: &str = "DEPLOY-HMAC-SHA256";
/// Default allowed difference between the client's and the receiver's clocks.
pub const DEFAULT_MAX_SKEW_SECS: u64 = 300;

type HmacSha256 = Hmac<Sha256>;

/// Whether `id` may be used as a correlation id: 1 to 128 printable ASCII characters, no spaces.
/// Both services take a valid `X-Correlation-Id` as given and make up a new one otherwise.
pub fn is_valid_correlation_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// The current Unix time in seconds, as `X-Deploy-Timestamp` carries it (0 before 1970).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Why a request's envelope was refused. Every variant maps to `UNAUTHORIZED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A required header is absent.
    #[error("missing header {0}: every /deployment request must be signed (see docs/PROTOCOL.md)")]
    MissingHeader(&'static str),
    /// A header is present but malformed.
    #[error("invalid header {name}: {reason}")]
    InvalidHeader {
        /// Header name.
        name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The key id is not in the receiver's key ring.
    #[error("unknown key id {0:?}: the receiver holds no key by that id")]
    UnknownKeyId(String),
    /// The timestamp is too far from the receiver's clock.
    #[error("timestamp {timestamp} is {delta} s from the receiver's clock (allowed: {max_skew} s): check the sender's clock")]
    TimestampSkew {
        /// Timestamp the client sent.
        timestamp: i64,
        /// Signed difference `timestamp - now`.
        delta: i64,
        /// Allowed absolute difference.
        max_skew: u64,
    },
    /// The signature does not match the request.
    #[error("signature does not match the request: wrong key, or the request was altered")]
    BadSignature,
    /// The request was addressed (its `Host`) to another receiver than this one.
    #[error("request addressed to {0:?}, which is not this receiver (it answers to its own address and port, or to RECEIVER_AUTHORITIES): a request signed for one receiver is refused by every other")]
    WrongAuthority(String),
    /// The nonce was already used inside the skew window.
    #[error("nonce already used: requests cannot be replayed")]
    ReplayedNonce,
}

/// The values that are signed, besides the secret.
#[derive(Debug, Clone, Copy)]
pub struct CanonicalRequest<'a> {
    /// HTTP method, upper case (`POST`).
    pub method: &'a str,
    /// The authority the client addressed, `host[:port]` exactly as in its `Host` header, lower
    /// case ([`canonical_authority`]). `None` is the older unbound form (no authority line), which
    /// a receiver accepts only when configured to.
    pub authority: Option<&'a str>,
    /// Path and query exactly as sent (`/deployment/upload`).
    pub path_and_query: &'a str,
    /// Unix time in seconds.
    pub timestamp: i64,
    /// The nonce.
    pub nonce: &'a str,
    /// The key id.
    pub key_id: &'a str,
    /// BLAKE3 of the signed content (JSON body, or the manifest part of a multipart upload).
    pub content_digest: &'a Checksum,
}

impl CanonicalRequest<'_> {
    /// The canonical string: eight lines joined by `\n`, no trailing newline (seven in the unbound
    /// form, which has no authority line).
    pub fn to_canonical_string(&self) -> String {
        let authority = self
            .authority
            .map(|a| format!("{}\n", canonical_authority(a)))
            .unwrap_or_default();
        format!(
            "{ALGORITHM}\n{}\n{authority}{}\n{}\n{}\n{}\n{}",
            self.method,
            self.path_and_query,
            self.timestamp,
            self.nonce,
            self.key_id,
            self.content_digest.to_hex()
        )
    }

    fn mac(&self, key: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
        mac.update(self.to_canonical_string().as_bytes());
        mac
    }

    /// Lowercase hex HMAC-SHA256 of the canonical string under `key`.
    pub fn sign(&self, key: &[u8]) -> String {
        hex::encode(self.mac(key).finalize().into_bytes())
    }

    /// Whether `signature_hex` is this request's signature under `key`, compared in constant time
    /// (a byte-by-byte early exit would let a client learn the MAC one byte at a time).
    pub fn verify_signature(&self, key: &[u8], signature_hex: &str) -> bool {
        let Some(given) = decode_signature(signature_hex) else {
            return false;
        };
        self.mac(key).verify_slice(&given).is_ok()
    }
}

fn decode_signature(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The authority as signed: ASCII lower case (host names are case-insensitive; a port is digits).
pub fn canonical_authority(authority: &str) -> String {
    authority.to_ascii_lowercase()
}

/// Whether `authority` has the form of a `Host` header this protocol signs: `host[:port]`, where
/// host is a DNS name or IPv4 address (letters, digits, `-`, `.`, `_`) or a bracketed IPv6
/// address, and port 1 to 5 digits; at most 255 characters, no user info, no path.
pub fn is_valid_authority(authority: &str) -> bool {
    if authority.is_empty() || authority.len() > 255 {
        return false;
    }
    let (host, port) = split_authority(authority);
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && !p.starts_with('0')
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|n| n > 0)
    });
    host_ok && port_ok
}

/// `host[:port]` split into host and port (`[v6]:port` keeps its brackets on the host).
pub fn split_authority(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => {
                let (host, rest) = authority.split_at(end + 1);
                (
                    host,
                    rest.strip_prefix(':')
                        .or(if rest.is_empty() { None } else { Some(rest) }),
                )
            }
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    }
}

/// Whether a timestamp header is a Unix time written canonically: decimal digits only, no sign,
/// no leading zero (but `0` itself), at most 18 digits. Anything else would let one signature
/// stand for several header values.
pub fn is_canonical_timestamp(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 18
        && value.bytes().all(|b| b.is_ascii_digit())
        && (value == "0" || !value.starts_with('0'))
}

/// Whether a nonce has the allowed form: 16 to 64 of `[A-Za-z0-9_-]`.
pub fn is_valid_nonce(nonce: &str) -> bool {
    (16..=64).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A fresh random nonce (32 hex characters).
pub fn new_nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The four signature headers of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeaders {
    /// `X-Deploy-Key-Id`.
    pub key_id: String,
    /// `X-Deploy-Timestamp`.
    pub timestamp: i64,
    /// `X-Deploy-Nonce`.
    pub nonce: String,
    /// `X-Deploy-Signature`.
    pub signature: String,
}

impl SignatureHeaders {
    /// Signs a request for the receiver at `authority` (`host[:port]` as the client's `Host`
    /// header will carry it; `None` for the unbound form): the client side of the envelope.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        key_id: &str,
        key: &[u8],
        authority: Option<&str>,
        method: &str,
        path_and_query: &str,
        content_digest: &Checksum,
        timestamp: i64,
        nonce: String,
    ) -> Self {
        let canonical = CanonicalRequest {
            method,
            authority,
            path_and_query,
            timestamp,
            nonce: &nonce,
            key_id,
            content_digest,
        };
        let signature = canonical.sign(key);
        Self {
            key_id: key_id.to_owned(),
            timestamp,
            nonce,
            signature,
        }
    }

    /// Reads the headers through `get` (a header-map lookup by lower-case name) and checks their form.
    pub fn parse<'h>(get: impl Fn(&'static str) -> Option<&'h str>) -> Result<Self, AuthError> {
        let need = |name: &'static str| get(name).ok_or(AuthError::MissingHeader(name));
        let key_id = need(HEADER_KEY_ID)?;
        if key_id.is_empty() || key_id.len() > 128 || !key_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(AuthError::InvalidHeader {
                name: HEADER_KEY_ID,
                reason: "1 to 128 visible ASCII characters",
            });
        }
        let timestamp = need(HEADER_TIMESTAMP)?;
        let timestamp = is_canonical_timestamp(timestamp)
            .then(|| timestamp.parse::<i64>().ok())
            .flatten()
            .ok_or(AuthError::InvalidHeader {
                name: HEADER_TIMESTAMP,
                reason:
                    "Unix time in whole seconds, decimal digits only (no sign, no leading zero)",
            })?;
        let nonce = need(HEADER_NONCE)?;
        if !is_valid_nonce(nonce) {
            return Err(AuthError::InvalidHeader {
                name: HEADER_NONCE,
                reason: "16 to 64 characters of [A-Za-z0-9_-]",
            });
        }
        let signature = need(HEADER_SIGNATURE)?;
        if decode_signature(signature).is_none() {
            return Err(AuthError::InvalidHeader {
                name: HEADER_SIGNATURE,
                reason: "64 lowercase hex characters",
            });
        }
        Ok(Self {
            key_id: key_id.to_owned(),
            timestamp,
            nonce: nonce.to_owned(),
            signature: signature.to_owned(),
        })
    }

    /// The headers as `(lower-case name, value)` pairs, ready to put on a request.
    pub fn to_pairs(&self) -> [(&'static str, String); 4] {
        [
            (HEADER_KEY_ID, self.key_id.clone()),
            (HEADER_TIMESTAMP, self.timestamp.to_string()),
            (HEADER_NONCE, self.nonce.clone()),
            (HEADER_SIGNATURE, self.signature.clone()),
        ]
    }

    /// Verifies these headers for a request addressed to `authority` (`None`: the unbound form):
    /// key id known, timestamp within `max_skew_secs` of
    /// `now`, signature matching in constant time. The caller checks the nonce for replay after
    /// this succeeds, so that unauthenticated requests cannot fill its nonce store.
    #[allow(clippy::too_many_arguments)]
    pub fn verify(
        &self,
        ring: &KeyRing,
        authority: Option<&str>,
        method: &str,
        path_and_query: &str,
        content_digest: &Checksum,
        now: i64,
        max_skew_secs: u64,
    ) -> Result<(), AuthError> {
        let key = ring
            .get(&self.key_id)
            .ok_or_else(|| AuthError::UnknownKeyId(self.key_id.clone()))?;
        let delta = self.timestamp.saturating_sub(now);
        if delta.unsigned_abs() > max_skew_secs {
            return Err(AuthError::TimestampSkew {
                timestamp: self.timestamp,
                delta,
                max_skew: max_skew_secs,
            });
        }
        let canonical = CanonicalRequest {
            method,
            authority,
            path_and_query,
            timestamp: self.timestamp,
            nonce: &self.nonce,
            key_id: &self.key_id,
            content_digest,
        };
        if canonical.verify_signature(key, &self.signature) {
            Ok(())
        } else {
            Err(AuthError::BadSignature)
        }
    }
}

/// Shared secrets by key id; several ids let keys rotate without downtime.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<String, Vec<u8>>,
}

/// Why a key list could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key list: {0} (expected id=secret,id2=secret2)")]
pub struct KeyListError(pub String);

impl KeyRing {
    /// An empty ring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a key.
    pub fn insert(&mut self, id: impl Into<String>, secret: impl Into<Vec<u8>>) {
        self.keys.insert(id.into(), secret.into());
    }

    /// Parses `id=secret,id2=secret2`. Ids and secrets must be non-empty; a secret may contain `=`.
    pub fn parse_list(list: &str) -> Result<Self, KeyListError> {
        let mut ring = Self::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (id, secret) = entry.split_once('=').ok_or_else(|| {
                KeyListError(format!(
                    "entry without '=' (key id {:?})",
                    entry.split('=').next().unwrap_or("")
                ))
            })?;
            let (id, secret) = (id.trim(), secret.trim());
            if id.is_empty() || secret.is_empty() {
                return Err(KeyListError("empty key id or secret".into()));
            }
            ring.insert(id, secret.as_bytes());
        }
        Ok(ring)
    }

    /// The secret of a key id.
    pub fn get(&self, id: &str) -> Option<&[u8]> {
        self.keys.get(id).map(Vec::as_slice)
    }

    /// Whether the ring holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key ids, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

impl fmt::Debug for KeyRing {
    /// Never prints secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests;
