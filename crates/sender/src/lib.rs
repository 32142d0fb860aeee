//! `deploy-sender`: builds and packages Docker images and streams them to `deploy-receiver`.
//!
//! The library holds the pipeline (build, package, store, upload) free of any web framework, so
//! that the CLI ([`commands::run`]) and the REST service call the same functions.

pub mod build;
pub mod cli;
pub mod commands;
pub mod config;
pub mod deploy;
pub mod docker;
pub mod doctor;
pub mod error;
pub mod events;
pub mod jobs;
/// The receiver client's protocol v2 calls.
pub mod client {
    #[path = "blobs.rs"]
    pub mod blobs;
    #[path = "releases.rs"]
    pub mod releases;
}
#[path = "pipeline/release.rs"]
pub mod release;
#[path = "pipeline/layers/mod.rs"]
pub mod layers;
pub mod metrics;
pub mod operations;
pub mod package;
pub mod progress;
pub mod routes;
pub mod server;
pub mod sink;
pub mod state;
pub mod store;
mod terminal;
pub mod upload;

pub use build::{BuildSpec, BuiltImage};
pub use deploy::{deploy, deploy_package, DeployFailure, DeployOutcome, DeployRequest};
pub use error::SenderError;
pub use package::{package_image, ImageSource, PackageRequest};
pub use progress::{NoProgress, Progress, ProgressEvent, Stage};
pub use server::{app, serve, ServeConfig};
pub use sink::CompressionOptions;
pub use state::AppState;
pub use store::{PackageInfo, PackageStore};
pub use upload::{upload_package, Endpoint, ReceiverTarget, UploadOutcome};

/// Logs to stderr with `filter` (tracing `EnvFilter` syntax); a bad filter falls back to `warn`.
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
