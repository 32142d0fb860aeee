//! The REST service's shared state: configuration, package store, Docker (connected lazily),
//! HTTP client, lifecycle events, metrics, jobs and the limit on concurrent transfers.

use std::sync::Arc;
use std::time::Instant;

use bollard::Docker;
use tokio::sync::{Mutex, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::config::ServeConfig;
use crate::pipeline::{LayerCache, Lifecycle, PackageStore};
use crate::service::jobs::Jobs;
use crate::service::metrics::Metrics;
use crate::SenderError;

/// Shared state of the sender service (cheap to clone).
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    config: ServeConfig,
    store: PackageStore,
    layers: LayerCache,
    docker: Mutex<Option<Docker>>,
    /// The last answer of [`AppState::docker_version`] and when it came; held while asking.
    last_version: Mutex<Option<(Instant, Option<String>)>>,
    http: reqwest::Client,
    events: Lifecycle,
    metrics: Metrics,
    jobs: Jobs,
    rollouts: crate::service::operations::Rollouts,
    transfer_slots: Arc<Semaphore>,
    package_slots: Arc<Semaphore>,
    stopping: CancellationToken,
    started: Instant,
}

impl AppState {
    /// Opens the package store, the event outbox and the rollout records. Docker is connected at first use, so the
    /// service starts (and reports `docker_available: false`) without an engine.
    pub async fn new(config: ServeConfig) -> Result<Self, SenderError> {
        let store = PackageStore::open(&config.store.package_dir).await?;
        let layers = config.store.open_layer_cache().await?;
        let events = config.events.open(&config.store.package_dir).await?;
        let rollouts = crate::service::operations::Rollouts::open(
            config.state_dir().join("rollouts"),
            &events,
        )
        .await?;
        let metrics = Metrics::new()
            .map_err(|e| SenderError::Internal(format!("cannot register metrics: {e}")))?;
        Ok(Self(Arc::new(Inner {
            http: config.receiver.http_client()?,
            transfer_slots: Arc::new(Semaphore::new(config.max_concurrent_transfers.max(1))),
            package_slots: Arc::new(Semaphore::new(config.max_concurrent_packages.max(1))),
            stopping: CancellationToken::new(),
            jobs: Jobs::new(config.job_history),
            rollouts,
            config,
            store,
            layers,
            docker: Mutex::new(None),
            last_version: Mutex::new(None),
            events,
            metrics,
            started: Instant::now(),
        })))
    }

    /// The layer cache (LAYER_CACHE_DIR).
    pub fn layer_cache(&self) -> &LayerCache {
        &self.0.layers
    }

    /// The configuration.
    pub fn config(&self) -> &ServeConfig {
        &self.0.config
    }

    /// The package store.
    pub fn store(&self) -> &PackageStore {
        &self.0.store
    }

    /// The Docker engine, connecting (again) if there is no connection yet.
    pub async fn docker(&self) -> Result<Docker, SenderError> {
        let mut docker = self.0.docker.lock().await;
        if let Some(d) = docker.as_ref() {
            return Ok(d.clone());
        }
        let connected = crate::pipeline::connect_docker().await?;
        *docker = Some(connected.clone());
        Ok(connected)
    }

    /// The engine's version, or `None` when it does not answer within 3 s. `/health` is open
    /// without a token, so one answer serves for a second (callers meanwhile wait for the ask in
    /// flight); only a failed ping drops the connection (one merely slow, an engine busy
    /// exporting, keeps it for the jobs using it).
    pub async fn docker_version(&self) -> Option<String> {
        const REUSE: std::time::Duration = std::time::Duration::from_secs(1);
        const PING: std::time::Duration = std::time::Duration::from_secs(3);
        let mut last = self.0.last_version.lock().await;
        if let Some((at, version)) = last.as_ref() {
            if at.elapsed() < REUSE {
                return version.clone();
            }
        }
        let version = match tokio::time::timeout(PING, self.docker()).await {
            Ok(Ok(docker)) => match tokio::time::timeout(PING, docker.version()).await {
                Ok(Ok(v)) => Some(v.version.unwrap_or_default()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Docker engine does not answer");
                    *self.0.docker.lock().await = None;
                    None
                }
                Err(_) => None,
            },
            _ => None,
        };
        *last = Some((Instant::now(), version.clone()));
        version
    }

    /// The HTTP client for receivers.
    pub fn http(&self) -> &reqwest::Client {
        &self.0.http
    }

    /// Lifecycle events.
    pub fn events(&self) -> &Lifecycle {
        &self.0.events
    }

    /// Metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Jobs.
    pub fn jobs(&self) -> &Jobs {
        &self.0.jobs
    }

    /// Fleet rollouts: this run's and those kept from earlier runs.
    pub fn rollouts(&self) -> &crate::service::operations::Rollouts {
        &self.0.rollouts
    }

    /// The MAX_CONCURRENT_TRANSFERS slots.
    pub fn transfer_slots(&self) -> &Arc<Semaphore> {
        &self.0.transfer_slots
    }

    /// One of the MAX_CONCURRENT_PACKAGES slots, for building, exporting or preparing an image;
    /// while none is free, `waiting` tells `progress` what it waits for.
    pub async fn package_slot(
        &self,
        progress: &dyn crate::pipeline::Progress,
    ) -> Result<SemaphorePermit<'_>, SenderError> {
        if let Ok(permit) = self.0.package_slots.try_acquire() {
            return Ok(permit);
        }
        let waiting = format!(
            "waiting for one of the {} image slots (MAX_CONCURRENT_PACKAGES): other images are \
             being built or exported",
            self.0.config.max_concurrent_packages.max(1)
        );
        progress.report(crate::pipeline::ProgressEvent {
            stage: crate::pipeline::Stage::Context,
            done: 0,
            total: None,
            message: Some(&waiting),
            finished: false,
        });
        self.0
            .package_slots
            .acquire()
            .await
            .map_err(|_| SenderError::Internal("the image slots are closed".into()))
    }

    /// Cancelled when the service begins to stop: event streams end, new work is refused.
    pub fn stopping(&self) -> &CancellationToken {
        &self.0.stopping
    }

    /// Seconds since start.
    pub fn uptime_secs(&self) -> u64 {
        self.0.started.elapsed().as_secs()
    }

    /// Free bytes in the package directory.
    pub fn free_bytes(&self) -> u64 {
        fs4::available_space(self.store().dir()).unwrap_or(0)
    }
}
