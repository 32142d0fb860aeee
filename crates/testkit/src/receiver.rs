//! A real receiver on 127.0.0.1:<ephemeral port> with the test key ([`crate::signing::SECRET`]):
//! served in this process ([`spawn_receiver`]) or as the real binary in a child process
//! ([`Daemon`]). Both dereference to [`Api`] for signed requests.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deploy_receiver::{AppState, Config};
use tokio::sync::oneshot;

use crate::api::Api;
use crate::signing::SECRET;

/// A receiver serving on 127.0.0.1:<ephemeral> until dropped.
pub struct Receiver {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// `http://<addr>`.
    pub url: String,
    /// Its package directory.
    pub package_dir: PathBuf,
    /// Its state (store, metrics, journal).
    pub state: AppState,
    api: Api,
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
        api: Api {
            base: format!("http://{addr}"),
        },
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

    /// Stops accepting connections at once, as a receiver killed would: the port refuses from
    /// now on (requests already under way are left to finish).
    pub fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.shutdown.take();
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

impl std::ops::Deref for Receiver {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A running `deploy-receiver` child process, signed with [`SECRET`]; killed (SIGKILL) on drop.
/// Its JSON log lines are kept for failure messages.
pub struct Daemon {
    child: std::process::Child,
    /// The address it announced.
    pub addr: SocketAddr,
    api: Api,
    logs: Arc<Mutex<Vec<String>>>,
}

impl std::ops::Deref for Daemon {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Daemon {
    /// Starts `binary` (a test's `env!("CARGO_BIN_EXE_deploy-receiver")`) on `package_dir` and
    /// `state_dir` with a clean environment plus `env` (no `DOCKER_HOST` unless given: the
    /// default socket), and waits until it announces its address.
    pub fn start(
        binary: &Path,
        package_dir: &Path,
        state_dir: &Path,
        env: &[(&str, String)],
    ) -> Self {
        let mut command = Self::command(binary, package_dir, state_dir);
        for (k, v) in env {
            command.env(k, v);
        }
        Self::spawn(command)
    }

    /// The command [`Daemon::start`] runs: `binary` with a clean environment (loopback, the test
    /// key, JSON logs), for a test that adjusts it before [`Daemon::spawn`].
    pub fn command(binary: &Path, package_dir: &Path, state_dir: &Path) -> std::process::Command {
        let mut command = std::process::Command::new(binary);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RECEIVER_BIND", "127.0.0.1:0")
            .env("PACKAGE_DIR", package_dir)
            .env("STATE_DIR", state_dir)
            .env("DEPLOY_HMAC_SECRET", SECRET)
            .env("ALLOWED_NETWORKS", "127.0.0.0/8")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info");
        command
    }

    /// Spawns `command` (a receiver logging JSON to stdout, which is taken over) and waits until
    /// it announces its address.
    pub fn spawn(mut command: std::process::Command) -> Self {
        command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = command.spawn().expect("spawn deploy-receiver");
        let stdout = child.stdout.take().expect("stdout");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = logs.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            // Keeps draining, so the child never blocks on a full pipe.
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
                if let Ok(mut logs) = kept.lock() {
                    logs.push(line);
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
            api: Api {
                base: format!("http://{addr}"),
            },
            logs,
        }
    }

    /// Its process id.
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
