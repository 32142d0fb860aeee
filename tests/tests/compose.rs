//! The shipped service images and `docker-compose.yml`, for real: `deploy/build-images.sh` packages
//! the binaries of this build FROM scratch (no registry), compose starts the receiver and the
//! sender from them (Kafka's image cannot be pulled here, so without it: `--no-deps`, events in
//! the outboxes), a Dockerfile in the build-context volume is packaged by the sender's REST API
//! and deployed through the receiver to a healthy container, and `down -v` removes the stack.
//! Needs Docker and docker-compose (either `docker compose` or Debian's `docker-compose`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::docker::{busybox_context, docker, host_guard, httpd_dockerfile, published_port};
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `target/<profile>`, where this test binary and the workspace's binaries are built.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    text
}

/// The binaries of this build: built by the workspace's test run, or here when only this crate's
/// tests were built.
fn service_binaries() -> PathBuf {
    let dir = profile_dir();
    let target = dir.parent().expect("target dir");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(repo_root())
        .args([
            "build",
            "--bins",
            "-p",
            "deploy-receiver",
            "-p",
            "deploy-sender",
        ])
        .arg("--target-dir")
        .arg(target);
    if dir.file_name().is_some_and(|p| p == "release") {
        build.arg("--release");
    }
    run(&mut build);
    dir
}

/// `docker compose` or Debian's `docker-compose`.
fn compose() -> Command {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut command = if plugin {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new("docker-compose")
    };
    command.current_dir(repo_root());
    command
}

/// Removes the compose project (containers, network, volumes) and the service images it ran.
struct Stack {
    project: String,
    env: Vec<(&'static str, String)>,
    images: Vec<String>,
}

impl Stack {
    fn compose(&self, args: &[&str]) -> String {
        let mut command = compose();
        command
            .args(["-f", "docker-compose.yml", "-p", &self.project])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        run(&mut command)
    }

    fn container(&self, service: &str) -> String {
        self.compose(&["ps", "-q", service]).trim().to_owned()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let mut down = compose();
        let _ = down
            .args(["-f", "docker-compose.yml", "-p", &self.project])
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output();
        for image in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", image]).output();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn wait_healthy(docker: &bollard::Docker, container: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let inspect = docker
            .inspect_container(container, None)
            .await
            .expect("inspect");
        let health = inspect
            .state
            .and_then(|s| s.health)
            .and_then(|h| h.status)
            .map(|s| s.to_string())
            .unwrap_or_default();
        if health == "healthy" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{container} is not healthy after 90 s: {health}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_stack_from_the_shipped_images_deploys_a_dockerfile_and_comes_down() {
    let docker = docker().await;
    let app = host_guard();
    let tag = app.name.trim_start_matches("deploy-e2e-").to_owned();
    let bin_dir = service_binaries();

    // A build context where the compose file mounts them, readable by the sender's user.
    let contexts = tempfile::tempdir().expect("tempdir");
    let source = busybox_context(&app, &httpd_dockerfile(80), "served by the compose stack");
    let app_dir = contexts.path().join("app");
    std::fs::create_dir(&app_dir).expect("app dir");
    for entry in ["Dockerfile", "busybox", "www"] {
        run(Command::new("cp")
            .arg("-r")
            .arg(source.path().join(entry))
            .arg(&app_dir));
    }
    run(Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(contexts.path()));
    std::fs::set_permissions(contexts.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");

    let socket_gid = std::fs::metadata("/var/run/docker.sock")
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .expect("the Docker socket");
    let (receiver_port, sender_port) = (free_port(), free_port());
    let token = format!("token-{}", uuid::Uuid::new_v4().simple());
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let stack = Stack {
        project: app.name.clone(),
        env: vec![
            ("DEPLOY_TAG", tag.clone()),
            ("DEPLOY_HMAC_SECRET", secret),
            ("SENDER_API_TOKEN", token.clone()),
            ("DOCKER_GID", socket_gid.to_string()),
            ("KAFKA_BOOTSTRAP_SERVERS", String::new()),
            ("RECEIVER_PUBLISH", format!("127.0.0.1:{receiver_port}")),
            ("SENDER_PUBLISH", format!("127.0.0.1:{sender_port}")),
            ("BUILD_CONTEXTS", contexts.path().display().to_string()),
        ],
        images: vec![
            format!("deploy-receiver:{tag}"),
            format!("deploy-sender:{tag}"),
        ],
    };

    // The images, from this build's binaries (dynamically linked: they carry their libraries).
    run(Command::new(repo_root().join("deploy/build-images.sh"))
        .env("BIN_DIR", &bin_dir)
        .env("SKIP_CARGO", "1")
        .env("TAG", &tag)
        .env("LATEST", "0"));

    stack.compose(&["up", "-d", "--no-deps", "--no-build", "receiver", "sender"]);

    // The receiver's HEALTHCHECK (`--probe`) passes, and both answer on their published ports.
    wait_healthy(&docker, &stack.container("receiver")).await;
    let http = reqwest::Client::new();
    let receiver: Value = http
        .get(format!("http://127.0.0.1:{receiver_port}/health"))
        .send()
        .await
        .expect("receiver /health")
        .json()
        .await
        .expect("json");
    assert_eq!(receiver["service"], "deploy-receiver", "{receiver}");
    assert_eq!(receiver["docker_available"], true, "{receiver}");
    let sender_url = format!("http://127.0.0.1:{sender_port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let sender: Value = loop {
        match http.get(format!("{sender_url}/health")).send().await {
            Ok(r) => break r.json().await.expect("json"),
            Err(e) => assert!(Instant::now() < deadline, "sender /health: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(sender["docker_available"], true, "{sender}");

    // Package the Dockerfile from the contexts volume, then deploy it through the receiver.
    let image = app.image("v1");
    let packaged: Value = http
        .post(format!("{sender_url}/api/v1/packages"))
        .bearer_auth(&token)
        .json(&json!({"build_context": "/contexts/app", "image_tag": image, "container_name": app.name}))
        .send()
        .await
        .expect("POST /api/v1/packages")
        .json()
        .await
        .expect("json");
    let package_id = packaged["package_id"]
        .as_str()
        .unwrap_or_else(|| panic!("packaged: {packaged}"));
    let transfer = http
        .post(format!("{sender_url}/api/v1/transfers"))
        .bearer_auth(&token)
        .json(&json!({
            "package_id": package_id,
            "deployment": {
                "container_name": app.name,
                "ports": [{"container_port": 80, "host_ip": "127.0.0.1"}]
            }
        }))
        .send()
        .await
        .expect("POST /api/v1/transfers");
    let status = transfer.status();
    let report: Value = transfer.json().await.expect("json");
    assert_eq!(status, 200, "{report}");

    let port = published_port(&docker, &app.name).await;
    let page = http
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .expect("the deployed container answers")
        .text()
        .await
        .expect("text");
    assert_eq!(page, "served by the compose stack");

    stack.compose(&["down", "-v", "-t", "5"]);
    assert_eq!(stack.compose(&["ps", "-q"]).trim(), "", "the stack is gone");
}
