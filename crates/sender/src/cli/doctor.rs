//! `deploy-sender doctor`: checks a receiver end to end the way a deployment would use it, and
//! says what to fix: reachable, a deploy-receiver, clock, key accepted, Docker, disk, warnings.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deploy_protocol::ErrorBody;
use serde::Serialize;

use crate::client::{ReceiverClient, ReceiverTarget};
use crate::config::{parse_size, ReceiverConfig};
use crate::SenderError;
use deploy_protocol::display::error_chain;

/// Clock difference worth a warning: signatures still pass, but the margin is shrinking.
const SKEW_WARN_SECS: i64 = 30;
/// The receiver's default `HMAC_MAX_SKEW_SECS`: beyond it every signed request fails.
const SKEW_FAIL_SECS: i64 = deploy_protocol::envelope::DEFAULT_MAX_SKEW_SECS as i64;
/// Longest wait for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// `deploy-sender doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Receiver and key to check.
    #[command(flatten)]
    pub receiver: ReceiverConfig,
    /// Free space in the receiver's package directory below which to warn (e.g. `2GiB`).
    #[arg(long, env = "DEPLOY_DOCTOR_MIN_FREE", default_value = "1GiB", value_parser = parse_size)]
    pub min_free: u64,
    /// Print the report as JSON.
    #[arg(long, env = "DEPLOY_JSON")]
    pub json: bool,
}

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but worth fixing.
    Warn,
    /// Deployments will fail until this is fixed.
    Fail,
    /// Not checked, because an earlier check failed.
    Skip,
}

/// One check: what was looked at, what was found, and what to do.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Short stable name: `config`, `reachable`, `receiver`, `clock`, `key`, `docker`, `disk`,
    /// `warnings`.
    pub name: &'static str,
    /// The verdict.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it, when something is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Every check against one receiver.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The receiver's base URL, as given.
    pub receiver: String,
    /// True when no check failed (warnings allowed).
    pub ok: bool,
    /// The checks, in the order they ran.
    pub checks: Vec<Check>,
}

impl Report {
    fn push(&mut self, name: &'static str, status: Status, detail: impl Into<String>) {
        self.checks.push(Check {
            name,
            status,
            detail: detail.into(),
            fix: None,
        });
    }

    fn push_fix(
        &mut self,
        name: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.checks.push(Check {
            name,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        });
    }

    /// The failed checks.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }
}

/// Runs every check against the receiver in `config`. Never errors: what goes wrong is a check.
pub async fn diagnose(config: &ReceiverConfig, min_free: u64) -> Report {
    let url = config.url().unwrap_or_default().to_owned();
    let mut report = Report {
        receiver: url.clone(),
        ok: false,
        checks: Vec::new(),
    };
    let secret = config.secret.clone().unwrap_or_default();
    // The URL is checked with the upload client's own rules; a missing secret is reported by the
    // key check, so that an operator still learns whether the receiver is up.
    let target = match ReceiverTarget::new(&url, &config.key_id, secret.as_bytes())
        .or_else(|_| ReceiverTarget::new(&url, &config.key_id, b"-"))
    {
        Ok(target) if !url.is_empty() => target,
        Ok(_) | Err(_) => {
            let detail = if url.is_empty() {
                "no receiver URL".to_owned()
            } else {
                format!("{url:?} is not a usable receiver URL")
            };
            report.push_fix(
                "config",
                Status::Fail,
                detail,
                "pass --to http://HOST:8001 or set DEFAULT_RECEIVER_URL",
            );
            return report;
        }
    };
    let client = match config.http_client() {
        Ok(http) => ReceiverClient::new(http, target),
        Err(e) => {
            report.push("config", Status::Fail, e.to_string());
            return report;
        }
    };

    let health = check_health(&client, &mut report).await;
    if let Some(health) = health {
        check_fields(&health, min_free, &mut report);
    }
    let reachable = report
        .checks
        .iter()
        .any(|c| c.name == "reachable" && c.status == Status::Ok);
    if !reachable {
        report.push("key", Status::Skip, "receiver not reachable");
    } else if secret.is_empty() {
        report.push_fix(
            "key",
            Status::Fail,
            "no HMAC secret configured on this side",
            "set DEPLOY_HMAC_SECRET (and DEPLOY_HMAC_KEY_ID) to the key the receiver holds",
        );
    } else {
        check_key(&client, &mut report).await;
    }
    let ok = report.failures().next().is_none();
    report.ok = ok;
    report
}

/// `GET /health`: reachable, really a deploy-receiver, and the clock from its `Date` header.
async fn check_health(client: &ReceiverClient, report: &mut Report) -> Option<serde_json::Value> {
    let url = client.target().url("/health");
    let sent = unix_now_f64();
    let response = match client.get("/health", REQUEST_TIMEOUT).await {
        Ok(response) => response,
        Err(e) => {
            report.push_fix(
                "reachable",
                Status::Fail,
                format!("GET {url} failed: {}", error_chain(&e)),
                "check that deploy-receiver runs there (systemctl status deploy-receiver / docker ps), \
                 listens on that address (RECEIVER_BIND), and that no firewall is in between",
            );
            return None;
        }
    };
    let received = unix_now_f64();
    let status = response.status();
    let date = response
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.bytes().await.unwrap_or_default();
    let health = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) if status.is_success() && v["service"] == "deploy-receiver" => v,
        _ => {
            report.push_fix(
                "reachable",
                Status::Fail,
                format!("GET {url} answered {status}, not a deploy-receiver health report"),
                "the URL points at something else (wrong port, or a proxy not forwarding to the receiver)",
            );
            return None;
        }
    };
    report.push(
        "reachable",
        Status::Ok,
        format!(
            "{url}: {} {} (protocol {}), up {} s, status {}",
            health["service"].as_str().unwrap_or("?"),
            health["version"].as_str().unwrap_or("?"),
            health["protocol_version"].as_str().unwrap_or("?"),
            health["uptime_secs"].as_u64().unwrap_or(0),
            health["status"].as_str().unwrap_or("?")
        ),
    );
    if health["protocol_version"].as_str() != Some(deploy_protocol::PROTOCOL_VERSION) {
        report.push_fix(
            "receiver",
            Status::Fail,
            format!(
                "the receiver speaks protocol {}, this sender {}",
                health["protocol_version"],
                deploy_protocol::PROTOCOL_VERSION
            ),
            "upgrade the older of the two",
        );
    }
    check_clock(date.as_deref(), (sent + received) / 2.0, report);
    Some(health)
}

/// Compares the receiver's `Date` header with the local clock at the middle of the round trip.
fn check_clock(date: Option<&str>, local: f64, report: &mut Report) {
    let Some(remote) = date.and_then(parse_http_date) else {
        report.push(
            "clock",
            Status::Warn,
            "the receiver sent no readable Date header; clock skew not checked",
        );
        return;
    };
    // The Date header has one-second resolution: round the local time the same way.
    let skew = remote - local.round() as i64;
    let detail = format!("receiver clock is {skew:+} s from this host's");
    let fix = "synchronise both clocks (timedatectl set-ntp true, or chrony); signatures older or \
               newer than HMAC_MAX_SKEW_SECS (default 300 s) are refused";
    match skew.abs() {
        s if s > SKEW_FAIL_SECS => report.push_fix("clock", Status::Fail, detail, fix),
        s if s > SKEW_WARN_SECS => report.push_fix("clock", Status::Warn, detail, fix),
        _ => report.push("clock", Status::Ok, detail),
    }
}

/// Docker, free space and the receiver's own warnings, from its health report.
fn check_fields(health: &serde_json::Value, min_free: u64, report: &mut Report) {
    if health["docker_available"].as_bool() == Some(true) {
        report.push(
            "docker",
            Status::Ok,
            format!(
                "Docker engine {} reachable from the receiver",
                health["docker_version"].as_str().unwrap_or("?")
            ),
        );
    } else {
        report.push_fix(
            "docker",
            Status::Fail,
            "the receiver cannot reach its Docker engine: it can store packages but not load or run them",
            "on the receiver host: is Docker running? is /var/run/docker.sock mounted into the \
             receiver's container, or is its user in the docker group? is DOCKER_HOST right?",
        );
    }
    match health["free_bytes"].as_u64() {
        Some(free) if free < min_free => report.push_fix(
            "disk",
            Status::Warn,
            format!(
                "{} free in the receiver's package directory (below {})",
                human(free),
                human(min_free)
            ),
            "free space on the receiver (old packages in PACKAGE_DIR, docker image prune) or \
             point PACKAGE_DIR at a larger disk",
        ),
        Some(free) => report.push(
            "disk",
            Status::Ok,
            format!("{} free in the receiver's package directory", human(free)),
        ),
        None => report.push(
            "disk",
            Status::Warn,
            "the receiver did not report free space",
        ),
    }
    let warnings: Vec<&str> = health["warnings"]
        .as_array()
        .map(|list| list.iter().filter_map(|w| w.as_str()).collect())
        .unwrap_or_default();
    if warnings.is_empty() {
        report.push(
            "warnings",
            Status::Ok,
            "the receiver reports no configuration warnings",
        );
    }
    for warning in warnings {
        report.push_fix(
            "warnings",
            Status::Warn,
            format!("receiver: {warning}"),
            "change the receiver's configuration (see docs/OPERATIONS.md)",
        );
    }
}

/// A signed `GET /deployments?limit=1`: the key and this host's address are accepted.
async fn check_key(client: &ReceiverClient, report: &mut Report) {
    let target = client.target();
    let url = target.url("/deployments?limit=1");
    let answer = client
        .signed_get(
            "/deployments?limit=1",
            Some("deploy-sender-doctor"),
            REQUEST_TIMEOUT,
        )
        .await;
    let response = match answer {
        Ok(response) => response,
        Err(e) => {
            report.push(
                "key",
                Status::Fail,
                format!("signed GET {url} failed: {}", error_chain(&e)),
            );
            return;
        }
    };
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap_or_default();
    let message = serde_json::from_slice::<ErrorBody>(&body)
        .map(|b| format!("{}: {}", b.error.code, b.error.message))
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(300).collect());
    match status {
        200 => report.push(
            "key",
            Status::Ok,
            format!(
                "key id {:?} accepted (signed GET /deployments answered 200)",
                target.key_id
            ),
        ),
        401 => report.push_fix(
            "key",
            Status::Fail,
            format!("key id {:?} refused: {message}", target.key_id),
            "DEPLOY_HMAC_SECRET and DEPLOY_HMAC_KEY_ID here must equal a key the receiver holds \
             (its DEPLOY_HMAC_SECRET/DEPLOY_HMAC_KEY_ID or DEPLOY_HMAC_KEYS); if the message is \
             about the timestamp, fix the clocks",
        ),
        403 => report.push_fix(
            "key",
            Status::Fail,
            format!("this host's address is refused: {message}"),
            "add this host's network to the receiver's ALLOWED_NETWORKS; behind a reverse proxy, \
             set the receiver's TRUSTED_PROXIES to the proxy's address",
        ),
        other => report.push(
            "key",
            Status::Fail,
            format!("signed GET {url} answered {other}: {message}"),
        ),
    }
}

/// Runs the doctor from the command line: prints the report and fails when a check failed.
pub async fn run(args: DoctorArgs) -> Result<(), SenderError> {
    let report = diagnose(&args.receiver, args.min_free).await;
    if args.json {
        super::terminal::print_json(&report);
    } else {
        print_report(&report);
    }
    let failed: Vec<&str> = report.failures().map(|c| c.name).collect();
    if failed.is_empty() {
        return Ok(());
    }
    let summary = format!("{} check(s) failed: {}", failed.len(), failed.join(", "));
    Err(if failed.contains(&"reachable") {
        SenderError::RemoteUnreachable {
            url: report.receiver.clone(),
            detail: summary,
        }
    } else {
        SenderError::Validation(summary)
    })
}

fn print_report(report: &Report) {
    println!("receiver {}", report.receiver);
    for check in &report.checks {
        let mark = match check.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        println!("  [{mark}] {:<9} {}", check.name, check.detail);
        if let Some(fix) = &check.fix {
            println!("         {:<9} fix: {fix}", "");
        }
    }
    let warnings = report
        .checks
        .iter()
        .filter(|c| c.status == Status::Warn)
        .count();
    if report.ok && warnings == 0 {
        println!("all checks passed");
    } else if report.ok {
        println!("no check failed; {warnings} warning(s) worth fixing");
    }
}

/// Parses an HTTP date (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`) into Unix seconds.
pub fn parse_http_date(value: &str) -> Option<i64> {
    let format = time::format_description::parse_borrowed::<2>(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT",
    )
    .ok()?;
    time::PrimitiveDateTime::parse(value.trim(), &format)
        .ok()
        .map(|t| t.assume_utc().unix_timestamp())
}

fn unix_now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("yesterday"), None);
    }

    #[test]
    fn clock_skew_verdicts() {
        let now = 1_761_393_600.0;
        let date = |offset: i64| {
            let t = time::OffsetDateTime::from_unix_timestamp(now as i64 + offset).expect("time");
            let format = time::format_description::parse_borrowed::<2>(
                "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT",
            )
            .expect("format");
            t.format(&format).expect("format")
        };
        for (offset, status) in [(0, Status::Ok), (-45, Status::Warn), (301, Status::Fail)] {
            let mut report = Report {
                receiver: String::new(),
                ok: true,
                checks: vec![],
            };
            check_clock(Some(&date(offset)), now, &mut report);
            assert_eq!(report.checks[0].status, status, "offset {offset}");
        }
    }
}
