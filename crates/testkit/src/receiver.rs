//! A real receiver serving on 127.0.0.1:<ephemeral port> until dropped or stopped, with the test
//! key ([`crate::signing::SECRET`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use deploy_receiver::{AppState, Config};
use tokio::sync::oneshot;

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

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
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
