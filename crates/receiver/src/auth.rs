//! Who may talk to the receiver: the IP allowlist (applied before any body byte is read), the HMAC
//! envelope with the replay-proof nonce store (`crate::nonces`), and extractors that give handlers only verified input.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequest, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use deploy_protocol::envelope::{
    canonical_authority, is_valid_authority, HEADER_CORRELATION_ID, HEADER_KEY_ID, HEADER_NONCE,
    HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use deploy_protocol::{AuthError, Checksum, SignatureHeaders};
use ipnet::IpNet;
use serde::de::DeserializeOwned;

use crate::config::AllowedNetworks;
use crate::connections;
use crate::deadline::BodyTimeout;
use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// Largest JSON body of a signed request.
pub const MAX_JSON_BODY: usize = 64 * 1024;

pub use deploy_protocol::envelope::unix_now;

/// The client's address: the socket peer (IPv4-mapped IPv6 read as IPv4), or, when the peer is a
/// trusted proxy, the right-most address in `X-Forwarded-For` that is not a trusted proxy.
/// `forwarded_for` is every `X-Forwarded-For` line in the order received (a proxy that appends
/// its own line is read like one that appends to the last). `None` when the chain cannot be read
/// where it matters (a hop that is not an address before an untrusted one is found): such a
/// client cannot be placed, and is refused.
pub fn client_ip(
    peer: IpAddr,
    forwarded_for: &[&[u8]],
    trusted_proxies: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer.to_canonical();
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|net| net.contains(ip));
    if !trusted(&peer) {
        return Some(peer);
    }
    let mut client = peer;
    for line in forwarded_for.iter().rev() {
        for hop in line.rsplit(|b| *b == b',') {
            let hop = std::str::from_utf8(hop).ok()?.trim_matches([' ', '\t']);
            client = parse_hop(hop)?.to_canonical();
            if !trusted(&client) {
                return Some(client);
            }
        }
    }
    Some(client)
}

/// One `X-Forwarded-For` entry: an address, optionally bracketed (IPv6) or with a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse::<IpAddr>().ok())
        })
}

/// Middleware: refuses clients outside ALLOWED_NETWORKS with 403 before the body is touched.
pub async fn allowlist(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Result<Response> {
    if let AllowedNetworks::Only(networks) = state.config().networks() {
        let lines: Vec<&[u8]> = request
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let refuse = |why: String| {
            state.metrics().auth_refused("forbidden");
            Err(ReceiverError::Forbidden(why))
        };
        match client_ip(peer.ip(), &lines, &state.config().trusted_proxies) {
            None => {
                return refuse(format!(
                    "X-Forwarded-For from the trusted proxy {} holds an entry that is not an address: the client cannot be placed",
                    peer.ip()
                ))
            }
            Some(ip) if !networks.iter().any(|net| net.contains(&ip)) => {
                return refuse(format!(
                    "address {ip} is not in this receiver's ALLOWED_NETWORKS"
                ))
            }
            Some(_) => {}
        }
    }
    Ok(next.run(request).await)
}

/// Headers a signed request may carry once only: the envelope, and what decides how its body and
/// target are read. A second line would let a proxy and the receiver read two different requests.
const SINGLE_HEADERS: [&str; 8] = [
    HEADER_KEY_ID,
    HEADER_TIMESTAMP,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_CORRELATION_ID,
    "host",
    "content-type",
    "content-length",
];

/// The authority the client addressed: its one `Host` header, which an absolute-form target
/// (`POST http://host/...`) must agree with.
fn addressed_authority(parts: &Parts) -> std::result::Result<String, AuthError> {
    let host = parts
        .headers
        .get(http::header::HOST)
        .ok_or(AuthError::MissingHeader("host"))?;
    let invalid = AuthError::InvalidHeader {
        name: "host",
        reason: "host[:port]: a DNS name, an IPv4 address or a bracketed IPv6 address",
    };
    let host = host.to_str().map_err(|_| invalid.clone())?;
    if !is_valid_authority(host) {
        return Err(invalid);
    }
    if let Some(target) = parts.uri.authority() {
        if !target.as_str().eq_ignore_ascii_case(host) {
            return Err(AuthError::InvalidHeader {
                name: "host",
                reason: "differs from the authority in the request target",
            });
        }
    }
    Ok(canonical_authority(host))
}

/// Verifies a request's envelope for `content_digest`, then spends its nonce and marks its
/// connection as authenticated (never evicted for a newcomer: see `crate::connections`).
pub fn authenticate(
    state: &AppState,
    parts: &Parts,
    content_digest: &Checksum,
) -> Result<SignatureHeaders> {
    let result = (|| {
        for name in SINGLE_HEADERS {
            if parts.headers.get_all(name).iter().nth(1).is_some() {
                return Err(AuthError::InvalidHeader {
                    name,
                    reason: "sent more than once",
                }
                .into());
            }
        }
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
        let config = state.config();
        let skew = config.hmac_max_skew_secs;
        let local = parts
            .extensions
            .get::<connections::Local>()
            .map_or(config.bind, |l| l.0);
        let verify = |authority: Option<&str>| {
            headers.verify(
                state.keys(),
                authority,
                parts.method.as_str(),
                path_and_query,
                content_digest,
                now,
                skew,
            )
        };
        let authority = addressed_authority(parts);
        let ours = match &authority {
            Ok(a) => state.authorities().accepts(a, local),
            Err(_) => false,
        };
        let verdict = match (ours, config.accept_unbound_signatures) {
            (true, false) => verify(authority.as_deref().ok()),
            (true, true) => verify(authority.as_deref().ok()).or_else(|_| verify(None)),
            (false, true) => verify(None),
            (false, false) => Err(match authority {
                Ok(a) => AuthError::WrongAuthority(a),
                Err(e) => e,
            }),
        };
        verdict?;
        // Stored only now that the MAC verified: see NonceCache.
        let expires = headers.timestamp.saturating_add(skew as i64);
        state
            .nonces()
            .check_and_insert(&headers.nonce, expires, now)?;
        if let Some(mark) = parts.extensions.get::<connections::Mark>() {
            mark.authenticated();
        }
        Ok(headers)
    })();
    if let Err(e) = &result {
        let reason = match e {
            ReceiverError::Unauthorized(AuthError::ReplayedNonce) => "replayed_nonce",
            ReceiverError::Unauthorized(AuthError::TimestampSkew { .. }) => "timestamp_skew",
            ReceiverError::Unauthorized(AuthError::UnknownKeyId(_)) => "unknown_key_id",
            ReceiverError::Unauthorized(AuthError::BadSignature) => "bad_signature",
            ReceiverError::Unauthorized(AuthError::WrongAuthority(_)) => "wrong_authority",
            ReceiverError::Unauthorized(_) => "malformed_headers",
            _ => "other",
        };
        state.metrics().auth_refused(reason);
    }
    result
}

/// Reads a small body that is not authenticated yet (its signature covers it): at most `limit`
/// bytes (a larger `Content-Length` is refused before a byte is read), each chunk copied as it
/// comes, so that no chunk keeps a buffer of the connection's alive, and the whole of it within
/// UPLOAD_IDLE_TIMEOUT_SECS + `limit` / UPLOAD_MIN_RATE (`408 TIMEOUT` after that, however
/// steadily it trickles: the route's small limit, not MAX_PACKAGE_SIZE as for a body without a
/// length, bounds it).
pub async fn read_small_body(
    state: &AppState,
    parts: &Parts,
    body: axum::body::Body,
    limit: usize,
) -> Result<Vec<u8>> {
    use futures::StreamExt as _;
    let too_large =
        || ReceiverError::Validation(format!("request body is larger than {limit} bytes"));
    let announced = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let config = state.config();
    let within = std::time::Duration::from_secs(
        config
            .upload_idle_timeout_secs
            .max(1)
            .saturating_add(limit as u64 / config.upload_min_rate.max(1)),
    );
    let read = async {
        let mut bytes = Vec::new();
        let mut chunks = body.into_data_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| match BodyTimeout::find(&e) {
                Some(why) => ReceiverError::Timeout(why),
                None => ReceiverError::Validation(format!("request body could not be read: {e}")),
            })?;
            if bytes.len().saturating_add(chunk.len()) > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    tokio::time::timeout(within, read)
        .await
        .unwrap_or_else(|_| {
            Err(ReceiverError::Timeout(format!(
                "the request body was not whole within {} s (UPLOAD_IDLE_TIMEOUT_SECS + {limit} bytes / UPLOAD_MIN_RATE)",
                within.as_secs()
            )))
        })
}

/// A signed JSON request body, verified and parsed. `Signed<()>` takes an empty body.
#[derive(Debug)]
pub struct Signed<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Signed<T> {
    type Rejection = ReceiverError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self> {
        let (parts, body) = request.into_parts();
        let bytes = read_small_body(state, &parts, body, MAX_JSON_BODY).await?;
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
        let ip = client_ip("::ffff:10.0.0.1".parse().expect("ip"), &[], &[]).expect("placed");
        assert_eq!(ip, "10.0.0.1".parse::<IpAddr>().expect("ip"));
        assert!(nets(&["10.0.0.0/8"]).iter().any(|n| n.contains(&ip)));
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
        let proxy: IpAddr = "127.0.0.1".parse().expect("ip");
        let untrusted: IpAddr = "127.0.0.9".parse().expect("ip");
        let trusted = nets(&["127.0.0.1/32", "10.9.0.0/16"]);
        assert_eq!(
            client_ip(untrusted, &[b"10.1.1.1"], &trusted),
            Some(untrusted)
        );
        assert_eq!(
            client_ip(proxy, &[b"192.0.2.7, 10.9.0.3"], &trusted),
            ip("192.0.2.7")
        );
        // A proxy that appends its own line: the last line is the one it wrote.
        assert_eq!(
            client_ip(proxy, &[b"10.1.1.1", b"192.0.2.7"], &trusted),
            ip("192.0.2.7")
        );
        assert_eq!(
            client_ip(proxy, &[b"10.1.1.1", b"10.9.0.3"], &trusted),
            ip("10.1.1.1")
        );
        assert_eq!(
            client_ip(proxy, &[b"[2001:db8::1]"], &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_ip(proxy, &[b"192.0.2.7:5000"], &trusted),
            ip("192.0.2.7")
        );
        assert_eq!(client_ip(proxy, &[b"garbage"], &trusted), None);
        assert_eq!(client_ip(proxy, &[b"10.1.1.1, garbage"], &trusted), None);
        assert_eq!(client_ip(proxy, &[b"\xff10.1.1.1"], &trusted), None);
        // Only the proxies' own hops: the nearest is the client.
        assert_eq!(client_ip(proxy, &[b"10.9.0.3"], &trusted), ip("10.9.0.3"));
        assert_eq!(client_ip(proxy, &[], &trusted), Some(proxy));
    }
}
