//! Which authorities (`host[:port]` in a request's `Host` header) this receiver answers to: a
//! signature covers the authority the client addressed, and a receiver accepts only its own, so a
//! request signed for one receiver is refused by every other sharing the key.

use std::net::{IpAddr, SocketAddr};

use deploy_protocol::envelope::{canonical_authority, is_valid_authority, split_authority};

/// The authorities this receiver accepts.
#[derive(Debug, Clone)]
pub enum Authorities {
    /// Exactly these (RECEIVER_AUTHORITIES: behind a proxy, or a published container port).
    Listed(Vec<String>),
    /// Its own: the address the connection came in on (any interface the client reached), or
    /// this host's name or `localhost` (on a loopback connection), with the listening port.
    Own {
        /// This host's name, lower case, if known.
        hostname: Option<String>,
    },
}

impl Authorities {
    /// From RECEIVER_AUTHORITIES (empty: [`Authorities::Own`]); an entry that is not `host[:port]`
    /// is an error.
    pub fn new(listed: &[String]) -> Result<Self, String> {
        let listed: Vec<String> = listed
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
            .map(|a| {
                if is_valid_authority(a) {
                    Ok(canonical_authority(a))
                } else {
                    Err(format!(
                        "RECEIVER_AUTHORITIES: {a:?} is not host[:port] (a DNS name, an IPv4 address or a bracketed IPv6 address)"
                    ))
                }
            })
            .collect::<Result<_, _>>()?;
        if !listed.is_empty() {
            return Ok(Self::Listed(listed));
        }
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty());
        Ok(Self::Own { hostname })
    }

    /// Whether `authority` (canonical) names this receiver, for a connection that came in on
    /// `local`.
    pub fn accepts(&self, authority: &str, local: SocketAddr) -> bool {
        match self {
            Self::Listed(listed) => listed.iter().any(|a| a == authority),
            Self::Own { hostname } => {
                let (host, port) = split_authority(authority);
                // No port: the scheme's default, 80 (the receiver itself speaks plain HTTP).
                let port = match port {
                    Some(p) => p.parse::<u16>().ok(),
                    None => Some(80),
                };
                if port != Some(local.port()) {
                    return false;
                }
                let local_ip = local.ip().to_canonical();
                let literal = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                match literal.parse::<IpAddr>() {
                    Ok(ip) => ip.to_canonical() == local_ip,
                    Err(_) => {
                        (host == "localhost" && local_ip.is_loopback())
                            || hostname.as_deref() == Some(host)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn own_address_and_port_only() {
        let own = Authorities::Own {
            hostname: Some("box".into()),
        };
        let l = local("127.0.0.1:8001");
        assert!(own.accepts("127.0.0.1:8001", l));
        assert!(own.accepts("localhost:8001", l));
        assert!(own.accepts("box:8001", l));
        assert!(!own.accepts("127.0.0.1:8002", l));
        assert!(!own.accepts("127.0.0.2:8001", l));
        assert!(!own.accepts("127.0.0.1", l));
        assert!(!own.accepts("other:8001", l));
        let l = local("[::ffff:10.0.0.5]:8001");
        assert!(own.accepts("10.0.0.5:8001", l));
        assert!(!own.accepts("localhost:8001", l));
        let l = local("[::1]:80");
        assert!(own.accepts("[::1]", l));
        assert!(own.accepts("[::1]:80", l));
    }

    #[test]
    fn listed_authorities_replace_the_own_ones() {
        let listed =
            Authorities::new(&["Deploy.Example.com".into(), "10.0.0.5:8443".into()]).expect("ok");
        let l = local("127.0.0.1:8001");
        assert!(listed.accepts("deploy.example.com", l));
        assert!(listed.accepts("10.0.0.5:8443", l));
        assert!(!listed.accepts("127.0.0.1:8001", l));
        assert!(Authorities::new(&["http://x".into()]).is_err());
    }
}
