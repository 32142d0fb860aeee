//! TLS in front of the receiver, as docs/OPERATIONS.md tells users to run it: the shipped
//! `deploy/proxy/nginx.conf` (only its port, certificate paths and upstream changed) on loopback,
//! a private CA and server certificate made with openssl, the real receiver behind it, and the
//! sender's HTTP client (`ReceiverConfig::http_client`, the one every CLI command and `serve`
//! use) uploading through it. Needs `nginx` and `openssl` (scripts/prereqs.sh installs them).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use deploy_protocol::ErrorCode;
use deploy_protocol::PackageManifest;
use deploy_sender::config::ReceiverConfig;
use deploy_sender::SenderError;
use deploy_sender::{manifest_for_file, ReceiverClient, ReceiverTarget, UploadOutcome};

/// Runs a command, panicking with its output when it fails.
fn run(program: &str, args: &[&str], dir: &Path) {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/prereqs.sh installs it): {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A private CA (`ca.crt`) and a certificate for 127.0.0.1 and localhost signed by it
/// (`server.crt`, `server.key`), in `dir`.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=deploy test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run("openssl", &ca, dir);
    let mut csr = vec!["req", "-new"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run("openssl", &csr, dir);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("extensions");
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
        dir,
    );
}

/// nginx running the shipped proxy configuration; stopped on drop.
struct Nginx {
    child: Child,
    url: String,
}

impl Nginx {
    fn start(dir: &Path, port: u16, upstream: &str) -> Self {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/proxy/nginx.conf");
        let shipped = std::fs::read_to_string(&shipped).expect("deploy/proxy/nginx.conf");
        let replace = |text: String, from: &str, to: &str| {
            assert!(text.contains(from), "nginx.conf no longer has {from:?}");
            text.replace(from, to)
        };
        let server = replace(
            shipped,
            "listen 443 ssl;",
            &format!("listen 127.0.0.1:{port} ssl;"),
        );
        let server = replace(
            server,
            "/etc/ssl/deploy/receiver.crt",
            &dir.join("server.crt").display().to_string(),
        );
        let server = replace(
            server,
            "/etc/ssl/deploy/receiver.key",
            &dir.join("server.key").display().to_string(),
        );
        let server = replace(server, "http://127.0.0.1:8001", upstream);
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
        let user = if is_root() { "user root;\n" } else { "" };
        let main = format!(
            "{user}daemon off;\nmaster_process off;\nerror_log {log} warn;\npid {pid};\n\
             events {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {tmp}/body;\n  \
             proxy_temp_path {tmp}/proxy;\n{server}\n}}\n",
            log = prefix.join("logs/error.log").display(),
            pid = prefix.join("nginx.pid").display(),
            tmp = prefix.display(),
        );
        let config = prefix.join("nginx.conf");
        std::fs::write(&config, main).expect("write nginx.conf");
        let nginx = ["nginx", "/usr/sbin/nginx"]
            .into_iter()
            .find(|p| Command::new(p).arg("-v").output().is_ok())
            .expect("nginx is needed for this test (scripts/prereqs.sh installs nginx-light)");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut child = child;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nginx exited ({status}) with the shipped configuration (its error is above)"
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {port}: {}",
                std::fs::read_to_string(prefix.join("logs/error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            url: format!("https://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// `POST /deployment/upload` of a package file, with the default retry policy.
async fn upload(
    client: &reqwest::Client,
    target: &ReceiverTarget,
    path: &Path,
    manifest: &PackageManifest,
) -> Result<UploadOutcome, SenderError> {
    ReceiverClient::new(client.clone(), target.clone())
        .upload(path, manifest)
        .send()
        .await
}

fn receiver_config(url: &str, ca_cert: Option<PathBuf>) -> ReceiverConfig {
    ReceiverConfig {
        to: vec![url.to_owned()],
        key_id: KEY_ID.into(),
        secret: Some(SECRET.to_owned()),
        connect_timeout_secs: 5,
        ca_cert,
        ..ReceiverConfig::default()
    }
}

#[tokio::test]
async fn the_sender_uploads_through_the_shipped_nginx_tls_proxy_and_refuses_an_untrusted_certificate(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    make_certificates(dir.path());
    // As OPERATIONS.md says: the receiver believes the proxy's X-Forwarded-For, and only allows
    // loopback clients, so a client-sent X-Forwarded-For that the proxy appended to instead of
    // replacing would turn into a 403.
    // Requests are signed for the proxy's authority, which the receiver is told it answers to.
    let port = free_port();
    let receiver = spawn_receiver(|c| {
        c.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
        c.allowed_networks =
            Some(deploy_receiver::config::parse_networks("127.0.0.0/8").expect("cidr"));
        c.receiver_authorities = vec![format!("127.0.0.1:{port}")];
    })
    .await;
    let nginx = Nginx::start(dir.path(), port, &receiver.url);

    let src = tempfile::tempdir().expect("tmp");
    let path = src.path().join("pkg.tar");
    write_test_file(&path, 24 << 20, 7);
    let manifest = manifest_for_file(&path, None, deploy_protocol::Compression::None, vec![])
        .await
        .expect("manifest");

    // Trusting the private CA: the upload goes through TLS, nginx and into the store intact.
    let config = receiver_config(&nginx.url, Some(dir.path().join("ca.crt")));
    let client = config.http_client().expect("client");
    let target = config.target().expect("target");
    let outcome = upload(&client, &target, &path, &manifest)
        .await
        .expect("upload through the TLS proxy");
    assert_eq!(outcome.status, 200);
    assert_eq!(
        outcome.response["checksum_verified"], true,
        "{}",
        outcome.response
    );
    let stored = receiver
        .package_dir
        .join(format!("{}.pkg", manifest.package_id));
    assert_eq!(
        std::fs::read(&stored).expect("stored package"),
        std::fs::read(&path).expect("source"),
        "stored byte-identical"
    );

    // A client-sent X-Forwarded-For is replaced by the proxy, not believed: had nginx appended
    // to it, the receiver would take 10.1.2.3 for the client and answer 403.
    let mut spoofing = reqwest::header::HeaderMap::new();
    spoofing.insert(
        "x-forwarded-for",
        reqwest::header::HeaderValue::from_static("10.1.2.3"),
    );
    let pem = std::fs::read(dir.path().join("ca.crt")).expect("ca.crt");
    let spoofer = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("ca"))
        .default_headers(spoofing)
        .build()
        .expect("client");
    let small = src.path().join("small.tar");
    write_test_file(&small, 64 << 10, 8);
    let small_manifest =
        manifest_for_file(&small, None, deploy_protocol::Compression::None, vec![])
            .await
            .expect("manifest");
    let spoofed = upload(&spoofer, &target, &small, &small_manifest)
        .await
        .expect("the proxy must set, not append to, X-Forwarded-For");
    assert_eq!(spoofed.status, 200);

    // Without the CA the certificate is not trusted: refused before anything is sent.
    let untrusting = receiver_config(&nginx.url, None);
    let err = upload(
        &untrusting.http_client().expect("client"),
        &untrusting.target().expect("target"),
        &path,
        &manifest,
    )
    .await
    .expect_err("an untrusted certificate is refused");
    assert_eq!(err.code(), ErrorCode::RemoteUnreachable, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("certificate") && message.contains("--ca-cert"),
        "the error names the certificate problem and the fix: {err}"
    );
    assert!(message.contains("not retried"), "{err}");
    eprintln!(
        "TLS: 24 MiB through nginx ({}) in {:.2} s ({:.0} MB/s), stored intact; untrusted \
         certificate refused: {err}",
        nginx.url,
        outcome.duration.as_secs_f64(),
        outcome.throughput_mbps
    );
}
