//! The `deploy-sender` binary: parse the command line, set up logging, run, report.
//!
//! Exit status: 0 done; 1 failed (`error: CODE: message` on stderr); 2 the command line was
//! refused (`error: VALIDATION_ERROR: ...`); 130 interrupted by Ctrl-C or SIGTERM (silent; the
//! command's temp files are removed). With `--json`, stdout holds exactly one JSON document.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use deploy_sender::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::report_usage_error(&e),
    };
    // Before the runtime starts any thread: the environment is only safe to change single-threaded.
    // `--docker-host` reaches the Docker client the way the variable would.
    if let Some(host) = cli.docker_host.as_deref().filter(|h| !h.is_empty()) {
        std::env::set_var("DOCKER_HOST", host);
    }
    deploy_sender::init_tracing(&cli.log);
    let (json, interruptible) = (cli.json(), cli.interruptible());
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            let error = deploy_sender::SenderError::Internal(format!(
                "cannot start the async runtime: {e}"
            ));
            cli::report_error(json, &error);
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        if !interruptible {
            return Some(cli::run(cli).await);
        }
        // Dropping the command's future on a signal drops its temp-file guards with it.
        tokio::select! {
            result = cli::run(cli) => Some(result),
            () = cli::interrupted() => None,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        Some(Ok(code)) => ExitCode::from(code),
        Some(Err(e)) => {
            cli::report_error(json, &e);
            ExitCode::FAILURE
        }
        None => ExitCode::from(130),
    }
}
