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

    /// The headers for `content` (the manifest bytes of a multipart body, or the JSON body).
    pub fn headers(&self, content: &[u8]) -> SignatureHeaders {
        SignatureHeaders::sign(
            &self.key_id,
            &self.secret,
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
        for (name, value) in self.headers(content).to_pairs() {
            request = request.header(name, value);
        }
        request
    }
}
