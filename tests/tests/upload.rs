//! Uploads end to end: the real sender client streams packages to the real receiver on loopback;
//! every refusal the protocol promises is provoked for real and leaves nothing on disk.

mod common;

use std::time::Duration;

use common::*;
use deploy_protocol::ErrorCode;
use deploy_sender::{manifest_for_file, ReceiverClient, ReceiverTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn target(receiver: &Receiver) -> ReceiverTarget {
    ReceiverTarget::new(&receiver.url, KEY_ID, SECRET.as_bytes()).expect("target")
}

async fn wait_until_empty(receiver: &Receiver) -> Vec<String> {
    for _ in 0..200 {
        if receiver.files().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    receiver.files()
}

#[tokio::test]
async fn upload_of_64_mib_stores_bytes_identical_to_the_source() {
    let receiver = spawn_receiver(|_| {}).await;
    let src = tempfile::tempdir().expect("tmp");
    let path = src.path().join("pkg.tar");
    write_test_file(&path, 64 << 20, 1);
    let manifest = manifest_for_file(&path, None, deploy_protocol::Compression::None, vec![])
        .await
        .expect("manifest");
    let outcome = ReceiverClient::new(reqwest::Client::new(), target(&receiver))
        .upload(&path, &manifest)
        .correlation_id(Some("corr-64"))
        .send()
        .await
        .expect("upload succeeds");
    assert_eq!(outcome.status, 200);
    assert_eq!(outcome.bytes, 64 << 20);
    assert_eq!(outcome.response["checksum_verified"], true);
    assert_eq!(outcome.response["outcome"], "created");
    let stored = receiver
        .package_dir
        .join(format!("{}.pkg", manifest.package_id));
    assert!(
        std::fs::read(&stored).expect("stored file") == std::fs::read(&path).expect("source"),
        "stored bytes differ"
    );
    assert_eq!(
        receiver.files().len(),
        2,
        "package and its manifest: {:?}",
        receiver.files()
    );
}

#[tokio::test]
async fn flipped_byte_is_checksum_mismatch_and_leaves_nothing_on_disk() {
    let receiver = spawn_receiver(|_| {}).await;
    let src = tempfile::tempdir().expect("tmp");
    let path = src.path().join("pkg.tar");
    write_test_file(&path, 4 << 20, 2);
    let manifest = manifest_for_file(&path, None, deploy_protocol::Compression::None, vec![])
        .await
        .expect("manifest");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[1234567] ^= 0x01;
    std::fs::write(&path, bytes).expect("write");
    let err = ReceiverClient::new(reqwest::Client::new(), target(&receiver))
        .upload(&path, &manifest)
        .send()
        .await
        .expect_err("tampered package refused");
    assert_eq!(err.code(), ErrorCode::ChecksumMismatch, "{err}");
    assert_eq!(wait_until_empty(&receiver).await, Vec::<String>::new());
}

#[tokio::test]
async fn repeated_upload_is_idempotent_and_same_id_other_content_is_conflict() {
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = b"package bytes".repeat(1000);
    let manifest = manifest_for(&bytes);
    let m = manifest.to_bytes();
    for expected in ["created", "existing"] {
        let (status, body) = send_multipart(
            &receiver,
            "/deployment/upload",
            &Signing::post("/deployment/upload"),
            &m,
            &[Part::manifest(m.clone()), Part::package(bytes.clone())],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["outcome"], expected);
    }
    let other = b"other bytes".repeat(1000);
    let mut conflicting = manifest_for(&other);
    conflicting.package_id = manifest.package_id;
    let m2 = conflicting.to_bytes();
    let (status, body) = send_multipart(
        &receiver,
        "/deployment/upload",
        &Signing::post("/deployment/upload"),
        &m2,
        &[Part::manifest(m2.clone()), Part::package(other)],
    )
    .await;
    assert_eq!((status, code(&body)), (409, "CONFLICT"), "{body}");
}

async fn upload_with(
    receiver: &Receiver,
    signing: Signing,
    signed: &[u8],
    sent: &[u8],
    bytes: &[u8],
) -> (u16, serde_json::Value) {
    send_multipart(
        receiver,
        "/deployment/upload",
        &signing,
        signed,
        &[Part::manifest(sent.to_vec()), Part::package(bytes.to_vec())],
    )
    .await
}

#[tokio::test]
async fn bad_signatures_are_401_and_store_nothing() {
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = vec![7u8; 10_000];
    let manifest = manifest_for(&bytes).to_bytes();

    let mut wrong_key = Signing::post("/deployment/upload");
    wrong_key.secret = b"not-the-secret".to_vec();
    let mut wrong_id = Signing::post("/deployment/upload");
    wrong_id.key_id = "other".into();
    let wrong_path = Signing::post("/deployment/upload?x=1");
    let mut wrong_method = Signing::post("/deployment/upload");
    wrong_method.method = "PUT".into();
    for (what, signing) in [
        ("wrong key", wrong_key),
        ("wrong key id", wrong_id),
        ("altered path", wrong_path),
        ("altered method", wrong_method),
    ] {
        let (status, body) = upload_with(&receiver, signing, &manifest, &manifest, &bytes).await;
        assert_eq!(
            (status, code(&body)),
            (401, "UNAUTHORIZED"),
            "{what}: {body}"
        );
    }
    // The manifest sent differs from the one signed (a bigger declared size, same content).
    let mut altered = manifest_for(&bytes);
    altered.package_size += 1;
    let (status, body) = upload_with(
        &receiver,
        Signing::post("/deployment/upload"),
        &manifest,
        &altered.to_bytes(),
        &bytes,
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (401, "UNAUTHORIZED"),
        "altered manifest: {body}"
    );
    assert!(receiver.files().is_empty(), "{:?}", receiver.files());
}

#[tokio::test]
async fn replayed_nonce_is_refused() {
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = vec![1u8; 1000];
    let manifest = manifest_for(&bytes).to_bytes();
    let signing = Signing::post("/deployment/upload");
    let replay = Signing {
        nonce: signing.nonce.clone(),
        timestamp: signing.timestamp,
        ..Signing::post("/deployment/upload")
    };
    let (status, body) = upload_with(&receiver, signing, &manifest, &manifest, &bytes).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = upload_with(&receiver, replay, &manifest, &manifest, &bytes).await;
    assert_eq!((status, code(&body)), (401, "UNAUTHORIZED"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("nonce"),
        "{body}"
    );
}

#[tokio::test]
async fn timestamps_301_seconds_old_or_ahead_are_refused() {
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = vec![2u8; 1000];
    let manifest = manifest_for(&bytes).to_bytes();
    // Ahead by 302: the request may reach the receiver in the next second of its clock, which
    // leaves 301 s of skew (whole seconds); a timestamp behind only gets older on the way.
    for offset in [-301, 302] {
        let mut signing = Signing::post("/deployment/upload");
        signing.timestamp = now() + offset;
        let (status, body) = upload_with(&receiver, signing, &manifest, &manifest, &bytes).await;
        assert_eq!(
            (status, code(&body)),
            (401, "UNAUTHORIZED"),
            "offset {offset}: {body}"
        );
    }
    assert!(receiver.files().is_empty());
}

#[tokio::test]
async fn client_outside_allowed_networks_is_403_before_the_body_is_read() {
    let receiver = spawn_receiver(|c| {
        c.allowed_networks =
            Some(deploy_receiver::config::parse_networks("10.0.0.0/8").expect("cidr"))
    })
    .await;
    // Announce a 1 GB body and send none of it: only an answer that does not wait for the body
    // can arrive.
    let mut stream = tokio::net::TcpStream::connect(receiver.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /deployment/upload HTTP/1.1\r\nHost: {}\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000000\r\n\r\n",
        receiver.addr
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut response = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut response))
        .await
        .expect("answered without the body")
        .expect("read");
    let text = String::from_utf8_lossy(&response[..n]);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("FORBIDDEN"), "{text}");
}

#[tokio::test]
async fn allowed_network_passes_the_allowlist() {
    let receiver = spawn_receiver(|c| {
        c.allowed_networks =
            Some(deploy_receiver::config::parse_networks("127.0.0.0/8").expect("cidr"))
    })
    .await;
    let bytes = vec![3u8; 1000];
    let manifest = manifest_for(&bytes).to_bytes();
    let (status, body) = upload_with(
        &receiver,
        Signing::post("/deployment/upload"),
        &manifest,
        &manifest,
        &bytes,
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn declared_and_actual_oversize_are_413_with_nothing_on_disk() {
    let receiver = spawn_receiver(|c| c.max_package_size = 1 << 20).await;
    let big = vec![4u8; 2 << 20];
    let declared = manifest_for(&big).to_bytes();
    let (status, body) = upload_with(
        &receiver,
        Signing::post("/deployment/upload"),
        &declared,
        &declared,
        &big,
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (413, "PACKAGE_TOO_LARGE"),
        "declared: {body}"
    );
    // Declares 512 KiB (within the limit) and sends 2 MiB.
    let mut small = manifest_for(&big[..512 << 10]);
    small.package_size = 512 << 10;
    let small = small.to_bytes();
    let (status, body) = upload_with(
        &receiver,
        Signing::post("/deployment/upload"),
        &small,
        &small,
        &big,
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (413, "PACKAGE_TOO_LARGE"),
        "actual: {body}"
    );
    assert_eq!(wait_until_empty(&receiver).await, Vec::<String>::new());
}

#[tokio::test]
async fn malformed_uploads_are_400_validation_error() {
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = vec![5u8; 1000];
    let m = manifest_for(&bytes).to_bytes();
    let sign = || Signing::post("/deployment/upload");
    let cases: Vec<(&str, Vec<u8>, Vec<Part>)> = vec![
        (
            "missing package part",
            m.clone(),
            vec![Part::manifest(m.clone())],
        ),
        (
            "missing manifest part",
            m.clone(),
            vec![Part::package(bytes.clone())],
        ),
        (
            "reordered parts",
            m.clone(),
            vec![Part::package(bytes.clone()), Part::manifest(m.clone())],
        ),
        (
            "extra part",
            m.clone(),
            vec![
                Part::manifest(m.clone()),
                Part::package(bytes.clone()),
                Part {
                    name: "extra",
                    content_type: "text/plain",
                    bytes: b"x".to_vec(),
                },
            ],
        ),
        (
            "malformed JSON",
            b"{not json".to_vec(),
            vec![
                Part::manifest(b"{not json".to_vec()),
                Part::package(bytes.clone()),
            ],
        ),
    ];
    for (what, signed, parts) in cases {
        let (status, body) =
            send_multipart(&receiver, "/deployment/upload", &sign(), &signed, &parts).await;
        assert_eq!(
            (status, code(&body)),
            (400, "VALIDATION_ERROR"),
            "{what}: {body}"
        );
    }
    let mut bad_uuid: serde_json::Value = serde_json::from_slice(&m).expect("json");
    bad_uuid["package_id"] = "not-a-uuid".into();
    let bad = serde_json::to_vec(&bad_uuid).expect("json");
    let (status, body) = upload_with(&receiver, sign(), &bad, &bad, &bytes).await;
    assert_eq!(
        (status, code(&body)),
        (400, "VALIDATION_ERROR"),
        "bad uuid: {body}"
    );
    assert!(receiver.files().is_empty(), "{:?}", receiver.files());
}

#[tokio::test]
async fn upload_cut_off_mid_stream_leaves_no_file() {
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = vec![6u8; 8 << 20];
    let m = manifest_for(&bytes).to_bytes();
    let body = multipart_body(&[Part::manifest(m.clone()), Part::package(bytes)]);
    let headers = Signing::to(receiver.authority(), "/deployment/upload").headers(&m);
    let mut head = format!(
        "POST /deployment/upload HTTP/1.1\r\nHost: {}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\n",
        receiver.addr,
        body.len()
    );
    for (name, value) in headers.to_pairs() {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(receiver.addr)
        .await
        .expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream
        .write_all(&body[..body.len() / 2])
        .await
        .expect("half the body");
    stream.flush().await.expect("flush");
    // Let the receiver start spooling, then vanish.
    for _ in 0..100 {
        if receiver.files().iter().any(|f| f.starts_with(".upload-")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stream);
    assert_eq!(wait_until_empty(&receiver).await, Vec::<String>::new());
    // and the daemon keeps serving
    let health = reqwest::get(format!("{}/health", receiver.url))
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn receive_registers_a_file_inside_the_package_dir_and_refuses_escapes() {
    let receiver = spawn_receiver(|_| {}).await;
    let bytes = vec![8u8; 50_000];
    std::fs::write(receiver.package_dir.join("dropped.tar"), &bytes).expect("write");
    let manifest = manifest_for(&bytes);
    let request = |path: &str| {
        serde_json::to_vec(&serde_json::json!({"package_path": path, "manifest": manifest}))
            .expect("json")
    };
    let (status, body) = send_json(
        &receiver,
        "POST",
        "/deployment/receive",
        &request("dropped.tar"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checksum_verified"], true);
    assert!(receiver
        .package_dir
        .join(format!("{}.pkg", manifest.package_id))
        .is_file());
    for escape in ["../../etc/passwd", "/etc/passwd", "missing.tar"] {
        let (status, body) =
            send_json(&receiver, "POST", "/deployment/receive", &request(escape)).await;
        assert_eq!(
            (status, code(&body)),
            (400, "VALIDATION_ERROR"),
            "{escape}: {body}"
        );
    }
}

#[tokio::test]
async fn unreachable_receiver_is_remote_unreachable() {
    // Bind then drop a listener: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let src = tempfile::tempdir().expect("tmp");
    let path = src.path().join("pkg.tar");
    write_test_file(&path, 1000, 3);
    let manifest = manifest_for_file(&path, None, deploy_protocol::Compression::None, vec![])
        .await
        .expect("manifest");
    let target = ReceiverTarget::new(
        &format!("http://127.0.0.1:{port}"),
        KEY_ID,
        SECRET.as_bytes(),
    )
    .expect("target");
    let err = ReceiverClient::new(reqwest::Client::new(), target.clone())
        .upload(&path, &manifest)
        .send()
        .await
        .expect_err("nobody listens");
    assert_eq!(err.code(), ErrorCode::RemoteUnreachable, "{err}");
}

#[tokio::test]
async fn receiver_refuses_to_start_without_a_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = deploy_receiver::Config::for_dir(dir.path(), "");
    let err = deploy_receiver::AppState::new(config)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("DEPLOY_HMAC_SECRET"), "{err}");
}
