//! The image-source flags `deploy` and `package` share: a Dockerfile to build, or an existing
//! image; and `KEY=VALUE` parsing.

use std::path::PathBuf;

use clap::ArgGroup;
use deploy_protocol::Compression;

use crate::pipeline::PackageParts;

/// Where the image comes from (a Dockerfile to build, or an image already on the build host) and
/// how it is compressed.
#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("image_source").required(true).args(["context", "image"])))]
pub(crate) struct ImageSourceArgs {
    /// Dockerfile to build: relative to --context unless absolute (as the API's
    /// `dockerfile_path`), and inside the context.
    #[arg(long, env = "DEPLOY_DOCKERFILE", requires = "context")]
    pub(crate) dockerfile: Option<PathBuf>,
    /// Build context directory (its root .dockerignore is honoured); the Dockerfile defaults
    /// to `Dockerfile` in it.
    #[arg(long, env = "DEPLOY_BUILD_CONTEXT")]
    pub(crate) context: Option<PathBuf>,
    /// Tag for the built image, `name:tag` (the image a receiver runs); a bare `tag` is
    /// named by --name (`NAME:tag`), and without --tag the image is `NAME:latest`.
    #[arg(long, env = "DEPLOY_IMAGE_TAG", requires = "context")]
    pub(crate) tag: Option<String>,
    /// Build argument `KEY=VALUE` (repeatable).
    #[arg(long = "build-arg", env = "DEPLOY_BUILD_ARG", value_parser = parse_key_value, requires = "context")]
    pub(crate) build_args: Vec<(String, String)>,
    /// Use an existing local image instead of building: `name:tag` or an image id.
    #[arg(long, env = "DEPLOY_IMAGE")]
    pub(crate) image: Option<String>,
    /// Compression: zstd, gzip or none.
    #[arg(long, env = "DEPLOY_COMPRESSION", default_value = "zstd")]
    pub(crate) compression: Compression,
    /// Compression level: gzip 1-9 (default 1), zstd 1-19 (default 3; a cold host's stream
    /// without a level: uncompressed to a receiver on this machine, zstd 1 to others).
    #[arg(long, env = "DEPLOY_COMPRESSION_LEVEL")]
    pub(crate) level: Option<i32>,
    /// zstd worker threads for a whole package (`package`, `--full`; default: one per core; 0
    /// compresses on the calling thread). Layer blobs are compressed one thread per layer, beside
    /// the thread that reads and hashes the export; a cold host's stream on one thread.
    #[arg(long, env = "DEPLOY_ZSTD_WORKERS")]
    pub(crate) zstd_workers: Option<u32>,
}

impl ImageSourceArgs {
    /// The image-source half of the package these flags describe (the rest is the caller's).
    pub(crate) fn parts(&self) -> PackageParts {
        PackageParts {
            image: self.image.clone(),
            context: self.context.clone(),
            dockerfile: self.dockerfile.clone(),
            tag: self.tag.clone(),
            build_args: self.build_args.iter().cloned().collect(),
            compression: Some(self.compression),
            level: self.level,
            zstd_workers: self.zstd_workers,
            ..PackageParts::default()
        }
    }
}

/// Parses `KEY=VALUE` (the value may contain `=`).
pub(crate) fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}
