//! `deploy-sender transfer`: stream a package file (or a stored package) to a receiver's
//! `POST /deployment/upload`.

use std::path::PathBuf;

use clap::ArgGroup;
use deploy_protocol::Compression;
use uuid::Uuid;

use super::terminal::{bytes_bar, print_json};
use crate::client::Endpoint;
use crate::config::ReceiverConfig;
use crate::pipeline::{compression_from_path, manifest_for_file, PackageHold, PackageStore};
use crate::SenderError;

/// `deploy-sender transfer`.
#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("what").required(true).args(["file", "stored"])))]
pub(crate) struct TransferArgs {
    /// Package file to send (a compressed `docker save` archive).
    #[arg(long, env = "DEPLOY_PACKAGE_FILE")]
    pub(crate) file: Option<PathBuf>,
    /// Send a package from the store instead, by id (its recorded manifest and tags are used).
    #[arg(long, env = "DEPLOY_STORED_PACKAGE", conflicts_with_all = ["package_id", "compression", "tags"])]
    pub(crate) stored: Option<Uuid>,
    /// Package store directory, for --stored.
    #[arg(long, env = "PACKAGE_DIR", default_value = "./packages")]
    pub(crate) package_dir: PathBuf,
    /// Receiver and key.
    #[command(flatten)]
    pub(crate) receiver: ReceiverConfig,
    /// Package id to announce (default: a new UUID).
    #[arg(long, env = "DEPLOY_PACKAGE_ID")]
    pub(crate) package_id: Option<Uuid>,
    /// Compression of the file: gzip, zstd or none (default: from the extension, .tar.gz/.tgz
    /// gzip, .tar.zst zstd, .tar none).
    #[arg(long, env = "DEPLOY_COMPRESSION")]
    pub(crate) compression: Option<Compression>,
    /// Image tag the archive may set when loaded, `name:tag` (repeatable).
    #[arg(long = "tag", env = "DEPLOY_IMAGE_TAGS", value_delimiter = ',')]
    pub(crate) tags: Vec<String>,
    /// Correlation id to send (echoed in the receiver's logs and events).
    #[arg(long, env = "DEPLOY_CORRELATION_ID", value_parser = super::deploy::parse_correlation_id)]
    pub(crate) correlation_id: Option<String>,
    /// Print the receiver's JSON answer instead of a summary.
    #[arg(long, env = "DEPLOY_JSON")]
    pub(crate) json: bool,
}

pub(super) async fn run(args: TransferArgs) -> Result<(), SenderError> {
    let client = args.receiver.client()?;
    let mut hold = None;
    let (path, manifest) = match (args.file, args.stored) {
        (_, Some(id)) => {
            let info = PackageStore::open(&args.package_dir).await?.get(id).await?;
            hold = Some(PackageHold::new(&info)?);
            (PathBuf::from(&info.package_path), info.manifest())
        }
        (Some(file), None) => {
            let compression = args
                .compression
                .or_else(|| compression_from_path(&file))
                .ok_or_else(|| {
                    SenderError::Validation(format!(
                        "cannot tell the compression of {} from its name: pass --compression",
                        file.display()
                    ))
                })?;
            let manifest =
                manifest_for_file(&file, args.package_id, compression, args.tags).await?;
            (file, manifest)
        }
        (None, None) => {
            return Err(SenderError::Validation(
                "pass --file PATH or --stored PACKAGE_ID".into(),
            ))
        }
    };
    let bar = bytes_bar(Some(manifest.package_size), "upload");
    let on_progress = {
        let bar = bar.clone();
        move |sent| bar.set_position(sent)
    };
    let result = client
        .upload(&path, &manifest)
        .correlation_id(args.correlation_id.as_deref())
        .on_progress(on_progress)
        .send()
        .await;
    bar.finish_and_clear();
    drop(hold);
    let outcome = result?;
    if args.json {
        print_json(&outcome.response);
    } else {
        println!(
            "sent {} bytes in {:.2} s ({:.2} MB/s) to {}",
            outcome.bytes,
            outcome.duration.as_secs_f64(),
            outcome.throughput_mbps,
            client.target().endpoint_url(Endpoint::Upload)
        );
        println!(
            "package {} ({}), BLAKE3 {}",
            manifest.package_id, manifest.compression, manifest.package_checksum
        );
    }
    Ok(())
}
