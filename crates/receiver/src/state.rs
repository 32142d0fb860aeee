//! The receiver's shared state: configuration, keys, nonce store, package store, metrics, events,
//! limits.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use deploy_protocol::KeyRing;
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::authorities::Authorities;
use crate::config::{Config, ConfigError};
use crate::docker::DockerHandle;
use crate::error::{ReceiverError, Result};
use crate::events::Events;
use crate::images::{LoadedImages, IMAGES_FILE};
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::nonces::{NonceCache, NONCE_LOG};
use crate::store::PackageStore;

/// Live nonces kept at most (each is a valid signed request inside the skew window).
const NONCE_CAPACITY: usize = 100_000;

/// Shared state of the receiver (cheap to clone).
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    images: LoadedImages,
    config: Config,
    keys: KeyRing,
    authorities: Authorities,
    nonces: NonceCache,
    store: PackageStore,
    metrics: Metrics,
    events: Events,
    docker: DockerHandle,
    upload_slots: Arc<Semaphore>,
    in_flight: Mutex<HashSet<Uuid>>,
    journal: Journal,
    container_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    layers: crate::v2::Layers,
    deployments: tokio_util::task::TaskTracker,
    started: Instant,
}

impl AppState {
    /// Builds the state: checks the keys, opens (and sweeps) the package store.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        config.check()?;
        let keys = config.key_ring()?;
        let authorities =
            Authorities::new(&config.receiver_authorities).map_err(ConfigError::Authorities)?;
        let store = PackageStore::open(&config.package_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot open PACKAGE_DIR {}: {e}",
                config.package_dir.display()
            )
        })?;
        let metrics = Metrics::new()?;
        let events = Events::new(&config, metrics.clone())?;
        // Opened now when there is a runtime, so that events left by the last run go out at once
        // and a broken outbox is reported at start; otherwise at the first event.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let events = events.clone();
            runtime.spawn(async move { events.sink().await.map(|_| ()) });
        }
        let journal_dir = config.state_dir().join("deployments");
        let journal = Journal::open(&journal_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the deployment journal {}: {e}",
                journal_dir.display()
            )
        })?;
        let nonce_log = config.state_dir().join(NONCE_LOG);
        let nonces = crate::store::private_dir(&config.state_dir())
            .and_then(|()| NonceCache::open(&nonce_log, NONCE_CAPACITY, crate::auth::unix_now()))
            .map_err(|e| {
                anyhow::anyhow!("cannot open the nonce log {}: {e}", nonce_log.display())
            })?;
        let docker = DockerHandle::new(config.docker_host.clone());
        let layers = crate::v2::Layers::open(&config, &metrics)?;
        let images_file = config.state_dir().join(IMAGES_FILE);
        let images = LoadedImages::open(&images_file).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the loaded-image list {}: {e}",
                images_file.display()
            )
        })?;
        Ok(Self(Arc::new(Inner {
            images,
            upload_slots: Arc::new(Semaphore::new(config.max_concurrent_uploads.max(1))),
            config,
            keys,
            authorities,
            nonces,
            store,
            metrics,
            events,
            docker,
            in_flight: Mutex::new(HashSet::new()),
            journal,
            container_locks: Mutex::new(HashMap::new()),
            layers,
            deployments: tokio_util::task::TaskTracker::new(),
            started: Instant::now(),
        })))
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.0.config
    }

    /// The HMAC key ring.
    pub fn keys(&self) -> &KeyRing {
        &self.0.keys
    }

    /// The nonce store.
    pub fn nonces(&self) -> &NonceCache {
        &self.0.nonces
    }

    /// The authorities this receiver answers to.
    pub fn authorities(&self) -> &Authorities {
        &self.0.authorities
    }

    /// The package store.
    pub fn store(&self) -> &PackageStore {
        &self.0.store
    }

    /// The images loaded from verified packages.
    pub fn images(&self) -> &LoadedImages {
        &self.0.images
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// The lifecycle events.
    pub fn events(&self) -> &Events {
        &self.0.events
    }

    /// The Docker engine.
    pub fn docker(&self) -> &DockerHandle {
        &self.0.docker
    }

    /// Protocol v2: releases, blobs, the layer inventory.
    pub fn layers(&self) -> &crate::v2::Layers {
        &self.0.layers
    }

    /// The deployments running in tasks of their own (`deploy::detached`): a stop waits for them
    /// within SHUTDOWN_GRACE_SECS, as for requests in flight.
    pub fn deployment_tasks(&self) -> &tokio_util::task::TaskTracker {
        &self.0.deployments
    }

    /// The deployment journal.
    pub fn journal(&self) -> &Journal {
        &self.0.journal
    }

    /// Waits for the turn to deploy to container `name`: one deployment per name at a time, in
    /// arrival order (tokio's mutex is fair).
    pub async fn container_lock(&self, name: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .0
                .container_locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Only the map holds an idle lock: nobody holds or waits for it, so it can go.
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            locks.entry(name.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Seconds since start.
    pub fn uptime_secs(&self) -> u64 {
        self.0.started.elapsed().as_secs()
    }

    /// One of MAX_CONCURRENT_UPLOADS slots, or BUSY.
    pub fn upload_slot(&self) -> Result<UploadSlot> {
        let permit = self
            .0
            .upload_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ReceiverError::Busy {
                message: format!(
                    "{} uploads are already in progress (MAX_CONCURRENT_UPLOADS); retry later",
                    self.0.config.max_concurrent_uploads
                ),
                retry_after_secs: 2,
            })?;
        self.metrics().uploads_in_flight().inc();
        Ok(UploadSlot {
            _permit: permit,
            state: self.clone(),
        })
    }
}

/// A held upload slot; frees itself on drop.
pub struct UploadSlot {
    _permit: OwnedSemaphorePermit,
    state: AppState,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        self.state.metrics().uploads_in_flight().dec();
    }
}

/// Marks a package id as being received, so two uploads of one id never race on the store.
pub struct InFlight {
    state: AppState,
    id: Uuid,
}

impl InFlight {
    /// Claims `id`, or BUSY when another request holds it.
    pub fn claim(state: &AppState, id: Uuid) -> Result<Self> {
        let mut set = state
            .0
            .in_flight
            .lock()
            .map_err(|_| ReceiverError::Internal("in-flight set poisoned".into()))?;
        if !set.insert(id) {
            return Err(ReceiverError::Busy {
                message: format!("package {id} is being received by another request"),
                retry_after_secs: 5,
            });
        }
        Ok(Self {
            state: state.clone(),
            id,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut set) = self.state.0.in_flight.lock() {
            set.remove(&self.id);
        }
    }
}
