//! Which receiver to talk to: its base URL and the shared key to sign with, and the endpoints
//! below it.

use std::fmt;

use reqwest::Url;

use crate::SenderError;

/// Where to send packages and the shared key to sign with.
#[derive(Clone)]
pub struct ReceiverTarget {
    /// Base URL of the receiver, e.g. `http://192.168.86.200:8001` (may carry a path prefix).
    pub base_url: Url,
    /// Id of the shared key (`X-Deploy-Key-Id`).
    pub key_id: String,
    /// The shared secret.
    pub secret: Vec<u8>,
}

impl fmt::Debug for ReceiverTarget {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverTarget")
            .field("base_url", &self.base_url.as_str())
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl ReceiverTarget {
    /// Parses and checks a base URL (http or https, no query or fragment).
    pub fn new(base_url: &str, key_id: &str, secret: &[u8]) -> Result<Self, SenderError> {
        let url = Url::parse(base_url).map_err(|e| {
            SenderError::Validation(format!(
                "receiver URL {base_url:?} is not a URL ({e}): use e.g. http://192.168.86.200:8001"
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(SenderError::Validation(format!(
                "receiver URL {base_url:?} must be http:// or https:// with a host"
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(SenderError::Validation(format!(
                "receiver URL {base_url:?} must not carry a query or fragment"
            )));
        }
        if secret.is_empty() {
            return Err(SenderError::Validation(
                "no HMAC secret: set DEPLOY_HMAC_SECRET or pass --secret".into(),
            ));
        }
        Ok(Self {
            base_url: url,
            key_id: key_id.to_owned(),
            secret: secret.to_vec(),
        })
    }

    /// The full URL of a receiver endpoint, keeping any path prefix of the base URL.
    pub fn endpoint_url(&self, endpoint: Endpoint) -> Url {
        self.url(endpoint.path())
    }

    /// The URL of `path_and_query` (e.g. `/deployments?limit=1`) below the base URL, keeping any
    /// path prefix of it.
    pub fn url(&self, path_and_query: &str) -> Url {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        let mut url = self.base_url.clone();
        url.set_path(&format!(
            "{}{path}",
            self.base_url.path().trim_end_matches('/')
        ));
        url.set_query(query);
        url
    }
}

/// Which receiver endpoint to upload to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /deployment/upload`: store and verify only.
    Upload,
    /// `POST /deployment/full`: upload, verify, load, deploy and health-check.
    Full,
    /// `POST /deployment/stream`: a package streamed as it is made, then deployed.
    Stream,
}

impl Endpoint {
    /// The endpoint's path below the receiver's base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Upload => "/deployment/upload",
            Endpoint::Full => "/deployment/full",
            Endpoint::Stream => "/deployment/stream",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_urls_are_checked_and_secrets_not_printed() {
        assert!(ReceiverTarget::new("ftp://x", "k", b"s").is_err());
        assert!(ReceiverTarget::new("http://x?q=1", "k", b"s").is_err());
        assert!(ReceiverTarget::new("http://x", "k", b"").is_err());
        let target = ReceiverTarget::new("http://x:8001", "k", b"hunter2").expect("ok");
        assert!(!format!("{target:?}").contains("hunter2"));
    }

    #[test]
    fn urls_below_the_base_keep_its_path_prefix() {
        let target = ReceiverTarget::new("https://proxy.example/deploy/", "k", b"s").expect("ok");
        assert_eq!(
            target.url("/health").as_str(),
            "https://proxy.example/deploy/health"
        );
        assert_eq!(
            target.url("/deployments?limit=1").as_str(),
            "https://proxy.example/deploy/deployments?limit=1"
        );
        assert_eq!(
            target.endpoint_url(Endpoint::Full).as_str(),
            "https://proxy.example/deploy/deployment/full"
        );
    }
}
