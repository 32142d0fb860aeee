//! What the receiver's Docker tests share beyond the test kit (`deploy-testkit`, which brings the
//! engine, the cleanup guard, images, the receiver in process or as a child process, and signed
//! requests): the receiver's package-directory layout, busybox images by health behaviour, and
//! `docker save` packages.
#![allow(dead_code, unused_imports)] // each test file uses its own part

pub mod docker_proxy;
pub mod v2;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use deploy_protocol::api::DeploymentRecord;
use deploy_protocol::{DeploymentSpec, PortMapping};
use deploy_receiver::Config;
use futures::StreamExt;
use serde_json::Value;

pub use deploy_protocol::envelope::unix_now;
pub use deploy_testkit::api::{http, manifest_for, Api};
pub use deploy_testkit::docker::{docker, Guard};
pub use deploy_testkit::images::ALWAYS_FAILS;
pub use deploy_testkit::receiver::{Daemon, Receiver};
pub use deploy_testkit::signing::{Signer, KEY_ID, SECRET};

/// The prefix of every container and image these tests create.
pub const PREFIX: &str = "deploy-receiver-test";

// ---------------------------------------------------------------------------------------------
// Docker, images and cleanup

/// A cleanup guard with a unique name (`deploy-receiver-test-<uuid>`) for a test's containers
/// and image repository.
pub fn guard() -> Guard {
    Guard::new(PREFIX)
}

/// Ids of containers named exactly one of `names` or set aside as `<name>.…`.
pub async fn containers_named(docker: &Docker, names: &[String]) -> Vec<String> {
    let mut ids = Vec::new();
    for name in names {
        for (id, found) in deploy_testkit::docker::containers_named(docker, name).await {
            if found == *name || found.starts_with(&format!("{name}.")) {
                ids.push(id);
            }
        }
    }
    ids
}

/// How a test image behaves.
pub struct ImageSpec<'a> {
    /// Content of `/www/index.html`.
    pub page: &'a str,
    /// The HEALTHCHECK command, if any.
    pub healthcheck: Option<&'a str>,
}

pub const HEALTHY: &str = r#"["/bin/busybox","wget","-q","-O","/dev/null","http://127.0.0.1:80/"]"#;

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

/// Builds `tag` (removed by `guard`) FROM scratch: busybox httpd serving `page` on port 80.
pub async fn build_image(docker: &Docker, guard: &mut Guard, tag: &str, spec: ImageSpec<'_>) {
    build_image_with(docker, guard, tag, spec, "").await;
}

/// As [`build_image`], with `extra` Dockerfile lines at the end (a later `CMD` replaces httpd's).
pub async fn build_image_with(
    docker: &Docker,
    guard: &mut Guard,
    tag: &str,
    spec: ImageSpec<'_>,
    extra: &str,
) {
    guard.remove_image(tag);
    let mut dockerfile = deploy_testkit::images::httpd_dockerfile_checked_by(spec.healthcheck);
    dockerfile.push_str(extra);
    let files: [(&str, &[u8]); 1] = [("www/index.html", spec.page.as_bytes())];
    deploy_testkit::images::build_image(docker, guard, tag, &dockerfile, &files).await;
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
// The receiver, in process and as the real binary

/// A receiver served in this process on `dir/packages`.
pub async fn start_receiver(dir: &Path) -> Receiver {
    start_receiver_with(dir, |_| {}).await
}

/// As [`start_receiver`], with `configure` adjusting the configuration.
pub async fn start_receiver_with(dir: &Path, configure: impl FnOnce(&mut Config)) -> Receiver {
    deploy_testkit::receiver::spawn_receiver_in(dir.join("packages"), configure).await
}

/// This package's `deploy-receiver` binary as a child process (see [`Daemon::start`]).
pub fn start_daemon(package_dir: &Path, state_dir: &Path, env: &[(&str, String)]) -> Daemon {
    Daemon::start(
        Path::new(env!("CARGO_BIN_EXE_deploy-receiver")),
        package_dir,
        state_dir,
        env,
    )
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
