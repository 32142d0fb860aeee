//! The command line: `deploy-sender transfer` and `deploy-sender package`. Every flag is also an
//! environment variable; the doc comments are the `--help` text.

use std::path::PathBuf;

use clap::{ArgGroup, Parser, Subcommand};
use deploy_protocol::Compression;
use uuid::Uuid;

use crate::config::{ReceiverConfig, StoreConfig};
use crate::SenderError;

mod deploy;
pub use deploy::{parse_health, parse_restart, DeployArgs, HealthArg};

/// Builds and packages Docker images and streams them to deploy-receiver, without a registry.
#[derive(Debug, Parser)]
#[command(name = "deploy-sender", version, about)]
pub struct Cli {
    /// Log filter in `tracing` syntax (e.g. `info`, `deploy_sender=debug`); logs go to stderr.
    #[arg(long, env = "RUST_LOG", default_value = "warn", global = true)]
    pub log: String,
    /// Docker engine that builds and exports images: `unix:///path/docker.sock`,
    /// `tcp://HOST:PORT` or `http://HOST:PORT` [default: unix:///var/run/docker.sock].
    #[arg(long, env = "DOCKER_HOST", global = true)]
    pub docker_host: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build (or take) an image, send it to a receiver and run it there, healthy or rolled back.
    Deploy(Box<DeployArgs>),
    /// Stream a package file to a receiver (`POST /deployment/upload`).
    Transfer(TransferArgs),
    /// Build an image (or take an existing one) and store it as a compressed package.
    Package(PackageArgs),
    /// List, show, verify or delete stored packages.
    #[command(subcommand)]
    Packages(PackagesCommand),
    /// Run the REST service (`/api/v1`, `/health`, `/metrics`, `/docs`).
    Serve(Box<crate::server::ServeConfig>),
    /// Check a receiver end to end (reachable, key, clock, Docker, disk) and say what to fix.
    Doctor(crate::doctor::DoctorArgs),
}

/// `deploy-sender packages ...`.
#[derive(Debug, Subcommand)]
pub enum PackagesCommand {
    /// List stored packages, newest first.
    List(StoreArgs),
    /// Show one package's metadata as JSON.
    Show(PackageIdArgs),
    /// Re-hash a package and compare with its recorded checksum.
    Verify(PackageIdArgs),
    /// Delete a package and its metadata.
    Delete(PackageIdArgs),
}

/// The store to look in.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// Package store directory.
    #[arg(long, env = "PACKAGE_DIR", default_value = "./packages")]
    pub package_dir: PathBuf,
    /// Print JSON.
    #[arg(long, env = "DEPLOY_JSON")]
    pub json: bool,
}

/// One stored package.
#[derive(Debug, clap::Args)]
pub struct PackageIdArgs {
    /// Package id.
    #[arg(env = "DEPLOY_PACKAGE_ID")]
    pub package_id: Uuid,
    /// The store.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `deploy-sender transfer`.
#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("what").required(true).args(["file", "stored"])))]
pub struct TransferArgs {
    /// Package file to send (a compressed `docker save` archive).
    #[arg(long, env = "DEPLOY_PACKAGE_FILE")]
    pub file: Option<PathBuf>,
    /// Send a package from the store instead, by id (its recorded manifest and tags are used).
    #[arg(long, env = "DEPLOY_STORED_PACKAGE", conflicts_with_all = ["package_id", "compression", "tags"])]
    pub stored: Option<Uuid>,
    /// Package store directory, for --stored.
    #[arg(long, env = "PACKAGE_DIR", default_value = "./packages")]
    pub package_dir: PathBuf,
    /// Receiver and key.
    #[command(flatten)]
    pub receiver: ReceiverConfig,
    /// Package id to announce (default: a new UUID).
    #[arg(long, env = "DEPLOY_PACKAGE_ID")]
    pub package_id: Option<Uuid>,
    /// Compression of the file: gzip, zstd or none (default: from the extension, .tar.gz/.tgz
    /// gzip, .tar.zst zstd, .tar none).
    #[arg(long, env = "DEPLOY_COMPRESSION")]
    pub compression: Option<Compression>,
    /// Image tag the archive may set when loaded, `name:tag` (repeatable).
    #[arg(long = "tag", env = "DEPLOY_IMAGE_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,
    /// Correlation id to send (echoed in the receiver's logs and events).
    #[arg(long, env = "DEPLOY_CORRELATION_ID")]
    pub correlation_id: Option<String>,
    /// Print the receiver's JSON answer instead of a summary.
    #[arg(long, env = "DEPLOY_JSON")]
    pub json: bool,
}

/// Where the image comes from: a Dockerfile to build, or an image already on the build host.
#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("image_source").required(true).args(["dockerfile", "image"])))]
pub struct ImageSourceArgs {
    /// Dockerfile to build (must lie inside --context).
    #[arg(long, env = "DEPLOY_DOCKERFILE", requires_all = ["context", "tag"])]
    pub dockerfile: Option<PathBuf>,
    /// Build context directory (its root .dockerignore is honoured).
    #[arg(long, env = "DEPLOY_BUILD_CONTEXT", requires = "dockerfile")]
    pub context: Option<PathBuf>,
    /// Tag for the built image, `name:tag` (the image a receiver runs).
    #[arg(long, env = "DEPLOY_IMAGE_TAG", requires = "dockerfile")]
    pub tag: Option<String>,
    /// Build argument `KEY=VALUE` (repeatable).
    #[arg(long = "build-arg", env = "DEPLOY_BUILD_ARG", value_parser = parse_key_value, requires = "dockerfile")]
    pub build_args: Vec<(String, String)>,
    /// Use an existing local image instead of building: `name:tag` or an image id.
    #[arg(long, env = "DEPLOY_IMAGE")]
    pub image: Option<String>,
}

impl ImageSourceArgs {
    /// The library's description of the image source.
    pub fn source(&self) -> Result<crate::ImageSource, SenderError> {
        match (&self.image, &self.dockerfile, &self.context, &self.tag) {
            (Some(image), ..) => Ok(crate::ImageSource::Existing(image.clone())),
            (None, Some(dockerfile), Some(context), Some(tag)) => {
                Ok(crate::ImageSource::Build(crate::BuildSpec {
                    dockerfile: dockerfile.clone(),
                    context: context.clone(),
                    build_args: self.build_args.iter().cloned().collect(),
                    tag: tag.clone(),
                }))
            }
            _ => Err(SenderError::Validation(
                "pass --image REF, or --dockerfile, --context and --tag".into(),
            )),
        }
    }
}

/// `deploy-sender package`.
#[derive(Debug, clap::Args)]
pub struct PackageArgs {
    /// The image to package.
    #[command(flatten)]
    pub source: ImageSourceArgs,
    /// Container the package is for (default: the image name's last component).
    #[arg(long, env = "DEPLOY_CONTAINER_NAME")]
    pub container_name: Option<String>,
    /// Package id (default: a new UUID).
    #[arg(long, env = "DEPLOY_PACKAGE_ID")]
    pub package_id: Option<Uuid>,
    /// Compression: zstd, gzip or none.
    #[arg(long, env = "DEPLOY_COMPRESSION", default_value = "zstd")]
    pub compression: Compression,
    /// Compression level: gzip 1-9 (default 1), zstd 1-19 (default 3).
    #[arg(long, env = "DEPLOY_COMPRESSION_LEVEL")]
    pub level: Option<i32>,
    /// zstd worker threads (default: one per core; 0 compresses on the calling thread).
    #[arg(long, env = "DEPLOY_ZSTD_WORKERS")]
    pub zstd_workers: Option<u32>,
    /// Package store.
    #[command(flatten)]
    pub store: StoreConfig,
    /// Print the result as JSON.
    #[arg(long, env = "DEPLOY_JSON")]
    pub json: bool,
}

/// Parses `KEY=VALUE` (the value may contain `=`).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn package_needs_exactly_one_source() {
        assert!(Cli::try_parse_from(["deploy-sender", "package"]).is_err());
        assert!(Cli::try_parse_from([
            "deploy-sender",
            "package",
            "--image",
            "a:b",
            "--dockerfile",
            "D",
            "--context",
            ".",
            "--tag",
            "a:b"
        ])
        .is_err());
        let cli = Cli::try_parse_from([
            "deploy-sender",
            "package",
            "--dockerfile",
            "D",
            "--context",
            ".",
            "--tag",
            "web:v1",
            "--build-arg",
            "A=b=c",
            "--compression",
            "gzip",
            "--level",
            "6",
        ])
        .expect("valid");
        let Command::Package(args) = cli.command else {
            panic!("package")
        };
        assert_eq!(args.source.build_args, [("A".to_owned(), "b=c".to_owned())]);
        assert_eq!(args.compression, Compression::Gzip);
    }

    #[test]
    fn transfer_takes_repeated_tags() {
        let cli = Cli::try_parse_from([
            "deploy-sender",
            "transfer",
            "--file",
            "p.tar.zst",
            "--to",
            "http://127.0.0.1:1",
            "--tag",
            "a:1",
            "--tag",
            "b:2",
        ])
        .expect("valid");
        let Command::Transfer(args) = cli.command else {
            panic!("transfer")
        };
        assert_eq!(args.tags, ["a:1", "b:2"]);
        let id = "643f58f6-4f40-4ecf-921f-0001187a7fd6";
        let both = [
            "deploy-sender",
            "transfer",
            "--file",
            "p.tar",
            "--stored",
            id,
        ];
        assert!(
            Cli::try_parse_from(both).is_err(),
            "a file or a stored package, not both"
        );
        let cli = Cli::try_parse_from(["deploy-sender", "packages", "verify", id]).expect("valid");
        assert!(matches!(
            cli.command,
            Command::Packages(PackagesCommand::Verify(_))
        ));
    }
}
