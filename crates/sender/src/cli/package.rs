//! `deploy-sender package`: build an image (or take an existing one) and store it as a
//! compressed package.

use uuid::Uuid;

use super::image::ImageSourceArgs;
use super::terminal::{print_json, TerminalProgress};
use crate::config::StoreConfig;
use crate::pipeline::{package_image, FrontDoor, PackageInfo, PackageParts, PackageStore};
use crate::SenderError;

/// `deploy-sender package`.
#[derive(Debug, clap::Args)]
pub(crate) struct PackageArgs {
    /// The image to package.
    #[command(flatten)]
    pub(crate) source: ImageSourceArgs,
    /// Container the package is for (default: the image name's last component).
    #[arg(long, visible_alias = "name", env = "DEPLOY_CONTAINER_NAME")]
    pub(crate) container_name: Option<String>,
    /// Package id (default: a new UUID).
    #[arg(long, env = "DEPLOY_PACKAGE_ID")]
    pub(crate) package_id: Option<Uuid>,
    /// Package store.
    #[command(flatten)]
    pub(crate) store: StoreConfig,
    /// Print the result as JSON.
    #[arg(long, env = "DEPLOY_JSON")]
    pub(crate) json: bool,
}

pub(super) async fn run(args: PackageArgs) -> Result<(), SenderError> {
    let request = PackageParts {
        container_name: args.container_name,
        package_id: args.package_id,
        max_package_size: Some(args.store.max_package_size),
        ..args.source.parts()
    }
    .request(FrontDoor::Cli)?;
    let store = PackageStore::open(&args.store.package_dir).await?;
    let docker = crate::pipeline::connect_docker().await?;
    let bars = TerminalProgress::default();
    let result = package_image(&docker, &store, &request, &bars).await;
    bars.clear();
    let info = result?;
    args.store.retain(&store, info.package_id).await;
    if args.json {
        print_json(&info);
    } else {
        print_package(&info);
    }
    Ok(())
}

fn print_package(info: &PackageInfo) {
    let level = info
        .compression_level
        .map(|l| format!(" level {l}"))
        .unwrap_or_default();
    println!("package   {}", info.package_id);
    println!("image     {} {}", info.image_id, info.image_tags.join(" "));
    println!("file      {}", info.package_path);
    println!(
        "size      {:.2} MB from {:.2} MB ({}{level}, {:.1}% smaller)",
        info.package_size_mb,
        info.original_size as f64 / 1e6,
        info.compression,
        info.compression_ratio * 100.0
    );
    println!("checksum  {} (BLAKE3)", info.package_checksum);
    println!(
        "time      build {} ms, export {} ms",
        info.build_duration_ms, info.export_duration_ms
    );
}
