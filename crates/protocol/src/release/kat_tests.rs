//! Known-answer vectors of protocol v2 (docs/PROTOCOL.md, "Protocol v2"), computed independently
//! with Python's hashlib, hmac, base64 and the `blake3` package.

use super::*;
use crate::{Checksum, SignatureHeaders};

const KEY: &[u8] = b"kat-secret-0123456789abcdef0123456789";
const TS: i64 = 1761393600;
const NONCE: &str = "0123456789abcdefABCDEF_-";

fn sign(method: &str, path: &str, digest: &Checksum) -> String {
    SignatureHeaders::sign("default", KEY, None, method, path, digest, TS, NONCE.into()).signature
}

const MANIFEST: &str = r#"{"release_id":"643f58f6-4f40-4ecf-921f-0001187a7fd6","image_id":"sha256:795ad09a3ebbc858e2383085bb9eef999a7d4486f0473c5ba5f99e5541e1e82c","config":"eyJhcmNoaXRlY3R1cmUiOiJhbWQ2NCIsIm9zIjoibGludXgiLCJyb290ZnMiOnsidHlwZSI6ImxheWVycyIsImRpZmZfaWRzIjpbInNoYTI1Njo1ODlmMGQ1OGI5MDUzYTRmZjczMjliOGZkYjRmOWRkMTIwZTI5MzU0YzA4NmFkMGIzYjEwNzMzZjZjZmQ2ZGUzIl19fQ==","layers":[{"diff_id":"sha256:589f0d58b9053a4ff7329b8fdb4f9dd120e29354c086ad0b3b10733f6cfd6de3","blob":{"blake3":"f3ac5127210d65689e9e0867975c3e37cd4be2c972413182ad1b68732fa8ca06","size":18,"compression":"zstd"}}],"image_tags":["app:1.2"]}"#;

#[test]
fn release_manifest_vector() {
    let diff_id = Sha256Digest::of(b"layer-a");
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let blob = b"example blob bytes";
    let manifest = ReleaseManifest {
        release_id: "643f58f6-4f40-4ecf-921f-0001187a7fd6"
            .parse()
            .expect("uuid"),
        image_id: Sha256Digest::of(config.as_bytes()),
        config: config.into_bytes(),
        layers: vec![LayerEntry {
            diff_id,
            blob: BlobRef {
                blake3: Checksum::of(blob),
                size: blob.len() as u64,
                compression: crate::Compression::Zstd,
            },
            uncompressed_size: None,
        }],
        image_tags: vec!["app:1.2".into()],
        created_at: None,
        deployment: None,
    };
    assert_eq!(
        String::from_utf8(manifest.to_bytes()).expect("utf8"),
        MANIFEST
    );
    assert_eq!(
        ReleaseManifest::from_slice(MANIFEST.as_bytes()).expect("valid"),
        manifest
    );
    let digest = Checksum::of(MANIFEST.as_bytes());
    assert_eq!(
        digest.to_hex(),
        "f42b1114563ed628f68735af7a59bbbec113549c7d0ce41a9a02bdd568d30890"
    );
    assert_eq!(
        sign("POST", paths::RELEASES, &digest),
        "7f2b2f21592358379e1b348696ed5ec8b20b0eab75a9a9ec994c5b9d03d69a70"
    );
}

#[test]
fn blob_and_inventory_vectors() {
    let blake3 = Checksum::of(b"example blob bytes");
    assert_eq!(
        blake3.to_hex(),
        "f3ac5127210d65689e9e0867975c3e37cd4be2c972413182ad1b68732fa8ca06"
    );
    let path = paths::blob(&blake3);
    // PATCH: the content digest is the blob's BLAKE3 itself.
    assert_eq!(
        sign("PATCH", &path, &blake3),
        "575e420df53de292f0c22f0c7acdf54f4cc6928e9efe7778e97b9e336cdce66f"
    );
    assert_eq!(
        sign("HEAD", &path, &Checksum::empty()),
        "cc9c39d26894bc3c07cb3594018e4edee7e2ef92c50d7729b688774d2dafa34e"
    );
    let body = serde_json::to_vec(&InventoryRequest {
        chain_ids: vec![Sha256Digest::of(b"layer-a")],
    })
    .expect("json");
    assert_eq!(
        body,
        br#"{"chain_ids":["sha256:589f0d58b9053a4ff7329b8fdb4f9dd120e29354c086ad0b3b10733f6cfd6de3"]}"#
    );
    assert_eq!(
        sign("POST", paths::INVENTORY, &Checksum::of(&body)),
        "84d1701aa4aaf33392764ff20a01b75d127f063b07213404b1782171079964bc"
    );
}
