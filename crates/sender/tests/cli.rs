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
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI codes on a pipe: {stderr:?}"
    );
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
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("SENDER_BIND"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "said once: {stderr}");
}

/// Runs `deploy-sender` with `args` (and no Docker engine: DOCKER_HOST names a missing socket).
fn sender_without_docker(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .env_remove("DEFAULT_RECEIVER_URL")
        .env_remove("DEPLOY_JSON")
        .env(
            "DEPLOY_HMAC_SECRET",
            "cli-test-secret-0123456789abcdef0123456789",
        )
        .output()
        .expect("run deploy-sender")
}

/// Exactly one JSON document on stdout.
fn one_document(args: &[&str], output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let documents: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {stdout}"));
    assert_eq!(documents.len(), 1, "{args:?}: one document: {stdout}");
    documents.into_iter().next().expect("one")
}

/// A stored package written by hand (no Docker needed): `<id>.tar` and its metadata.
fn stored_package(dir: &std::path::Path) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    let bytes = b"not really a docker save archive";
    std::fs::write(dir.join(format!("{id}.tar")), bytes).expect("package");
    let info = serde_json::json!({
        "package_id": id, "image_id": "sha256:abc", "image_tags": ["web:v1"],
        "package_path": "", "package_size": bytes.len(), "package_size_mb": 0.0,
        "original_size": bytes.len(), "compression": "none", "compression_ratio": 0.0,
        "compression_factor": 1.0, "package_checksum": deploy_protocol::Checksum::of(bytes),
        "build_duration_ms": 0, "export_duration_ms": 0, "created_at": "2026-01-01T00:00:00Z"
    });
    std::fs::write(dir.join(format!("{id}.json")), info.to_string()).expect("metadata");
    id
}

#[test]
fn every_command_with_json_prints_exactly_one_json_document_success_or_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().to_str().expect("utf-8");
    let id = stored_package(dir.path()).to_string();
    let missing = uuid::Uuid::new_v4().to_string();
    let file = dir.path().join("p.tar").display().to_string();
    std::fs::write(&file, b"bytes").expect("file");
    // (arguments, succeeds)
    let cases: Vec<(Vec<&str>, bool)> = vec![
        (
            vec!["packages", "list", "--package-dir", store, "--json"],
            true,
        ),
        (
            vec!["packages", "show", &id, "--package-dir", store, "--json"],
            true,
        ),
        (
            vec!["packages", "verify", &id, "--package-dir", store, "--json"],
            true,
        ),
        (
            vec![
                "packages",
                "show",
                &missing,
                "--package-dir",
                store,
                "--json",
            ],
            false,
        ),
        (
            vec![
                "packages",
                "verify",
                &missing,
                "--package-dir",
                store,
                "--json",
            ],
            false,
        ),
        (
            vec![
                "packages",
                "delete",
                &missing,
                "--package-dir",
                store,
                "--json",
            ],
            false,
        ),
        (
            vec!["packages", "delete", &id, "--package-dir", store, "--json"],
            true,
        ),
        (
            vec![
                "transfer",
                "--file",
                &file,
                "--to",
                "http://127.0.0.1:1",
                "--json",
            ],
            false,
        ),
        (
            vec![
                "package",
                "--image",
                "web:v1",
                "--package-dir",
                store,
                "--json",
            ],
            false,
        ),
        (
            vec![
                "deploy",
                "--image",
                "web:v1",
                "--name",
                "web",
                "--to",
                "http://127.0.0.1:1",
                "--package-dir",
                store,
                "--json",
            ],
            false,
        ),
        (
            vec!["doctor", "--to", "http://127.0.0.1:1", "--json"],
            false,
        ),
    ];
    for (args, succeeds) in cases {
        let output = sender_without_docker(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let document = one_document(&args, &output);
        assert_eq!(output.status.success(), succeeds, "{args:?}: {stderr}");
        if !succeeds {
            assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
            let code = document["error"]["code"]
                .as_str()
                .or_else(|| document["ok"].is_boolean().then_some("doctor report"))
                .unwrap_or_else(|| panic!("{args:?}: no error code in {document}"));
            assert!(!code.is_empty());
            let last = stderr.lines().last().unwrap_or_default();
            assert!(last.starts_with("error: "), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn argument_errors_exit_2_with_the_error_code_and_json_when_asked() {
    let args = ["packages", "show", "not-a-uuid", "--json"];
    let output = sender_without_docker(&args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: VALIDATION_ERROR: "), "{stderr}");
    let document = one_document(&args, &output);
    assert_eq!(document["error"]["code"], "VALIDATION_ERROR", "{document}");

    let output = sender_without_docker(&["packages", "list", "--no-such-flag"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: VALIDATION_ERROR: "), "{stderr}");
    assert!(output.stdout.is_empty(), "no --json, nothing on stdout");
}

/// Removes the test image when dropped.
struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

fn temp_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with(".state"))
        .collect()
}

#[test]
fn ctrl_c_during_export_removes_the_temp_file_and_exits_130_silently() {
    // An image whose export takes seconds: 256 MiB of random bytes, compressed with gzip -9.
    let context = tempfile::tempdir().expect("tempdir");
    let random = std::process::Command::new("head")
        .args(["-c", "268435456", "/dev/urandom"])
        .output()
        .expect("head /dev/urandom");
    std::fs::write(context.path().join("big"), random.stdout).expect("write");
    std::fs::write(
        context.path().join("Dockerfile"),
        format!(
            "FROM scratch\nLABEL test={}\nCOPY big /big\n",
            uuid::Uuid::new_v4()
        ),
    )
    .expect("Dockerfile");
    let image = ImageGuard(format!(
        "deploy-sender-cli-{}:big",
        uuid::Uuid::new_v4().simple()
    ));
    let built = Command::new("docker")
        .args(["build", "-q", "-t", &image.0])
        .arg(context.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build (the Docker engine is needed)");
    assert!(
        built.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&built.stderr)
    );

    let store = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(BIN)
        .args([
            "package",
            "--image",
            &image.0,
            "--compression",
            "gzip",
            "--level",
            "9",
        ])
        .arg("--package-dir")
        .arg(store.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !temp_files(store.path())
        .iter()
        .any(|n| n.starts_with(".tmp-"))
    {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the export ended before it could be interrupted"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no temp file after 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(kill.success());
    let output = child.wait_with_output().expect("wait");
    assert_eq!(output.status.code(), Some(130), "{output:?}");
    assert!(
        output.stdout.is_empty() && output.stderr.is_empty(),
        "silent: {output:?}"
    );
    assert_eq!(
        temp_files(store.path()),
        Vec::<String>::new(),
        "nothing left behind"
    );
}

#[test]
fn a_bad_tag_without_a_name_is_reported_as_a_bad_tag() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").expect("Dockerfile");
    let output = sender_without_docker(&[
        "deploy",
        "--dockerfile",
        "Dockerfile",
        "--context",
        dir.path().to_str().expect("utf-8"),
        "--tag",
        "My App:1.0",
        "--to",
        "http://127.0.0.1:1",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: VALIDATION_ERROR: --tag \"My App:1.0\""),
        "{stderr}"
    );
    assert!(!stderr.contains("container"), "{stderr}");
}
