//! Store behaviour on a temp directory: listing, restart, verify, delete, temp-file sweep.

use super::*;

fn sample(id: Uuid, created_at: &str) -> PackageInfo {
    PackageInfo {
        package_id: id,
        image_id: "sha256:abc".into(),
        image_tags: vec!["web:v1".into()],
        package_path: String::new(),
        package_size: 3,
        package_size_mb: 0.000003,
        original_size: 10,
        compression: Compression::None,
        compression_level: None,
        compression_ratio: 0.7,
        compression_factor: 10.0 / 3.0,
        package_checksum: Checksum::of(b"abc"),
        build_duration_ms: 0,
        export_duration_ms: 1,
        created_at: created_at.into(),
        container_name: Some("web".into()),
    }
}

#[tokio::test]
async fn metadata_survives_reopen_and_verify_detects_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("open");
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, at) in [(a, "2025-01-01T00:00:00Z"), (b, "2025-02-01T00:00:00Z")] {
        std::fs::write(store.package_path(id, Compression::None), b"abc").expect("write");
        store.write_metadata(&sample(id, at)).await.expect("meta");
    }
    let store = PackageStore::open(dir.path()).await.expect("reopen");
    let ids: Vec<Uuid> = store
        .list()
        .await
        .expect("list")
        .iter()
        .map(|p| p.package_id)
        .collect();
    assert_eq!(ids, [b, a], "newest first");
    store.verify(a).await.expect("intact");
    std::fs::write(store.package_path(a, Compression::None), b"abd").expect("write");
    let err = store.verify(a).await.expect_err("changed");
    assert_eq!(err.code(), deploy_protocol::ErrorCode::ChecksumMismatch);
    store.delete(a).await.expect("delete");
    assert_eq!(
        store.get(a).await.expect_err("gone").code(),
        deploy_protocol::ErrorCode::NotFound
    );
    assert!(!store.package_path(a, Compression::None).exists());
}

#[tokio::test]
async fn stale_temp_files_are_swept_and_fresh_ones_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("open");
    let temp = store.temp_path(Uuid::new_v4());
    std::fs::write(&temp, b"partial").expect("write");
    PackageStore::open(dir.path()).await.expect("reopen");
    assert!(
        temp.exists(),
        "a fresh temp file may belong to a live writer"
    );
    assert_eq!(
        store.sweep_temp_files(Duration::ZERO).await.expect("sweep"),
        1
    );
    assert!(!temp.exists());
}

#[test]
fn compression_stats_match_the_seed_style() {
    let (ratio, factor) = compression_stats(1000, 11);
    assert!((ratio - 0.989).abs() < 1e-9);
    assert!((factor - 1000.0 / 11.0).abs() < 1e-9);
    assert_eq!(compression_stats(0, 0), (0.0, 0.0));
}
