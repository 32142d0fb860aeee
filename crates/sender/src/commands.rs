//! What each subcommand does: call the library, draw progress on a terminal, print the result.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::{Cli, Command, PackageArgs, TransferArgs};
use crate::package::{package_image, ImageSource, PackageRequest};
use crate::progress::{Progress, ProgressEvent, Stage};
use crate::sink::{default_zstd_workers, CompressionOptions};
use crate::store::{PackageInfo, PackageStore};
use crate::upload::{compression_from_path, manifest_for_file, upload_package, Endpoint};
use crate::{BuildSpec, SenderError};

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), SenderError> {
    match cli.command {
        Command::Transfer(args) => transfer(args).await,
        Command::Package(args) => package(args).await,
    }
}

async fn transfer(args: TransferArgs) -> Result<(), SenderError> {
    let target = args.receiver.target()?;
    let client = args.receiver.http_client()?;
    let compression = match args
        .compression
        .or_else(|| compression_from_path(&args.file))
    {
        Some(c) => c,
        None => {
            return Err(SenderError::Validation(format!(
            "cannot tell the compression of {} from its name: pass --compression gzip|zstd|none",
            args.file.display()
        )))
        }
    };
    let manifest = manifest_for_file(&args.file, args.package_id, compression, args.tags).await?;
    let bar = bytes_bar(Some(manifest.package_size), "upload");
    let on_progress = {
        let bar = bar.clone();
        move |sent| bar.set_position(sent)
    };
    let result = upload_package(
        &client,
        &target,
        &args.file,
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
            "package {} ({compression}), BLAKE3 {}",
            manifest.package_id, manifest.package_checksum
        );
    }
    Ok(())
}

async fn package(args: PackageArgs) -> Result<(), SenderError> {
    let source = match (args.image, args.dockerfile, args.context, args.tag) {
        (Some(image), ..) => ImageSource::Existing(image),
        (None, Some(dockerfile), Some(context), Some(tag)) => ImageSource::Build(BuildSpec {
            dockerfile,
            context,
            build_args: args.build_args.into_iter().collect::<BTreeMap<_, _>>(),
            tag,
        }),
        _ => {
            return Err(SenderError::Validation(
                "pass --image REF, or --dockerfile, --context and --tag".into(),
            ))
        }
    };
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

/// A byte bar on stderr when it is a terminal, hidden otherwise.
fn bytes_bar(total: Option<u64>, label: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = match total {
        Some(t) => ProgressBar::with_draw_target(Some(t), target).with_style(
            ProgressStyle::with_template(
                "{prefix:>7} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        ),
        None => ProgressBar::with_draw_target(None, target).with_style(
            ProgressStyle::with_template("{prefix:>7} {spinner} {bytes} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_prefix(label.to_owned());
    bar
}

/// Draws one bar per stage as the pipeline reports.
#[derive(Default)]
struct TerminalProgress {
    current: Mutex<Option<(Stage, ProgressBar)>>,
}

impl TerminalProgress {
    fn clear(&self) {
        if let Ok(mut current) = self.current.lock() {
            if let Some((_, bar)) = current.take() {
                bar.finish_and_clear();
            }
        }
    }
}

impl Progress for TerminalProgress {
    fn report(&self, event: ProgressEvent<'_>) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        if current.as_ref().map(|(s, _)| *s) != Some(event.stage) {
            if let Some((_, bar)) = current.take() {
                bar.finish_and_clear();
            }
            let total = if event.stage == Stage::Build {
                None
            } else {
                event.total
            };
            let bar = bytes_bar(total, event.stage.as_str());
            if event.stage == Stage::Build {
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>7} {spinner} {wide_msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
            }
            *current = Some((event.stage, bar));
        }
        let Some((_, bar)) = current.as_ref() else {
            return;
        };
        if let Some(message) = event.message {
            bar.set_message(message.to_owned());
            bar.tick();
        } else if event.stage != Stage::Build {
            if let Some(total) = event.total {
                if bar.length() != Some(total.max(event.done)) {
                    bar.set_length(total.max(event.done));
                }
            }
            bar.set_position(event.done);
        }
        if event.finished {
            bar.finish_and_clear();
        }
    }
}
