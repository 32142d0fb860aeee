//! `deploy-sender packages list|show|verify|delete`: the package store from the command line.

use std::path::PathBuf;

use clap::Subcommand;
use uuid::Uuid;

use super::terminal::print_json;
use crate::pipeline::PackageStore;
use crate::SenderError;

/// `deploy-sender packages ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum PackagesCommand {
    /// List stored packages, newest first.
    List(StoreArgs),
    /// Show one package's metadata as JSON.
    Show(PackageIdArgs),
    /// Re-hash a package and compare with its recorded checksum.
    Verify(PackageIdArgs),
    /// Delete a package and its metadata.
    Delete(PackageIdArgs),
    /// Delete old packages: keep the newest --keep of each container name, then delete the
    /// oldest until the store fits --max-size (`deploy` and `package` do this after each new
    /// package, with PACKAGE_HISTORY and PACKAGE_STORE_MAX_SIZE).
    Prune(PruneArgs),
}

/// `packages prune`.
#[derive(Debug, clap::Args)]
pub(crate) struct PruneArgs {
    /// Packages kept per container name (the newest).
    #[arg(long, env = "PACKAGE_HISTORY", default_value_t = crate::config::DEFAULT_PACKAGE_HISTORY)]
    pub(crate) keep: usize,
    /// Size budget of the whole store, e.g. `10GiB` [default: none].
    #[arg(long, env = "PACKAGE_STORE_MAX_SIZE", value_parser = crate::config::parse_size)]
    pub(crate) max_size: Option<u64>,
    /// The store.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

/// The store to look in.
#[derive(Debug, clap::Args)]
pub(crate) struct StoreArgs {
    /// Package store directory.
    #[arg(long, env = "PACKAGE_DIR", default_value = "./packages")]
    pub(crate) package_dir: PathBuf,
    /// Print JSON.
    #[arg(long, env = "DEPLOY_JSON")]
    pub(crate) json: bool,
}

/// One stored package.
#[derive(Debug, clap::Args)]
pub(crate) struct PackageIdArgs {
    /// Package id.
    #[arg(env = "DEPLOY_PACKAGE_ID")]
    pub(crate) package_id: Uuid,
    /// The store.
    #[command(flatten)]
    pub(crate) store: StoreArgs,
}

impl PackagesCommand {
    /// Whether it prints JSON (`show` always does).
    pub(super) fn json(&self) -> bool {
        match self {
            PackagesCommand::List(args) => args.json,
            PackagesCommand::Show(_) => true,
            PackagesCommand::Verify(args) | PackagesCommand::Delete(args) => args.store.json,
            PackagesCommand::Prune(args) => args.store.json,
        }
    }
}

pub(super) async fn run(command: PackagesCommand) -> Result<(), SenderError> {
    match command {
        PackagesCommand::List(args) => {
            let list = PackageStore::open(&args.package_dir).await?.list().await?;
            if args.json {
                print_json(&list);
                return Ok(());
            }
            for info in &list {
                println!(
                    "{}  {:>10.2} MB  {:<5}  {}  {}",
                    info.package_id,
                    info.package_size_mb,
                    info.compression,
                    info.created_at,
                    info.image_tags.join(",")
                );
            }
        }
        PackagesCommand::Show(args) => {
            let store = PackageStore::open(&args.store.package_dir).await?;
            print_json(&store.get(args.package_id).await?);
        }
        PackagesCommand::Verify(args) => {
            let store = PackageStore::open(&args.store.package_dir).await?;
            let info = store.verify(args.package_id).await?;
            if args.store.json {
                print_json(&info);
            } else {
                println!(
                    "package {} verified: BLAKE3 {}",
                    info.package_id, info.package_checksum
                );
            }
        }
        PackagesCommand::Delete(args) => {
            let store = PackageStore::open(&args.store.package_dir).await?;
            store.delete(args.package_id).await?;
            if args.store.json {
                print_json(&serde_json::json!({"package_id": args.package_id, "deleted": true}));
            } else {
                println!("package {} deleted", args.package_id);
            }
        }
        PackagesCommand::Prune(args) => {
            let store = PackageStore::open(&args.store.package_dir).await?;
            let deleted = store.prune(args.keep, args.max_size, None).await?;
            if args.store.json {
                print_json(&deleted);
                return Ok(());
            }
            for info in &deleted {
                println!(
                    "deleted {}  {:>10.2} MB  {}  {}",
                    info.package_id,
                    info.package_size_mb,
                    info.created_at,
                    info.container_name.as_deref().unwrap_or("-")
                );
            }
            let freed: u64 = deleted.iter().map(|i| i.package_size).sum();
            println!(
                "{} package(s) deleted, {:.2} MB freed",
                deleted.len(),
                freed as f64 / 1e6
            );
        }
    }
    Ok(())
}
