//! The `deploy-sender` binary as a user runs it: its help, its warnings on a pipe, and `serve` on
//! an address already taken. No Docker needed.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_deploy-sender");

fn sender(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .output()
        .expect("run deploy-sender")
}

#[test]
fn help_names_docker_host() {
    let help = sender(&["--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    assert!(text.contains("DOCKER_HOST"), "{text}");
    assert!(text.contains("--docker-host"), "{text}");
}

#[test]
fn warnings_written_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Unreadable metadata: `packages list` warns that it skips it.
    std::fs::write(
        dir.path().join(format!("{}.json", uuid::Uuid::new_v4())),
        b"not json",
    )
    .expect("write");
    let output = sender(&[
        "packages",
        "list",
        "--package-dir",
        dir.path().to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("skipping package"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "ANSI codes on a pipe: {stderr:?}");
}

#[test]
fn serve_on_an_address_in_use_names_it_and_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output = sender(&[
        "serve",
        "--bind",
        &addr,
        "--package-dir",
        dir.path().to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
    assert!(stderr.contains("SENDER_BIND"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "said once: {stderr}");
}
