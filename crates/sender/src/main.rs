//! The `deploy-sender` binary: parse the command line, set up logging, run, report.

use std::process::ExitCode;

use clap::Parser;
use deploy_sender::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before the runtime starts any thread: the environment is only safe to change single-threaded.
    // `--docker-host` reaches the Docker client the way the variable would.
    if let Some(host) = cli.docker_host.as_deref().filter(|h| !h.is_empty()) {
        std::env::set_var("DOCKER_HOST", host);
    }
    deploy_sender::init_tracing(&cli.log);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: INTERNAL_ERROR: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(deploy_sender::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}: {e}", e.code());
            ExitCode::FAILURE
        }
    }
}
