//! The `deploy-receiver` binary as an operator starts it: its log on a pipe or a terminal, the
//! errors it stops with at start, and its `--probe` health check. Loopback only.

mod common;

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{start_daemon, SECRET};

const BIN: &str = env!("CARGO_BIN_EXE_deploy-receiver");

/// The binary with a clean environment, a key, an ephemeral loopback port and temp directories.
fn receiver(dir: &std::path::Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RECEIVER_BIND", "127.0.0.1:0")
        .env("PACKAGE_DIR", dir.join("packages"))
        .env("STATE_DIR", dir.join("state"))
        .env("DEPLOY_HMAC_SECRET", SECRET)
        .env("ALLOWED_NETWORKS", "127.0.0.0/8")
        .env("RUST_LOG", "info");
    command
}

/// Runs `command` until it exits (at most 30 s).
fn run_to_exit(command: &mut Command) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

const ESC: char = '\u{1b}';

#[test]
fn text_logs_written_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = receiver(dir.path())
        .env("LOG_FORMAT", "text")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while !seen.contains("deploy-receiver listening") {
        assert!(Instant::now() < deadline, "no listening line: {seen}");
        let n = stdout.read(&mut buf).expect("read");
        assert!(n > 0, "the receiver exited: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(!seen.contains(ESC), "ANSI codes in a piped log: {seen:?}");
}

/// Runs the receiver for two seconds on a pseudo-terminal (util-linux `script`) and returns what
/// it wrote there.
fn on_a_terminal(dir: &std::path::Path, no_color: Option<&str>) -> String {
    let base = receiver(dir);
    // The same environment, with `script` in front of the receiver.
    let mut command = Command::new("script");
    command.env_clear();
    for (key, value) in base.get_envs() {
        if let Some(value) = value {
            command.env(key, value);
        }
    }
    command.env("LOG_FORMAT", "text").args([
        "-qec",
        &format!("timeout -s INT 2 {BIN}"),
        "/dev/null",
    ]);
    if let Some(value) = no_color {
        command.env("NO_COLOR", value);
    }
    let output = run_to_exit(&mut command);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        text.contains("deploy-receiver listening"),
        "util-linux `script` must run the receiver on a terminal: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

#[test]
fn text_logs_are_coloured_on_a_terminal_unless_no_color_is_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coloured = on_a_terminal(dir.path(), None);
    assert!(
        coloured.contains(ESC),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_a_terminal(dir.path(), Some("1"));
    assert!(!plain.contains(ESC), "colour despite NO_COLOR: {plain:?}");
}

#[test]
fn an_address_in_use_is_named_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let output = run_to_exit(receiver(dir.path()).env("RECEIVER_BIND", addr.to_string()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("RECEIVER_BIND"), "{stderr}");
    assert!(stderr.contains("Address already in use"), "{stderr}");
}

#[test]
fn a_missing_key_is_reported_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = run_to_exit(receiver(dir.path()).env_remove("DEPLOY_HMAC_SECRET"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let all = format!("{stdout}{stderr}");
    assert_eq!(
        all.matches("no HMAC key configured").count(),
        1,
        "printed once: {all}"
    );
    assert!(stderr.starts_with("deploy-receiver: error: "), "{stderr}");
}

/// Answers every connection with one HTTP response carrying `body` (what another service's
/// `/health` says), until the test ends.
fn another_service(body: &'static str) -> std::net::SocketAddr {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[test]
fn probe_passes_only_for_a_healthy_deploy_receiver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = start_daemon(&dir.path().join("packages"), &dir.path().join("state"), &[]);
    let ok = run_to_exit(
        Command::new(BIN)
            .env_clear()
            .args(["--probe", &format!("{}/health", daemon.base)]),
    );
    assert!(
        ok.status.success(),
        "a healthy receiver (is Docker running?): {}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // The sender's /health says `healthy` too, with its own service name.
    let sender = another_service(
        r#"{"status":"healthy","service":"deploy-sender","docker_available":true}"#,
    );
    let refused = run_to_exit(
        Command::new(BIN)
            .env_clear()
            .args(["--probe", &format!("http://{sender}/health")]),
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not as a deploy-receiver"), "{stderr}");
    assert!(stderr.contains("deploy-sender"), "{stderr}");
}

#[test]
fn help_names_docker_host() {
    let help = run_to_exit(Command::new(BIN).arg("--help"));
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    assert!(text.contains("DOCKER_HOST"), "{text}");
    assert!(text.contains("--docker-host"), "{text}");
}
