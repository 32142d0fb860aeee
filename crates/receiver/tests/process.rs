//! The real `deploy-receiver` binary as a child process, under load and under faults: 50
//! uploads at once (peak RSS read from /proc/<pid>/status), SIGKILL at 24 points of an upload
//! and restart, a disk that is full or fills up mid-write (a small tmpfs), and a client process
//! killed mid-upload. Loopback only. Figures are printed with `--nocapture`
//! (`cargo test -p deploy-receiver --test process -- --nocapture --test-threads 1`).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{manifest_for, Daemon, Signer};
use deploy_protocol::{Checksum, PackageManifest, SignatureHeaders};
use deploy_testkit::receiver::files_in as names;
use deploy_testkit::tmpfs::Tmpfs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BOUNDARY: &str = "process-test-boundary-93ac";

/// These tests need no Docker: the receiver must not need it to take uploads.
fn start_daemon(package_dir: &Path, state_dir: &Path) -> Daemon {
    common::start_daemon(
        package_dir,
        state_dir,
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock".to_owned())],
    )
}

fn test_bytes(size: usize, seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; size];
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[seed]);
    hasher.finalize_xof().fill(&mut out);
    out
}

/// A signed upload: (head, body).
fn signed_upload(addr: SocketAddr, package: &[u8]) -> (PackageManifest, String, Vec<u8>) {
    let manifest = manifest_for(package);
    let manifest_bytes = manifest.to_bytes();
    let mut body = Vec::with_capacity(package.len() + 1024);
    for (name, bytes, content_type) in [
        ("manifest", &manifest_bytes[..], "application/json"),
        ("package", package, "application/octet-stream"),
    ] {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\nContent-Type: {content_type}\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    let headers = signature(&addr.to_string(), &manifest_bytes);
    let mut head = format!(
        "POST /deployment/upload HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers.to_pairs() {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    (manifest, head, body)
}

fn signature(authority: &str, manifest_bytes: &[u8]) -> SignatureHeaders {
    Signer::to(authority, "/deployment/upload").headers(manifest_bytes)
}

/// Sends a whole upload on a fresh connection; returns the status and the JSON body.
async fn upload(addr: SocketAddr, package: &[u8]) -> (PackageManifest, u16, serde_json::Value) {
    let (manifest, result) = try_upload(addr, package).await;
    let (status, body) = result.expect("send");
    (manifest, status, body)
}

/// As [`upload`], but a connection error is returned: a refusal answered while the client is
/// still sending the body closes the connection, and the client may see that instead.
async fn try_upload(
    addr: SocketAddr,
    package: &[u8],
) -> (
    PackageManifest,
    Result<(u16, serde_json::Value), reqwest::Error>,
) {
    let (manifest, head, body) = signed_upload(addr, package);
    let mut request = reqwest::Client::new()
        .post(format!("http://{addr}/deployment/upload"))
        .body(body);
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(": ") {
            if !k.eq_ignore_ascii_case("host") && !k.eq_ignore_ascii_case("content-length") {
                request = request.header(k, v);
            }
        }
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return (manifest, Err(e)),
    };
    let status = response.status().as_u16();
    (
        manifest,
        Ok((
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )),
    )
}

/// A counter of the daemon's /metrics, by line prefix.
async fn metric(url: &str, prefix: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn temp_files(dir: &Path) -> usize {
    names(dir)
        .iter()
        .filter(|n| n.starts_with(".upload-"))
        .count()
}

/// The store's invariant: no temp file, every package has its manifest and hashes to it.
/// Returns the number of complete packages.
fn assert_store_consistent(dir: &Path) -> usize {
    let names = names(dir);
    assert_eq!(temp_files(dir), 0, "temp files left: {names:?}");
    let mut complete = 0;
    for name in &names {
        if let Some(id) = name.strip_suffix(".pkg") {
            let manifest_path = dir.join(format!("{id}.manifest.json"));
            let manifest = PackageManifest::from_slice(
                &std::fs::read(&manifest_path).expect("a stored package has its manifest"),
            )
            .expect("manifest parses");
            let bytes = std::fs::read(dir.join(name)).expect("package");
            assert_eq!(
                bytes.len() as u64,
                manifest.package_size,
                "{name}: partial file"
            );
            assert_eq!(Checksum::of(&bytes), manifest.package_checksum, "{name}");
            complete += 1;
        } else if let Some(id) = name.strip_suffix(".manifest.json") {
            assert!(
                dir.join(format!("{id}.pkg")).is_file(),
                "manifest without package: {name}"
            );
        } else {
            panic!("unexpected file in the store: {name}");
        }
    }
    complete
}

fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    let packages = dir.path().join("packages");
    let state = dir.path().join("state");
    (dir, packages, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_uploads_at_once_complete_intact_or_are_refused_busy_and_health_stays_up() {
    let (_dir, packages, state) = dirs();
    let daemon = start_daemon(&packages, &state);
    let idle_rss = daemon.peak_rss_kib();
    let addr = daemon.addr;
    let package = test_bytes(8 << 20, 1);

    let health_url = format!("{}/health", daemon.base);
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let prober = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let (mut ok, mut failed, mut slowest) = (0u32, 0u32, Duration::ZERO);
        loop {
            let started = Instant::now();
            match client
                .get(&health_url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => ok += 1,
                _ => failed += 1,
            }
            slowest = slowest.max(started.elapsed());
            tokio::select! {
                _ = &mut stop_rx => break,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        (ok, failed, slowest)
    });

    let started = Instant::now();
    let uploads = (0..50).map(|_| {
        let package = package.clone();
        tokio::spawn(async move { try_upload(addr, &package).await })
    });
    let results = futures::future::join_all(uploads).await;
    let elapsed = started.elapsed();
    let _ = stop_tx.send(());
    let (health_ok, health_failed, slowest_health) = prober.await.expect("prober");

    let (mut stored, mut busy, mut cut) = (0, 0, 0);
    for result in results {
        let (manifest, result) = result.expect("task");
        let Ok((status, body)) = result else {
            // Refused while the client was still sending: counted against the daemon's own
            // count of BUSY answers below.
            cut += 1;
            continue;
        };
        match status {
            200 => {
                assert_eq!(body["checksum_verified"], true, "{body}");
                let bytes = std::fs::read(packages.join(format!("{}.pkg", manifest.package_id)))
                    .expect("stored");
                assert!(bytes == package, "stored bytes differ");
                stored += 1;
            }
            429 => {
                assert_eq!(body["error"]["code"], "BUSY", "{body}");
                busy += 1;
            }
            other => panic!("neither stored nor BUSY: {other} {body}"),
        }
    }
    let peak = daemon.peak_rss_kib();
    let busy_answers = metric(
        &daemon.base,
        "deploy_receiver_uploads_total{result=\"BUSY\"}",
    )
    .await as usize;
    let ok_answers =
        metric(&daemon.base, "deploy_receiver_uploads_total{result=\"ok\"}").await as usize;
    eprintln!(
        "50 concurrent 8 MiB uploads (MAX_CONCURRENT_UPLOADS=4): {stored} stored intact, \
         {busy_answers} refused BUSY by the daemon ({busy} clients read the 429, {cut} saw the \
         connection close mid-body), 0 other, in {:.1} s; /health {health_ok} ok, \
         {health_failed} failed, slowest {} ms; receiver peak RSS (VmHWM) {} KiB ({:.1} MiB), \
         idle {} KiB",
        elapsed.as_secs_f64(),
        slowest_health.as_millis(),
        peak,
        peak as f64 / 1024.0,
        idle_rss
    );
    assert_eq!(stored + busy + cut, 50);
    assert_eq!(
        ok_answers, stored,
        "every upload the daemon accepted reached its client"
    );
    assert_eq!(
        busy_answers,
        busy + cut,
        "every other upload was refused BUSY"
    );
    assert!(stored >= 4, "at least one batch must get through");
    assert_eq!(health_failed, 0);
    assert_eq!(assert_store_consistent(&packages), stored);

    // BUSY carries Retry-After.
    let mut held = Vec::new();
    for _ in 0..4 {
        let (_, head, body) = signed_upload(addr, &package);
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(&body[..1000]).await.expect("part");
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A fifth signed upload: slots are taken only by authenticated uploads, so it must be signed.
    let (_, head, body) = signed_upload(addr, &test_bytes(1000, 9));
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    let _ = stream.write_all(&body).await;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 429"), "{answer}");
    let retry_after = answer
        .lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(retry_after.is_some_and(|s| s > 0), "{answer}");
    drop(held);
}

#[tokio::test]
async fn sigkill_at_24_points_of_an_upload_leaves_no_partial_file_after_restart() {
    let (_dir, packages, state) = dirs();
    let package = test_bytes(8 << 20, 2);
    let mut daemon = start_daemon(&packages, &state);
    let (_, _, sample_body) = signed_upload(daemon.addr, &package);
    let body_len = sample_body.len();
    // Kill points: in the headers, inside the manifest, then through the package to the last
    // byte, and after the whole body is sent (racing the commit).
    let mut points: Vec<Option<usize>> = vec![None, Some(0), Some(50), Some(200)];
    for k in 1..=18 {
        points.push(Some(body_len * k / 19));
    }
    points.push(Some(body_len - 1));
    points.push(Some(body_len));
    assert!(points.len() >= 24);
    let (mut left_temp, mut committed) = (0, 0);
    for (i, point) in points.iter().enumerate() {
        let (_, head, body) = signed_upload(daemon.addr, &package);
        let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
        match point {
            None => stream
                .write_all(&head.as_bytes()[..head.len() / 2])
                .await
                .expect("half the head"),
            Some(n) => {
                stream.write_all(head.as_bytes()).await.expect("head");
                stream.write_all(&body[..*n]).await.expect("body");
            }
        }
        stream.flush().await.expect("flush");
        // Let the receiver take in what was sent (a temp file appears once the package starts).
        let wait_until = Instant::now() + Duration::from_millis(400);
        while Instant::now() < wait_until && temp_files(&packages) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if *point == Some(body_len) {
            tokio::time::sleep(Duration::from_millis(i as u64 % 3 * 20)).await;
        }
        if temp_files(&packages) > 0 {
            left_temp += 1;
        }
        daemon.sigkill();
        drop(stream);
        // Restart on the same directory: the sweep must leave a consistent store.
        daemon = start_daemon(&packages, &state);
        committed = assert_store_consistent(&packages);
        let health = reqwest::get(format!("{}/health", daemon.base))
            .await
            .expect("health");
        assert_eq!(health.status(), 200);
    }
    // And the restarted receiver still takes uploads.
    let (manifest, status, body) = upload(daemon.addr, &package).await;
    assert_eq!(status, 200, "{body}");
    assert!(packages
        .join(format!("{}.pkg", manifest.package_id))
        .is_file());
    let total = assert_store_consistent(&packages);
    eprintln!(
        "SIGKILL: {} kills at points from mid-headers to after the last byte; {left_temp} left \
         a temp file behind, all swept at restart; 0 partial or orphan files; {committed} \
         upload(s) had committed whole before the kill; store consistent ({total} packages)",
        points.len()
    );
}

#[tokio::test]
async fn a_full_disk_is_refused_up_front_and_a_disk_filling_up_mid_write_is_a_clean_507() {
    let fs = Tmpfs::mount("48m");
    let (_dir, _, state) = dirs();
    let packages = fs.path().to_path_buf();
    let daemon = start_daemon(&packages, &state);

    // Declared beyond free space (48 MiB fs, 40 MiB + 16 MiB margin): refused before the body.
    // Only the head and the first 64 KiB are sent: the answer must not need the rest.
    let (_, head, body) = signed_upload(daemon.addr, &test_bytes(40 << 20, 3));
    let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(&body[..64 << 10]).await.expect("start");
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("answered before the body")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
    assert!(answer.contains("INSUFFICIENT_STORAGE"), "{answer}");
    drop(stream);
    assert_eq!(temp_files(&packages), 0);

    // Declared within free space, then the disk fills up while the package is written.
    let package = test_bytes(24 << 20, 4);
    let (_, head, body) = signed_upload(daemon.addr, &package);
    let mut stream = TcpStream::connect(daemon.addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream
        .write_all(&body[..8 << 20])
        .await
        .expect("first 8 MiB");
    let deadline = Instant::now() + Duration::from_secs(10);
    while temp_files(&packages) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(temp_files(&packages), 1, "the upload is being written");
    // Another tenant of the disk takes what is left.
    let filler = packages.join("filler.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0xAAu8; 1 << 20];
        while f.write_all(&block).is_ok() {}
    }
    let _ = stream.write_all(&body[8 << 20..]).await; // the receiver may hang up early
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
    assert!(answer.contains("INSUFFICIENT_STORAGE"), "{answer}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while temp_files(&packages) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(temp_files(&packages), 0, "the partial file is removed");

    // Space freed: the receiver takes uploads again.
    std::fs::remove_file(&filler).expect("rm filler");
    let (_, status, body) = upload(daemon.addr, &test_bytes(4 << 20, 5)).await;
    assert_eq!(status, 200, "{body}");
    eprintln!("disk full (48 MiB tmpfs): declared 40 MiB -> 507 before the body; filled up mid-write of 24 MiB -> 507, temp file removed; next upload 200");
}

#[tokio::test]
async fn a_sender_process_killed_mid_upload_leaves_nothing_and_the_receiver_keeps_serving() {
    assert!(
        Command::new("curl")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok(),
        "this test kills a curl upload mid-stream: install curl"
    );
    let (dir, packages, state) = dirs();
    let daemon = start_daemon(&packages, &state);
    let package = test_bytes(16 << 20, 6);
    let (_, head, body) = signed_upload(daemon.addr, &package);
    let body_path = dir.path().join("body.bin");
    std::fs::write(&body_path, &body).expect("body");
    let mut curl = Command::new("curl");
    curl.args([
        "-s",
        "-o",
        "/dev/null",
        "--limit-rate",
        "2M",
        "--data-binary",
    ])
    .arg(format!("@{}", body_path.display()))
    .arg(format!("{}/deployment/upload", daemon.base));
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(": ") {
            if !k.eq_ignore_ascii_case("host") && !k.eq_ignore_ascii_case("content-length") {
                curl.args(["-H", &format!("{k}: {v}")]);
            }
        }
    }
    let mut sender = curl
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("curl");
    let deadline = Instant::now() + Duration::from_secs(10);
    while temp_files(&packages) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(temp_files(&packages), 1, "the upload is being written");
    tokio::time::sleep(Duration::from_millis(500)).await;
    sender.kill().expect("SIGKILL the sender");
    let _ = sender.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while temp_files(&packages) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(names(&packages), Vec::<String>::new());
    let (_, status, body) = upload(daemon.addr, &test_bytes(1 << 20, 7)).await;
    assert_eq!(status, 200, "{body}");
    eprintln!("sender SIGKILLed mid-upload: temp file removed by the receiver, next upload 200");
}
