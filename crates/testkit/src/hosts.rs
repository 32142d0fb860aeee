//! Extra Docker engines as cold target hosts: each a real `dockerd` with its own data root under
//! a temp dir, in its own network namespace (entered with `nsenter --net`, never the machine's
//! own: a second engine there deletes the main engine's `docker0` bridge), with its own
//! containerd namespace. Stopped and removed on drop, which then checks that the main engine's
//! `docker0` still exists.
//!
//! Needs root, `ip`, `nsenter`, `dockerd`, and the containerd the main engine uses.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bollard::Docker;

/// How long an engine may take to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// containerd sockets tried, in order (Docker's own first).
const CONTAINERD_SOCKETS: [&str; 2] = [
    "/var/run/docker/containerd/containerd.sock",
    "/run/containerd/containerd.sock",
];

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The containerd socket of this machine (Docker's, or the system one).
pub fn containerd_socket() -> PathBuf {
    CONTAINERD_SOCKETS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("no containerd socket at {CONTAINERD_SOCKETS:?}: the test hosts need the containerd the main engine uses")
        })
}

/// A unique short tag: `prefix` (a few letters naming the test suite) + process id + counter.
/// Used for the network namespace, the containerd namespaces and the temp dir.
pub fn unique_tag(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

/// One extra engine: a cold target host.
pub struct TestHost {
    tag: String,
    root: Option<tempfile::TempDir>,
    socket: PathBuf,
    child: Option<Child>,
}

impl TestHost {
    /// Starts an engine tagged [`unique_tag`]`(prefix)` and waits until it answers.
    pub async fn start(prefix: &str) -> Self {
        let tag = unique_tag(prefix);
        let root = tempfile::Builder::new()
            .prefix(&format!("test-host-{tag}-"))
            .tempdir()
            .expect("temp dir for a test host");
        let dir = root.path().to_owned();
        std::fs::write(dir.join("daemon.json"), "{}").expect("daemon.json");
        run("ip", &["netns", "add", &tag]);
        run(
            "ip",
            &["netns", "exec", &tag, "ip", "link", "set", "lo", "up"],
        );
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("dockerd log");
        let containerd = containerd_socket();
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{tag}"))
            .arg("dockerd")
            .arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("pid"))
            .arg("--host")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .args(["--storage-driver", "fuse-overlayfs"])
            .arg("--containerd")
            .arg(&containerd)
            .args(["--containerd-namespace", &tag])
            .args(["--containerd-plugins-namespace", &format!("{tag}p")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let mut host = Self {
            socket: dir.join("docker.sock"),
            tag,
            root: Some(root),
            child: None,
        };
        match child {
            Ok(child) => host.child = Some(child),
            Err(e) => panic!("cannot start dockerd for test host {}: {e}", host.tag),
        }
        host.wait_ready().await;
        host
    }

    async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "dockerd of test host {} exited with {status}: {}",
                        self.tag,
                        self.log_tail()
                    );
                }
            }
            if self.socket.exists() {
                if let Ok(docker) = self.try_docker() {
                    if docker.ping().await.is_ok() {
                        return;
                    }
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                panic!(
                    "test host {} did not answer within {READY_TIMEOUT:?}: {}",
                    self.tag,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = self
            .root
            .as_ref()
            .and_then(|r| std::fs::read_to_string(r.path().join("dockerd.log")).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn try_docker(&self) -> Result<Docker, bollard::errors::Error> {
        Docker::connect_with_unix(
            &self.socket.display().to_string(),
            120,
            bollard::API_DEFAULT_VERSION,
        )
    }

    /// The engine's tag (network namespace and containerd namespace name).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// `unix://<socket>`: the `DOCKER_HOST` of this host's receiver.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The engine's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A client of this engine, API version negotiated.
    pub async fn docker(&self) -> Docker {
        let docker = self.try_docker().expect("connect to the test host");
        docker
            .negotiate_version()
            .await
            .expect("negotiate with the test host")
    }

    /// A scratch directory inside this host's temp dir (removed with it).
    pub fn dir(&self, name: &str) -> PathBuf {
        let dir = self
            .root
            .as_ref()
            .map(|r| r.path().join(name))
            .expect("test host root");
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    /// Stops the engine (SIGTERM, then SIGKILL after 20 s), deletes its network namespace and
    /// data; returns whether the main engine's `docker0` survived.
    fn shutdown(&mut self) -> bool {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.tag])
            .stderr(Stdio::null())
            .status();
        if let Some(root) = self.root.take() {
            // The engine's data root may hold mounts (fuse-overlayfs) left by a hard kill.
            let data = root.path().join("data");
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "grep -o ' {0}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                    data.display()
                ))
                .status();
            let _ = root.close();
        }
        main_bridge_exists()
    }
}

/// Whether the main engine's `docker0` bridge exists.
pub fn main_bridge_exists() -> bool {
    Command::new("ip")
        .args(["link", "show", "docker0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let bridge = self.shutdown();
        if !bridge && !std::thread::panicking() {
            panic!(
                "the main engine's docker0 bridge is gone after test host {} stopped",
                self.tag
            );
        }
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed: {status}");
}
