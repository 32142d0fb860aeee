//! Who may talk to the receiver: the IP allowlist (applied before any body byte is read), the HMAC
//! envelope with the replay-proof nonce store (`crate::nonces`), and extractors that give handlers only verified input.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequest, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use deploy_protocol::{AuthError, Checksum, SignatureHeaders};
use ipnet::IpNet;
use serde::de::DeserializeOwned;

use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// Largest JSON body of a signed request.
pub const MAX_JSON_BODY: usize = 64 * 1024;

pub use deploy_protocol::envelope::unix_now;

/// The client's address: the socket peer (IPv4-mapped IPv6 read as IPv4), or, when the peer is a
/// trusted proxy, the right-most address in `X-Forwarded-For` that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted_proxies: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|net| net.contains(ip));
    if !trusted(&peer) {
        return peer;
    }
    let Some(chain) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in chain.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip.to_canonical();
                if !trusted(&client) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// Middleware: refuses clients outside ALLOWED_NETWORKS with 403 before the body is touched.
pub async fn allowlist(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Result<Response> {
    let networks = &state.config().allowed_networks;
    if !networks.is_empty() {
        let forwarded = request
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let ip = client_ip(peer.ip(), forwarded, &state.config().trusted_proxies);
        if !networks.iter().any(|net| net.contains(&ip)) {
            state.metrics().auth_refused("forbidden");
            return Err(ReceiverError::Forbidden(ip));
        }
    }
    Ok(next.run(request).await)
}

/// Verifies a request's envelope for `content_digest`, then spends its nonce.
pub fn authenticate(
    state: &AppState,
    parts: &Parts,
    content_digest: &Checksum,
) -> Result<SignatureHeaders> {
    let result = (|| {
        let headers =
            SignatureHeaders::parse(|name| parts.headers.get(name).and_then(|v| v.to_str().ok()))?;
        let path_and_query = parts
            .extensions
            .get::<OriginalUri>()
            .map(|o| &o.0)
            .unwrap_or(&parts.uri)
            .path_and_query()
            .map_or("/", |pq| pq.as_str());
        let now = unix_now();
        let skew = state.config().hmac_max_skew_secs;
        headers.verify(
            state.keys(),
            parts.method.as_str(),
            path_and_query,
            content_digest,
            now,
            skew,
        )?;
        // Stored only now that the MAC verified: see NonceCache.
        let expires = headers.timestamp.saturating_add(skew as i64);
        state
            .nonces()
            .check_and_insert(&headers.nonce, expires, now)?;
        Ok(headers)
    })();
    if let Err(e) = &result {
        let reason = match e {
            ReceiverError::Unauthorized(AuthError::ReplayedNonce) => "replayed_nonce",
            ReceiverError::Unauthorized(AuthError::TimestampSkew { .. }) => "timestamp_skew",
            ReceiverError::Unauthorized(AuthError::UnknownKeyId(_)) => "unknown_key_id",
            ReceiverError::Unauthorized(AuthError::BadSignature) => "bad_signature",
            ReceiverError::Unauthorized(_) => "malformed_headers",
            _ => "other",
        };
        state.metrics().auth_refused(reason);
    }
    result
}

/// A signed JSON request body, verified and parsed. `Signed<()>` takes an empty body.
#[derive(Debug)]
pub struct Signed<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Signed<T> {
    type Rejection = ReceiverError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self> {
        let (parts, body) = request.into_parts();
        let bytes = axum::body::to_bytes(body, MAX_JSON_BODY)
            .await
            .map_err(|_| {
                ReceiverError::Validation(format!(
                    "request body is larger than {MAX_JSON_BODY} bytes"
                ))
            })?;
        authenticate(state, &parts, &Checksum::of(&bytes))?;
        let json: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        let value = serde_json::from_slice(json)
            .map_err(|e| ReceiverError::Validation(format!("invalid JSON body: {e}")))?;
        Ok(Signed(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    #[test]
    fn mapped_ipv6_is_matched_as_ipv4() {
        let ip = client_ip("::ffff:10.0.0.1".parse().expect("ip"), None, &[]);
        assert_eq!(ip, "10.0.0.1".parse::<IpAddr>().expect("ip"));
        assert!(nets(&["10.0.0.0/8"]).iter().any(|n| n.contains(&ip)));
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let proxy: IpAddr = "127.0.0.1".parse().expect("ip");
        let untrusted: IpAddr = "127.0.0.9".parse().expect("ip");
        let trusted = nets(&["127.0.0.1/32", "10.9.0.0/16"]);
        assert_eq!(client_ip(untrusted, Some("10.1.1.1"), &trusted), untrusted);
        assert_eq!(
            client_ip(proxy, Some("192.0.2.7, 10.9.0.3"), &trusted),
            "192.0.2.7".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(client_ip(proxy, Some("garbage"), &trusted), proxy);
    }
}
