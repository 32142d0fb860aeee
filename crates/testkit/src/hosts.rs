//! Cold target hosts for tests: each [`TestHost`] is a real `dockerd` with its own image store,
//! its own network namespace and its own socket, started on this machine and removed when dropped.
//!
//! The recipe is the one in the shared TEST-HOSTS page, and its rules are kept here so no test has
//! to remember them:
//! - the engine runs in its own network namespace (`nsenter --net`), never in the machine's own:
//!   a second engine there deletes the main engine's `docker0` bridge;
//! - `nsenter --net`, not `ip netns exec` (which remounts `/sys`, and the engine then fails);
//! - an empty `--config-file`, so the engine does not read the machine's `/etc/docker/daemon.json`;
//! - its containerd namespaces are its own, so its containers and images are its own.
//!
//! Ports its containers publish are bound inside its namespace: run a client there with
//! [`TestHost::command_in_netns`]. A receiver for this host runs on the machine's loopback with
//! `DOCKER_HOST` = [`TestHost::docker_host`].
//!
//! Starting needs root, `ip`, `nsenter`, `dockerd` and `fuse-overlayfs`; a test that cannot have
//! them fails with a message saying what is missing (it never skips).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long an engine may take to answer `/_ping` (2-8 s when the machine is idle; a loaded CI
/// machine building Rust beside it is much slower).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a stopping engine gets after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// containerd's socket of the main engine, shared (with their own namespaces) by test engines.
const CONTAINERD_SOCKETS: [&str; 2] = [
    "/var/run/docker/containerd/containerd.sock",
    "/run/containerd/containerd.sock",
];

/// A running extra Docker engine standing for one cold target host. Dropping it stops the engine
/// and removes its namespace and every file it wrote.
#[derive(Debug)]
pub struct TestHost {
    tag: String,
    root: PathBuf,
    dockerd: Option<Child>,
}

impl TestHost {
    /// Starts an engine and waits until it answers. `label` (a few letters) helps tell hosts
    /// apart in `ip netns list` and process lists; a random suffix makes the tag unique.
    ///
    /// Blocks for the engine's start (seconds); call it from `spawn_blocking` in async tests if
    /// the runtime has one worker thread.
    ///
    /// # Panics
    /// When the engine cannot be started, saying why (not root, a tool missing, the engine's log).
    pub fn start(label: &str) -> TestHost {
        preflight();
        let label: String = label
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(4)
            .collect();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let tag = format!("th{label}{}", &suffix[..6]);
        let root = std::env::temp_dir().join("test-hosts").join(&tag);
        std::fs::create_dir_all(&root)
            .unwrap_or_else(|e| panic!("test host {tag}: cannot create {}: {e}", root.display()));
        std::fs::write(root.join("daemon.json"), "{}\n")
            .unwrap_or_else(|e| panic!("test host {tag}: cannot write daemon.json: {e}"));
        let mut host = TestHost {
            tag: tag.clone(),
            root: root.clone(),
            dockerd: None,
        };
        run(
            Command::new("ip").args(["netns", "add", &tag]),
            "ip netns add",
        );
        run(
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{tag}"))
                .args(["ip", "link", "set", "lo", "up"]),
            "bring lo up in the namespace",
        );
        let log = std::fs::File::create(root.join("dockerd.log"))
            .unwrap_or_else(|e| panic!("test host {tag}: cannot create its log: {e}"));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("test host {tag}: cannot clone its log handle: {e}"));
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{tag}"))
            .arg("dockerd")
            .arg("--config-file")
            .arg(root.join("daemon.json"))
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(root.join("exec"))
            .arg("--pidfile")
            .arg(root.join("pid"))
            .arg("--host")
            .arg(format!("unix://{}", root.join("docker.sock").display()))
            .args(["--storage-driver", "fuse-overlayfs"])
            .arg("--containerd")
            .arg(containerd_socket())
            .args(["--containerd-namespace", &tag])
            .arg("--containerd-plugins-namespace")
            .arg(format!("{tag}p"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("test host {tag}: cannot run dockerd: {e}"));
        host.dockerd = Some(child);
        host.wait_ready();
        host
    }

    /// The unique tag: network namespace, containerd namespace and directory name.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The engine's socket file.
    pub fn socket(&self) -> PathBuf {
        self.root.join("docker.sock")
    }

    /// `DOCKER_HOST` for this engine (`unix:///tmp/test-hosts/<tag>/docker.sock`).
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// A command that runs inside this host's network namespace (to reach ports its containers
    /// publish, or to take a port on this host alone).
    pub fn command_in_netns(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/var/run/netns/{}", self.tag))
            .arg(program);
        command
    }

    /// A `docker` CLI command against this engine.
    pub fn docker_cli(&self) -> Command {
        let mut command = Command::new("docker");
        command.env("DOCKER_HOST", self.docker_host());
        command
    }

    /// The engine's log so far (for failure messages).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.root.join("dockerd.log")).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        text.get(start..).unwrap_or(&text).to_owned()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(&self.socket()) {
                return;
            }
            if let Some(child) = self.dockerd.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "test host {}: dockerd exited ({status}) before answering; its log:\n{}",
                        self.tag,
                        self.log()
                    );
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "test host {}: dockerd did not answer within {:?}; its log:\n{}",
                    self.tag,
                    START_TIMEOUT,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.dockerd.take() {
            // SIGTERM lets the engine stop its containers and unmount its layers.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        unmount_below(&self.root);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.tag])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.stop();
        if !main_bridge_exists() {
            // Not a panic: Drop may run while a test already unwinds.
            eprintln!(
                "test host {}: the main engine's docker0 bridge is gone after stopping it; \
                 containers on the main engine cannot start (see TEST-HOSTS.md)",
                self.tag
            );
        }
    }
}

/// Whether the main engine's `docker0` bridge exists (an extra engine started outside its own
/// namespace deletes it). Tests that start hosts assert this at their end.
pub fn main_bridge_exists() -> bool {
    Command::new("ip")
        .args(["link", "show", "docker0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn preflight() {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "test hosts (extra Docker engines in network namespaces) need root; this test cannot run as uid {uid}"
    );
    for tool in ["ip", "nsenter", "dockerd", "fuse-overlayfs"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            found,
            "test hosts need `{tool}` on PATH (scripts/prereqs.sh installs what is missing)"
        );
    }
}

/// The containerd socket test engines share with the main engine (Docker's own, or the system one).
pub fn containerd_socket() -> &'static str {
    CONTAINERD_SOCKETS
        .iter()
        .copied()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!(
                "test hosts share the main engine's containerd, and its socket is not at any of {CONTAINERD_SOCKETS:?}"
            )
        })
}

fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("test host: {what}: cannot run: {e}"));
    assert!(
        output.status.success(),
        "test host: {what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `GET /_ping` on the engine's socket answers 200.
fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

/// Unmounts (lazily) whatever is still mounted below `root`, deepest first, so its removal does
/// not fail on busy fuse-overlayfs mounts of a killed engine.
fn unmount_below(root: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let root = root.to_string_lossy().into_owned();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter(|point| point.starts_with(&root))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        let _ = Command::new("umount")
            .args(["-l", point])
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_host_is_a_separate_cold_engine_and_leaves_nothing_behind() {
        let host = TestHost::start("kit");
        let tag = host.tag().to_owned();
        let root = host.socket().parent().map(Path::to_path_buf);
        let images = host
            .docker_cli()
            .args(["images", "-q"])
            .output()
            .expect("docker images on the test host");
        assert!(images.status.success(), "{}", host.log());
        assert!(
            String::from_utf8_lossy(&images.stdout).trim().is_empty(),
            "a new test host holds no images"
        );
        let netns = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        assert!(String::from_utf8_lossy(&netns.stdout).contains(&tag));
        drop(host);
        let netns = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        assert!(
            !String::from_utf8_lossy(&netns.stdout).contains(&tag),
            "the namespace is removed"
        );
        assert!(root.is_some_and(|r| !r.exists()), "its files are removed");
        assert!(main_bridge_exists(), "the main engine's docker0 survives");
    }
}
