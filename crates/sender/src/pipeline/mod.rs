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
//! - [`rollout`]: one release to many receivers (canary, health-gated batches, fleet rollback).
//! - `layers`: the layer cache: an image as compressed layer blobs, each made once.
//! - `release`: an image sent as a protocol v2 release (only the layers the target lacks).
//! - `stream`: a cold host's deploy, `docker save` streamed into its `docker load` as it is made.

mod build;
mod compress;
mod deploy;
mod docker;
mod events;
mod layers;
mod package;
mod progress;
mod release;
pub mod rollout;
mod store;
mod stream;

pub use build::{build_image, BuildSpec, BuiltImage, LOG_TAIL_LINES};
pub use compress::{default_zstd_workers, CompressionOptions};
pub use deploy::{deploy, deploy_package, DeployFailure, DeployOutcome, DeployRequest};
pub use docker::connect as connect_docker;
pub use events::{error_payload, Lifecycle, Subject};
pub use layers::{
    chain_ids, digest_hex, prepare_image, sha256_digest, CachedLayer, Eviction, LayerCache,
    PrepareStats, PreparedImage, PreparedLayer, DEFAULT_LAYER_CACHE_SIZE,
};
pub use package::{
    compression_from_path, default_container_name, manifest_for_file, package_image, FrontDoor,
    ImageSource, PackageParts, PackageRequest, DEFAULT_MAX_PACKAGE_SIZE,
};
pub use progress::{NoProgress, Progress, ProgressEvent, Stage};
pub use release::{
    deploy_release, prepare_source, release_manifest, send_manifest, send_release, LayerFate,
    LayerReport, ReleaseAction, ReleaseOutcome, ReleaseTotals, TransferMode,
};
pub use store::{hash_file, now_rfc3339, PackageHold, PackageInfo, PackageStore};
