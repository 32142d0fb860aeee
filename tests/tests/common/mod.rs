//! Shared harness for the end-to-end tests: the real receiver on an ephemeral loopback port, a
//! signed-request builder for hand-made (also deliberately malformed) requests, test files, and
//! the real Docker engine ([`docker`]).

#![allow(dead_code)] // each test binary uses a different subset

pub mod docker;

use std::path::Path;

use deploy_protocol::{Checksum, PackageManifest};

#[allow(unused_imports)] // each test binary uses a different subset
pub use deploy_testkit::receiver::{files_in, spawn_receiver, spawn_receiver_in, Receiver};
#[allow(unused_imports)]
pub use deploy_testkit::signing::{Signer as Signing, KEY_ID, SECRET};

/// Writes `size` bytes of deterministic pseudo-random data (incompressible, fast).
pub fn write_test_file(path: &Path, size: usize, seed: u64) {
    let mut out = Vec::with_capacity(size);
    let mut reader = blake3::Hasher::new_derive_key("deploy e2e test data");
    reader.update(&seed.to_le_bytes());
    let mut xof = reader.finalize_xof();
    let mut block = [0u8; 65536];
    while out.len() < size {
        xof.fill(&mut block);
        let n = block.len().min(size - out.len());
        out.extend_from_slice(&block[..n]);
    }
    std::fs::write(path, out).expect("write test file");
}

/// A manifest for `bytes`.
pub fn manifest_for(bytes: &[u8]) -> PackageManifest {
    PackageManifest {
        package_id: uuid::Uuid::new_v4(),
        package_checksum: Checksum::of(bytes),
        package_size: bytes.len() as u64,
        compression: deploy_protocol::Compression::None,
        image_id: None,
        image_tags: vec![],
        container_name: None,
        created_at: None,
        original_size: None,
        deployment: None,
    }
}

/// Current Unix time.
pub fn now() -> i64 {
    deploy_receiver::auth::unix_now()
}

/// One part of a hand-made multipart body.
pub struct Part {
    pub name: &'static str,
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

impl Part {
    pub fn manifest(bytes: Vec<u8>) -> Self {
        Self {
            name: "manifest",
            content_type: "application/json",
            bytes,
        }
    }
    pub fn package(bytes: Vec<u8>) -> Self {
        Self {
            name: "package",
            content_type: "application/octet-stream",
            bytes,
        }
    }
}

pub const BOUNDARY: &str = "deploy-e2e-boundary-7d1f0c";

/// Encodes parts as multipart/form-data with [`BOUNDARY`].
pub fn multipart_body(parts: &[Part]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{}\"\r\nContent-Type: {}\r\n\r\n",
                part.name, part.content_type
            )
            .as_bytes(),
        );
        body.extend_from_slice(&part.bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// Sends a hand-made multipart upload to `url_path`, signed over `signed_manifest`.
pub async fn send_multipart(
    receiver: &Receiver,
    url_path: &str,
    signing: &Signing,
    signed_manifest: &[u8],
    parts: &[Part],
) -> (u16, serde_json::Value) {
    let mut signing = signing.clone();
    if signing.authority.is_empty() {
        signing.authority = receiver.authority().to_owned();
    }
    let headers = signing.headers(signed_manifest);
    let mut request = reqwest::Client::new()
        .post(format!("{}{url_path}", receiver.url))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(multipart_body(parts));
    for (name, value) in headers.to_pairs() {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let body = response
        .json::<serde_json::Value>()
        .await
        .unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// Sends a signed JSON request.
pub async fn send_json(
    receiver: &Receiver,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let mut signing = Signing::to(receiver.authority(), path);
    signing.method = method.into();
    let headers = signing.headers(body);
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", receiver.url))
        .body(body.to_vec());
    if !body.is_empty() {
        request = request.header("content-type", "application/json");
    }
    for (name, value) in headers.to_pairs() {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// The error code of an error body.
pub fn code(body: &serde_json::Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no code>")
}
