//! Protocol v2 from the client side, for tests: releases split from a real `docker save`
//! (layers compressed into blobs), and a signed raw client of the v2 endpoints built from
//! `deploy-protocol` alone.

use std::collections::HashMap;
use std::io::Read;

use deploy_protocol::release::{paths, BLOB_CONTENT_TYPE, UPLOAD_OFFSET};
use deploy_protocol::{
    BlobRef, Checksum, Compression, DeploymentSpec, LayerEntry, ReleaseManifest, Sha256Digest,
    SignatureHeaders,
};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use super::{http, unix_now, KEY_ID, SECRET};

/// A release and the blob bytes of its layers.
#[derive(Clone)]
pub struct Built {
    pub manifest: ReleaseManifest,
    pub blobs: HashMap<Checksum, Vec<u8>>,
}

impl Built {
    /// The blob of layer `i`.
    pub fn blob(&self, i: usize) -> (Checksum, &[u8]) {
        let b = self.manifest.layers[i].blob.blake3;
        (b, &self.blobs[&b])
    }
}

/// Compresses `data` as `compression` says.
pub async fn compress(data: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => data.to_vec(),
        Compression::Zstd => {
            let mut e = async_compression::tokio::write::ZstdEncoder::new(Vec::new());
            e.write_all(data).await.expect("zstd");
            e.shutdown().await.expect("zstd");
            e.into_inner()
        }
        Compression::Gzip => {
            let mut e = async_compression::tokio::write::GzipEncoder::new(Vec::new());
            e.write_all(data).await.expect("gzip");
            e.shutdown().await.expect("gzip");
            e.into_inner()
        }
    }
}

/// Splits a `docker save` archive into a release: config verbatim, each layer compressed.
pub async fn split(
    save: &[u8],
    compression: Compression,
    tags: &[&str],
    deployment: Option<DeploymentSpec>,
) -> Built {
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut archive = tar::Archive::new(save);
    for entry in archive.entries().expect("tar") {
        let mut entry = entry.expect("entry");
        if entry.header().entry_type().is_file() {
            let path = entry.path().expect("path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read");
            files.insert(path, data);
        }
    }
    let manifest: Value = serde_json::from_slice(&files["manifest.json"]).expect("manifest.json");
    let config = files[manifest[0]["Config"].as_str().expect("Config")].clone();
    let tars: Vec<&[u8]> = manifest[0]["Layers"]
        .as_array()
        .expect("Layers")
        .iter()
        .map(|path| files[path.as_str().expect("layer path")].as_slice())
        .collect();
    let mut built = release_of(config, &tars, compression, tags).await;
    built.manifest.created_at = Some("2026-11-29T12:00:00Z".into());
    built.manifest.deployment = deployment;
    built
}

/// A release of `config` and these layer tars, each compressed into its blob.
async fn release_of(
    config: Vec<u8>,
    tars: &[&[u8]],
    compression: Compression,
    tags: &[&str],
) -> Built {
    let mut layers = Vec::new();
    let mut blobs = HashMap::new();
    for tar in tars {
        let blob = compress(tar, compression).await;
        let blake3 = Checksum::of(&blob);
        layers.push(LayerEntry {
            diff_id: Sha256Digest::of(tar),
            blob: BlobRef {
                blake3,
                size: blob.len() as u64,
                compression,
            },
            uncompressed_size: Some(tar.len() as u64),
        });
        blobs.insert(blake3, blob);
    }
    Built {
        manifest: ReleaseManifest {
            release_id: Uuid::new_v4(),
            image_id: Sha256Digest::of(&config),
            config,
            layers,
            image_tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            created_at: None,
            deployment: None,
        },
        blobs,
    }
}

/// A response: status, `Upload-Offset` if any, JSON (or text) body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub offset: Option<u64>,
    pub length: Option<u64>,
    pub body: Value,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// Signed v2 requests to a receiver at `base`.
#[derive(Clone)]
pub struct V2 {
    pub base: String,
}

impl V2 {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
        }
    }

    /// A signed request whose content digest is `digest`.
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        digest: Checksum,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> reqwest::Result<Answer> {
        let signature = SignatureHeaders::sign(
            KEY_ID,
            SECRET.as_bytes(),
            Some(self.base.trim_start_matches("http://")),
            method.as_str(),
            path,
            &digest,
            unix_now(),
            deploy_protocol::envelope::new_nonce(),
        );
        let mut request = http()
            .request(method, format!("{}{path}", self.base))
            .body(body);
        for (name, value) in signature.to_pairs().into_iter() {
            request = request.header(name, value);
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        };
        let (status, offset, length) = (
            response.status(),
            header(UPLOAD_OFFSET),
            header(deploy_protocol::release::UPLOAD_LENGTH),
        );
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Answer {
            status,
            offset,
            length,
            body,
        })
    }

    pub async fn json(&self, method: Method, path: &str, body: &Value) -> Answer {
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).expect("json")
        };
        self.try_request(
            method,
            path,
            Checksum::of(&bytes),
            bytes,
            &[("content-type", "application/json".into())],
        )
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    pub async fn inventory(&self, chain_ids: &[Sha256Digest]) -> Answer {
        self.json(
            Method::POST,
            paths::INVENTORY,
            &serde_json::json!({"chain_ids": chain_ids}),
        )
        .await
    }

    pub async fn register(&self, manifest: &ReleaseManifest) -> Answer {
        let bytes = manifest.to_bytes();
        self.try_request(
            Method::POST,
            paths::RELEASES,
            Checksum::of(&bytes),
            bytes,
            &[("content-type", "application/json".into())],
        )
        .await
        .expect("register")
    }

    pub async fn status(&self, id: Uuid) -> Answer {
        self.json(Method::GET, &paths::release(id), &Value::Null)
            .await
    }

    pub async fn head(&self, blake3: &Checksum) -> Answer {
        self.try_request(
            Method::HEAD,
            &paths::blob(blake3),
            Checksum::empty(),
            Vec::new(),
            &[],
        )
        .await
        .expect("HEAD")
    }

    pub async fn try_patch(
        &self,
        blake3: &Checksum,
        offset: u64,
        bytes: Vec<u8>,
    ) -> reqwest::Result<Answer> {
        self.try_request(
            Method::PATCH,
            &paths::blob(blake3),
            *blake3,
            bytes,
            &[
                (UPLOAD_OFFSET, offset.to_string()),
                ("content-type", BLOB_CONTENT_TYPE.into()),
            ],
        )
        .await
    }

    pub async fn patch(&self, blake3: &Checksum, offset: u64, bytes: &[u8]) -> Answer {
        self.try_patch(blake3, offset, bytes.to_vec())
            .await
            .unwrap_or_else(|e| panic!("PATCH {blake3}: {e}"))
    }

    pub async fn load(&self, id: Uuid) -> Answer {
        self.json(Method::POST, &paths::release_load(id), &Value::Null)
            .await
    }

    /// `load` with `?await_blobs=true`: blobs not complete yet are read as they arrive.
    pub async fn load_awaiting(&self, id: Uuid) -> Answer {
        let path = format!("{}?await_blobs=true", paths::release_load(id));
        self.json(Method::POST, &path, &Value::Null).await
    }

    pub async fn deploy(&self, id: Uuid) -> Answer {
        self.json(Method::POST, &paths::release_deploy(id), &Value::Null)
            .await
    }

    /// Registers `built` and sends every blob the answer says is partial or missing, from its
    /// offset; returns the bytes sent and the status answer.
    pub async fn send_release(&self, built: &Built) -> (u64, Value) {
        let answer = self.register(&built.manifest).await;
        assert!(
            answer.status.is_success(),
            "register: {} {}",
            answer.status,
            answer.body
        );
        let status: deploy_protocol::ReleaseStatus =
            serde_json::from_value(answer.body.clone()).expect("ReleaseStatus");
        let mut sent = 0;
        for layer in status.blobs_to_send() {
            let bytes = &built.blobs[&layer.blake3][layer.offset as usize..];
            let done = self.patch(&layer.blake3, layer.offset, bytes).await;
            assert_eq!(done.status, StatusCode::NO_CONTENT, "PATCH: {}", done.body);
            assert_eq!(done.offset, Some(layer.size));
            sent += bytes.len() as u64;
        }
        (sent, answer.body)
    }
}

/// A layer tar holding one file `name` of `size` pseudo-random (incompressible) bytes.
pub fn layer_tar(name: &str, size: usize, seed: u8) -> Vec<u8> {
    let mut data = vec![0u8; size];
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[seed]);
    hasher.update(name.as_bytes());
    hasher.finalize_xof().fill(&mut data);
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    builder
        .append_data(&mut header, name, &data[..])
        .expect("tar entry");
    builder.into_inner().expect("tar")
}

/// An image config over these layer tars.
pub fn config_for(tars: &[&[u8]]) -> Vec<u8> {
    let diff_ids: Vec<Sha256Digest> = tars.iter().map(|t| Sha256Digest::of(t)).collect();
    let history: Vec<Value> = tars
        .iter()
        .map(|_| serde_json::json!({"created": "2026-11-29T12:00:00Z", "created_by": "layers-rx test"}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2026-11-29T12:00:00Z",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }))
    .expect("config")
}

/// A release of an image made of these layer tars (not built by Docker: layers no engine holds).
pub async fn synthetic(tars: &[Vec<u8>], compression: Compression, tags: &[&str]) -> Built {
    let tars: Vec<&[u8]> = tars.iter().map(Vec::as_slice).collect();
    release_of(config_for(&tars), &tars, compression, tags).await
}

/// Builds `tag` on `docker` from `dockerfile` and a context of `files` (path, bytes, mode).
pub async fn build(
    docker: &bollard::Docker,
    tag: &str,
    dockerfile: &str,
    files: &[(&str, Vec<u8>, u32)],
) {
    let mut context = tar::Builder::new(Vec::new());
    let mut add = |path: &str, bytes: &[u8], mode: u32| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_cksum();
        context
            .append_data(&mut header, path, bytes)
            .expect("tar entry");
    };
    add("Dockerfile", dockerfile.as_bytes(), 0o644);
    for (path, bytes, mode) in files {
        add(path, bytes, *mode);
    }
    let context = context.into_inner().expect("tar");
    deploy_testkit::images::run_build(docker, tag, context).await;
}

/// A raw signed `PATCH` over TCP that sends the head (declaring `declared` body bytes) and
/// `part` of the body, then `hold`s the connection open or closes it at once.
pub async fn patch_cut(
    addr: std::net::SocketAddr,
    blake3: &Checksum,
    offset: u64,
    declared: usize,
    part: &[u8],
) -> tokio::net::TcpStream {
    let path = paths::blob(blake3);
    let signature = SignatureHeaders::sign(
        KEY_ID,
        SECRET.as_bytes(),
        Some(&addr.to_string()),
        "PATCH",
        &path,
        blake3,
        unix_now(),
        deploy_protocol::envelope::new_nonce(),
    );
    let mut head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {BLOB_CONTENT_TYPE}\r\nContent-Length: {declared}\r\n{UPLOAD_OFFSET}: {offset}\r\n"
    );
    for (name, value) in signature.to_pairs() {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(part).await.expect("part");
    stream.flush().await.expect("flush");
    stream
}

/// Polls `HEAD` until the blob's offset is `want` (the writer of a cut request has finished).
pub async fn wait_offset(v2: &V2, blake3: &Checksum, want: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let answer = v2.head(blake3).await;
        if answer.offset == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "offset of {blake3} stays {:?}, expected {want}",
            answer.offset
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The blob's offset once it stops moving (the writer of a cut request has finished; a request
/// whose connection went before the receiver read its body leaves the offset where it was).
pub async fn settled_offset(v2: &V2, blake3: &Checksum) -> u64 {
    let mut last = None;
    let mut same = 0;
    loop {
        let offset = v2.head(blake3).await.offset.expect("Upload-Offset");
        if last == Some(offset) {
            same += 1;
            if same == 5 {
                return offset;
            }
        } else {
            same = 0;
        }
        last = Some(offset);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
