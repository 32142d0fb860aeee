//! Shared harness for the end-to-end tests: the real receiver on an ephemeral loopback port, a
//! signed-request builder for hand-made (also deliberately malformed) requests, test files, and
//! the real Docker engine ([`docker`]).

#![allow(dead_code)] // each test binary uses a different subset

pub mod docker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use deploy_protocol::{Checksum, PackageManifest, SignatureHeaders};
use deploy_receiver::{AppState, Config};
use tokio::sync::oneshot;

/// The shared secret of test receivers.
pub const SECRET: &str = "e2e-test-secret-0123456789abcdef0123456789";
/// Its key id.
pub const KEY_ID: &str = "default";

/// A receiver serving on 127.0.0.1:<ephemeral> until dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    pub url: String,
    pub package_dir: PathBuf,
    pub state: AppState,
    _dir: Option<tempfile::TempDir>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Starts a receiver with a fresh package directory; `tune` adjusts the configuration.
pub async fn spawn_receiver(tune: impl FnOnce(&mut Config)) -> Receiver {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut receiver = spawn_receiver_in(dir.path().join("packages"), tune).await;
    receiver._dir = Some(dir);
    receiver
}

/// Starts a receiver on an existing package directory (to test restarts).
pub async fn spawn_receiver_in(package_dir: PathBuf, tune: impl FnOnce(&mut Config)) -> Receiver {
    let mut config = Config::for_dir(&package_dir, SECRET);
    tune(&mut config);
    let state = AppState::new(config).expect("receiver state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(deploy_receiver::serve(listener, state.clone(), async {
        let _ = rx.await;
    }));
    Receiver {
        addr,
        url: format!("http://{addr}"),
        package_dir: state.store().dir().to_path_buf(),
        state,
        _dir: None,
        shutdown: Some(tx),
        task: Some(task),
    }
}

impl Receiver {
    /// The authority requests to it are signed for (`127.0.0.1:<port>`).
    pub fn authority(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Stops serving and waits for the server task.
    pub async fn stop(mut self) {
        self.stop_in_place().await;
    }

    /// As [`Receiver::stop`], keeping the value (its directory stays until it is dropped).
    pub async fn stop_in_place(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Regular files in the package directory (the `.state` directory is not counted).
    pub fn files(&self) -> Vec<String> {
        files_in(&self.package_dir)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Names of regular files directly in `dir`.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

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

/// How to sign a hand-made request; every field can be bent to test a refusal.
#[derive(Clone)]
pub struct Signing {
    /// The authority signed (`host:port`); [`send_multipart`] and [`send_json`] fill in the
    /// receiver's when it is empty.
    pub authority: String,
    pub key_id: String,
    pub secret: Vec<u8>,
    pub method: String,
    pub path: String,
    pub timestamp: i64,
    pub nonce: String,
}

impl Signing {
    /// Correct signing for `path`.
    pub fn new(path: &str) -> Self {
        Self {
            authority: String::new(),
            key_id: KEY_ID.into(),
            secret: SECRET.as_bytes().to_vec(),
            method: "POST".into(),
            path: path.into(),
            timestamp: now(),
            nonce: deploy_protocol::envelope::new_nonce(),
        }
    }

    /// Correct signing for `path` on `receiver`.
    pub fn to(receiver: &Receiver, path: &str) -> Self {
        Self {
            authority: receiver.authority().to_owned(),
            ..Self::new(path)
        }
    }

    /// The headers for `content` (the manifest bytes or JSON body).
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
    let mut signing = Signing::to(receiver, path);
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
