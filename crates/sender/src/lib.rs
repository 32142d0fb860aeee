//! `deploy-sender`: builds and packages Docker images and streams them to `deploy-receiver`.
//!
//! # Layout
//!
//! - `pipeline/`: build, package, compress, store, progress, Docker, deploy. Free of any web
//!   framework and terminal: the CLI and the service call the same functions.
//! - `client/`: the receiver client (signed requests, upload, retry).
//! - [`cli`]: the `deploy-sender` command line, one file per verb (flags, run, printing).
//! - [`service`]: the REST service (`deploy-sender serve`): middleware, state, jobs, events,
//!   metrics, operations and routes.
//! - [`config`]: settings shared by the CLI and the service (flags and environment variables).
//! - `error`: [`SenderError`], one stable code per failure.
//!
//! The crate root re-exports the pipeline and the client.

pub mod cli;
mod client;
pub mod config;
mod error;
mod pipeline;
pub mod service;

pub use client::*;
pub use error::SenderError;
pub use pipeline::*;

/// Logs to stderr with `filter` (tracing `EnvFilter` syntax); a bad filter falls back to `warn`.
/// Coloured only when stderr is a terminal, and never when `NO_COLOR` is set (no-color.org).
pub fn init_tracing(filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .try_init();
}
