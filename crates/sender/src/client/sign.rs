//! The HMAC envelope on an outgoing request: every signed call (v1 and v2) goes through
//! [`sign_request`], so a fresh timestamp and nonce, the headers and the correlation id
//! are written once.

use deploy_protocol::envelope::{self, HEADER_CORRELATION_ID};
use deploy_protocol::{Checksum, SignatureHeaders};
use reqwest::{Method, RequestBuilder, Url};

use super::ReceiverClient;

impl ReceiverClient {
    /// A request of `method` to `url`, signed over `content` (the JSON body, the manifest part of
    /// a multipart body, or nothing), carrying `correlation_id` when there is one.
    pub(super) fn signed(
        &self,
        method: Method,
        url: Url,
        content: &[u8],
        correlation_id: Option<&str>,
    ) -> RequestBuilder {
        sign_request(
            &self.http,
            &self.target,
            method,
            url,
            &Checksum::of(content),
            correlation_id,
        )
    }
}

/// A request of `method` to `url` for `target`, signed over the content whose BLAKE3 is `digest`
/// (a JSON body, a multipart manifest, nothing, or for a blob `PATCH` the whole blob), with a
/// fresh timestamp and nonce, carrying `correlation_id` when there is one. Every signed request
/// of the client is made here.
pub(crate) fn sign_request(
    http: &reqwest::Client,
    target: &super::ReceiverTarget,
    method: Method,
    url: Url,
    digest: &Checksum,
    correlation_id: Option<&str>,
) -> RequestBuilder {
    let nonce = envelope::new_nonce();
    sign_with_nonce(http, target, method, url, digest, correlation_id, nonce)
}

/// [`sign_request`] with the nonce given (a streamed upload's seal signs it too).
pub(crate) fn sign_with_nonce(
    http: &reqwest::Client,
    target: &super::ReceiverTarget,
    method: Method,
    url: Url,
    digest: &Checksum,
    correlation_id: Option<&str>,
    nonce: String,
) -> RequestBuilder {
    let path_and_query = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let headers = SignatureHeaders::sign(
        &target.key_id,
        &target.secret,
        Some(&authority(&url)),
        method.as_str(),
        &path_and_query,
        digest,
        envelope::unix_now(),
        nonce,
    );
    let mut request = http.request(method, url);
    for (name, value) in headers.to_pairs() {
        request = request.header(name, value);
    }
    if let Some(id) = correlation_id {
        request = request.header(HEADER_CORRELATION_ID, id);
    }
    request
}

/// The authority a request to `url` is signed for: `host[:port]` exactly as the HTTP client puts
/// it in the `Host` header (the port only when it is not the scheme's default).
pub(crate) fn authority(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}
