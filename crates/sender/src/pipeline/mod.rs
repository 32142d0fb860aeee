//! The pipeline: from a Dockerfile or an image on this host to a package in the store, and from
//! there to a receiver. It knows nothing of HTTP servers or terminals; the CLI and the service
//! both call it.
//!
//! - `build`: a Dockerfile and its context to an image (Docker API, `.dockerignore`).
//! - `package`: an image to a stored package ([`PackageRequest`], [`package_image`]).
//! - `compress`: the package writer (gzip or zstd, BLAKE3 and size counted on the way).
//! - `store`: the package store on disk and file hashing.
//! - `progress`: how a step reports progress to whoever draws it.
//! - `docker`: connecting to the Docker engine.
//! - `deploy`: package, then send to a receiver's `/deployment/full` ([`deploy`]).

mod build;
mod compress;
mod deploy;
mod docker;
mod events;
mod package;
mod progress;
mod store;

pub use build::{build_image, BuildSpec, BuiltImage, LOG_TAIL_LINES};
pub use compress::{default_zstd_workers, CompressionOptions};
pub use deploy::{deploy, deploy_package, DeployFailure, DeployOutcome, DeployRequest};
pub use docker::connect as connect_docker;
pub use events::{error_payload, Lifecycle, Subject};
pub use package::{
    compression_from_path, default_container_name, manifest_for_file, package_image, ImageSource,
    PackageRequest, DEFAULT_MAX_PACKAGE_SIZE,
};
pub use progress::{NoProgress, Progress, ProgressEvent, Stage};
pub use store::{hash_file, now_rfc3339, PackageInfo, PackageStore};
