//! What each subcommand does: call the library, draw progress on a terminal, print the result.

use std::path::PathBuf;

use crate::cli::{Cli, Command, PackageArgs, PackagesCommand, TransferArgs};
use crate::package::{package_image, PackageRequest};
use crate::sink::{default_zstd_workers, CompressionOptions};
use crate::store::{PackageInfo, PackageStore};
use crate::terminal::{bytes_bar, TerminalProgress};
use crate::upload::{compression_from_path, manifest_for_file, upload_package, Endpoint};
use crate::SenderError;

mod deploy;
mod rollout;

/// Runs a parsed command line; the process exit code on success (0, or where a rollout left the
/// fleet: see [`FleetState::exit_code`](crate::rollout::FleetState::exit_code)).
pub async fn run(cli: Cli) -> Result<u8, SenderError> {
    match cli.command {
        Command::Deploy(args) => {
            let mut args = *args;
            args.receiver.to = args.rollout.urls(&args.receiver.to)?;
            if args.receiver.to.len() > 1 {
                let urls = args.receiver.to.clone();
                rollout::run(args, urls).await
            } else {
                deploy::run(args).await.map(|()| 0)
            }
        }
        Command::Transfer(args) => transfer(args).await.map(|()| 0),
        Command::Package(args) => package(args).await.map(|()| 0),
        Command::Packages(command) => packages(command).await.map(|()| 0),
        Command::Serve(config) => crate::server::run(*config).await.map(|()| 0),
        Command::Doctor(args) => crate::doctor::run(args).await.map(|()| 0),
    }
}

async fn transfer(args: TransferArgs) -> Result<(), SenderError> {
    let target = args.receiver.target()?;
    let client = args.receiver.http_client()?;
    let (path, manifest) = match (args.file, args.stored) {
        (_, Some(id)) => {
            let info = PackageStore::open(&args.package_dir).await?.get(id).await?;
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
    let result = upload_package(
        &client,
        &target,
        &path,
        &manifest,
        Endpoint::Upload,
        args.correlation_id.as_deref(),
        on_progress,
    )
    .await;
    bar.finish_and_clear();
    let outcome = result?;
    if args.json {
        print_json(&outcome.response);
    } else {
        println!(
            "sent {} bytes in {:.2} s ({:.2} MB/s) to {}",
            outcome.bytes,
            outcome.duration.as_secs_f64(),
            outcome.throughput_mbps,
            target.endpoint_url(Endpoint::Upload)
        );
        println!(
            "package {} ({}), BLAKE3 {}",
            manifest.package_id, manifest.compression, manifest.package_checksum
        );
    }
    Ok(())
}

async fn package(args: PackageArgs) -> Result<(), SenderError> {
    let source = args.source.source()?;
    let request = PackageRequest {
        source,
        container_name: args.container_name,
        package_id: args.package_id,
        compression: CompressionOptions {
            compression: args.compression,
            level: args.level,
            zstd_workers: args.zstd_workers.unwrap_or_else(default_zstd_workers),
        },
        max_package_size: args.store.max_package_size,
    };
    let store = PackageStore::open(&args.store.package_dir).await?;
    let docker = crate::docker::connect().await?;
    let bars = TerminalProgress::default();
    let result = package_image(&docker, &store, &request, &bars).await;
    bars.clear();
    let info = result?;
    if args.json {
        print_json(&info);
    } else {
        print_package(&info);
    }
    Ok(())
}

async fn packages(command: PackagesCommand) -> Result<(), SenderError> {
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
            println!("package {} deleted", args.package_id);
        }
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("cannot print JSON: {e}"),
    }
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
