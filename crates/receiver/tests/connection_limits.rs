//! The receiver binary's start-up refusals (an empty ALLOWED_NETWORKS) and its behaviour at the process's descriptor limit:
//! the real `deploy-receiver` as a child process on loopback.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The receiver binary with a clean environment plus `env`, run through `sh -c PREFIX exec`.
fn command(prefix: &str, env: &[(&str, &str)], dir: &std::path::Path) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("{prefix} exec \"$0\""))
        .arg(env!("CARGO_BIN_EXE_deploy-receiver"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RECEIVER_BIND", "127.0.0.1:0")
        .env("PACKAGE_DIR", dir.join("packages"))
        .env("DEPLOY_HMAC_SECRET", SECRET)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info");
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

#[test]
fn an_unset_empty_or_blank_allowlist_is_a_start_up_error() {
    let dir = temp_dir();
    for value in [None, Some(""), Some("  "), Some(","), Some("10.0.0.0/8,")] {
        let mut cmd = command("", &[], dir.path());
        if let Some(v) = value {
            cmd.env("ALLOWED_NETWORKS", v);
        }
        let output = cmd
            .stdin(Stdio::null())
            .output()
            .expect("run deploy-receiver");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{value:?} started");
        assert!(
            stderr.to_ascii_lowercase().contains("allowed") || stderr.contains("allowed-networks"),
            "{value:?}: {stderr}"
        );
    }
}

/// Starts the binary and waits until it announces its address.
fn start(prefix: &str, env: &[(&str, &str)], dir: &std::path::Path) -> Daemon {
    Daemon::spawn(command(prefix, env, dir))
}

#[test]
fn any_must_be_said_and_then_starts() {
    let dir = temp_dir();
    let daemon = start("", &[("ALLOWED_NETWORKS", "any")], dir.path());
    assert!(daemon.addr.ip().is_loopback());
    daemon.sigkill();
}

#[tokio::test]
async fn health_answers_with_more_slow_clients_than_descriptors() {
    let dir = temp_dir();
    let daemon = start(
        "ulimit -n 128 &&",
        &[("ALLOWED_NETWORKS", "127.0.0.0/8")],
        dir.path(),
    );
    let addr = daemon.addr.to_string();
    // 140 clients that connect, send half a head, and wait.
    let mut slow = Vec::new();
    for _ in 0..140 {
        if let Ok(mut stream) = TcpStream::connect(&addr).await {
            let _ = stream
                .write_all(b"POST /deployment/load HTTP/1.1\r\nHost: x\r\n")
                .await;
            slow.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut health = TcpStream::connect(&addr).await.expect("connect");
    health
        .write_all(
            format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), health.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    eprintln!(
        "figure: /health with 140 slow clients under `ulimit -n 128`: {} in {} ms",
        text.lines().next().unwrap_or("no answer"),
        started.elapsed().as_millis()
    );
    daemon.sigkill();
    assert!(read.is_ok(), "no answer within 10 s");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    drop(slow);
}
