use super::*;
use crate::release::Sha256Digest;

fn layer_diff(n: u8) -> Sha256Digest {
    Sha256Digest::of(&[n; 4])
}

fn config(diff_ids: &[Sha256Digest]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .expect("json")
}

fn sample() -> serde_json::Value {
    let diffs = [layer_diff(1), layer_diff(2)];
    let cfg = config(&diffs);
    serde_json::json!({
        "release_id": "643f58f6-4f40-4ecf-921f-0001187a7fd6",
        "image_id": Sha256Digest::of(&cfg),
        "config": base64::engine::general_purpose::STANDARD.encode(&cfg),
        "layers": diffs.iter().enumerate().map(|(i, d)| serde_json::json!({
            "diff_id": d,
            "blob": {"blake3": Checksum::of(&[i as u8]), "size": 10 + i, "compression": "zstd"}
        })).collect::<Vec<_>>(),
        "image_tags": ["app:1.2"],
        "created_at": "2026-11-29T12:00:00Z"
    })
}

fn parse(v: &serde_json::Value) -> Result<ReleaseManifest, ManifestError> {
    ReleaseManifest::from_slice(&serde_json::to_vec(v).expect("json"))
}

#[test]
fn valid_manifest_round_trips() {
    let m = parse(&sample()).expect("valid");
    assert_eq!(m.layers.len(), 2);
    assert_eq!(m.chain_ids()[0], layer_diff(1));
    assert_eq!(
        ReleaseManifest::from_slice(&m.to_bytes()).expect("again"),
        m
    );
    assert_eq!(m.blob(&Checksum::of(&[1])).map(|b| b.size), Some(11));
}

#[test]
fn refuses_unknown_fields_and_malformed_values() {
    let mut v = sample();
    v["surprise"] = serde_json::json!(1);
    assert!(parse(&v).is_err());
    let mut v = sample();
    v["layers"][0]["blob"]["extra"] = serde_json::json!(1);
    assert!(parse(&v).is_err());
    for (pointer, value) in [
        ("/release_id", serde_json::json!("nope")),
        ("/image_id", serde_json::json!("sha256:00")),
        ("/config", serde_json::json!("%%%")),
        ("/layers/0/blob/size", serde_json::json!(0)),
        ("/layers/0/blob/compression", serde_json::json!("brotli")),
        ("/layers/0/blob/blake3", serde_json::json!("ABC")),
        ("/image_tags", serde_json::json!(["UPPER:tag"])),
    ] {
        let mut v = sample();
        *v.pointer_mut(pointer).expect("pointer") = value;
        assert!(parse(&v).is_err(), "{pointer} should be refused");
    }
}

#[test]
fn config_must_hash_to_image_id_and_match_the_layers() {
    let mut v = sample();
    v["image_id"] = serde_json::json!(layer_diff(9));
    let err = parse(&v).expect_err("wrong image id");
    assert!(err.to_string().contains("image_id"), "{err}");

    // Layers swapped: the config's order is the law.
    let mut v = sample();
    let layers = v["layers"].as_array().expect("array").clone();
    v["layers"] = serde_json::json!([layers[1], layers[0]]);
    assert!(parse(&v).is_err());

    // A layer dropped.
    let mut v = sample();
    v["layers"].as_array_mut().expect("array").pop();
    assert!(parse(&v).is_err());

    // Config that is not an image config.
    let mut v = sample();
    let cfg = b"{}".to_vec();
    v["config"] = serde_json::json!(base64::engine::general_purpose::STANDARD.encode(&cfg));
    v["image_id"] = serde_json::json!(Sha256Digest::of(&cfg));
    assert!(parse(&v).is_err());
}

#[test]
fn oversize_manifest_is_refused() {
    let big = vec![b' '; MAX_RELEASE_MANIFEST_BYTES + 1];
    assert!(matches!(
        ReleaseManifest::from_slice(&big),
        Err(ManifestError::TooLarge { .. })
    ));
}
