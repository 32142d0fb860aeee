//! The client's wire format against a tiny in-test server that records what arrives.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use deploy_protocol::{ErrorCode, KeyRing};

use super::*;
use crate::client::{Endpoint, ReceiverTarget};
use crate::pipeline::manifest_for_file;
use deploy_protocol::envelope::unix_now;
use deploy_protocol::Compression;
use deploy_protocol::{Checksum, SignatureHeaders};

#[derive(Debug, Default, Clone)]
struct Seen {
    headers: Vec<(String, String)>,
    path: String,
    parts: Vec<(String, Option<String>, Vec<u8>)>,
}

async fn spawn_recorder(status: StatusCode, answer: &'static str) -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = Arc::clone(&seen);
    let handler = move |uri: axum::http::Uri, headers: HeaderMap, body: Body| {
        let record = Arc::clone(&record);
        async move {
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let boundary = multer::parse_boundary(content_type).expect("multipart boundary");
            let mut multipart = multer::Multipart::new(body.into_data_stream(), boundary);
            let mut parts = Vec::new();
            while let Some(field) = multipart.next_field().await.expect("field") {
                let name = field.name().unwrap_or_default().to_owned();
                let ct = field.content_type().map(|m| m.to_string());
                parts.push((name, ct, field.bytes().await.expect("bytes").to_vec()));
            }
            let mut seen = record.lock().expect("lock");
            seen.path = uri.path().to_owned();
            seen.headers = headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        v.to_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            seen.parts = parts;
            (status, [("content-type", "application/json")], answer).into_response()
        }
    };
    let app = Router::new()
        .route("/deployment/upload", post(handler.clone()))
        .route("/prefix/deployment/full", post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

fn package_file(dir: &Path, len: usize) -> std::path::PathBuf {
    let path = dir.join("pkg.tar.zst");
    let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&path, bytes).expect("write");
    path
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn sends_signed_manifest_then_streamed_package() {
    let (base, seen) = spawn_recorder(StatusCode::OK, r#"{"checksum_verified":true}"#).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = package_file(dir.path(), 3 * 1024 * 1024 + 17);
    let manifest = manifest_for_file(&path, None, Compression::Zstd, vec!["web:v1".into()])
        .await
        .expect("manifest");
    let target = ReceiverTarget::new(&base, "k1", b"s3cret").expect("target");
    let last = Arc::new(AtomicU64::new(0));
    let last_seen = Arc::clone(&last);
    let outcome = ReceiverClient::new(reqwest::Client::new(), target)
        .upload(&path, &manifest)
        .correlation_id(Some("corr-1"))
        .on_progress(move |n| last_seen.store(n, Ordering::Relaxed))
        .send()
        .await
        .expect("upload");

    let file_bytes = std::fs::read(&path).expect("read");
    assert_eq!(outcome.bytes, file_bytes.len() as u64);
    assert_eq!(last.load(Ordering::Relaxed), file_bytes.len() as u64);
    assert_eq!(outcome.response["checksum_verified"], true);

    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.path, "/deployment/upload");
    let names: Vec<&str> = seen.parts.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, [PART_MANIFEST, PART_PACKAGE]);
    assert_eq!(seen.parts[0].1.as_deref(), Some(MANIFEST_CONTENT_TYPE));
    assert_eq!(seen.parts[0].2, manifest.to_bytes());
    assert_eq!(seen.parts[1].1.as_deref(), Some(PACKAGE_CONTENT_TYPE));
    assert!(
        seen.parts[1].2 == file_bytes,
        "package part equals the file"
    );
    assert_eq!(header(&seen, "x-correlation-id"), Some("corr-1"));
    assert_eq!(
        header(&seen, "host"),
        Some(base.trim_start_matches("http://")),
        "the signed authority is the Host header sent"
    );
    assert!(
        header(&seen, "content-length").is_some(),
        "length known up front"
    );

    let signed = SignatureHeaders::parse(|name| header(&seen, name)).expect("signature headers");
    let mut ring = KeyRing::new();
    ring.insert("k1", "s3cret");
    signed
        .verify(
            &ring,
            header(&seen, "host"),
            "POST",
            "/deployment/upload",
            &Checksum::of(&seen.parts[0].2),
            unix_now(),
            60,
        )
        .expect("signature verifies");
}

#[tokio::test]
async fn a_base_path_prefix_is_kept_and_signed() {
    let (base, seen) = spawn_recorder(StatusCode::OK, "{}").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = package_file(dir.path(), 10);
    let manifest = manifest_for_file(&path, None, Compression::Zstd, vec![])
        .await
        .expect("manifest");
    let target = ReceiverTarget::new(&format!("{base}/prefix/"), "k1", b"s").expect("target");
    ReceiverClient::new(reqwest::Client::new(), target)
        .upload(&path, &manifest)
        .to(Endpoint::Full)
        .send()
        .await
        .expect("upload");
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.path, "/prefix/deployment/full");
    let signed = SignatureHeaders::parse(|name| header(&seen, name)).expect("headers");
    let mut ring = KeyRing::new();
    ring.insert("k1", "s");
    let digest = Checksum::of(&seen.parts[0].2);
    signed
        .verify(
            &ring,
            header(&seen, "host"),
            "POST",
            "/prefix/deployment/full",
            &digest,
            unix_now(),
            60,
        )
        .expect("path with prefix is what was signed");
}

#[tokio::test]
async fn receiver_error_codes_pass_through() {
    let body =
        r#"{"error":{"code":"UNAUTHORIZED","message":"signature does not match the request"}}"#;
    let (base, _) = spawn_recorder(StatusCode::UNAUTHORIZED, body).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = package_file(dir.path(), 10);
    let manifest = manifest_for_file(&path, None, Compression::Zstd, vec![])
        .await
        .expect("manifest");
    let target = ReceiverTarget::new(&base, "k1", b"s").expect("target");
    let err = ReceiverClient::new(reqwest::Client::new(), target)
        .upload(&path, &manifest)
        .send()
        .await
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::Unauthorized);
    assert_eq!(err.to_string(), "signature does not match the request");
}

#[tokio::test]
async fn a_non_protocol_error_answer_is_transfer_failed() {
    let (base, _) = spawn_recorder(StatusCode::BAD_GATEWAY, "not json").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = package_file(dir.path(), 10);
    let manifest = manifest_for_file(&path, None, Compression::Zstd, vec![])
        .await
        .expect("manifest");
    let target = ReceiverTarget::new(&base, "k1", b"s").expect("target");
    let err = ReceiverClient::new(reqwest::Client::new(), target)
        .upload(&path, &manifest)
        .send()
        .await
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::TransferFailed);
}

#[tokio::test]
async fn a_closed_port_is_remote_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = package_file(dir.path(), 10);
    let manifest = manifest_for_file(&path, None, Compression::Zstd, vec![])
        .await
        .expect("manifest");
    let target = ReceiverTarget::new(&format!("http://{addr}"), "k1", b"s").expect("target");
    let err = ReceiverClient::new(reqwest::Client::new(), target)
        .upload(&path, &manifest)
        .send()
        .await
        .expect_err("nobody there");
    assert_eq!(err.code(), ErrorCode::RemoteUnreachable);
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

/// A server that answers every connection with `response` (raw HTTP/1.1), whatever arrives.
async fn spawn_raw(response: &'static str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            // Take the whole request before answering, as a server does: answering and closing
            // mid-body makes the client's write fail ("Broken pipe") instead of reading the
            // answer. The request ends with the multipart's closing boundary, or with the last
            // chunk of a chunked body; a read that waits 2 s ends it too.
            let (mut buf, mut request) = ([0u8; 4096], Vec::new());
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await
            {
                request.extend_from_slice(&buf[..n]);
                if n == 0 || request.ends_with(b"--\r\n") || request.ends_with(b"\r\n0\r\n\r\n") {
                    break;
                }
            }
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    addr
}

async fn upload_to(base: &str) -> SenderError {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = package_file(dir.path(), 10);
    let manifest = manifest_for_file(&path, None, Compression::Zstd, vec![])
        .await
        .expect("manifest");
    let target = ReceiverTarget::new(base, "k1", b"s").expect("target");
    let client = crate::config::ReceiverConfig::default()
        .http_client()
        .expect("the CLI's client");
    ReceiverClient::new(client, target)
        .upload(&path, &manifest)
        .send()
        .await
        .expect_err("refused")
}

#[tokio::test]
async fn https_to_a_plain_http_receiver_says_to_use_http_not_a_ca_certificate() {
    let addr =
        spawn_raw("HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
    let err = upload_to(&format!("https://{addr}")).await;
    let message = err.to_string();
    assert_eq!(err.code(), ErrorCode::RemoteUnreachable, "{message}");
    assert!(message.contains("plain HTTP"), "{message}");
    assert!(message.contains(&format!("http://{addr}")), "{message}");
    assert!(!message.contains("--ca-cert"), "{message}");
}

#[tokio::test]
async fn a_404_with_an_empty_body_asks_whether_it_is_a_receiver() {
    let addr =
        spawn_raw("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
    let err = upload_to(&format!("http://{addr}")).await;
    let message = err.to_string();
    assert_eq!(err.code(), ErrorCode::TransferFailed, "{message}");
    assert!(message.contains("(an empty body)"), "{message}");
    assert!(message.contains("deploy-receiver"), "{message}");
}

#[tokio::test]
async fn a_file_that_changed_since_its_manifest_is_refused_before_sending() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = package_file(dir.path(), 10);
    let manifest = manifest_for_file(&path, None, Compression::Zstd, vec![])
        .await
        .expect("manifest");
    std::fs::write(&path, b"longer than before").expect("rewrite");
    let target = ReceiverTarget::new("http://127.0.0.1:9", "k1", b"s").expect("target");
    let err = ReceiverClient::new(reqwest::Client::new(), target)
        .upload(&path, &manifest)
        .send()
        .await
        .expect_err("size differs");
    assert_eq!(err.code(), ErrorCode::ValidationError);
}

/// Uploads run on spawned tasks: the future must be `Send`.
#[allow(dead_code)]
fn upload_future_is_send(client: &ReceiverClient, manifest: &PackageManifest) {
    fn is_send<T: Send>(_: &T) {}
    is_send(&client.upload(Path::new("p"), manifest).send());
}

#[test]
fn throughput_is_in_decimal_megabytes() {
    assert_eq!(throughput_mbps(125_000_000, Duration::from_secs(1)), 125.0);
    assert_eq!(throughput_mbps(1, Duration::ZERO), 0.0);
}
