//! Shared by the receiver's Docker tests: a real receiver on loopback with signed requests, images
//! built `FROM scratch` with the host's static busybox (no registry, no pulls), packages made by
//! `docker save`, and cleanup guards that remove what a test created even when it fails.
#![allow(dead_code)] // each test file uses its own part

pub mod docker_proxy;
pub mod v2;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::container::{ListContainersOptions, RemoveContainerOptions};
use bollard::image::{BuildImageOptions, RemoveImageOptions};
use bollard::Docker;
use deploy_protocol::api::DeploymentRecord;
use deploy_protocol::{
    Checksum, Compression, DeploymentSpec, PackageManifest, PortMapping, SignatureHeaders,
};
use deploy_receiver::{AppState, Config};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use uuid::Uuid;

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";
pub const KEY_ID: &str = "default";

// ---------------------------------------------------------------------------------------------
// Docker, images and cleanup

pub async fn docker() -> Docker {
    let connect = async {
        let docker = Docker::connect_with_defaults().map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
            .await
            .map_err(|_| "no answer within 5 s".to_owned())?
            .map_err(|e| e.to_string())
    };
    match connect.await {
        Ok(docker) => docker,
        Err(e) => panic!(
            "these tests need a running Docker engine (DOCKER_HOST or /var/run/docker.sock), and it is not reachable: {e}"
        ),
    }
}

/// Removes, on drop, every container named `<name>` or `<name>.*` and every listed image.
pub struct Cleanup {
    pub names: Vec<String>,
    pub images: Vec<String>,
}

impl Cleanup {
    pub fn new(name: &str) -> Self {
        Self {
            names: vec![name.to_owned()],
            images: Vec::new(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.names);
        let images = std::mem::take(&mut self.images);
        // Drop may run inside the test's runtime: do the async work on a thread of its own.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                let Ok(docker) = Docker::connect_with_defaults() else {
                    return;
                };
                let Ok(docker) = docker.negotiate_version().await else {
                    return;
                };
                for c in containers_named(&docker, &names).await {
                    let options = RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    };
                    let _ = docker.remove_container(&c, Some(options)).await;
                }
                for image in images {
                    let options = RemoveImageOptions {
                        force: true,
                        noprune: false,
                    };
                    let _ = docker.remove_image(&image, Some(options), None).await;
                }
            });
        });
        let _ = done.join();
    }
}

/// Ids of containers named exactly one of `names` or set aside as `<name>.…`.
pub async fn containers_named(docker: &Docker, names: &[String]) -> Vec<String> {
    let all = docker
        .list_containers(Some(ListContainersOptions::<String> {
            all: true,
            ..Default::default()
        }))
        .await
        .unwrap_or_default();
    all.into_iter()
        .filter(|c| {
            c.names.iter().flatten().any(|n| {
                names
                    .iter()
                    .any(|name| n == &format!("/{name}") || n.starts_with(&format!("/{name}.")))
            })
        })
        .filter_map(|c| c.id)
        .collect()
}

/// How a test image behaves.
pub struct ImageSpec<'a> {
    /// Content of `/www/index.html`.
    pub page: &'a str,
    /// The HEALTHCHECK command, if any.
    pub healthcheck: Option<&'a str>,
}

pub const HEALTHY: &str = r#"["/bin/busybox","wget","-q","-O","/dev/null","http://127.0.0.1:80/"]"#;
pub const ALWAYS_FAILS: &str = r#"["/bin/busybox","false"]"#;

impl<'a> ImageSpec<'a> {
    /// Serves `page`, with a HEALTHCHECK that passes once httpd answers.
    pub fn healthy(page: &'a str) -> Self {
        Self {
            page,
            healthcheck: Some(HEALTHY),
        }
    }

    /// Serves `page`, with a HEALTHCHECK that always fails.
    pub fn failing(page: &'a str) -> Self {
        Self {
            page,
            healthcheck: Some(ALWAYS_FAILS),
        }
    }
}

/// Builds `tag` FROM scratch: busybox httpd serving `page` on port 80.
pub async fn build_image(docker: &Docker, cleanup: &mut Cleanup, tag: &str, spec: ImageSpec<'_>) {
    build_image_with(docker, cleanup, tag, spec, "").await;
}

/// As [`build_image`], with `extra` Dockerfile lines at the end (a later `CMD` replaces httpd's).
pub async fn build_image_with(
    docker: &Docker,
    cleanup: &mut Cleanup,
    tag: &str,
    spec: ImageSpec<'_>,
    extra: &str,
) {
    cleanup.images.push(tag.to_owned());
    let mut dockerfile = String::from("FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\n");
    if let Some(test) = spec.healthcheck {
        dockerfile.push_str(&format!(
            "HEALTHCHECK --interval=1s --timeout=2s --retries=2 CMD {test}\n"
        ));
    }
    dockerfile.push_str(r#"CMD ["/bin/busybox","httpd","-f","-p","80","-h","/www"]"#);
    dockerfile.push('\n');
    dockerfile.push_str(extra);
    let mut context = tar::Builder::new(Vec::new());
    let mut add = |path: &str, bytes: &[u8], mode: u32| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        context
            .append_data(&mut header, path, bytes)
            .expect("tar entry");
    };
    add("Dockerfile", dockerfile.as_bytes(), 0o644);
    add("www/index.html", spec.page.as_bytes(), 0o644);
    let busybox = std::fs::read("/bin/busybox").expect("the static busybox at /bin/busybox");
    add("busybox", &busybox, 0o755);
    let context = context.into_inner().expect("tar");
    let options = BuildImageOptions {
        dockerfile: "Dockerfile".to_owned(),
        t: tag.to_owned(),
        rm: true,
        forcerm: true,
        pull: false,
        ..Default::default()
    };
    let mut stream = docker.build_image(options, None, Some(context.into()));
    while let Some(item) = stream.next().await {
        let info = item.unwrap_or_else(|e| panic!("building {tag}: {e}"));
        if let Some(error) = info.error {
            panic!("building {tag}: {error}");
        }
    }
}

/// `docker save` of `tag`, uncompressed.
pub async fn save_image(docker: &Docker, tag: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stream = docker.export_image(tag);
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("docker save"));
    }
    out
}

pub async fn inspect(docker: &Docker, name: &str) -> bollard::models::ContainerInspectResponse {
    docker
        .inspect_container(name, None)
        .await
        .unwrap_or_else(|e| panic!("inspecting {name}: {e}"))
}

pub async fn image_exists(docker: &Docker, image: &str) -> bool {
    docker.inspect_image(image).await.is_ok()
}

/// The host port Docker published for container port 80.
pub async fn host_port(docker: &Docker, name: &str) -> u16 {
    let ports = inspect(docker, name)
        .await
        .network_settings
        .and_then(|n| n.ports)
        .expect("published ports");
    ports["80/tcp"].as_ref().expect("80/tcp is published")[0]
        .host_port
        .as_deref()
        .expect("host port")
        .parse()
        .expect("numeric port")
}

/// The page the container serves. A container just (re)started may not listen yet: connection
/// errors are retried for a while.
pub async fn page(docker: &Docker, name: &str) -> String {
    let url = format!("http://127.0.0.1:{}/", host_port(docker, name).await);
    let mut last = String::new();
    for _ in 0..100 {
        match http().get(&url).send().await {
            Ok(response) => return response.text().await.expect("page body"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("GET {url}: {last}");
}

// ---------------------------------------------------------------------------------------------
// The receiver and signed requests

/// Signed requests to a receiver at `base` (in process or a child process).
#[derive(Clone)]
pub struct Api {
    pub base: String,
}

/// A receiver served in this process.
pub struct Receiver {
    api: Api,
    pub state: AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl std::ops::Deref for Receiver {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Receiver {
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, |_| {}).await
    }

    pub async fn start_with(dir: &Path, configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::for_dir(dir.join("packages"), SECRET);
        configure(&mut config);
        let state = AppState::new(config).expect("receiver state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(deploy_receiver::serve(listener, state.clone(), async {
            let _ = rx.await;
        }));
        Self {
            api: Api { base },
            state,
            shutdown: Some(tx),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Api {
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
        let headers = SignatureHeaders::sign(
            KEY_ID,
            SECRET.as_bytes(),
            Some(self.base.trim_start_matches("http://")),
            method.as_str(),
            path,
            &Checksum::of(signed),
            unix_now(),
            deploy_protocol::envelope::new_nonce(),
        );
        let mut request = http()
            .request(method, format!("{}{path}", self.base))
            .body(body);
        if !content_type.is_empty() {
            request = request.header("content-type", content_type);
        }
        for (name, value) in headers.to_pairs() {
            request = request.header(name, value);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

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

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, Vec::new(), "", b"").await
    }

    /// `POST /deployment/full` of `package` with `deployment` in its manifest.
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
        let mut body = Vec::new();
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"\r\nContent-Type: application/json\r\n\r\n").as_bytes());
        body.extend_from_slice(manifest);
        body.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"package\"; filename=\"package.tar\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend_from_slice(&package);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let content_type = format!("multipart/form-data; boundary={boundary}");
        self.try_send(Method::POST, path, body, &content_type, manifest)
            .await
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary as a child process

/// A running `deploy-receiver` child process (the binary built by this package), signed with
/// [`SECRET`]; killed (SIGKILL) on drop. Its JSON log lines are kept for failure messages.
pub struct Daemon {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
    api: Api,
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl std::ops::Deref for Daemon {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Daemon {
    /// Starts the binary on `package_dir` and `state_dir` with a clean environment plus `env`
    /// (no `DOCKER_HOST` unless given: the default socket), and waits for it to listen.
    pub fn start(package_dir: &Path, state_dir: &Path, env: &[(&str, String)]) -> Self {
        use std::io::BufRead;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_deploy-receiver"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RECEIVER_BIND", "127.0.0.1:0")
            .env("PACKAGE_DIR", package_dir)
            .env("STATE_DIR", state_dir)
            .env("DEPLOY_HMAC_SECRET", SECRET)
            .env("ALLOWED_NETWORKS", "127.0.0.0/8")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn deploy-receiver");
        let stdout = child.stdout.take().expect("stdout");
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = logs.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            // Keeps draining, so the child never blocks on a full pipe.
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if let Some(addr) = v["fields"]["addr"].as_str() {
                            let _ = tx.send(addr.to_owned());
                            sent = true;
                        }
                    }
                }
                if let Ok(mut logs) = kept.lock() {
                    logs.push(line);
                }
            }
        });
        let addr: std::net::SocketAddr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("deploy-receiver announced its address")
            .parse()
            .expect("addr");
        Self {
            child,
            addr,
            api: Api {
                base: format!("http://{addr}"),
            },
            logs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmHWM")
    }

    /// The log lines written so far whose text contains `needle` (all when empty).
    pub fn logs(&self, needle: &str) -> Vec<String> {
        self.logs
            .lock()
            .map(|l| l.iter().filter(|l| l.contains(needle)).cloned().collect())
            .unwrap_or_default()
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn sigkill(mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("http client")
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

pub fn unique_name() -> String {
    format!("deploy-test-{}", Uuid::new_v4().simple())
}

pub fn web_spec(name: &str) -> DeploymentSpec {
    DeploymentSpec {
        container_name: name.to_owned(),
        ports: vec![PortMapping {
            container_port: 80,
            host_port: None,
            protocol: Default::default(),
            host_ip: Some("127.0.0.1".into()),
        }],
        ..Default::default()
    }
}

pub fn record(value: &Value) -> DeploymentRecord {
    serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("not a deployment record ({e}): {value}"))
}

/// A named change that asks for more than the default policy allows.
pub type Risky = (&'static str, fn(&mut DeploymentSpec));

pub fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn state_dir(dir: &Path) -> PathBuf {
    dir.join("packages").join(".state").join("deployments")
}
