//! `deploy-receiver` binary: parse configuration, start tracing, bind, serve until SIGTERM/SIGINT.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use deploy_receiver::{serve, AppState, Config};
use tracing_subscriber::EnvFilter;

/// List-valued settings for which an empty value (as a compose or env file often leaves it) means
/// "not set" rather than "one empty entry". Not ALLOWED_NETWORKS: it must be set, to CIDRs or
/// `any`, and an empty value is refused.
const LIST_VARIABLES: [&str; 3] = [
    "RECEIVER_AUTHORITIES",
    "TRUSTED_PROXIES",
    "DEPLOY_HMAC_KEYS",
];

fn main() -> ExitCode {
    // Before the runtime starts any thread: the environment is only safe to change single-threaded.
    for name in LIST_VARIABLES {
        if std::env::var(name).is_ok_and(|v| v.trim().is_empty()) {
            std::env::remove_var(name);
        }
    }
    let config = Config::parse();
    // `--docker-host` given as a flag reaches the Docker client the way the variable would.
    if let Some(host) = config.docker_host.as_deref().filter(|h| !h.is_empty()) {
        std::env::set_var("DOCKER_HOST", host);
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(run(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Printed once, here, whether or not logging was set up yet.
            eprintln!("deploy-receiver: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    if let Some(url) = &config.probe {
        return probe(url).await;
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if config.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_ansi(colour(&std::io::stdout()))
            .with_env_filter(filter)
            .init();
    }
    let bind = config.bind;
    let state = AppState::new(config)?;
    for warning in deploy_receiver::warnings(state.config()) {
        tracing::warn!("{warning}");
    }
    let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| {
        format!(
            "cannot listen on {bind}: is another deploy-receiver (or another service) using it? \
             Stop it, or choose another address with --bind / RECEIVER_BIND"
        )
    })?;
    tracing::info!(addr = %listener.local_addr()?, package_dir = %state.store().dir().display(), "deploy-receiver listening");
    serve(listener, state, shutdown_signal()).await?;
    tracing::info!("deploy-receiver stopped");
    Ok(())
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything (no-color.org).
fn colour(stream: &impl IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// `--probe URL`: one health request, for a HEALTHCHECK; the error (exit 1) says what was seen.
/// Healthy only when a deploy-receiver answers: another service's `/health` on that port (a
/// sender, a proxy's default page) must not pass for it.
async fn probe(url: &str) -> anyhow::Result<()> {
    let response = reqwest::Client::new()
        .get(url)
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("{url}: no answer"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    anyhow::ensure!(
        body["service"] == "deploy-receiver",
        "{url} answered {status}, but not as a deploy-receiver (service {}): is the URL right?",
        body["service"]
    );
    anyhow::ensure!(
        status.is_success() && body["status"] == "healthy",
        "{url} answered {status}, status {}, docker_available {}",
        body["status"],
        body["docker_available"]
    );
    println!("{url}: healthy");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c.await.unwrap_or(()),
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
