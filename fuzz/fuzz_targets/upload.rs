//! The whole upload path of the real receiver (allowlist, multipart reader, manifest parser,
//! envelope, spool, store) driven in process through its router. The body is built from the
//! input in three ways: a well-formed upload whose manifest is made valid for the package bytes
//! (so the store path runs), a well-formed upload with the fuzzed manifest, and raw fuzzed body
//! bytes. Every request is correctly signed over what the receiver will take for the manifest
//! part, so the fuzzer gets past the signature. No answer may be a 500, and no temp file may
//! be left behind once the answer is out.
#![no_main]

const AUTHORITY: &str = "127.0.0.1:8001";

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use axum::body::Body;
use axum::extract::ConnectInfo;
use deploy_protocol::{Checksum, Compression, PackageManifest, SignatureHeaders};
use deploy_receiver::{AppState, Config};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const SECRET: &str = "fuzz-secret-0123456789abcdef0123456789";
const BOUNDARY: &str = "fuzz-boundary-4f2a";

struct Harness {
    runtime: tokio::runtime::Runtime,
    // The router is built once per state: building it (OpenAPI document, docs page) per input
    // would cost more than the request.
    state: Mutex<(AppState, axum::Router, tempfile::TempDir)>,
    runs: AtomicU64,
}

fn fresh_state() -> (AppState, axum::Router, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::for_dir(dir.path().join("packages"), SECRET);
    config.max_package_size = 1 << 20;
    config.allowed_networks =
        Some(deploy_receiver::config::parse_networks("127.0.0.0/8").expect("cidr"));
    let state = AppState::new(config).expect("state");
    let app = deploy_receiver::app(state.clone());
    (state, app, dir)
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let state = runtime.block_on(async { fresh_state() });
        Harness {
            runtime,
            state: Mutex::new(state),
            runs: AtomicU64::new(0),
        }
    })
}

fn multipart(manifest: &[u8], package: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, bytes) in [("manifest", manifest), ("package", package)] {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// What the receiver will read as the first part's content, as far as a simple scan can tell.
fn first_part(body: &[u8]) -> &[u8] {
    let Some(start) = find(body, b"\r\n\r\n").map(|i| i + 4) else {
        return b"";
    };
    let delimiter = format!("\r\n--{BOUNDARY}");
    let end = find(&body[start..], delimiter.as_bytes()).map_or(body.len(), |i| start + i);
    &body[start..end]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (manifest, body) = match mode % 3 {
        0 => {
            // A valid manifest for the package bytes: one of 16 ids, so stores, repeats and
            // conflicts all happen, and the package directory stays small.
            let id = uuid::Uuid::from_u128(0xf022_0000 + u128::from(mode >> 4));
            let manifest = PackageManifest {
                package_id: id,
                package_checksum: Checksum::of(rest),
                package_size: rest.len().max(1) as u64,
                compression: Compression::None,
                image_id: None,
                image_tags: vec![],
                container_name: None,
                created_at: None,
                original_size: None,
                deployment: None,
            }
            .to_bytes();
            let body = multipart(&manifest, rest);
            (manifest, body)
        }
        1 => {
            let split = rest
                .len()
                .min(usize::from(rest.first().copied().unwrap_or(0)) * 4);
            let (manifest, package) = rest.split_at(split);
            (manifest.to_vec(), multipart(manifest, package))
        }
        _ => (first_part(rest).to_vec(), rest.to_vec()),
    };
    let h = harness();
    if h.runs.fetch_add(1, Ordering::Relaxed) % 20_000 == 19_999 {
        // The nonce store holds 100 000 live nonces and then fails closed: start afresh.
        let mut guard = h.state.lock().expect("lock");
        *guard = h.runtime.block_on(async { fresh_state() });
    }
    let (state, app) = {
        let guard = h.state.lock().expect("lock");
        (guard.0.clone(), guard.1.clone())
    };
    let headers = SignatureHeaders::sign(
        "default",
        SECRET.as_bytes(),
        Some(AUTHORITY),
        "POST",
        "/deployment/upload",
        &Checksum::of(&manifest),
        deploy_receiver::auth::unix_now(),
        deploy_protocol::envelope::new_nonce(),
    );
    let mut request = http::Request::post("/deployment/upload")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(Body::from(body))
        .expect("request");
    for (name, value) in headers.to_pairs() {
        request
            .headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    let status = h.runtime.block_on(async move {
        let response = app.oneshot(request).await.expect("infallible");
        let status = response.status();
        let _ = axum::body::to_bytes(response.into_body(), 1 << 20).await;
        status
    });
    assert_ne!(status.as_u16(), 500, "internal error on a fuzzed upload");
    let leftovers = std::fs::read_dir(state.store().dir())
        .expect("package dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".upload-"))
        .count();
    assert_eq!(leftovers, 0, "temp file left behind");
});
