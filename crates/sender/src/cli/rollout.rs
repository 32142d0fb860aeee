//! The fleet flags of `deploy-sender deploy`: more than one receiver makes a deploy a rollout.

use std::path::PathBuf;
use std::time::Duration;

use crate::rollout::{BatchSize, RolloutOptions};
use crate::SenderError;

/// How a release goes to several receivers (`--to URL1,URL2` or `--hosts FILE`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RolloutArgs {
    /// File of receiver URLs, one a line (blank lines and `#` comments skipped); with --to, the
    /// --to hosts come first.
    #[arg(long, env = "DEPLOY_HOSTS_FILE")]
    pub hosts: Option<PathBuf>,
    /// Hosts deployed to first, all of which must be healthy before any other host moves
    /// (default: 1 when there are 3 hosts or more, else 0).
    #[arg(long, env = "DEPLOY_CANARY")]
    pub canary: Option<usize>,
    /// Hosts per batch after the canary: a number (`2`) or a share of the fleet (`25%`); each
    /// batch is health-gated before the next.
    #[arg(long, env = "DEPLOY_BATCH", default_value = "25%")]
    pub batch: BatchSize,
    /// Failed hosts tolerated before the rollout stops and rolls back (a failed canary always
    /// stops it).
    #[arg(long, env = "DEPLOY_MAX_FAILURES", default_value_t = 0)]
    pub max_failures: usize,
    /// Leave the hosts a stopped rollout moved on the new release instead of rolling them back.
    #[arg(long, env = "DEPLOY_NO_ROLLBACK")]
    pub no_rollback: bool,
    /// Seconds one host's deployment (transfer, load, start, health check) may take before the
    /// host counts as failed: a receiver that goes away cannot hang the rollout.
    #[arg(long, env = "DEPLOY_HOST_TIMEOUT_SECS", default_value_t = 600)]
    pub host_timeout: u64,
    /// Seconds one host's rollback may take.
    #[arg(long, env = "DEPLOY_ROLLBACK_TIMEOUT_SECS", default_value_t = 300)]
    pub rollback_timeout: u64,
    /// Hosts sent to at the same time (one host's transfer proceeds while others load).
    #[arg(long, env = "MAX_CONCURRENT_TRANSFERS", default_value_t = 5)]
    pub max_concurrent_transfers: usize,
}

impl RolloutArgs {
    /// The engine's options.
    pub fn options(&self) -> RolloutOptions {
        RolloutOptions {
            canary: self.canary,
            batch: self.batch,
            max_failures: self.max_failures,
            rollback: !self.no_rollback,
            host_timeout: Duration::from_secs(self.host_timeout.max(1)),
            rollback_timeout: Duration::from_secs(self.rollback_timeout.max(1)),
            max_concurrent: self.max_concurrent_transfers.max(1),
        }
    }

    /// `to` followed by the URLs of `--hosts`, each once.
    pub fn urls(&self, to: &[String]) -> Result<Vec<String>, SenderError> {
        let mut urls: Vec<String> = to.iter().filter(|u| !u.is_empty()).cloned().collect();
        if let Some(path) = &self.hosts {
            let text = std::fs::read_to_string(path).map_err(|e| {
                SenderError::Validation(format!("--hosts {}: cannot read it: {e}", path.display()))
            })?;
            urls.extend(parse_hosts(&text));
        }
        let mut seen = std::collections::HashSet::new();
        urls.retain(|u| seen.insert(u.trim_end_matches('/').to_owned()));
        Ok(urls)
    }
}

/// The URLs of a hosts file: one a line, blank lines and `#` comments skipped.
pub fn parse_hosts(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_file_has_one_url_a_line_and_comments() {
        let text = "# fleet\nhttp://10.0.0.1:8001\n\n  http://10.0.0.2:8001  # rack 2\n";
        assert_eq!(
            parse_hosts(text),
            ["http://10.0.0.1:8001", "http://10.0.0.2:8001"]
        );
    }
}
