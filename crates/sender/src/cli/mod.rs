//! The command line, one file per verb: its flags, what it does and what it prints. Every flag is
//! also an environment variable; the doc comments are the `--help` text.

use clap::{Parser, Subcommand};

use crate::SenderError;

mod deploy;
pub mod doctor;
mod image;
mod package;
mod packages;
mod rollout;
mod rollouts;
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
    /// Docker engine that builds and exports images: `unix:///path/docker.sock`,
    /// `tcp://HOST:PORT` or `http://HOST:PORT` [default: unix:///var/run/docker.sock].
    #[arg(long, env = "DOCKER_HOST", global = true)]
    pub docker_host: Option<String>,
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
    /// List, show, verify, delete or prune stored packages.
    #[command(subcommand)]
    Packages(packages::PackagesCommand),
    /// Run the REST service (`/api/v1`, `/health`, `/metrics`, `/docs`).
    Serve(Box<crate::config::ServeConfig>),
    /// Check a receiver end to end (reachable, key, clock, Docker, disk) and say what to fix.
    Doctor(doctor::DoctorArgs),
    /// List the rollouts `deploy` ran to several hosts; undo one whose command died.
    #[command(subcommand)]
    Rollouts(rollouts::RolloutsCommand),
}

impl Cli {
    /// Whether the command prints JSON on stdout (`--json`).
    pub fn json(&self) -> bool {
        match &self.command {
            Command::Deploy(args) => args.json,
            Command::Transfer(args) => args.json,
            Command::Package(args) => args.json,
            Command::Packages(command) => command.json(),
            Command::Serve(_) => false,
            Command::Doctor(args) => args.json,
            Command::Rollouts(command) => command.json(),
        }
    }

    /// Whether Ctrl-C ends the command at once (dropping its work, which removes its temp
    /// files). `serve` handles SIGINT and SIGTERM itself, finishing the requests in flight.
    pub fn interruptible(&self) -> bool {
        match &self.command {
            Command::Serve(_) => false,
            // A rollout handles Ctrl-C itself: it stops and rolls back the hosts it moved.
            // (`--to` counted as the command will, each receiver once; a `--hosts` file is not
            // read here: it may be a pipe, readable once.)
            Command::Deploy(args) => {
                args.rollout.hosts.is_none()
                    && args
                        .rollout
                        .urls(&args.receiver.to)
                        .map_or(true, |urls| urls.len() <= 1)
            }
            _ => true,
        }
    }
}

/// Reports a failed command: `error: CODE: message` on stderr, and with `--json` the protocol's
/// error body (`{"error": {"code", "message"}}`) on stdout, unless the command printed its own
/// JSON document for the failure (`deploy`, `doctor`): exactly one document either way.
pub fn report_error(json: bool, error: &SenderError) {
    if json && !terminal::json_printed() {
        terminal::print_json(&deploy_protocol::ErrorBody::new(
            error.code(),
            error.to_string(),
            None,
        ));
    }
    eprintln!("error: {}: {error}", error.code());
}

/// Reports a command line clap refused (exit status 2) as every other failure is reported:
/// `error: VALIDATION_ERROR: message` on stderr with clap's usage after it, and with `--json`
/// among the arguments the error body on stdout. `--help` and `--version` print and succeed.
pub fn report_usage_error(error: &clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = error.print();
        return std::process::ExitCode::SUCCESS;
    }
    let rendered = error.render().to_string();
    let (message, rest) = match error.kind() {
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            ("a subcommand is required".to_owned(), rendered.as_str())
        }
        _ => {
            let (first, rest) = rendered.split_once('\n').unwrap_or((&rendered, ""));
            (first.trim_start_matches("error: ").to_owned(), rest)
        }
    };
    let json = std::env::args().any(|a| a == "--json")
        || std::env::var("DEPLOY_JSON").is_ok_and(|v| matches!(v.as_str(), "1" | "true"));
    if json {
        terminal::print_json(&deploy_protocol::ErrorBody::new(
            deploy_protocol::ErrorCode::ValidationError,
            message.clone(),
            None,
        ));
    }
    eprintln!("error: VALIDATION_ERROR: {message}");
    eprint!("{rest}");
    std::process::ExitCode::from(2)
}

/// SIGINT (Ctrl-C) or SIGTERM: a command that ends on it drops its work, which removes its temp
/// files, and exits 130.
pub async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return tokio::signal::ctrl_c().await.unwrap_or(()),
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Runs a parsed command line; the process exit code on success (0, or where a rollout left the
/// fleet: see [`FleetState::exit_code`](crate::pipeline::rollout::FleetState::exit_code)).
pub async fn run(cli: Cli) -> Result<u8, SenderError> {
    match cli.command {
        Command::Deploy(args) => {
            let mut args = *args;
            // `main` handles signals for a single deploy it can count from `--to` alone; one
            // that a `--hosts` file makes single is handled here the same way.
            let signals_here = args.rollout.hosts.is_some();
            args.receiver.to = args.rollout.urls(&args.receiver.to)?;
            if args.receiver.to.len() > 1 {
                let urls = args.receiver.to.clone();
                rollout::run(args, urls).await
            } else if signals_here {
                tokio::select! {
                    done = deploy::run(args) => done.map(|()| 0),
                    () = interrupted() => Ok(130),
                }
            } else {
                deploy::run(args).await.map(|()| 0)
            }
        }
        Command::Transfer(args) => transfer::run(args).await.map(|()| 0),
        Command::Package(args) => package::run(args).await.map(|()| 0),
        Command::Packages(command) => packages::run(command).await.map(|()| 0),
        Command::Serve(config) => serve::run(*config).await.map(|()| 0),
        Command::Doctor(args) => doctor::run(args).await.map(|()| 0),
        Command::Rollouts(command) => rollouts::run(command).await,
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
        assert_eq!(args.source.compression, Compression::Gzip);
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
