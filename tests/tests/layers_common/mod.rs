//! What the layer-transfer tests share: the real `deploy-receiver` binary in front of a cold
//! target host (an extra Docker engine from deploy-testkit), a loopback TCP proxy that counts the
//! bytes the sender puts on the wire and can cut or stall a connection after N bytes (a real
//! fault on a real socket), and multi-layer busybox images built `FROM scratch`.

#![allow(dead_code)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deploy_protocol::{DeploymentSpec, HealthCheckKind};
use deploy_sender::{
    deploy_release, CompressionOptions, DeployRequest, ImageSource, LayerCache, Lifecycle,
    NoProgress, PackageRequest, ReceiverTarget, ReleaseCalls, ReleaseOutcome, RetryPolicy,
};
use deploy_testkit::hosts::TestHost;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The shared secret of the test receivers.
pub const SECRET: &str = "layers-tx-e2e-secret-0123456789abcdef01234567";

/// The sender library with its own layer cache and event outbox, as `deploy-sender deploy` uses
/// it; whether a cold host gets a stream is the sender's `stream_cold`.
pub struct Sender {
    pub docker: bollard::Docker,
    pub cache: LayerCache,
    pub events: Lifecycle,
    http: reqwest::Client,
    policy: RetryPolicy,
    stream_cold: bool,
    _dir: tempfile::TempDir,
}

impl Sender {
    pub async fn new(stream_cold: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self {
            docker: deploy_sender::connect_docker()
                .await
                .expect("these tests need the Docker engine"),
            cache: LayerCache::open(dir.path().join("layers"), u64::MAX)
                .await
                .expect("cache"),
            events: Lifecycle::open(dir.path().join("state"), None, "deployments".into())
                .await
                .expect("the outbox"),
            http: reqwest::Client::new(),
            policy: RetryPolicy {
                max_attempts: 6,
                min_delay: Duration::from_millis(100),
                max_delay: Duration::from_secs(1),
                max_retry_after: Duration::from_secs(5),
            },
            stream_cold,
            _dir: dir,
        }
    }

    pub fn calls<'a>(&'a self, target: &'a ReceiverTarget) -> ReleaseCalls<'a> {
        ReleaseCalls {
            http: &self.http,
            target,
            correlation_id: None,
            policy: &self.policy,
            await_blobs: true,
            blob_connections: 1,
            stream_cold: self.stream_cold,
        }
    }

    /// `deploy_release` of the local image `tag` as container `name` (no health check) to the
    /// receiver at `url`, compressed with `compression`; panics when it fails.
    pub async fn deploy_with(
        &self,
        url: &str,
        tag: &str,
        name: &str,
        compression: CompressionOptions,
    ) -> ReleaseOutcome {
        let target = target(url);
        let mut request = DeployRequest {
            package: PackageRequest::new(ImageSource::Existing(tag.to_owned())),
            deployment: spec(name),
            correlation_id: None,
        };
        request.package.compression = compression;
        match deploy_release(
            &self.docker,
            &self.cache,
            self.calls(&target),
            &request,
            Arc::new(NoProgress),
            &self.events,
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(e) => panic!("deploy of {tag} failed: {e}"),
        }
    }
}

/// The receiver at `url`'s deployment journal (its newest 100 records, newest first), read with a
/// signed `GET /deployments` as an operator would.
pub async fn journal(url: &str) -> Vec<deploy_protocol::api::DeploymentRecord> {
    let client = deploy_sender::ReceiverClient::new(reqwest::Client::new(), target(url));
    let response = client
        .signed_get("/deployments?limit=100", None, Duration::from_secs(10))
        .await
        .expect("the receiver answers its journal query");
    assert_eq!(response.status(), 200, "the journal query");
    response
        .json::<deploy_protocol::api::DeploymentList>()
        .await
        .expect("a deployment list")
        .deployments
}

/// The test receivers' target at `url`.
pub fn target(url: &str) -> ReceiverTarget {
    ReceiverTarget::new(url, "default", SECRET.as_bytes()).expect("target")
}

/// Container `name`, without a health check.
pub fn spec(name: &str) -> DeploymentSpec {
    let mut spec = DeploymentSpec {
        container_name: name.to_owned(),
        ..DeploymentSpec::default()
    };
    spec.health_check.kind = HealthCheckKind::None;
    spec
}

/// A binary of this workspace next to the test executable (`target/<profile>/<name>`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: these tests run the real binaries; build them first with \
         `cargo build -p deploy-receiver -p deploy-sender`",
        path.display()
    );
    path
}

/// The real receiver binary talking to `docker_host`, on 127.0.0.1:<ephemeral>; SIGKILLed on drop.
pub struct Daemon {
    child: std::process::Child,
    pub addr: SocketAddr,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start(docker_host: &str) -> Self {
        Self::start_with(docker_host, &[])
    }

    /// As [`Daemon::start`], with more environment (e.g. RECEIVER_AUTHORITIES behind a proxy).
    pub fn start_with(docker_host: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(workspace_binary("deploy-receiver"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RECEIVER_BIND", "127.0.0.1:0")
            .env("PACKAGE_DIR", dir.path().join("packages"))
            .env("STATE_DIR", dir.path().join("state"))
            .env("DEPLOY_HMAC_SECRET", SECRET)
            .env("ALLOWED_NETWORKS", "127.0.0.0/8")
            .env("DOCKER_HOST", docker_host)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn deploy-receiver");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if let Some(addr) = v["fields"]["addr"].as_str() {
                            let _ = tx.send(addr.to_owned());
                            sent = true;
                        }
                    }
                }
            }
        });
        let addr: SocketAddr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("deploy-receiver announced its address")
            .parse()
            .expect("addr");
        Self {
            child,
            addr,
            url: format!("http://{addr}"),
            _dir: dir,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback TCP proxy in front of `upstream`: counts client-to-server bytes, and can cut every
/// connection (once) or stall it once a total of N client bytes has passed.
pub struct Proxy {
    pub url: String,
    pub sent: Arc<AtomicU64>,
    /// Connections that carried at least one blob `PATCH`.
    pub patch_connections: Arc<AtomicU64>,
    /// `429 Too Many Requests` answers the receiver sent.
    pub busy_answers: Arc<AtomicU64>,
    /// `408 Request Timeout` answers the receiver sent.
    pub timeout_answers: Arc<AtomicU64>,
    /// Answers the proxy gave itself ([`Proxy::answer_instead`]).
    pub own_answers: Arc<AtomicU64>,
    fault: Arc<Mutex<Option<(u64, Fault)>>>,
    answer: Arc<Mutex<Option<Answer>>>,
    hook: Arc<Mutex<Option<Hook>>>,
    stop: Arc<AtomicBool>,
}

/// Something to do (once) before forwarding the first client bytes that contain `needle`.
type Hook = (Vec<u8>, Box<dyn FnOnce() + Send>);

/// A connection whose first bytes contain `.0` is answered `.1` by the proxy itself.
type Answer = (Vec<u8>, Vec<u8>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Close both sides.
    Cut,
    /// Stop forwarding and hold the connection open.
    Stall,
}

impl Proxy {
    /// A receiver for `docker_host` behind a new proxy: requests are signed for the proxy's
    /// authority (the sender addresses the proxy), so the receiver is told to answer to it, as
    /// behind any proxy (RECEIVER_AUTHORITIES).
    pub async fn with_receiver(docker_host: &str) -> (Daemon, Self) {
        Self::with_receiver_env(docker_host, &[]).await
    }

    /// As [`Proxy::with_receiver`], with more receiver environment.
    pub async fn with_receiver_env(docker_host: &str, env: &[(&str, &str)]) -> (Daemon, Self) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let authority = listener.local_addr().expect("addr").to_string();
        let mut env = env.to_vec();
        env.push(("RECEIVER_AUTHORITIES", &authority));
        let daemon = Daemon::start_with(docker_host, &env);
        let proxy = Self::serve(listener, daemon.addr);
        (daemon, proxy)
    }

    fn serve(listener: tokio::net::TcpListener, upstream: SocketAddr) -> Self {
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let sent = Arc::new(AtomicU64::new(0));
        let fault: Arc<Mutex<Option<(u64, Fault)>>> = Arc::default();
        let hook: Arc<Mutex<Option<Hook>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let patch_connections = Arc::new(AtomicU64::new(0));
        let busy_answers = Arc::new(AtomicU64::new(0));
        let timeout_answers = Arc::new(AtomicU64::new(0));
        let own_answers = Arc::new(AtomicU64::new(0));
        let answer: Arc<Mutex<Option<Answer>>> = Arc::default();
        let (s, f, h, st) = (sent.clone(), fault.clone(), hook.clone(), stop.clone());
        let (pc, ba, ta, oa, an) = (
            patch_connections.clone(),
            busy_answers.clone(),
            timeout_answers.clone(),
            own_answers.clone(),
            answer.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let counters = Counters {
                    sent: s.clone(),
                    patch_connections: pc.clone(),
                    busy_answers: ba.clone(),
                    timeout_answers: ta.clone(),
                    own_answers: oa.clone(),
                };
                let answer = an.lock().expect("lock").clone();
                tokio::spawn(pipe(client, server, counters, f.clone(), h.clone(), answer));
            }
        });
        Self {
            url,
            sent,
            patch_connections,
            busy_answers,
            timeout_answers,
            own_answers,
            fault,
            answer,
            hook,
            stop,
        }
    }

    /// From now on, a new connection whose first bytes contain `needle` (e.g. a request line)
    /// never reaches the receiver: the proxy answers `response` (a whole HTTP/1.1 response) and
    /// reads the rest of what the client sends until it goes away. Stands in for a receiver
    /// that answers so, e.g. an older one without an endpoint.
    pub fn answer_instead(&self, needle: &str, response: &str) {
        *self.answer.lock().expect("lock") =
            Some((needle.as_bytes().to_vec(), response.as_bytes().to_vec()));
    }

    /// Runs `action` (blocking, off the runtime) once, before forwarding the first client bytes
    /// that contain `needle` (e.g. a request line), so a test can change the target host at an
    /// exact point of the protocol.
    pub fn before(&self, needle: &str, action: impl FnOnce() + Send + 'static) {
        *self.hook.lock().expect("lock") = Some((needle.as_bytes().to_vec(), Box::new(action)));
    }

    /// From now on, `fault` once `after` more client bytes have passed.
    pub fn fault_after(&self, after: u64, fault: Fault) {
        let at = self.sent.load(Ordering::Relaxed) + after;
        *self.fault.lock().expect("lock") = Some((at, fault));
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a proxied connection counts.
struct Counters {
    sent: Arc<AtomicU64>,
    patch_connections: Arc<AtomicU64>,
    busy_answers: Arc<AtomicU64>,
    timeout_answers: Arc<AtomicU64>,
    own_answers: Arc<AtomicU64>,
}

async fn pipe(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    counters: Counters,
    fault: Arc<Mutex<Option<(u64, Fault)>>>,
    hook: Arc<Mutex<Option<Hook>>>,
    answer: Option<Answer>,
) {
    let (mut cr, cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let Counters {
        sent,
        patch_connections,
        busy_answers,
        timeout_answers,
        own_answers,
    } = counters;
    // Shared: the proxy may answer a request itself, on a connection that carried others.
    let cw = Arc::new(tokio::sync::Mutex::new(cw));
    let answers_down = Arc::clone(&cw);
    let down = tokio::spawn(async move {
        let cw = answers_down;
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = sr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            // Answers are small: a status line is within one read.
            let count = |line: &[u8]| buf[..n].windows(line.len()).filter(|w| *w == line).count();
            busy_answers.fetch_add(count(b"HTTP/1.1 429 ") as u64, Ordering::Relaxed);
            timeout_answers.fetch_add(count(b"HTTP/1.1 408 ") as u64, Ordering::Relaxed);
            if cw.lock().await.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.lock().await.shutdown().await;
    });
    let mut carried_patch = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((needle, response)) = &answer {
            if buf[..n]
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
            {
                // The requests before it were answered (one at a time on a connection): from
                // here on the receiver hears nothing of this connection.
                down.abort();
                own_answers.fetch_add(1, Ordering::Relaxed);
                let _ = cw.lock().await.write_all(response).await;
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                return;
            }
        }
        const PATCH: &[u8] = b"PATCH /deployment/v2/blobs/";
        if !carried_patch && buf[..n].windows(PATCH.len()).any(|w| w == PATCH) {
            carried_patch = true;
            patch_connections.fetch_add(1, Ordering::Relaxed);
        }
        let due = {
            let mut guard = hook.lock().expect("lock");
            let hit = matches!(&*guard, Some((needle, _))
                if buf[..n].windows(needle.len()).any(|w| w == needle.as_slice()));
            if hit {
                guard.take()
            } else {
                None
            }
        };
        if let Some((_, action)) = due {
            tokio::task::spawn_blocking(action)
                .await
                .expect("the proxy's hook ran");
        }
        let before = sent.load(Ordering::Relaxed);
        let hit = {
            let mut guard = fault.lock().expect("lock");
            match *guard {
                Some((at, kind)) if before + n as u64 >= at => {
                    *guard = None;
                    Some((at - before.min(at), kind))
                }
                _ => None,
            }
        };
        if let Some((take, kind)) = hit {
            let take = usize::try_from(take).unwrap_or(n).min(n);
            let _ = sw.write_all(&buf[..take]).await;
            sent.fetch_add(take as u64, Ordering::Relaxed);
            if kind == Fault::Stall {
                // Hold both sides open until the client goes away.
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            }
            down.abort();
            return;
        }
        if sw.write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = sw.shutdown().await;
    let _ = down.await;
}

/// Images built on the main engine (legacy builder, `FROM scratch` + busybox), removed on drop,
/// newest first so that children go before their bases.
#[derive(Default)]
pub struct Images {
    tags: Mutex<Vec<String>>,
}

impl Images {
    pub fn build(&self, dockerfile: &str, files: &[(&str, Vec<u8>)]) -> String {
        let tag = format!("deploy-e2e-layers-tx/{}:v1", uuid::Uuid::new_v4().simple());
        self.tags.lock().expect("lock").push(tag.clone());
        let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        deploy_testkit::images::build_with_cli(&tag, dockerfile, &files);
        tag
    }

    /// A base: busybox, and `base_bytes` of incompressible data in a layer of its own.
    pub fn base(&self, base_bytes: usize) -> String {
        self.build(
            "FROM scratch\nCOPY busybox /bin/busybox\nCOPY blob /opt/base.bin\n",
            &[("blob", noise(base_bytes, rand_seed()))],
        )
    }

    /// An app on `base`: one top layer of `top_bytes` incompressible bytes.
    pub fn app(&self, base: &str, top_bytes: usize) -> String {
        self.build(
            &format!(
                "FROM {base}\nCOPY top /srv/top.bin\nCMD [\"/bin/busybox\",\"sleep\",\"3600\"]\n"
            ),
            &[("top", noise(top_bytes, rand_seed()))],
        )
    }

    pub fn id(&self, tag: &str) -> String {
        let out = Command::new("docker")
            .args(["image", "inspect", "-f", "{{.Id}}", tag])
            .output()
            .expect("docker inspect");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let tags = std::mem::take(&mut *self.tags.lock().unwrap_or_else(|e| e.into_inner()));
        for tag in tags.iter().rev() {
            let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
        }
    }
}

fn rand_seed() -> u64 {
    uuid::Uuid::new_v4().as_u128() as u64
}

/// `len` pseudo-random (incompressible) bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A cold host, started off the async runtime (it blocks for seconds).
pub async fn cold_host(label: &'static str) -> TestHost {
    tokio::task::spawn_blocking(move || TestHost::start(label))
        .await
        .expect("test host")
}

/// The image id of `container` on `host`.
pub fn container_image(host: &TestHost, container: &str) -> String {
    let out = host
        .docker_cli()
        .args(["inspect", "-f", "{{.Image}}", container])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Copies `tag` from the main engine into `host`'s engine as its operator would
/// (`docker save | docker load`), not through a receiver.
pub fn copy_image(tag: &str, host: &TestHost) {
    let out = Command::new("sh")
        .args([
            "-c",
            "docker save \"$1\" | DOCKER_HOST=\"$2\" docker load -q",
            "sh",
        ])
        .args([tag, &host.docker_host()])
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "docker save | docker load of {tag} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `host`'s engine holds image `id_or_tag`.
pub fn host_has_image(host: &TestHost, id_or_tag: &str) -> bool {
    host.docker_cli()
        .args(["image", "inspect", id_or_tag])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("docker image inspect runs")
        .success()
}
