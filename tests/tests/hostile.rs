//! The receiver against an attacker's client, round two: raw HTTP on loopback, one test per
//! finding of docs/SECURITY.md's "Hostile clients, round two" table. Every request that should be
//! refused is written byte by byte, as a client without our sender would write it.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use deploy_protocol::SignatureHeaders;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The status and body of the answer on `stream`, or `None` when none came within `wait`.
async fn answer(stream: &mut (impl AsyncReadExt + Unpin), wait: Duration) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                // A whole answer: head and a body of its Content-Length.
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        break;
                    }
                }
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Sends `request` on a fresh connection and reads the answer.
async fn exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The receiver may answer and close before it has read everything: that is fine.
    let _ = stream.write_all(request).await;
    answer(&mut stream, wait).await
}

/// The head of a signed multipart upload to `path` (without the blank line).
fn signed_head(addr: SocketAddr, path: &str, headers: &SignatureHeaders, len: usize) -> String {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len}\r\n"
    );
    for (name, value) in headers.to_pairs() {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head
}

/// A whole signed upload of `bytes` as raw HTTP, signed for `authority`.
fn signed_upload(addr: SocketAddr, authority: &str, bytes: &[u8]) -> Vec<u8> {
    let manifest = manifest_for(bytes).to_bytes();
    let body = multipart_body(&[
        Part::manifest(manifest.clone()),
        Part::package(bytes.to_vec()),
    ]);
    let headers = Signing {
        authority: authority.into(),
        ..Signing::post("/deployment/upload")
    }
    .headers(&manifest);
    let mut request = signed_head(addr, "/deployment/upload", &headers, body.len());
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    request.extend_from_slice(&body);
    request
}

fn code_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

const WAIT: Duration = Duration::from_secs(10);

// 1 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn clients_without_a_key_cannot_hold_the_upload_slots() {
    let receiver = spawn_receiver(|c| {
        c.max_concurrent_uploads = 1;
        c.upload_idle_timeout_secs = 60;
    })
    .await;
    let addr = receiver.addr;
    // Four clients send a head and the start of a manifest part, then stall.
    let mut holders = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let headers = Signing::to(receiver.authority(), "/deployment/upload").headers(b"{}");
        let mut head = signed_head(addr, "/deployment/upload", &headers, 1 << 20);
        head.push_str(&format!(
            "\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"manifest\"\r\nContent-Type: application/json\r\n\r\n{{"
        ));
        stream.write_all(head.as_bytes()).await.expect("write");
        holders.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (status, body) = exchange(
        addr,
        &signed_upload(addr, receiver.authority(), &[5u8; 4096]),
        WAIT,
    )
    .await
    .expect("an answer");
    eprintln!(
        "figure: signed upload with 4 unsigned holders (MAX_CONCURRENT_UPLOADS=1): {status} in {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(status, 200, "{body}");
    drop(holders);
}

// 2 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn bytes_before_the_manifest_are_bounded_before_authentication() {
    let receiver = spawn_receiver(|c| c.upload_idle_timeout_secs = 60).await;
    let addr = receiver.addr;
    let bound = deploy_protocol::multipart::MAX_BYTES_BEFORE_AUTHENTICATION;
    // A preamble with no boundary, and a part with endless header lines: 4 MiB each announced,
    // 1 MiB sent, then the client waits for the answer.
    let preamble = vec![b'x'; 1 << 20];
    let mut header_lines =
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n")
            .into_bytes();
    while header_lines.len() < 1 << 20 {
        header_lines.extend_from_slice(b"X-Junk: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    for (what, body) in [("preamble", preamble), ("part headers", header_lines)] {
        let headers = Signing::to(receiver.authority(), "/deployment/upload").headers(b"{}");
        let mut request = signed_head(addr, "/deployment/upload", &headers, 4 << 20);
        request.push_str("\r\n");
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("head");
        let started = Instant::now();
        let _ = stream.write_all(&body).await;
        let (status, text) = answer(&mut stream, WAIT).await.unwrap_or_else(|| {
            panic!("{what}: no answer within {WAIT:?}: the body is being buffered")
        });
        eprintln!(
            "figure: {what} of 1 MiB without a manifest: {status} after {} ms (bound {bound} bytes)",
            started.elapsed().as_millis()
        );
        assert_eq!(status, 400, "{what}: {text}");
        assert!(
            text.contains("before the end of the manifest part"),
            "{what}: {text}"
        );
    }
}

// 3 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_json_body_that_stops_coming_is_cut_off() {
    let receiver = spawn_receiver(|c| c.upload_idle_timeout_secs = 1).await;
    let addr = receiver.addr;
    let request = format!(
        "POST /deployment/load HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    let started = Instant::now();
    let (status, body) = exchange(addr, request.as_bytes(), WAIT)
        .await
        .expect("an answer: the body read has a deadline");
    eprintln!(
        "figure: JSON body stalled after 1 of 100 bytes: {status} after {} ms (UPLOAD_IDLE_TIMEOUT_SECS=1)",
        started.elapsed().as_millis()
    );
    assert_eq!(
        (status, code_of(&body).as_str()),
        (408, "TIMEOUT"),
        "{body}"
    );
}

#[tokio::test]
async fn a_json_body_that_trickles_is_cut_off_as_a_whole() {
    // The whole body's deadline is then 1 s + 1 MiB / 1 GiB/s.
    let receiver = spawn_receiver(|c| {
        c.upload_idle_timeout_secs = 1;
        c.upload_min_rate = 1 << 30;
    })
    .await;
    let addr = receiver.addr;
    // Chunked (no Content-Length, so the size-based deadline would allow MAX_PACKAGE_SIZE at
    // UPLOAD_MIN_RATE: hours), one byte every 300 ms (never idle for a second), no key.
    let (mut reader, mut stream) = TcpStream::connect(addr)
        .await
        .expect("connect")
        .into_split();
    let head = format!(
        "POST /deployment/v2/releases HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let started = Instant::now();
    let trickle = async {
        for _ in 0..100 {
            if stream.write_all(b"1\r\n{\r\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let (_, answered) = tokio::join!(trickle, answer(&mut reader, WAIT));
    let (status, body) = answered.expect("an answer within 10 s: the whole body has a deadline");
    eprintln!(
        "figure: chunked JSON body trickled 1 byte / 300 ms: {status} after {} ms (UPLOAD_IDLE_TIMEOUT_SECS=1)",
        started.elapsed().as_millis()
    );
    assert_eq!(
        (status, code_of(&body).as_str()),
        (408, "TIMEOUT"),
        "{body}"
    );

    // A body announced larger than a release manifest may be is refused before it is read (not
    // after the 30 s idle timeout of a body that stops coming).
    let receiver = spawn_receiver(|c| c.upload_idle_timeout_secs = 30).await;
    let addr = receiver.addr;
    let request = format!(
        "POST /deployment/v2/releases HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{{"
    );
    let (status, body) = exchange(addr, request.as_bytes(), WAIT)
        .await
        .expect("an answer within 10 s, not after the 30 s idle timeout");
    assert_eq!(
        (status, code_of(&body).as_str()),
        (400, "VALIDATION_ERROR"),
        "{body}"
    );
}

#[tokio::test]
async fn a_stop_is_not_held_up_by_a_slow_body() {
    let mut receiver = spawn_receiver(|c| {
        c.upload_idle_timeout_secs = 600;
        c.shutdown_grace_secs = 1;
    })
    .await;
    let addr = receiver.addr;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST /deployment/load HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(15), receiver.stop_in_place()).await;
    eprintln!(
        "figure: stop with a stalled body in flight took {} ms (SHUTDOWN_GRACE_SECS=1)",
        started.elapsed().as_millis()
    );
    assert!(stopped.is_ok(), "the stop waited on the slow body");
    drop(stream);
}

#[tokio::test]
async fn health_answers_while_unauthenticated_connections_fill_the_limit() {
    let receiver = spawn_receiver(|c| {
        c.max_connections = 16;
        c.max_connections_per_ip = 16;
    })
    .await;
    let addr = receiver.addr;
    // 40 connections that send half a request head and wait.
    let mut idle = Vec::new();
    for _ in 0..40 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"POST /deployment/upload HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        idle.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let (status, _) = exchange(
        addr,
        format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
        WAIT,
    )
    .await
    .expect("/health answered");
    eprintln!(
        "figure: /health with 40 half-open connections over MAX_CONNECTIONS=16: {status} in {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(status, 200);
    drop(idle);
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let receiver = spawn_receiver(|_| {}).await;
    let addr = receiver.addr;
    let mut request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n");
    request.push_str(&format!("X-Big: {}\r\n", "a".repeat(128 * 1024)));
    request.push_str("\r\n");
    let (status, _) = exchange(addr, request.as_bytes(), WAIT)
        .await
        .unwrap_or((0, String::new()));
    assert_eq!(status, 431, "a 128 KiB header is over MAX_REQUEST_HEAD");
    let mut many = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n");
    for i in 0..200 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let (status, _) = exchange(addr, many.as_bytes(), WAIT)
        .await
        .unwrap_or((0, String::new()));
    assert_eq!(status, 431, "200 header lines are over MAX_HEADERS");
}

// 6 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_forwarded_for_line_is_read_in_order() {
    let receiver = spawn_receiver(|c| {
        c.trusted_proxies = vec!["127.0.0.1/32".parse().expect("net")];
        c.allowed_networks = Some(deploy_receiver::config::AllowedNetworks::Only(vec![
            "10.0.0.0/8".parse().expect("net"),
        ]));
    })
    .await;
    let addr = receiver.addr;
    let send = |lines: Vec<&'static str>| async move {
        let mut request = format!("GET /deployments HTTP/1.1\r\nHost: {addr}\r\n");
        for line in lines {
            request.push_str(&format!("X-Forwarded-For: {line}\r\n"));
        }
        request.push_str("\r\n");
        exchange(addr, request.as_bytes(), WAIT)
            .await
            .expect("answer")
            .0
    };
    // The client wrote the first line; the proxy appended the second with the real address.
    assert_eq!(send(vec!["10.1.1.1", "192.0.2.7"]).await, 403);
    assert_eq!(
        send(vec!["192.0.2.7", "10.1.1.1"]).await,
        401,
        "allowed, then unsigned"
    );
    assert_eq!(send(vec!["10.1.1.1, 192.0.2.7"]).await, 403);
    assert_eq!(send(vec!["10.1.1.1", "not-an-address"]).await, 403);
}

// 7 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_timestamp_is_verified_as_sent() {
    let receiver = spawn_receiver(|_| {}).await;
    let addr = receiver.addr;
    for prefix in ["+", "0", "00", " 0"] {
        let bytes = [3u8; 100];
        let manifest = manifest_for(&bytes).to_bytes();
        let body = multipart_body(&[
            Part::manifest(manifest.clone()),
            Part::package(bytes.to_vec()),
        ]);
        let headers = Signing::to(receiver.authority(), "/deployment/upload").headers(&manifest);
        let mut request = signed_head(addr, "/deployment/upload", &headers, body.len());
        request = request.replace(
            &format!("x-deploy-timestamp: {}", headers.timestamp),
            &format!("x-deploy-timestamp: {prefix}{}", headers.timestamp),
        );
        request.push_str("\r\n");
        let mut request = request.into_bytes();
        request.extend_from_slice(&body);
        let (status, text) = exchange(addr, &request, WAIT).await.expect("answer");
        assert_eq!(
            (status, code_of(&text).as_str()),
            (401, "UNAUTHORIZED"),
            "{prefix:?}: {text}"
        );
    }
    assert!(receiver.files().is_empty(), "{:?}", receiver.files());
}

// 8 ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_request_signed_for_one_receiver_is_refused_by_every_other() {
    let a = spawn_receiver(|_| {}).await;
    let b = spawn_receiver(|_| {}).await;
    let bytes = [8u8; 1000];
    // Captured on its way to A, replayed to B (another port on the same host) first.
    let for_a = signed_upload(a.addr, a.authority(), &bytes);
    let (status, text) = exchange(b.addr, &for_a, WAIT).await.expect("answer");
    assert_eq!(
        (status, code_of(&text).as_str()),
        (401, "UNAUTHORIZED"),
        "{text}"
    );
    assert!(text.contains("not this receiver"), "{text}");
    // With B's Host header, the signature (over A's authority) does not match.
    let retargeted = String::from_utf8_lossy(&for_a)
        .replacen(
            &format!("Host: {}", a.addr),
            &format!("Host: {}", b.addr),
            1,
        )
        .into_bytes();
    let (status, text) = exchange(b.addr, &retargeted, WAIT).await.expect("answer");
    assert_eq!(status, 401, "{text}");
    assert!(b.files().is_empty(), "{:?}", b.files());
    // A takes it.
    let (status, text) = exchange(a.addr, &for_a, WAIT).await.expect("answer");
    assert_eq!(status, 200, "{text}");
    // A name of the host (localhost) with A's port is A too; another port is not.
    let localhost = format!("localhost:{}", a.addr.port());
    let request = String::from_utf8_lossy(&signed_upload(a.addr, &localhost, &bytes))
        .replacen(
            &format!("Host: {}", a.addr),
            &format!("Host: {localhost}"),
            1,
        )
        .into_bytes();
    assert_eq!(
        exchange(a.addr, &request, WAIT).await.expect("answer").0,
        200
    );
}

#[tokio::test]
async fn the_unbound_form_is_refused_unless_enabled() {
    let bytes = [9u8; 500];
    let unbound = |r: &Receiver| {
        let manifest = manifest_for(&bytes).to_bytes();
        let body = multipart_body(&[
            Part::manifest(manifest.clone()),
            Part::package(bytes.to_vec()),
        ]);
        let headers = SignatureHeaders::sign(
            KEY_ID,
            SECRET.as_bytes(),
            None,
            "POST",
            "/deployment/upload",
            &deploy_protocol::Checksum::of(&manifest),
            now(),
            deploy_protocol::envelope::new_nonce(),
        );
        let mut request = signed_head(r.addr, "/deployment/upload", &headers, body.len());
        request.push_str("\r\n");
        let mut request = request.into_bytes();
        request.extend_from_slice(&body);
        request
    };
    let strict = spawn_receiver(|_| {}).await;
    let (status, text) = exchange(strict.addr, &unbound(&strict), WAIT)
        .await
        .expect("answer");
    assert_eq!(status, 401, "{text}");
    let lenient = spawn_receiver(|c| c.accept_unbound_signatures = true).await;
    let (status, text) = exchange(lenient.addr, &unbound(&lenient), WAIT)
        .await
        .expect("answer");
    assert_eq!(status, 200, "{text}");
}

#[tokio::test]
async fn host_header_tricks_are_refused() {
    let receiver = spawn_receiver(|_| {}).await;
    let addr = receiver.addr;
    let bytes = [1u8; 100];
    let request =
        String::from_utf8_lossy(&signed_upload(addr, receiver.authority(), &bytes)).into_owned();
    let host = format!("Host: {addr}\r\n");
    for (what, changed) in [
        (
            "two Host lines",
            request.replacen(&host, &format!("{host}{host}"), 1),
        ),
        ("no Host", request.replacen(&host, "", 1)),
        (
            "user info",
            request.replacen(&host, &format!("Host: u@{addr}\r\n"), 1),
        ),
        (
            "absolute target naming another authority",
            request.replacen(
                "POST /deployment/upload HTTP/1.1",
                "POST http://other.example:1/deployment/upload HTTP/1.1",
                1,
            ),
        ),
        (
            "port with a leading zero",
            request.replacen(&host, &format!("Host: 127.0.0.1:0{}\r\n", addr.port()), 1),
        ),
        (
            "trailing dot",
            request.replacen(&host, &format!("Host: 127.0.0.1.:{}\r\n", addr.port()), 1),
        ),
    ] {
        let (status, text) = exchange(addr, changed.as_bytes(), WAIT)
            .await
            .unwrap_or((400, String::new()));
        assert!(matches!(status, 400 | 401), "{what}: {status} {text}");
    }
    assert!(receiver.files().is_empty(), "{:?}", receiver.files());
}

// 11 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn full_refused_by_policy_stores_nothing() {
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = vec![2u8; 64 << 10];
    let mut manifest = manifest_for(&bytes);
    manifest.image_tags = vec!["harden-policy:v1".into()];
    manifest.deployment = Some(deploy_protocol::DeploymentSpec {
        container_name: "harden-policy".into(),
        privileged: true,
        ..Default::default()
    });
    let manifest = manifest.to_bytes();
    let (status, body) = send_multipart(
        &receiver,
        "/deployment/full",
        &Signing::post("/deployment/full"),
        &manifest,
        &[Part::manifest(manifest.clone()), Part::package(bytes)],
    )
    .await;
    assert_eq!((status, code(&body)), (403, "POLICY_DENIED"), "{body}");
    assert!(receiver.files().is_empty(), "{:?}", receiver.files());
}

// 13 -----------------------------------------------------------------------------------------

#[tokio::test]
async fn a_second_envelope_header_line_is_refused() {
    let receiver = spawn_receiver(|_| {}).await;
    let addr = receiver.addr;
    let bytes = [4u8; 100];
    let request =
        String::from_utf8_lossy(&signed_upload(addr, receiver.authority(), &bytes)).into_owned();
    for name in [
        "x-deploy-signature",
        "x-deploy-key-id",
        "x-deploy-timestamp",
        "x-deploy-nonce",
        "content-type",
    ] {
        let line = request
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{name} in the request"))
            .to_owned();
        let doubled = request.replacen(&line, &format!("{line}\r\n{line}"), 1);
        let (status, text) = exchange(addr, doubled.as_bytes(), WAIT)
            .await
            .expect("answer");
        assert!(matches!(status, 400 | 401), "{name} twice: {status} {text}");
    }
    assert!(receiver.files().is_empty(), "{:?}", receiver.files());
}

#[tokio::test]
async fn part_content_types_and_created_at_are_checked() {
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = vec![6u8; 1000];
    let manifest = manifest_for(&bytes).to_bytes();
    for (what, parts) in [
        (
            "manifest as text/plain",
            vec![
                Part {
                    content_type: "text/plain",
                    ..Part::manifest(manifest.clone())
                },
                Part::package(bytes.clone()),
            ],
        ),
        (
            "package as text/html",
            vec![
                Part::manifest(manifest.clone()),
                Part {
                    content_type: "text/html",
                    ..Part::package(bytes.clone())
                },
            ],
        ),
    ] {
        let (status, body) = send_multipart(
            &receiver,
            "/deployment/upload",
            &Signing::post("/deployment/upload"),
            &manifest,
            &parts,
        )
        .await;
        assert_eq!(
            (status, code(&body)),
            (400, "VALIDATION_ERROR"),
            "{what}: {body}"
        );
    }
    let mut dated = manifest_for(&bytes);
    dated.created_at = Some("yesterday\u{7}".into());
    let dated = dated.to_bytes();
    let (status, body) = send_multipart(
        &receiver,
        "/deployment/upload",
        &Signing::post("/deployment/upload"),
        &dated,
        &[Part::manifest(dated.clone()), Part::package(bytes.clone())],
    )
    .await;
    assert_eq!((status, code(&body)), (400, "VALIDATION_ERROR"), "{body}");
    assert!(receiver.files().is_empty(), "{:?}", receiver.files());
}

#[tokio::test]
async fn control_characters_in_environment_keys_are_refused() {
    let receiver = spawn_receiver(|_| {}).await;
    for key in ["A\nB", "A\u{1b}[31m", "A B", "\u{7f}", "A=B", ""] {
        let spec = serde_json::json!({
            "deployment": {"container_name": "harden-env", "image": "harden-env:v1", "env": {key: "x"}}
        });
        let (status, body) = send_json(
            &receiver,
            "POST",
            "/deployment/deploy",
            &serde_json::to_vec(&spec).expect("json"),
        )
        .await;
        assert_eq!(
            (status, code(&body)),
            (400, "VALIDATION_ERROR"),
            "{key:?}: {body}"
        );
    }
}

#[tokio::test]
async fn packages_and_state_are_private_to_the_receiver() {
    use std::os::unix::fs::PermissionsExt;
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = vec![7u8; 1000];
    let manifest = manifest_for(&bytes).to_bytes();
    let (status, body) = send_multipart(
        &receiver,
        "/deployment/upload",
        &Signing::post("/deployment/upload"),
        &manifest,
        &[Part::manifest(manifest.clone()), Part::package(bytes)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    let dir = &receiver.package_dir;
    assert_eq!(mode(dir), 0o700, "package directory");
    let state = dir.join(".state");
    assert_eq!(mode(&state), 0o700, "state directory");
    let mut files = 0;
    for entry in std::fs::read_dir(dir)
        .expect("read dir")
        .chain(std::fs::read_dir(&state).expect("state"))
    {
        let path = entry.expect("entry").path();
        if path.is_file() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            files += 1;
        }
    }
    assert!(files >= 3, "package, manifest and nonce log: {files}");
}

// 4 (the copy; the load's own hash is in crates/receiver/tests/provenance.rs) ----------------

#[tokio::test]
async fn a_registered_package_shares_nothing_with_its_source() {
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = vec![0x5au8; 200_000];
    let source = receiver.package_dir.join("incoming.tar");
    std::fs::write(&source, &bytes).expect("write source");
    let manifest = manifest_for(&bytes);
    let body = serde_json::json!({"manifest": manifest, "package_path": "incoming.tar"});
    let (status, answer) = send_json(
        &receiver,
        "POST",
        "/deployment/receive",
        &serde_json::to_vec(&body).expect("json"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // Rewritten in place after the 200 (same inode, other bytes).
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&source)
            .expect("open");
        f.seek(std::io::SeekFrom::Start(0)).expect("seek");
        f.write_all(&vec![0xa5u8; 200_000]).expect("rewrite");
    }
    let stored = receiver
        .package_dir
        .join(format!("{}.pkg", manifest.package_id));
    assert_eq!(
        std::fs::read(&stored).expect("stored"),
        bytes,
        "the stored copy changed with its source"
    );
}
