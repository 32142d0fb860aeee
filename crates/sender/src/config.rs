//! Settings of the CLI and the REST service: where packages live, which receiver to talk to
//! with which key, and how the service runs. Every field is a flag and an environment variable.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::client::{ReceiverClient, ReceiverTarget};
use crate::pipeline::{LayerCache, Lifecycle, DEFAULT_LAYER_CACHE_SIZE, DEFAULT_MAX_PACKAGE_SIZE};
use crate::SenderError;

/// The package store.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct StoreConfig {
    /// Directory where packages and their metadata are kept.
    #[arg(long, env = "PACKAGE_DIR", default_value = "./packages")]
    pub package_dir: PathBuf,
    /// Largest package (compressed) to write, e.g. `5GiB`, `500MB` or a number of bytes.
    #[arg(long, env = "MAX_PACKAGE_SIZE", default_value = "5GiB", value_parser = parse_size)]
    pub max_package_size: u64,
    /// Packages kept per container name (failed attempts included): after a new package is
    /// stored, older ones of the same name are deleted.
    #[arg(long, env = "PACKAGE_HISTORY", default_value_t = DEFAULT_PACKAGE_HISTORY)]
    pub package_history: usize,
    /// Size budget of the whole store, e.g. `20GiB`: after a new package is stored, the oldest
    /// others are deleted until the store fits [default: no budget].
    #[arg(long, env = "PACKAGE_STORE_MAX_SIZE", value_parser = parse_size)]
    pub package_store_max_size: Option<u64>,
    /// Directory of the layer cache (compressed layer blobs by diffID, image configs by id);
    /// default `<PACKAGE_DIR>/layers`.
    #[arg(long, env = "LAYER_CACHE_DIR")]
    pub layer_cache_dir: Option<PathBuf>,
    /// Budget of the layer cache, e.g. `20GiB`; the least recently used blobs go beyond it
    /// (never those of a transfer in progress).
    #[arg(long, env = "LAYER_CACHE_SIZE", default_value = "20GiB", value_parser = parse_size)]
    pub layer_cache_size: u64,
}

impl StoreConfig {
    /// The layer cache directory: `--layer-cache-dir`, or `<PACKAGE_DIR>/layers`.
    pub fn layer_cache_dir(&self) -> PathBuf {
        self.layer_cache_dir
            .clone()
            .unwrap_or_else(|| self.package_dir.join("layers"))
    }

    /// Opens the layer cache.
    pub async fn open_layer_cache(&self) -> Result<LayerCache, SenderError> {
        LayerCache::open(self.layer_cache_dir(), self.layer_cache_size).await
    }
}

/// Packages kept per container name by default.
pub const DEFAULT_PACKAGE_HISTORY: usize = 3;

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            package_dir: PathBuf::from("./packages"),
            max_package_size: DEFAULT_MAX_PACKAGE_SIZE,
            layer_cache_dir: None,
            layer_cache_size: DEFAULT_LAYER_CACHE_SIZE,
            package_history: DEFAULT_PACKAGE_HISTORY,
            package_store_max_size: None,
        }
    }
}

impl StoreConfig {
    /// Applies the retention after `new` was stored (never deleting `new`); a failure is logged,
    /// never returned: the package is made either way.
    pub async fn retain(&self, store: &crate::PackageStore, new: uuid::Uuid) {
        if let Err(e) = store
            .prune(self.package_history, self.package_store_max_size, Some(new))
            .await
        {
            tracing::warn!(error = %e, "could not prune old packages");
        }
    }
}

/// A byte size: a plain number of bytes, or a number with a unit (`KB`, `MiB`, `GiB`...).
pub fn parse_size(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.trim().parse::<u64>() {
        return Ok(n);
    }
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size ({e}): use e.g. 5GiB, 500MB or 1048576"))
}

/// The receiver to send to and the key to sign with.
#[derive(Clone, PartialEq, Eq, clap::Args)]
pub struct ReceiverConfig {
    /// Receiver base URL, e.g. `http://192.168.86.200:8001`; for `deploy`, several (repeat
    /// `--to`, or separate with commas) roll the release out to each.
    #[arg(long = "to", env = "DEFAULT_RECEIVER_URL", value_delimiter = ',')]
    pub to: Vec<String>,
    /// Id of the shared HMAC key the receiver knows this sender by.
    #[arg(long, env = "DEPLOY_HMAC_KEY_ID", default_value = "default")]
    pub key_id: String,
    /// Shared HMAC secret (prefer the environment variable: flags show in process lists).
    #[arg(long, env = "DEPLOY_HMAC_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Seconds to wait for a connection to the receiver.
    #[arg(long, env = "DEPLOY_CONNECT_TIMEOUT_SECS", default_value_t = 10)]
    pub connect_timeout_secs: u64,
    /// PEM file of CA certificate(s) to trust for an `https://` receiver, in addition to the
    /// system's (e.g. the private CA that signed the TLS proxy's certificate).
    #[arg(long, env = "DEPLOY_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Protocol v2: ask the receiver to load a release while its blobs are still arriving
    /// (`true`), or only once every blob is sent (`false`).
    #[arg(long, env = "DEPLOY_AWAIT_BLOBS", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub await_blobs: bool,
    /// Protocol v2: most blobs of one release uploaded at once, each on its own connection.
    #[arg(long, env = "DEPLOY_BLOB_CONNECTIONS", default_value_t = crate::client::DEFAULT_BLOB_CONNECTIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64), value_name = "N")]
    pub blob_connections: usize,
    /// Protocol v2: a deploy to a host whose engine holds none of the image's layers, of an image
    /// the layer cache lacks, streams `docker save` compressed straight into the receiver's
    /// `docker load` (`/deployment/stream`) instead of splitting it into layers first (`true`);
    /// `false` always sends layers.
    #[arg(long, env = "DEPLOY_STREAM_COLD", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub stream_cold: bool,
}

impl fmt::Debug for ReceiverConfig {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("to", &self.to)
            .field("key_id", &self.key_id)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("ca_cert", &self.ca_cert)
            .field("await_blobs", &self.await_blobs)
            .field("blob_connections", &self.blob_connections)
            .field("stream_cold", &self.stream_cold)
            .finish()
    }
}

impl Default for ReceiverConfig {
    /// No receiver, key id `default`, no secret, 10 s connect timeout, system CAs only.
    fn default() -> Self {
        Self {
            to: Vec::new(),
            key_id: "default".into(),
            secret: None,
            connect_timeout_secs: 10,
            ca_cert: None,
            await_blobs: true,
            blob_connections: crate::client::DEFAULT_BLOB_CONNECTIONS,
            stream_cold: true,
        }
    }
}

impl ReceiverConfig {
    /// The first receiver URL given, if any.
    pub fn url(&self) -> Option<&str> {
        self.to.iter().map(String::as_str).find(|u| !u.is_empty())
    }

    /// The one target, or `VALIDATION_ERROR` naming what is missing (or that there are several).
    pub fn target(&self) -> Result<ReceiverTarget, SenderError> {
        let url = self.url().ok_or_else(|| {
            SenderError::Validation("no receiver: pass --to URL or set DEFAULT_RECEIVER_URL".into())
        })?;
        if self.to.iter().filter(|u| !u.is_empty()).count() > 1 {
            return Err(SenderError::Validation(format!(
                "this command sends to one receiver, and {} were given: only `deploy` rolls out to several",
                self.to.len()
            )));
        }
        let secret = self.secret.as_deref().unwrap_or_default();
        ReceiverTarget::new(url, &self.key_id, secret.as_bytes())
    }

    /// The client for the receiver and key these settings name.
    pub fn client(&self) -> Result<ReceiverClient, SenderError> {
        Ok(self.client_for(self.http_client()?, self.target()?))
    }

    /// A client for `target` over `http` with these settings' protocol v2 options.
    pub fn client_for(&self, http: reqwest::Client, target: ReceiverTarget) -> ReceiverClient {
        ReceiverClient::new(http, target)
            .with_await_blobs(self.await_blobs)
            .with_blob_connections(self.blob_connections)
            .with_stream_cold(self.stream_cold)
    }

    /// An HTTP client for uploads: a connect timeout, and no overall timeout (packages are large
    /// and a full deployment waits for health checks). `https://` receivers are verified against
    /// the system's CA certificates and those of `ca_cert`.
    pub fn http_client(&self) -> Result<reqwest::Client, SenderError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(self.connect_timeout_secs))
            .user_agent(concat!("deploy-sender/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &self.ca_cert {
            for certificate in read_ca_certs(path)? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        builder
            .build()
            .map_err(|e| SenderError::Internal(format!("cannot create the HTTP client: {e}")))
    }
}

/// The certificates of a PEM file, or `VALIDATION_ERROR` naming the file and what is wrong.
fn read_ca_certs(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, SenderError> {
    let invalid = |why: String| {
        SenderError::Validation(format!(
            "DEPLOY_CA_CERT / --ca-cert {}: {why}",
            path.display()
        ))
    };
    let pem = std::fs::read(path).map_err(|e| invalid(format!("cannot read it: {e}")))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| invalid(format!("not PEM certificates: {e}")))?;
    if certificates.is_empty() {
        return Err(invalid("holds no PEM certificate".into()));
    }
    Ok(certificates)
}

/// Where lifecycle events go: a durable outbox in the state directory, delivered to Kafka when
/// bootstrap servers are set.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct EventsConfig {
    /// State directory (event outbox); default `<PACKAGE_DIR>/.state`.
    #[arg(long, env = "SENDER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Kafka bootstrap servers for lifecycle events; unset: events stay in the local outbox.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: Option<String>,
    /// Kafka topic for lifecycle events.
    #[arg(long, env = "KAFKA_TOPIC", default_value = deploy_protocol::events::DEFAULT_TOPIC)]
    pub kafka_topic: String,
}

impl Default for EventsConfig {
    /// The default state directory, no Kafka, the default topic.
    fn default() -> Self {
        Self {
            state_dir: None,
            kafka_bootstrap_servers: None,
            kafka_topic: deploy_protocol::events::DEFAULT_TOPIC.into(),
        }
    }
}

impl EventsConfig {
    /// The state directory in effect: the one given, or `<package_dir>/.state`.
    pub fn state_dir(&self, package_dir: &std::path::Path) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| package_dir.join(".state"))
    }

    /// Opens the outbox (and the Kafka producer, when configured).
    pub(crate) async fn open(
        &self,
        package_dir: &std::path::Path,
    ) -> Result<Lifecycle, SenderError> {
        Lifecycle::open(
            self.state_dir(package_dir),
            self.kafka_bootstrap_servers.clone(),
            self.kafka_topic.clone(),
        )
        .await
    }
}

/// Settings of `deploy-sender serve`. Every field is a flag and an environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "SENDER_BIND", default_value = "127.0.0.1:8000")]
    pub bind: SocketAddr,
    /// Bearer token every `/api` request must carry (`Authorization: Bearer <token>`); unset: no
    /// token is asked for, which `serve` accepts only on a loopback address (or with
    /// SENDER_OPEN_API).
    #[arg(long, env = "SENDER_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Serve `/api` without a token on an address other than loopback: anyone who reaches it can
    /// then package the engine's images, send them anywhere and deploy with this sender's key.
    /// For a network that only trusted clients reach.
    #[arg(long, env = "SENDER_OPEN_API")]
    pub open_api: bool,
    /// Package store.
    #[command(flatten)]
    pub store: StoreConfig,
    /// Default receiver (`--to` / DEFAULT_RECEIVER_URL) and the HMAC key to sign with.
    #[command(flatten)]
    pub receiver: ReceiverConfig,
    /// Lifecycle events: outbox and Kafka.
    #[command(flatten)]
    pub events: EventsConfig,
    /// Uploads to receivers running at once, over all requests.
    #[arg(long, env = "MAX_CONCURRENT_TRANSFERS", default_value_t = 5)]
    pub max_concurrent_transfers: usize,
    /// Images built, exported or prepared as layers at once, over all requests (packages,
    /// transfers, rollouts); the rest wait their turn. A build holds its context in memory (up
    /// to 512 MiB), and each export keeps the engine and a core busy.
    #[arg(long, env = "MAX_CONCURRENT_PACKAGES", default_value_t = 2)]
    pub max_concurrent_packages: usize,
    /// On SIGTERM or Ctrl-C: how long requests in flight and running jobs get to finish before
    /// the service exits (below Docker's 10 s stop timeout). Open event streams end at once.
    #[arg(long, env = "SENDER_SHUTDOWN_GRACE_SECS", default_value_t = 8)]
    pub shutdown_grace_secs: u64,
    /// zstd worker threads per whole-package job (default: one per core). Layer blobs are
    /// compressed one thread per layer, beside the thread that reads and hashes the export.
    #[arg(long, env = "DEPLOY_ZSTD_WORKERS")]
    pub zstd_workers: Option<u32>,
    /// Finished jobs kept for `GET /api/v1/jobs/{id}`.
    #[arg(long, env = "SENDER_JOB_HISTORY", default_value_t = 200)]
    pub job_history: usize,
}

impl ServeConfig {
    /// Refuses what would leave the API open by mistake: an empty token (what an env file
    /// leaves), and no token on an address other than loopback without SENDER_OPEN_API.
    pub fn check_exposure(&self) -> Result<(), SenderError> {
        match self.api_token.as_deref().map(str::trim) {
            Some("") => Err(SenderError::Validation(
                "SENDER_API_TOKEN is set but empty: set a token (e.g. `openssl rand -hex 32`), \
                 or unset it to serve on loopback without one"
                    .into(),
            )),
            None if !self.bind.ip().is_loopback() && !self.open_api => {
                Err(SenderError::Validation(format!(
                    "serving /api on {} without SENDER_API_TOKEN would let anyone who reaches it \
                     package this engine's images, send them anywhere and deploy with this \
                     sender's key: set SENDER_API_TOKEN, bind to 127.0.0.1 (SENDER_BIND), or set \
                     SENDER_OPEN_API=true if only trusted clients can reach it",
                    self.bind
                )))
            }
            _ => Ok(()),
        }
    }

    /// A configuration for a package directory, with every other setting at its default
    /// (loopback on an ephemeral port, no token, no receiver, no Kafka): for tests and embedding.
    pub fn for_dir(package_dir: impl Into<PathBuf>) -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_token: None,
            open_api: false,
            store: StoreConfig {
                package_dir: package_dir.into(),
                ..StoreConfig::default()
            },
            receiver: ReceiverConfig::default(),
            events: EventsConfig::default(),
            max_concurrent_transfers: 5,
            max_concurrent_packages: 2,
            shutdown_grace_secs: 8,
            zstd_workers: None,
            job_history: 200,
        }
    }

    /// The state directory in effect.
    pub fn state_dir(&self) -> PathBuf {
        self.events.state_dir(&self.store.package_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_refuses_an_open_api_by_mistake() {
        let mut config = ServeConfig::for_dir("/tmp/p");
        assert!(config.check_exposure().is_ok(), "loopback without a token");
        config.bind = "0.0.0.0:8000".parse().expect("addr");
        let refused = config.check_exposure().expect_err("open to the network");
        assert!(
            refused.to_string().contains("SENDER_API_TOKEN"),
            "{refused}"
        );
        config.open_api = true;
        assert!(config.check_exposure().is_ok(), "said so");
        config.open_api = false;
        config.api_token = Some("  ".into());
        assert!(config.check_exposure().is_err(), "an empty token");
        config.api_token = Some("s3cret".into());
        assert!(config.check_exposure().is_ok());
    }

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size("5GiB"), Ok(5 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let config = ReceiverConfig {
            secret: Some("hunter2".into()),
            ..ReceiverConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(
            config.target().expect_err("no url").code(),
            deploy_protocol::ErrorCode::ValidationError
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_a_validation_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").expect("write");
        for path in [empty, dir.path().join("missing.pem")] {
            let config = ReceiverConfig {
                ca_cert: Some(path.clone()),
                ..ReceiverConfig::default()
            };
            let err = config.http_client().expect_err("refused");
            assert_eq!(err.code(), deploy_protocol::ErrorCode::ValidationError);
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        }
    }
}
