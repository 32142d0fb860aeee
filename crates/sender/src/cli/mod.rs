//! The command line, one file per verb: its flags, what it does and what it prints. Every flag is
//! also an environment variable; the doc comments are the `--help` text.

use clap::{Parser, Subcommand};

use crate::SenderError;

mod deploy;
pub mod doctor;
mod image;
mod package;
mod packages;
mod serve;
mod terminal;
mod transfer;

/// Builds and packages Docker images and streams them to deploy-receiver, without a registry.
#[derive(Debug, Parser)]
#[command(name = "deploy-sender", version, about)]
pub struct Cli {
    /// Log filter in `tracing` syntax (e.g. `info`, `deploy_sender=debug`); logs go to stderr.
    #[arg(long, env = "RUST_LOG", default_value = "warn", global = true)]
    pub log: String,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Build (or take) an image, send it to a receiver and run it there, healthy or rolled back.
    Deploy(Box<deploy::DeployArgs>),
    /// Stream a package file to a receiver (`POST /deployment/upload`).
    Transfer(transfer::TransferArgs),
    /// Build an image (or take an existing one) and store it as a compressed package.
    Package(package::PackageArgs),
    /// List, show, verify or delete stored packages.
    #[command(subcommand)]
    Packages(packages::PackagesCommand),
    /// Run the REST service (`/api/v1`, `/health`, `/metrics`, `/docs`).
    Serve(Box<crate::config::ServeConfig>),
    /// Check a receiver end to end (reachable, key, clock, Docker, disk) and say what to fix.
    Doctor(doctor::DoctorArgs),
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), SenderError> {
    match cli.command {
        Command::Deploy(args) => deploy::run(*args).await,
        Command::Transfer(args) => transfer::run(args).await,
        Command::Package(args) => package::run(args).await,
        Command::Packages(command) => packages::run(command).await,
        Command::Serve(config) => serve::run(*config).await,
        Command::Doctor(args) => doctor::run(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use deploy_protocol::Compression;
    use packages::PackagesCommand;

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
