//! The `deploy-sender` binary: parse the command line, set up logging, run, report.

use std::process::ExitCode;

use clap::Parser;
use deploy_sender::cli::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    deploy_sender::init_tracing(&cli.log);
    match deploy_sender::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}: {e}", e.code());
            ExitCode::FAILURE
        }
    }
}
