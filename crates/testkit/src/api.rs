//! Signed requests to a receiver (in process or a child process), parsed as `(status, JSON)`:
//! the receiver's own tests speak the protocol with these, below the sender's client.

use std::time::Duration;

use deploy_protocol::{Checksum, Compression, DeploymentSpec, PackageManifest};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use uuid::Uuid;

use crate::signing::Signer;

/// Signed requests to the receiver at `base` (`http://<addr>`), with the test key.
#[derive(Debug, Clone)]
pub struct Api {
    /// `http://<addr>`.
    pub base: String,
}

impl Api {
    /// A signed request; `signed` is the signed content (the JSON body, or a multipart body's
    /// manifest part). Panics when the exchange fails.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
        signed: &[u8],
    ) -> (StatusCode, Value) {
        self.try_send(method, path, body, content_type, signed)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// As [`Api::send`], with a failed exchange (a receiver killed mid-request) as an error.
    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
        signed: &[u8],
    ) -> reqwest::Result<(StatusCode, Value)> {
        let mut request = Signer::new(method.as_str(), path)
            .request(&http(), &self.base, signed)
            .body(body);
        if !content_type.is_empty() {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// A signed `POST path` of `body` as JSON.
    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let bytes = serde_json::to_vec(body).expect("json");
        self.send(
            Method::POST,
            path,
            bytes.clone(),
            "application/json",
            &bytes,
        )
        .await
    }

    /// A signed `GET path`.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, Vec::new(), "", b"").await
    }

    /// `POST /deployment/full` of `package` (uncompressed) tagged `tags`, with `deployment` in
    /// its manifest.
    pub async fn full(
        &self,
        tags: &[&str],
        package: Vec<u8>,
        deployment: &DeploymentSpec,
    ) -> (StatusCode, Value) {
        self.try_full(tags, package, deployment)
            .await
            .unwrap_or_else(|e| panic!("/deployment/full: {e}"))
    }

    /// As [`Api::full`], with a failed exchange as an error.
    pub async fn try_full(
        &self,
        tags: &[&str],
        package: Vec<u8>,
        deployment: &DeploymentSpec,
    ) -> reqwest::Result<(StatusCode, Value)> {
        let mut manifest = manifest_for(&package);
        manifest.image_tags = tags.iter().map(|t| (*t).to_owned()).collect();
        manifest.container_name = Some(deployment.container_name.clone());
        manifest.deployment = Some(deployment.clone());
        self.try_multipart("/deployment/full", &manifest.to_bytes(), package)
            .await
    }

    /// `POST /deployment/upload` of `package` (uncompressed) with a fresh package id.
    pub async fn upload(&self, package: Vec<u8>) -> (StatusCode, Value) {
        let manifest = manifest_for(&package).to_bytes();
        self.multipart("/deployment/upload", &manifest, package)
            .await
    }

    /// A signed multipart request: parts `manifest` (the signed content) then `package`.
    pub async fn multipart(
        &self,
        path: &str,
        manifest: &[u8],
        package: Vec<u8>,
    ) -> (StatusCode, Value) {
        self.try_multipart(path, manifest, package)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// As [`Api::multipart`], with a failed exchange as an error.
    pub async fn try_multipart(
        &self,
        path: &str,
        manifest: &[u8],
        package: Vec<u8>,
    ) -> reqwest::Result<(StatusCode, Value)> {
        let boundary = format!("deploy-test-{}", Uuid::new_v4().simple());
        let mut body = Vec::with_capacity(package.len() + manifest.len() + 512);
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\
                 Content-Type: application/json\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(manifest);
        body.extend_from_slice(
            format!(
                "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"package\"; \
                 filename=\"package.tar\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(&package);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let content_type = format!("multipart/form-data; boundary={boundary}");
        self.try_send(Method::POST, path, body, &content_type, manifest)
            .await
    }
}

/// The manifest of an uncompressed `package` with a fresh id.
pub fn manifest_for(package: &[u8]) -> PackageManifest {
    PackageManifest {
        package_id: Uuid::new_v4(),
        package_checksum: Checksum::of(package),
        package_size: package.len() as u64,
        compression: Compression::None,
        image_id: None,
        image_tags: Vec::new(),
        container_name: None,
        created_at: None,
        original_size: None,
        deployment: None,
    }
}

/// An HTTP client for tests: no proxy (loopback only), a generous timeout.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("http client")
}
