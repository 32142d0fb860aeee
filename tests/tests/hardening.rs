//! Hardening end to end: the receiver under attack and the sender under faults, on loopback.
//! Replays raced in parallel, floods of bad signatures, slow-header and slow-body clients,
//! IPv4-mapped peers on a dual-stack socket, and the sender's retry rules against the real
//! receiver. Figures are printed with `--nocapture` (see docs/SECURITY.md).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use deploy_protocol::ErrorCode;
use deploy_receiver::{AppState, Config};
use deploy_sender::{manifest_for_file, ReceiverClient, ReceiverTarget, RetryPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn target(url: &str, secret: &[u8]) -> ReceiverTarget {
    ReceiverTarget::new(url, KEY_ID, secret).expect("target")
}

/// The raw head of a signed multipart upload of `body_len` bytes.
fn upload_head(
    addr: SocketAddr,
    headers: &deploy_protocol::SignatureHeaders,
    body_len: usize,
) -> String {
    let mut head = format!(
        "POST /deployment/upload HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {body_len}\r\n"
    );
    for (name, value) in headers.to_pairs() {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// A value of the receiver's Prometheus text for a metric line starting with `prefix`.
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

#[tokio::test]
async fn a_replay_raced_twenty_times_in_parallel_is_accepted_exactly_once() {
    let receiver = spawn_receiver(|c| c.max_concurrent_uploads = 32).await;
    let bytes = vec![9u8; 64 << 10];
    let manifest = manifest_for(&bytes).to_bytes();
    let signing = Signing::to(receiver.authority(), "/deployment/upload");
    let headers = signing.headers(&manifest);
    let body = multipart_body(&[Part::manifest(manifest.clone()), Part::package(bytes)]);
    let client = reqwest::Client::new();
    let sends = (0..20).map(|_| {
        let mut request = client
            .post(format!("{}/deployment/upload", receiver.url))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(body.clone());
        for (name, value) in headers.to_pairs() {
            request = request.header(name, value);
        }
        async move {
            let response = request.send().await.expect("send");
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            (status, code(&body).to_owned())
        }
    });
    let results = futures::future::join_all(sends).await;
    let accepted = results.iter().filter(|(s, _)| *s == 200).count();
    let replays = results
        .iter()
        .filter(|(s, c)| *s == 401 && c == "UNAUTHORIZED")
        .count();
    eprintln!("replay race: 20 identical signed uploads in parallel, {accepted} accepted, {replays} refused as replays");
    assert_eq!(accepted, 1, "{results:?}");
    assert_eq!(replays, 19, "{results:?}");
    assert_eq!(receiver.state.nonces().len(), 1);
}

/// The nonce store outlives the process: a request captured before a restart of the receiver
/// (inside the skew window) is refused after it, with the package directory and state kept.
#[tokio::test]
async fn a_request_captured_before_a_restart_cannot_be_replayed_after_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let packages = dir.path().join("packages");
    let bytes = vec![7u8; 32 << 10];
    let manifest = manifest_for(&bytes).to_bytes();
    // Both runs answer to one configured authority, as behind a proxy: the request is the same.
    let signing = Signing {
        authority: "deploy.test".into(),
        ..Signing::post("/deployment/upload")
    };
    let headers = signing.headers(&manifest);
    let body = multipart_body(&[Part::manifest(manifest), Part::package(bytes)]);
    let send = |url: String, headers: deploy_protocol::SignatureHeaders, body: Vec<u8>| async move {
        let mut request = reqwest::Client::new()
            .post(format!("{url}/deployment/upload"))
            .header("host", "deploy.test")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(body);
        for (name, value) in headers.to_pairs() {
            request = request.header(name, value);
        }
        let response = request.send().await.expect("send");
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        (status, body)
    };
    let proxied = |c: &mut deploy_receiver::Config| {
        c.receiver_authorities = vec!["deploy.test".into()];
    };
    let first = spawn_receiver_in(packages.clone(), proxied).await;
    let (status, answer) = send(first.url.clone(), headers.clone(), body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    first.stop().await;

    let second = spawn_receiver_in(packages.clone(), proxied).await;
    assert_eq!(second.state.nonces().len(), 1, "the nonce was read back");
    let (status, answer) = send(second.url.clone(), headers.clone(), body.clone()).await;
    let body = answer;
    assert_eq!(status, 401, "{body}");
    assert_eq!(code(&body), "UNAUTHORIZED", "{body}");
    assert!(
        body.to_string().contains("nonce"),
        "refused as a replay: {body}"
    );
    // A fresh request still goes through.
    let fresh = vec![8u8; 1024];
    let manifest = manifest_for(&fresh).to_bytes();
    let fresh_signing = Signing {
        authority: "deploy.test".into(),
        ..Signing::post("/deployment/upload")
    };
    let (status, body) = send(
        second.url.clone(),
        fresh_signing.headers(&manifest),
        multipart_body(&[Part::manifest(manifest.clone()), Part::package(fresh)]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    eprintln!("replay after restart: refused (401, nonce already used); fresh request 200");
}

#[tokio::test]
async fn a_flood_of_bad_signatures_leaves_the_nonce_store_empty() {
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = vec![1u8; 100];
    let manifest = manifest_for(&bytes).to_bytes();
    let client = reqwest::Client::new();
    let mut refused = 0;
    for round in 0..100 {
        // five kinds of bad envelope, each with a fresh, well-formed nonce
        let mut wrong_secret = Signing::to(receiver.authority(), "/deployment/upload");
        wrong_secret.secret = b"attacker-guess".to_vec();
        let mut unknown_key = Signing::to(receiver.authority(), "/deployment/upload");
        unknown_key.key_id = format!("k{round}");
        let mut stale = Signing::to(receiver.authority(), "/deployment/upload");
        stale.timestamp -= 3600;
        let wrong_path = Signing::to(receiver.authority(), "/deployment/full");
        let mut wrong_method = Signing::to(receiver.authority(), "/deployment/upload");
        wrong_method.method = "PUT".into();
        for signing in [wrong_secret, unknown_key, stale, wrong_path, wrong_method] {
            let mut request = client
                .post(format!("{}/deployment/upload", receiver.url))
                .header(
                    "content-type",
                    format!("multipart/form-data; boundary={BOUNDARY}"),
                )
                .body(multipart_body(&[
                    Part::manifest(manifest.clone()),
                    Part::package(bytes.clone()),
                ]));
            for (name, value) in signing.headers(&manifest).to_pairs() {
                request = request.header(name, value);
            }
            let response = request.send().await.expect("send");
            assert_eq!(response.status(), 401);
            refused += 1;
        }
        // and a signed JSON request with a bad signature
        let (status, _) = {
            let mut signing = Signing::to(receiver.authority(), "/deployments");
            signing.method = "GET".into();
            signing.secret = b"attacker-guess".to_vec();
            let mut request = client.get(format!("{}/deployments", receiver.url));
            for (name, value) in signing.headers(b"").to_pairs() {
                request = request.header(name, value);
            }
            let response = request.send().await.expect("send");
            (response.status().as_u16(), ())
        };
        assert_eq!(status, 401);
        refused += 1;
    }
    eprintln!(
        "bad-signature flood: {refused} refused, nonce store holds {}",
        receiver.state.nonces().len()
    );
    assert_eq!(receiver.state.nonces().len(), 0);
    assert!(receiver.files().is_empty(), "{:?}", receiver.files());
}

#[tokio::test]
async fn fifty_slow_clients_are_cut_off_while_a_normal_upload_succeeds() {
    let receiver = spawn_receiver(|c| {
        c.header_read_timeout_secs = 1;
        c.upload_idle_timeout_secs = 1;
        c.upload_min_rate = 1 << 20;
    })
    .await;
    let addr = receiver.addr;
    let started = Instant::now();
    let mut dribblers = Vec::new();
    // 44 clients trickle their request headers (slowloris), never finishing them.
    for _ in 0..44 {
        dribblers.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let head = format!("POST /deployment/upload HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ");
            stream.write_all(head.as_bytes()).await.expect("write");
            dribble(stream, b'a', Duration::from_millis(100)).await
        }));
    }
    // 3 send headers, then trickle the (unsigned, not yet verified) manifest part...
    for _ in 0..3 {
        dribblers.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let headers = Signing {
                authority: addr.to_string(),
                ..Signing::post("/deployment/upload")
            }
            .headers(b"{}");
            let mut head = upload_head(addr, &headers, 1 << 20);
            head.push_str(&format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n{{"
            ));
            stream.write_all(head.as_bytes()).await.expect("write");
            dribble(stream, b' ', Duration::from_millis(100)).await
        }));
    }
    // ...and 3 send a signed manifest, then trickle the package far below UPLOAD_MIN_RATE.
    for _ in 0..3 {
        dribblers.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let bytes = vec![0u8; 1 << 20];
            let manifest = manifest_for(&bytes).to_bytes();
            let body = multipart_body(&[Part::manifest(manifest.clone()), Part::package(bytes)]);
            let headers = Signing {
                authority: addr.to_string(),
                ..Signing::post("/deployment/upload")
            }
            .headers(&manifest);
            let head = upload_head(addr, &headers, body.len());
            stream.write_all(head.as_bytes()).await.expect("write");
            let start = body.len() - (1 << 20);
            stream.write_all(&body[..start]).await.expect("write");
            dribble(stream, 0, Duration::from_millis(100)).await
        }));
    }
    assert_eq!(dribblers.len(), 50);

    // Meanwhile a normal upload (slots may be taken: the sender honours BUSY's Retry-After).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = reqwest::get(format!("{}/health", receiver.url))
        .await
        .expect("health while dribbled");
    assert_eq!(health.status(), 200);
    let src = tempfile::tempdir().expect("tmp");
    let path = src.path().join("pkg.tar");
    write_test_file(&path, 8 << 20, 11);
    let manifest = manifest_for_file(&path, None, deploy_protocol::Compression::None, vec![])
        .await
        .expect("manifest");
    let policy = RetryPolicy {
        max_attempts: 6,
        ..RetryPolicy::default()
    };
    let outcome = ReceiverClient::new(
        reqwest::Client::new(),
        target(&receiver.url, SECRET.as_bytes()),
    )
    .upload(&path, &manifest)
    .retry(policy.clone())
    .send()
    .await
    .expect("the normal upload succeeds");
    assert_eq!(outcome.response["checksum_verified"], true);
    let upload_done = started.elapsed();

    let mut cut_after = Vec::new();
    for d in dribblers {
        cut_after.push(d.await.expect("dribbler"));
    }
    let slowest = cut_after.iter().max().copied().unwrap_or_default();
    let slowest_header = cut_after[..44].iter().max().copied().unwrap_or_default();
    eprintln!(
        "slow clients: 50 dribbling connections, all cut off (header dribblers within {:.1} s, \
         all within {:.1} s); the normal 8 MiB upload finished after {:.1} s",
        slowest_header.as_secs_f64(),
        slowest.as_secs_f64(),
        upload_done.as_secs_f64()
    );
    assert!(slowest_header < Duration::from_secs(4), "{cut_after:?}");
    assert!(slowest < Duration::from_secs(8), "{cut_after:?}");
    for _ in 0..100 {
        if receiver.files().iter().all(|f| !f.starts_with(".upload-")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receiver.files().len(), 2, "{:?}", receiver.files());
}

/// Writes one `byte` per `every` until the server closes the connection; returns when that
/// happened (from the connection's start), or panics after 20 s.
async fn dribble(mut stream: TcpStream, byte: u8, every: Duration) -> Duration {
    let started = Instant::now();
    let mut sink = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(20) {
        if stream.write_all(&[byte]).await.is_err() {
            return started.elapsed();
        }
        // an answer (408 TIMEOUT) or EOF both mean the server is done with us
        match tokio::time::timeout(every, stream.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {
                // drain until EOF
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(2), stream.read(&mut sink)).await
                {
                    if n == 0 {
                        break;
                    }
                }
                return started.elapsed();
            }
            Err(_) => {}
        }
    }
    panic!("a dribbling connection was never cut off");
}

/// A receiver served from a listener bound by the test (here: the dual-stack `[::]:0`).
async fn serve_on(
    listener: tokio::net::TcpListener,
    tune: impl FnOnce(&mut Config),
) -> (
    AppState,
    tempfile::TempDir,
    tokio::sync::oneshot::Sender<()>,
) {
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = Config::for_dir(dir.path().join("packages"), SECRET);
    tune(&mut config);
    let state = AppState::new(config).expect("state");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(deploy_receiver::serve(listener, state.clone(), async {
        let _ = rx.await;
    }));
    (state, dir, tx)
}

async fn upload_small(url: &str) -> (u16, serde_json::Value) {
    let bytes = vec![4u8; 1000];
    let manifest = manifest_for(&bytes).to_bytes();
    let mut request = reqwest::Client::new()
        .post(format!("{url}/deployment/upload"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(multipart_body(&[
            Part::manifest(manifest.clone()),
            Part::package(bytes),
        ]));
    let signing = Signing {
        authority: url.trim_start_matches("http://").to_owned(),
        ..Signing::post("/deployment/upload")
    };
    for (name, value) in signing.headers(&manifest).to_pairs() {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test]
async fn ipv4_mapped_peers_on_a_dual_stack_socket_match_ipv4_networks() {
    for (networks, expected) in [("127.0.0.0/8", 200), ("10.0.0.0/8", 403)] {
        let listener = match tokio::net::TcpListener::bind("[::]:0").await {
            Ok(l) => l,
            Err(e) => panic!("cannot bind [::]:0 (no IPv6 here?): {e}"),
        };
        let port = listener.local_addr().expect("addr").port();
        let (_state, _dir, _stop) = serve_on(listener, |c| {
            c.allowed_networks =
                Some(deploy_receiver::config::parse_networks(networks).expect("cidr"));
        })
        .await;
        // Connect over IPv4: the dual-stack socket sees the peer as ::ffff:127.0.0.1.
        let (status, body) = upload_small(&format!("http://127.0.0.1:{port}")).await;
        assert_eq!(status, expected, "ALLOWED_NETWORKS={networks}: {body}");
        if expected == 403 {
            assert_eq!(code(&body), "FORBIDDEN");
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("127.0.0.1") && !message.contains("::ffff"),
                "the refused address is read as IPv4: {message}"
            );
        }
        eprintln!("dual-stack [::]:{port}, peer 127.0.0.1, ALLOWED_NETWORKS={networks}: {status}");
    }
}

#[tokio::test]
async fn the_sender_retries_until_a_briefly_unavailable_receiver_starts() {
    // Reserve a port, leave it closed for a while, then start the receiver on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let src = tempfile::tempdir().expect("tmp");
    let path = src.path().join("pkg.tar");
    write_test_file(&path, 1 << 20, 12);
    let manifest = manifest_for_file(&path, None, deploy_protocol::Compression::None, vec![])
        .await
        .expect("manifest");
    let starter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("rebind the reserved port");
        serve_on(listener, |_| {}).await
    });
    let policy = RetryPolicy {
        max_attempts: 8,
        min_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(2),
        ..RetryPolicy::default()
    };
    let started = Instant::now();
    let outcome = ReceiverClient::new(
        reqwest::Client::new(),
        target(&format!("http://127.0.0.1:{port}"), SECRET.as_bytes()),
    )
    .upload(&path, &manifest)
    .retry(policy.clone())
    .send()
    .await
    .expect("succeeds once the receiver is up");
    assert_eq!(outcome.response["outcome"], "created");
    let (state, _dir, _stop) = starter.await.expect("starter");
    assert!(state
        .store()
        .get(manifest.package_id)
        .expect("get")
        .is_some());
    eprintln!(
        "sender retry: receiver down for 1.5 s, upload stored after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn refusals_that_a_retry_cannot_change_are_tried_once() {
    let receiver = spawn_receiver(|c| c.max_package_size = 1 << 20).await;
    let src = tempfile::tempdir().expect("tmp");
    let path = src.path().join("pkg.tar");
    write_test_file(&path, 4096, 13);
    let manifest = manifest_for_file(&path, None, deploy_protocol::Compression::None, vec![])
        .await
        .expect("manifest");
    let policy = RetryPolicy {
        max_attempts: 5,
        min_delay: Duration::from_millis(10),
        ..RetryPolicy::default()
    };
    let client = reqwest::Client::new();
    // 401: a wrong secret.
    let started = Instant::now();
    let err = ReceiverClient::new(client.clone(), target(&receiver.url, b"wrong-secret"))
        .upload(&path, &manifest)
        .retry(policy.clone())
        .send()
        .await
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::Unauthorized, "{err}");
    let attempts = metric(
        &receiver.url,
        "deploy_receiver_auth_refused_total{reason=\"bad_signature\"}",
    )
    .await;
    assert_eq!(attempts, 1.0, "401 must be a single attempt");
    // 422: bytes that differ from the manifest (a retry would send the same bytes).
    let mut tampered = manifest.clone();
    tampered.package_checksum = deploy_protocol::Checksum::of(b"other");
    let err = ReceiverClient::new(client.clone(), target(&receiver.url, SECRET.as_bytes()))
        .upload(&path, &tampered)
        .retry(policy.clone())
        .send()
        .await
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::ChecksumMismatch, "{err}");
    let mismatches = metric(
        &receiver.url,
        "deploy_receiver_uploads_total{result=\"CHECKSUM_MISMATCH\"}",
    )
    .await;
    assert_eq!(mismatches, 1.0, "422 must be a single attempt");
    // 413: declared size over MAX_PACKAGE_SIZE.
    let big = src.path().join("big.tar");
    write_test_file(&big, (1 << 20) + 1, 14);
    let big_manifest = manifest_for_file(&big, None, deploy_protocol::Compression::None, vec![])
        .await
        .expect("manifest");
    let err = ReceiverClient::new(client.clone(), target(&receiver.url, SECRET.as_bytes()))
        .upload(&big, &big_manifest)
        .retry(policy.clone())
        .send()
        .await
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::PackageTooLarge, "{err}");
    let too_large = metric(
        &receiver.url,
        "deploy_receiver_uploads_total{result=\"PACKAGE_TOO_LARGE\"}",
    )
    .await;
    assert_eq!(too_large, 1.0, "413 must be a single attempt");
    eprintln!(
        "no retry of 401/422/413: 1 attempt each, {:.2} s in all",
        started.elapsed().as_secs_f64()
    );
}
