//! Deployment against the real Docker engine: a real receiver on loopback, signed requests, images
//! built `FROM scratch` with the host's static busybox (no registry, no pulls), packages made by
//! `docker save`. Every test removes the containers and images it created, also when it fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::container::{
    Config as ContainerConfig, CreateContainerOptions, ListContainersOptions,
    RemoveContainerOptions, RenameContainerOptions, StopContainerOptions,
};
use bollard::image::{BuildImageOptions, RemoveImageOptions};
use bollard::Docker;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use deploy_protocol::{
    Checksum, Compression, DeploymentSpec, HealthCheckKind, PackageManifest, PortMapping,
    SignatureHeaders,
};
use deploy_receiver::{AppState, Config};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

const SECRET: &str = "test-secret-0123456789abcdef0123456789";
const KEY_ID: &str = "default";

// ---------------------------------------------------------------------------------------------
// Docker, images and cleanup

async fn docker() -> Docker {
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
struct Cleanup {
    names: Vec<String>,
    images: Vec<String>,
}

impl Cleanup {
    fn new(name: &str) -> Self {
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
async fn containers_named(docker: &Docker, names: &[String]) -> Vec<String> {
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
struct ImageSpec<'a> {
    /// Content of `/www/index.html`.
    page: &'a str,
    /// The HEALTHCHECK command, if any.
    healthcheck: Option<&'a str>,
}

const HEALTHY: &str = r#"["/bin/busybox","wget","-q","-O","/dev/null","http://127.0.0.1:80/"]"#;
const ALWAYS_FAILS: &str = r#"["/bin/busybox","false"]"#;

/// Builds `tag` FROM scratch: busybox httpd serving `page` on port 80.
async fn build_image(docker: &Docker, cleanup: &mut Cleanup, tag: &str, spec: ImageSpec<'_>) {
    cleanup.images.push(tag.to_owned());
    let mut dockerfile = String::from("FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\n");
    if let Some(test) = spec.healthcheck {
        dockerfile.push_str(&format!(
            "HEALTHCHECK --interval=1s --timeout=2s --retries=2 CMD {test}\n"
        ));
    }
    dockerfile.push_str(r#"CMD ["/bin/busybox","httpd","-f","-p","80","-h","/www"]"#);
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
async fn save_image(docker: &Docker, tag: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stream = docker.export_image(tag);
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("docker save"));
    }
    out
}

async fn inspect(docker: &Docker, name: &str) -> bollard::models::ContainerInspectResponse {
    docker
        .inspect_container(name, None)
        .await
        .unwrap_or_else(|e| panic!("inspecting {name}: {e}"))
}

async fn image_exists(docker: &Docker, image: &str) -> bool {
    docker.inspect_image(image).await.is_ok()
}

/// The host port Docker published for container port 80.
async fn host_port(docker: &Docker, name: &str) -> u16 {
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
async fn page(docker: &Docker, name: &str) -> String {
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

struct Receiver {
    base: String,
    state: AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Receiver {
    async fn start(dir: &Path) -> Self {
        Self::start_with(dir, |_| {}).await
    }

    async fn start_with(dir: &Path, configure: impl FnOnce(&mut Config)) -> Self {
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
            base,
            state,
            shutdown: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
        signed: &[u8],
    ) -> (StatusCode, Value) {
        let headers = SignatureHeaders::sign(
            KEY_ID,
            SECRET.as_bytes(),
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
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = response.status();
        let text = response.text().await.expect("response body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
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

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, Vec::new(), "", b"").await
    }

    /// `POST /deployment/full` of `package` with `deployment` in its manifest.
    async fn full(
        &self,
        tags: &[&str],
        package: Vec<u8>,
        deployment: &DeploymentSpec,
    ) -> (StatusCode, Value) {
        let manifest = PackageManifest {
            package_id: Uuid::new_v4(),
            package_checksum: Checksum::of(&package),
            package_size: package.len() as u64,
            compression: Compression::None,
            image_id: None,
            image_tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            container_name: Some(deployment.container_name.clone()),
            created_at: None,
            original_size: None,
            deployment: Some(deployment.clone()),
        }
        .to_bytes();
        let boundary = format!("deploy-test-{}", Uuid::new_v4().simple());
        let mut body = Vec::new();
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"\r\nContent-Type: application/json\r\n\r\n").as_bytes());
        body.extend_from_slice(&manifest);
        body.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"package\"; filename=\"package.tar\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend_from_slice(&package);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let content_type = format!("multipart/form-data; boundary={boundary}");
        self.send(
            Method::POST,
            "/deployment/full",
            body,
            &content_type,
            &manifest,
        )
        .await
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("http client")
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn unique_name() -> String {
    format!("deploy-test-{}", Uuid::new_v4().simple())
}

fn web_spec(name: &str) -> DeploymentSpec {
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

fn record(value: &Value) -> DeploymentRecord {
    serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("not a deployment record ({e}): {value}"))
}

/// A named change that asks for more than the default policy allows.
type Risky = (&'static str, fn(&mut DeploymentSpec));

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn state_dir(dir: &Path) -> PathBuf {
    dir.join("packages").join(".state").join("deployments")
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_deploys_v1_replaces_it_with_v2_and_rolls_a_failing_v3_back_to_v2() {
    let docker = docker().await;
    let name = unique_name();
    let mut cleanup = Cleanup::new(&name);
    let (v1, v2, v3) = (
        format!("{name}:v1"),
        format!("{name}:v2"),
        format!("{name}:v3"),
    );
    build_image(
        &docker,
        &mut cleanup,
        &v1,
        ImageSpec {
            page: "v1",
            healthcheck: Some(HEALTHY),
        },
    )
    .await;
    build_image(
        &docker,
        &mut cleanup,
        &v2,
        ImageSpec {
            page: "v2",
            healthcheck: Some(HEALTHY),
        },
    )
    .await;
    build_image(
        &docker,
        &mut cleanup,
        &v3,
        ImageSpec {
            page: "v3",
            healthcheck: Some(ALWAYS_FAILS),
        },
    )
    .await;
    let dir = temp_dir();
    let receiver = Receiver::start(dir.path()).await;
    let spec = web_spec(&name);

    // v1: a new container, healthy by the image's HEALTHCHECK.
    let (status, body) = receiver
        .full(&[&v1], save_image(&docker, &v1).await, &spec)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = record(&body);
    assert_eq!(first.status, DeploymentStatus::Succeeded);
    assert_eq!(
        first.image, v1,
        "the image defaults to the manifest's first tag"
    );
    let stages: Vec<_> = first
        .stages
        .iter()
        .map(|s| serde_json::to_value(s.stage).expect("stage"))
        .collect();
    assert_eq!(
        stages,
        [
            json!("upload"),
            json!("verify"),
            json!("load"),
            json!("start"),
            json!("health"),
            json!("cleanup")
        ]
    );
    assert_eq!(page(&docker, &name).await, "v1");
    let v1_container = inspect(&docker, &name).await;
    let labels = v1_container
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .expect("labels");
    assert_eq!(labels["io.deploy.managed"], "true");
    assert_eq!(
        labels["io.deploy.deployment_id"],
        first.deployment_id.to_string()
    );
    assert_eq!(
        labels.get("io.deploy.package_id").map(String::as_str),
        first.package_id.map(|p| p.to_string()).as_deref()
    );
    assert!(labels.contains_key("io.deploy.package_checksum"));

    // The running container is healthy for /deployment/health-check too.
    let (status, body) = receiver
        .post(
            "/deployment/health-check",
            &json!({"container_name": name, "health_check": {"deadline_secs": 30}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["healthy"].clone(), body["kind"].clone()),
        (json!(true), json!("docker"))
    );

    // v2 replaces v1: one container, serving v2; v1's image is kept for rollback.
    let (status, body) = receiver
        .full(&[&v2], save_image(&docker, &v2).await, &spec)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = record(&body);
    assert_eq!(second.previous_container_id, v1_container.id);
    assert_eq!(page(&docker, &name).await, "v2");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name))
            .await
            .len(),
        1
    );
    assert!(
        docker
            .inspect_container(v1_container.id.as_deref().expect("id"), None)
            .await
            .is_err(),
        "the v1 container is gone"
    );
    assert!(image_exists(&docker, &v1).await, "the v1 image is kept");
    let v2_id = inspect(&docker, &name).await.id;

    // v3 never becomes healthy: rolled back to v2.
    let (status, body) = receiver
        .full(&[&v3], save_image(&docker, &v3).await, &spec)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let third = record(&body);
    assert_eq!(third.status, DeploymentStatus::RolledBack, "{body}");
    let error = third.error.clone().expect("error");
    assert_eq!(
        serde_json::to_value(error.code).expect("code"),
        json!("HEALTH_CHECK_FAILED")
    );
    assert!(
        error.message.contains("exit code 1"),
        "the last health output is reported: {}",
        error.message
    );
    assert_eq!(inspect(&docker, &name).await.id, v2_id, "v2 runs again");
    assert_eq!(page(&docker, &name).await, "v2");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name))
            .await
            .len(),
        1,
        "exactly one container"
    );

    // The journal answers, newest first, and survives a restart.
    let (status, body) = receiver.get("/deployments?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<_> = body["deployments"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["deployment_id"].clone())
        .collect();
    assert_eq!(
        ids,
        [json!(third.deployment_id), json!(second.deployment_id)]
    );
    receiver.stop().await;
    let receiver = Receiver::start(dir.path()).await;
    for expected in [&first, &second, &third] {
        let (status, body) = receiver
            .get(&format!("/deployments/{}", expected.deployment_id))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(&record(&body), expected);
    }
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_runs_a_loaded_image_with_an_http_check_and_refuses_risky_specs_without_change() {
    let docker = docker().await;
    let name = unique_name();
    let mut cleanup = Cleanup::new(&name);
    let tag = format!("{name}:plain");
    build_image(
        &docker,
        &mut cleanup,
        &tag,
        ImageSpec {
            page: "plain",
            healthcheck: None,
        },
    )
    .await;
    let dir = temp_dir();
    let receiver = Receiver::start(dir.path()).await;

    let mut spec = web_spec(&name);
    spec.image = Some(tag.clone());
    spec.health_check.kind = HealthCheckKind::Http;
    spec.health_check.path = Some("/index.html".into());
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": spec}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let deployed = record(&body);
    assert_eq!(deployed.status, DeploymentStatus::Succeeded);
    assert!(
        deployed.stages.iter().any(|s| s
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("http check"))),
        "{body}"
    );
    assert_eq!(page(&docker, &name).await, "plain");
    let running = inspect(&docker, &name).await.id;

    let (status, body) = receiver
        .post(
            "/deployment/health-check",
            &json!({"container_name": name, "health_check": {"kind": "http", "path": "/"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["kind"], json!("http"));

    let risky: [Risky; 3] = [
        ("privileged", |s| s.privileged = true),
        ("binds", |s| s.binds = vec!["/etc:/host-etc:ro".into()]),
        ("host network", |s| s.network_mode = Some("host".into())),
    ];
    for (what, change) in risky {
        let mut asks = spec.clone();
        change(&mut asks);
        let (status, body) = receiver
            .post("/deployment/deploy", &json!({"deployment": asks}))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {body}");
        assert_eq!(
            body["error"]["code"],
            json!("POLICY_DENIED"),
            "{what}: {body}"
        );
        let (status, body) = receiver
            .full(&[&tag], save_image(&docker, &tag).await, &asks)
            .await;
        assert_eq!(
            (status, body["error"]["code"].clone()),
            (StatusCode::FORBIDDEN, json!("POLICY_DENIED")),
            "{what} via /full: {body}"
        );
    }
    assert_eq!(inspect(&docker, &name).await.id, running, "nothing changed");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name))
            .await
            .len(),
        1
    );
    let (_, body) = receiver.get("/deployments").await;
    assert_eq!(
        body["deployments"].as_array().map(Vec::len),
        Some(1),
        "refusals are not deployments: {body}"
    );

    // Unknown container and unknown deployment: 404.
    let (status, body) = receiver
        .post(
            "/deployment/health-check",
            &json!({"container_name": format!("{name}-nope")}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("NOT_FOUND")),
        "{body}"
    );
    // The journal is signed like everything else, and every route is documented.
    let unsigned = http()
        .get(format!("{}/deployments", receiver.base))
        .send()
        .await
        .expect("GET");
    assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);
    let doc: Value = http()
        .get(format!("{}/openapi.json", receiver.base))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    for path in [
        "/deployment/deploy",
        "/deployment/health-check",
        "/deployment/full",
        "/deployments",
        "/deployments/{id}",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} is in the OpenAPI document"
        );
    }
    let (status, body) = receiver
        .get(&format!("/deployments/{}", Uuid::new_v4()))
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("NOT_FOUND")),
        "{body}"
    );
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_deploy_that_fails_is_failed_and_leaves_no_container() {
    let docker = docker().await;
    let name = unique_name();
    let mut cleanup = Cleanup::new(&name);
    let tag = format!("{name}:crash");
    build_image(
        &docker,
        &mut cleanup,
        &tag,
        ImageSpec {
            page: "x",
            healthcheck: None,
        },
    )
    .await;
    let dir = temp_dir();
    let receiver = Receiver::start(dir.path()).await;

    let mut spec = web_spec(&name);
    spec.image = Some(tag.clone());
    spec.command = Some(vec!["/bin/busybox".into(), "false".into()]);
    spec.restart_policy = deploy_protocol::RestartPolicy::No;
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": spec}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let failed = record(&body);
    assert_eq!(failed.status, DeploymentStatus::Failed);
    assert_eq!(body["error"]["code"], json!("HEALTH_CHECK_FAILED"));
    assert!(containers_named(&docker, std::slice::from_ref(&name))
        .await
        .is_empty());

    // A port Docker cannot bind is DEPLOY_FAILED with Docker's own message.
    let mut taken = web_spec(&name);
    taken.image = Some(tag.clone());
    taken.ports[0].host_ip = Some("203.0.113.1".into());
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": taken}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::INTERNAL_SERVER_ERROR, json!("DEPLOY_FAILED")),
        "{body}"
    );
    assert!(containers_named(&docker, std::slice::from_ref(&name))
        .await
        .is_empty());
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_rolls_back_a_deployment_cut_off_before_its_container_was_healthy() {
    let docker = docker().await;
    let name = unique_name();
    let mut cleanup = Cleanup::new(&name);
    let good = format!("{name}:good");
    let bad = format!("{name}:bad");
    build_image(
        &docker,
        &mut cleanup,
        &good,
        ImageSpec {
            page: "good",
            healthcheck: Some(HEALTHY),
        },
    )
    .await;
    build_image(
        &docker,
        &mut cleanup,
        &bad,
        ImageSpec {
            page: "bad",
            healthcheck: Some(ALWAYS_FAILS),
        },
    )
    .await;
    let dir = temp_dir();
    let receiver = Receiver::start(dir.path()).await;
    let mut spec = web_spec(&name);
    spec.image = Some(good.clone());
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": spec}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    receiver.stop().await;

    let (deployment_id, old_id, _) = interrupt_deployment(&docker, dir.path(), &name, &bad).await;
    let receiver = Receiver::start(dir.path()).await;
    let reconciled = settled(&receiver, deployment_id).await;
    assert_eq!(
        reconciled.status,
        DeploymentStatus::RolledBack,
        "{reconciled:?}"
    );
    assert_eq!(
        inspect(&docker, &name).await.id.as_deref(),
        Some(old_id.as_str())
    );
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name)).await,
        [old_id]
    );
    assert_eq!(page(&docker, &name).await, "good");
    assert!(receiver
        .state
        .journal()
        .get(deployment_id)
        .expect("journal")
        .is_some());
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deploys_to_one_name_take_turns() {
    let docker = docker().await;
    let name = unique_name();
    let mut cleanup = Cleanup::new(&name);
    let (a, b) = (format!("{name}:a"), format!("{name}:b"));
    build_image(
        &docker,
        &mut cleanup,
        &a,
        ImageSpec {
            page: "a",
            healthcheck: Some(HEALTHY),
        },
    )
    .await;
    build_image(
        &docker,
        &mut cleanup,
        &b,
        ImageSpec {
            page: "b",
            healthcheck: Some(HEALTHY),
        },
    )
    .await;
    let dir = temp_dir();
    let receiver = Receiver::start(dir.path()).await;
    let request = |image: &str| {
        let mut spec = web_spec(&name);
        spec.image = Some(image.to_owned());
        json!({ "deployment": spec })
    };
    let (to_a, to_b) = (request(&a), request(&b));
    let (first, second) = tokio::join!(
        receiver.post("/deployment/deploy", &to_a),
        receiver.post("/deployment/deploy", &to_b),
    );
    for (status, body) in [&first, &second] {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(record(body).status, DeploymentStatus::Succeeded);
    }
    let (first, second) = (record(&first.1), record(&second.1));
    let last = if first.previous_container_id == second.container_id {
        &first
    } else {
        &second
    };
    let containers = containers_named(&docker, std::slice::from_ref(&name)).await;
    assert_eq!(containers.len(), 1, "one container after two deployments");
    assert_eq!(
        Some(&containers[0]),
        last.container_id.as_ref(),
        "the later deployment runs"
    );
    let expected = if last.image == a { "a" } else { "b" };
    assert_eq!(page(&docker, &name).await, expected);
    receiver.stop().await;
}

/// Leaves what a receiver killed mid-deploy leaves: the container named `name` stopped and set
/// aside, a new one from `image` started under the name, the journal saying IN_PROGRESS.
/// Returns the deployment id, the old and the new container id.
async fn interrupt_deployment(
    docker: &Docker,
    dir: &Path,
    name: &str,
    image: &str,
) -> (Uuid, String, String) {
    let old_id = inspect(docker, name).await.id.expect("id");
    docker
        .stop_container(&old_id, Some(StopContainerOptions { t: 1 }))
        .await
        .expect("stop");
    let aside = deploy_receiver::deploy::aside_name(name, &old_id);
    docker
        .rename_container(&old_id, RenameContainerOptions { name: aside })
        .await
        .expect("rename");
    let deployment_id = Uuid::new_v4();
    let config = ContainerConfig {
        image: Some(image.to_owned()),
        labels: Some(HashMap::from([
            ("io.deploy.managed".to_owned(), "true".to_owned()),
            (
                "io.deploy.deployment_id".to_owned(),
                deployment_id.to_string(),
            ),
        ])),
        exposed_ports: Some(HashMap::from([("80/tcp".to_owned(), HashMap::new())])),
        host_config: Some(bollard::models::HostConfig {
            port_bindings: Some(HashMap::from([(
                "80/tcp".to_owned(),
                Some(vec![bollard::models::PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(String::new()),
                }]),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    };
    let new_id = docker
        .create_container(
            Some(CreateContainerOptions {
                name: name.to_owned(),
                platform: None,
            }),
            config,
        )
        .await
        .expect("create")
        .id;
    docker
        .start_container::<String>(&new_id, None)
        .await
        .expect("start");
    let interrupted = json!({
        "deployment_id": deployment_id, "status": "IN_PROGRESS", "container_name": name,
        "image": image, "container_id": new_id, "previous_container_id": old_id,
        "started_at": "2025-01-01T00:00:00Z", "stages": []
    });
    std::fs::write(
        state_dir(dir).join(format!("{deployment_id}.json")),
        interrupted.to_string(),
    )
    .expect("journal");
    (deployment_id, old_id, new_id)
}

/// The record once start-up reconciliation has settled it.
async fn settled(receiver: &Receiver, id: Uuid) -> DeploymentRecord {
    for _ in 0..600 {
        let (status, body) = receiver.get(&format!("/deployments/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["status"] != json!("IN_PROGRESS") {
            return record(&body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("deployment {id} was never reconciled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_finishes_a_deployment_whose_new_container_was_already_healthy() {
    let docker = docker().await;
    let name = unique_name();
    let mut cleanup = Cleanup::new(&name);
    let (v1, v2) = (format!("{name}:v1"), format!("{name}:v2"));
    build_image(
        &docker,
        &mut cleanup,
        &v1,
        ImageSpec {
            page: "v1",
            healthcheck: Some(HEALTHY),
        },
    )
    .await;
    build_image(
        &docker,
        &mut cleanup,
        &v2,
        ImageSpec {
            page: "v2",
            healthcheck: Some(HEALTHY),
        },
    )
    .await;
    let dir = temp_dir();
    let receiver = Receiver::start(dir.path()).await;
    let mut spec = web_spec(&name);
    spec.image = Some(v1.clone());
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": spec}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    receiver.stop().await;

    let (deployment_id, old_id, new_id) =
        interrupt_deployment(&docker, dir.path(), &name, &v2).await;
    let mut healthy = false;
    for _ in 0..300 {
        let health = inspect(&docker, &new_id)
            .await
            .state
            .and_then(|s| s.health)
            .and_then(|h| h.status);
        if health == Some(bollard::models::HealthStatusEnum::HEALTHY) {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(healthy, "the v2 container never became healthy");

    let receiver = Receiver::start(dir.path()).await;
    let reconciled = settled(&receiver, deployment_id).await;
    assert_eq!(
        reconciled.status,
        DeploymentStatus::Succeeded,
        "{reconciled:?}"
    );
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name)).await,
        [new_id]
    );
    assert!(
        docker.inspect_container(&old_id, None).await.is_err(),
        "the v1 container is gone"
    );
    assert_eq!(page(&docker, &name).await, "v2");
    receiver.stop().await;
}
