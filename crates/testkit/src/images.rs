//! Test images built `FROM scratch` with this machine's static busybox (`/bin/busybox`): no
//! registry, no pulls. Every image carries the guard's label, so the guard removes it and parallel
//! tests never share build-cache layers (one test's cleanup must not delete another's base).

use std::path::Path;

use bollard::image::BuildImageOptions;
use bollard::Docker;
use futures::StreamExt;

use crate::docker::{Guard, LABEL};

/// Where the static busybox comes from.
pub const BUSYBOX: &str = "/bin/busybox";

/// busybox httpd on port 80 serving `/www`, healthy when `wget` gets `/` from `health_port`
/// (80 for a healthy image; a port nobody listens on for one that never becomes healthy).
pub fn httpd_dockerfile(health_port: u16) -> String {
    httpd_dockerfile_checked_by(Some(&format!(
        "[\"/bin/busybox\", \"wget\", \"-q\", \"-O\", \"/dev/null\", \"http://127.0.0.1:{health_port}/\"]"
    )))
}

/// A HEALTHCHECK command that never passes.
pub const ALWAYS_FAILS: &str = r#"["/bin/busybox", "false"]"#;

/// busybox httpd on port 80 serving `/www`, with `healthcheck` (an exec-form JSON array) as its
/// HEALTHCHECK command, or none.
pub fn httpd_dockerfile_checked_by(healthcheck: Option<&str>) -> String {
    let mut dockerfile =
        String::from("FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\nEXPOSE 80\n");
    if let Some(test) = healthcheck {
        dockerfile.push_str(&format!(
            "HEALTHCHECK --interval=1s --timeout=2s --retries=2 CMD {test}\n"
        ));
    }
    dockerfile
        .push_str("CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/www\"]\n");
    dockerfile
}

/// `dockerfile` with the guard's label after its `FROM` line, and a label of its own: no two
/// builds share build-cache layers, not even two of one guard (a layer an engine already has is
/// skipped by `docker load`, so a shared one would hide a corrupt package).
fn labelled(dockerfile: &str, guard: &Guard) -> String {
    let (from, rest) = dockerfile.split_once('\n').unwrap_or((dockerfile, ""));
    format!(
        "{from}\nLABEL {LABEL}={} {LABEL}.build={}\n{rest}",
        guard.name,
        uuid::Uuid::new_v4().simple()
    )
}

/// A build context directory (for builds that read one from disk, like the sender's): the static
/// busybox as `busybox`, `www/index.html` holding `page`, and `dockerfile` labelled for `guard`.
pub fn busybox_context(guard: &Guard, dockerfile: &str, page: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(BUSYBOX, dir.path().join("busybox")).expect("copy /bin/busybox");
    std::fs::create_dir(dir.path().join("www")).expect("www");
    std::fs::write(dir.path().join("www/index.html"), page).expect("index.html");
    std::fs::write(dir.path().join("Dockerfile"), labelled(dockerfile, guard)).expect("Dockerfile");
    dir
}

/// Builds `tag` on the engine from `dockerfile` (labelled for `guard`), with the static busybox
/// as `busybox` and `files` (path, bytes) in the context. Panics with the build's error.
pub async fn build_image(
    docker: &Docker,
    guard: &Guard,
    tag: &str,
    dockerfile: &str,
    files: &[(&str, &[u8])],
) {
    let mut context = tar::Builder::new(Vec::new());
    let mut add = |path: &str, bytes: &[u8], mode: u32| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        context
            .append_data(&mut header, path, bytes)
            .expect("tar entry");
    };
    add("Dockerfile", labelled(dockerfile, guard).as_bytes(), 0o644);
    let busybox = std::fs::read(Path::new(BUSYBOX)).expect("the static busybox at /bin/busybox");
    add("busybox", &busybox, 0o755);
    for (path, bytes) in files {
        add(path, bytes, 0o644);
    }
    let context = context.into_inner().expect("tar");
    run_build(docker, tag, context).await;
}

/// Builds `context` (a tar holding `Dockerfile`) as `tag` with the legacy builder. A build whose
/// stream reports an error is tried once more before the test panics with that error in full:
/// concurrent builds of identical layers on this engine (Docker 20.10, fuse-overlayfs) failed
/// once in CI with an error in the build stream while every other build passed.
pub async fn run_build(docker: &Docker, tag: &str, context: Vec<u8>) {
    let mut failure = None;
    for attempt in 1..=2 {
        match build_once(docker, tag, context.clone()).await {
            Ok(()) => return,
            Err(e) => {
                eprintln!("building {tag}, attempt {attempt}: {e}");
                failure = Some(e);
            }
        }
    }
    panic!(
        "building {tag}: {}",
        failure.unwrap_or_else(|| "no attempt ran".into())
    );
}

async fn build_once(docker: &Docker, tag: &str, context: Vec<u8>) -> Result<(), String> {
    let options = BuildImageOptions {
        dockerfile: "Dockerfile".to_owned(),
        t: tag.to_owned(),
        rm: true,
        forcerm: true,
        pull: false,
        ..Default::default()
    };
    let mut stream = docker.build_image(options, None, Some(context.into()));
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| format!("{e:?}"))?;
        if let Some(error) = info.error {
            return Err(error);
        }
    }
    Ok(())
}

/// Builds `tag` with the `docker` CLI's legacy builder from a context holding the static busybox
/// (as `busybox`), `files` (path, bytes) and `dockerfile`. Panics with the build's stderr.
pub fn build_with_cli(tag: &str, dockerfile: &str, files: &[(&str, &[u8])]) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(BUSYBOX, dir.path().join("busybox")).expect("copy the static busybox");
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).expect("context file");
    }
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("Dockerfile");
    let build = |extra: &[&str]| {
        std::process::Command::new("docker")
            .args(["build", "-q", "-t", tag])
            .args(extra)
            .arg(dir.path())
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .expect("docker build runs")
    };
    let mut out = build(&[]);
    // Tests run at once and remove their images: a cached step (the shared busybox layer) can
    // lose its image between the builder's cache lookup and its commit ("unknown parent image
    // ID"). That is the other test's clean-up, not this build: build once more without the cache.
    if !out.status.success()
        && String::from_utf8_lossy(&out.stderr).contains("unknown parent image ID")
    {
        out = build(&["--no-cache"]);
    }
    assert!(
        out.status.success(),
        "docker build of {tag} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
