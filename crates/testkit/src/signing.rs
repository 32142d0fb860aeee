//! The test key and hand-made signed requests (also deliberately malformed ones: every field of
//! a [`Signer`] can be bent to test a refusal), for tests that speak the protocol below the
//! sender's client.

use deploy_protocol::envelope::{new_nonce, unix_now};
use deploy_protocol::{Checksum, SignatureHeaders};

/// The shared secret of test receivers.
pub const SECRET: &str = "testkit-secret-0123456789abcdef0123456789";
/// Its key id.
pub const KEY_ID: &str = "default";

/// How to sign one request: correct by default, every field open to bending.
#[derive(Debug, Clone)]
pub struct Signer {
    /// The authority (`host:port`) the request is signed for; [`Signer::request`] fills in the
    /// base URL's when it is empty.
    pub authority: String,
    /// Key id.
    pub key_id: String,
    /// Shared secret.
    pub secret: Vec<u8>,
    /// HTTP method.
    pub method: String,
    /// Path and query as sent.
    pub path: String,
    /// Unix time in seconds.
    pub timestamp: i64,
    /// Single-use nonce.
    pub nonce: String,
}

impl Signer {
    /// Correct signing of `method path` with the test key, now, with a fresh nonce.
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            authority: String::new(),
            key_id: KEY_ID.into(),
            secret: SECRET.as_bytes().to_vec(),
            method: method.into(),
            path: path.into(),
            timestamp: unix_now(),
            nonce: new_nonce(),
        }
    }

    /// Correct signing of `POST path`.
    pub fn post(path: &str) -> Self {
        Self::new("POST", path)
    }

    /// Correct signing of `POST path` for the receiver at `authority` (`host:port`).
    pub fn to(authority: &str, path: &str) -> Self {
        Self {
            authority: authority.to_owned(),
            ..Self::post(path)
        }
    }

    /// The headers for `content` (the manifest bytes of a multipart body, or the JSON body).
    pub fn headers(&self, content: &[u8]) -> SignatureHeaders {
        SignatureHeaders::sign(
            &self.key_id,
            &self.secret,
            Some(&self.authority),
            &self.method,
            &self.path,
            &Checksum::of(content),
            self.timestamp,
            self.nonce.clone(),
        )
    }

    /// A request to `base_url` + the path, carrying the headers for `content` (which the caller
    /// still attaches, as the body or the manifest part).
    pub fn request(
        &self,
        client: &reqwest::Client,
        base_url: &str,
        content: &[u8],
    ) -> reqwest::RequestBuilder {
        let method =
            reqwest::Method::from_bytes(self.method.as_bytes()).unwrap_or(reqwest::Method::POST);
        let mut request = client.request(method, format!("{base_url}{}", self.path));
        let mut signer = self.clone();
        if signer.authority.is_empty() {
            signer.authority = authority_of(base_url);
        }
        for (name, value) in signer.headers(content).to_pairs() {
            request = request.header(name, value);
        }
        request
    }
}

/// `host:port` of a base URL such as `http://127.0.0.1:8001` (what the HTTP client sends as
/// `Host`).
pub fn authority_of(base_url: &str) -> String {
    let rest = base_url
        .split_once("://")
        .map_or(base_url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}
