//! Receiver configuration: every setting is a flag with an environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use deploy_protocol::KeyRing;
use ipnet::IpNet;

/// `deploy-receiver`: accepts signed, streamed deployment packages and runs them on this host's Docker.
#[derive(Debug, Clone, Parser)]
#[command(name = "deploy-receiver", version, about)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "RECEIVER_BIND", default_value = "0.0.0.0:8001")]
    pub bind: SocketAddr,

    /// Directory holding received packages (created if missing).
    #[arg(
        long,
        env = "PACKAGE_DIR",
        default_value = "/var/lib/deploy-receiver/packages"
    )]
    pub package_dir: PathBuf,

    /// Directory for the deployment journal, the event outbox and the nonce log
    /// [default: <PACKAGE_DIR>/.state].
    #[arg(long, env = "STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Shared HMAC secret for key id DEPLOY_HMAC_KEY_ID.
    #[arg(long, env = "DEPLOY_HMAC_SECRET", hide_env_values = true)]
    pub hmac_secret: Option<String>,

    /// Key id of DEPLOY_HMAC_SECRET.
    #[arg(long, env = "DEPLOY_HMAC_KEY_ID", default_value = "default")]
    pub hmac_key_id: String,

    /// Several keys for rotation: `id=secret,id2=secret2` (added to DEPLOY_HMAC_SECRET's key).
    #[arg(long, env = "DEPLOY_HMAC_KEYS", hide_env_values = true)]
    pub hmac_keys: Option<String>,

    /// Client networks allowed to call /deployment endpoints: comma-separated CIDRs, or `any`
    /// (said explicitly; the HMAC signature is required either way). Required: unset, empty or
    /// blank is a start-up error.
    #[arg(long, env = "ALLOWED_NETWORKS", value_parser = parse_networks)]
    pub allowed_networks: Option<AllowedNetworks>,

    /// The authorities (`host[:port]`, as clients put it in the Host header and sign it) this
    /// receiver answers to, comma-separated. Unset: its own address the client connected to, this
    /// host's name or `localhost`, each with the listening port. Set it behind a reverse proxy or a
    /// published container port (`deploy.example.com`, `192.168.86.200:8001`).
    #[arg(long, env = "RECEIVER_AUTHORITIES", value_delimiter = ',')]
    pub receiver_authorities: Vec<String>,

    /// Also accept signatures in the older form that does not cover the authority (a request
    /// signed that way can be replayed to any receiver sharing the key): only while senders are
    /// upgraded.
    #[arg(long, env = "ACCEPT_UNBOUND_SIGNATURES")]
    pub accept_unbound_signatures: bool,

    /// Reverse proxies whose X-Forwarded-For is believed, comma-separated CIDRs (unset = none).
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpNet>,

    /// Largest accepted package, in bytes or with a unit (`5GiB`, `512MiB`).
    #[arg(long, env = "MAX_PACKAGE_SIZE", default_value = "5GiB", value_parser = parse_size)]
    pub max_package_size: u64,

    /// Largest decompressed `docker save` archive a package may unpack to when loaded, in bytes
    /// or with a unit. The default is 4 x the default MAX_PACKAGE_SIZE, room for images that
    /// compress well; a package that unpacks to more is refused as a possible decompression bomb
    /// before Docker keeps any of it.
    #[arg(long, env = "MAX_IMAGE_SIZE", default_value = "20GiB", value_parser = parse_size)]
    pub max_image_size: u64,

    /// Allowed difference between a request's timestamp and this host's clock, in seconds.
    #[arg(long, env = "HMAC_MAX_SKEW_SECS", default_value_t = deploy_protocol::envelope::DEFAULT_MAX_SKEW_SECS)]
    pub hmac_max_skew_secs: u64,

    /// Uploads accepted at once; more are answered 429 BUSY with Retry-After.
    #[arg(long, env = "MAX_CONCURRENT_UPLOADS", default_value_t = 4)]
    pub max_concurrent_uploads: usize,

    /// Seconds an upload may go without receiving a byte before it is cut off.
    #[arg(long, env = "UPLOAD_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    pub upload_idle_timeout_secs: u64,

    /// Slowest accepted upload, in bytes per second (`64KiB`): an upload must finish within
    /// UPLOAD_IDLE_TIMEOUT_SECS + package_size / UPLOAD_MIN_RATE, so a client trickling a byte
    /// now and then cannot hold an upload slot for hours. Its unsigned manifest part must arrive
    /// within UPLOAD_IDLE_TIMEOUT_SECS in all.
    #[arg(long, env = "UPLOAD_MIN_RATE", default_value = "64KiB", value_parser = parse_size)]
    pub upload_min_rate: u64,

    /// Seconds a connection may take to send a request's headers before it is closed (against
    /// slow-header clients holding connections open).
    #[arg(long, env = "HEADER_READ_TIMEOUT_SECS", default_value_t = 15)]
    pub header_read_timeout_secs: u64,

    /// Connections open at once (lowered to the process's open-file limit less 64). A newcomer
    /// over it takes the place of the oldest connection that has not authenticated a request.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Connections open at once from one client address (the socket peer; an IPv6 peer counts by
    /// its /64); a newcomer over it takes the place of that address's oldest unauthenticated
    /// connection.
    #[arg(long, env = "MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    pub max_connections_per_ip: usize,

    /// Seconds a stop (SIGTERM) waits for requests in flight before it closes their connections.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Deployments kept per container name for rollback: the images and packages of its last N
    /// successful deployments (a redeploy of the same image counts as one), and when those all
    /// ran one image also the newest deployment of another image, so that there is always a
    /// version to roll back to. Older ones, and those of rolled-back deployments, are removed
    /// after each successful deployment of that name.
    #[arg(long, env = "IMAGE_HISTORY", default_value_t = 3)]
    pub image_history: usize,

    /// Finished deployment records kept in the journal (besides the IMAGE_HISTORY ones each name
    /// keeps, and any in progress); older ones are deleted after each successful deployment.
    #[arg(long, env = "JOURNAL_HISTORY", default_value_t = 1000)]
    pub journal_history: usize,

    /// How long partial layer blobs (protocol v2), unloaded complete blobs and registered
    /// releases are kept (`24h`, `90m`); older ones are swept.
    #[arg(long, env = "PARTIAL_TTL", default_value = "24h", value_parser = parse_duration)]
    pub partial_ttl: std::time::Duration,

    /// Most bytes partial layer blobs may hold in all; beyond it the oldest partials not being
    /// written are swept (`10GiB`).
    #[arg(long, env = "PARTIAL_BUDGET", default_value = "10GiB", value_parser = parse_size)]
    pub partial_budget: u64,

    /// Let deployment specs ask for privileged mode.
    #[arg(long, env = "ALLOW_PRIVILEGED")]
    pub allow_privileged: bool,

    /// Let deployment specs mount host paths.
    #[arg(long, env = "ALLOW_HOST_MOUNTS")]
    pub allow_host_mounts: bool,

    /// Let deployment specs use host networking (or any network mode other than bridge).
    #[arg(long, env = "ALLOW_HOST_NETWORK")]
    pub allow_host_network: bool,

    /// Let deployment specs add Linux capabilities.
    #[arg(long, env = "ALLOW_CAP_ADD")]
    pub allow_cap_add: bool,

    /// Let deployment specs map host devices.
    #[arg(long, env = "ALLOW_DEVICES")]
    pub allow_devices: bool,

    /// Let deployments run, re-tag and prune images this receiver did not load from a verified
    /// package (an image already on the host, named by the request). Off: only images it loaded
    /// may be run, and a package may only move tags that point at such images.
    #[arg(long, env = "ALLOW_UNVERIFIED_IMAGES")]
    pub allow_unverified_images: bool,

    /// Kafka bootstrap servers for lifecycle events (unset = local outbox only).
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: Option<String>,

    /// Kafka topic for lifecycle events.
    #[arg(long, env = "KAFKA_TOPIC", default_value = deploy_protocol::events::DEFAULT_TOPIC)]
    pub kafka_topic: String,

    /// Docker engine to deploy to: `unix:///path/docker.sock`, `tcp://HOST:PORT` or
    /// `http://HOST:PORT` [default: unix:///var/run/docker.sock].
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,

    /// Log format: `text` or `json`. Text is coloured only on a terminal and never when
    /// NO_COLOR is set.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// Instead of serving: GET this health URL of a running receiver, exit 0 when it answers
    /// 200 with status `healthy`, else 1. For container HEALTHCHECKs (the image has no curl);
    /// deliberately no environment variable, which would stop the daemon from ever starting.
    #[arg(long, value_name = "URL")]
    pub probe: Option<String>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No key at all.
    #[error(
        "no HMAC key configured: set DEPLOY_HMAC_SECRET (and optionally DEPLOY_HMAC_KEY_ID) or \
         DEPLOY_HMAC_KEYS=id=secret,... — the receiver refuses to run unauthenticated"
    )]
    NoKey,
    /// DEPLOY_HMAC_KEYS is malformed.
    #[error("DEPLOY_HMAC_KEYS: {0}")]
    KeyList(#[from] deploy_protocol::envelope::KeyListError),
    /// ALLOWED_NETWORKS is not set.
    #[error(
        "ALLOWED_NETWORKS is not set: name the client networks (ALLOWED_NETWORKS=192.168.86.0/24,10.0.0.0/8) \
         or say ALLOWED_NETWORKS=any — the receiver does not guess"
    )]
    NoNetworks,
    /// RECEIVER_AUTHORITIES is malformed.
    #[error("{0}")]
    Authorities(String),
}

/// Who may call /deployment endpoints, by address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedNetworks {
    /// Any address (`ALLOWED_NETWORKS=any`).
    Any,
    /// Addresses in these networks.
    Only(Vec<IpNet>),
}

/// Parses `any` or comma-separated CIDRs; empty or blank (or an empty entry) is an error.
pub fn parse_networks(s: &str) -> Result<AllowedNetworks, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err(
            "empty: name the client networks as CIDRs (10.0.0.0/8,192.168.86.0/24) or say `any`"
                .into(),
        );
    }
    if s.eq_ignore_ascii_case("any") {
        return Ok(AllowedNetworks::Any);
    }
    s.split(',')
        .map(|entry| {
            let entry = entry.trim();
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!(
                        "{entry:?} is not a CIDR (10.0.0.0/8) or an address; `any` stands alone"
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(AllowedNetworks::Only)
}

impl Config {
    /// A configuration for tests and embedding: defaults, one key, the given package directory.
    pub fn for_dir(package_dir: impl Into<PathBuf>, secret: &str) -> Self {
        let mut config = Config::parse_from(["deploy-receiver"]);
        config.package_dir = package_dir.into();
        config.hmac_secret = Some(secret.to_owned());
        config.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        config.allowed_networks = Some(AllowedNetworks::Any);
        config
    }

    /// The allowlist; [`Config::check`] has made sure it is set.
    pub fn networks(&self) -> &AllowedNetworks {
        static NONE: AllowedNetworks = AllowedNetworks::Only(Vec::new());
        self.allowed_networks.as_ref().unwrap_or(&NONE)
    }

    /// Refuses a configuration that does not say what it must: the allowlist.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.allowed_networks.is_none() {
            return Err(ConfigError::NoNetworks);
        }
        Ok(())
    }

    /// The key ring from DEPLOY_HMAC_KEYS and DEPLOY_HMAC_SECRET; empty is an error.
    pub fn key_ring(&self) -> Result<KeyRing, ConfigError> {
        let mut ring = match &self.hmac_keys {
            Some(list) => KeyRing::parse_list(list)?,
            None => KeyRing::new(),
        };
        if let Some(secret) = self.hmac_secret.as_deref().filter(|s| !s.is_empty()) {
            ring.insert(self.hmac_key_id.clone(), secret.as_bytes());
        }
        if ring.is_empty() {
            return Err(ConfigError::NoKey);
        }
        Ok(ring)
    }

    /// Where the journal and outbox live.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.package_dir.join(".state"))
    }
}

/// Parses `1234`, `512MiB`, `5GiB`, `1.5GB`, `100 KB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let size: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|e| format!("invalid size {s:?}: {e}"))?;
    if size.as_u64() == 0 {
        return Err("size must be greater than zero".into());
    }
    Ok(size.as_u64())
}

/// Parses `24h`, `90m`, `30s`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("5GiB"), Ok(5 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn networks_must_be_named_or_any() {
        assert!(parse_networks("").is_err());
        assert!(parse_networks("  ").is_err());
        assert!(parse_networks("10.0.0.0/8,").is_err());
        assert!(parse_networks("any,10.0.0.0/8").is_err());
        assert_eq!(parse_networks("any"), Ok(AllowedNetworks::Any));
        assert_eq!(parse_networks(" ANY "), Ok(AllowedNetworks::Any));
        assert_eq!(
            parse_networks("10.0.0.0/8, 192.0.2.1"),
            Ok(AllowedNetworks::Only(vec![
                "10.0.0.0/8".parse().expect("net"),
                "192.0.2.1/32".parse().expect("net")
            ]))
        );
        let mut config = Config::for_dir("/tmp/x", "k");
        assert!(config.check().is_ok());
        config.allowed_networks = None;
        assert!(matches!(config.check(), Err(ConfigError::NoNetworks)));
    }

    #[test]
    fn refuses_to_run_without_a_key() {
        let mut config = Config::for_dir("/tmp/x", "");
        assert!(matches!(config.key_ring(), Err(ConfigError::NoKey)));
        config.hmac_keys = Some("a=1,b=2".into());
        let ring = config.key_ring().expect("keys");
        assert_eq!(ring.ids().collect::<Vec<_>>(), ["a", "b"]);
    }
}
