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
async fn temp_files_are_swept_when_no_process_holds_them_whatever_their_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("open");
    let (held, abandoned) = (
        store.temp_path(Uuid::new_v4()),
        store.temp_path(Uuid::new_v4()),
    );
    std::fs::write(&held, b"partial").expect("write");
    std::fs::write(&abandoned, b"partial").expect("write");
    let lock = TempLock::try_acquire(&held)
        .expect("lock")
        .expect("not held yet");
    // A fresh file nobody holds (a writer that was killed a moment ago) goes at once...
    PackageStore::open(dir.path()).await.expect("reopen");
    assert!(!abandoned.exists(), "abandoned temp file swept");
    // ...one a live writer holds stays, until it lets go.
    assert!(held.exists(), "a held temp file belongs to a live writer");
    drop(lock);
    assert_eq!(store.sweep_temp_files().await.expect("sweep"), 1);
    assert!(!held.exists());
}

#[tokio::test]
async fn a_package_file_left_without_metadata_is_swept_unless_its_writer_still_holds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("open");
    let recorded = stored(&store, "web", "sha256:1", "2025-01-01T00:00:00Z").await;
    let (orphan, writing) = (
        store.package_path(Uuid::new_v4(), Compression::Zstd),
        store.package_path(Uuid::new_v4(), Compression::Gzip),
    );
    std::fs::write(&orphan, b"renamed, never recorded").expect("write");
    std::fs::write(&writing, b"renamed, metadata on its way").expect("write");
    let lock = TempLock::try_acquire(&writing)
        .expect("lock")
        .expect("not held yet");
    PackageStore::open(dir.path()).await.expect("reopen");
    assert!(!orphan.exists(), "a killed writer's package file is swept");
    assert!(writing.exists(), "a live writer's is not");
    assert!(store.package_path(recorded, Compression::None).exists());
    drop(lock);
    assert_eq!(store.sweep_temp_files().await.expect("sweep"), 1);
    assert!(!writing.exists());
    assert_eq!(store.list().await.expect("list").len(), 1);
}

#[test]
fn compression_stats_match_the_seed_style() {
    let (ratio, factor) = compression_stats(1000, 11);
    assert!((ratio - 0.989).abs() < 1e-9);
    assert!((factor - 1000.0 / 11.0).abs() < 1e-9);
    assert_eq!(compression_stats(0, 0), (0.0, 0.0));
}

async fn stored(store: &PackageStore, name: &str, image: &str, at: &str) -> Uuid {
    let id = Uuid::new_v4();
    std::fs::write(store.package_path(id, Compression::None), b"abc").expect("write");
    let mut info = sample(id, at);
    info.container_name = Some(name.into());
    info.image_id = image.into();
    store.write_metadata(&info).await.expect("meta");
    id
}

#[tokio::test]
async fn prune_keeps_the_newest_per_name_then_fits_the_budget_and_spares_the_new_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("open");
    let web1 = stored(&store, "web", "sha256:1", "2025-01-01T00:00:00Z").await;
    let web2 = stored(&store, "web", "sha256:2", "2025-01-02T00:00:00Z").await;
    let web3 = stored(&store, "web", "sha256:3", "2025-01-03T00:00:00Z").await;
    let api1 = stored(&store, "api", "sha256:4", "2025-01-04T00:00:00Z").await;
    let deleted: Vec<Uuid> = store
        .prune(2, None, None)
        .await
        .expect("prune")
        .iter()
        .map(|p| p.package_id)
        .collect();
    assert_eq!(deleted, [web1], "web keeps its 2 newest, api its one");
    assert!(!store.package_path(web1, Compression::None).exists());
    // A budget of 6 bytes (two 3-byte packages): the oldest go, the spared one stays.
    let deleted: Vec<Uuid> = store
        .prune(2, Some(6), Some(web2))
        .await
        .expect("prune")
        .iter()
        .map(|p| p.package_id)
        .collect();
    assert_eq!(deleted, [web3], "oldest first, web2 spared");
    let left: Vec<Uuid> = store
        .list()
        .await
        .expect("list")
        .iter()
        .map(|p| p.package_id)
        .collect();
    assert_eq!(left, [api1, web2]);
}

#[tokio::test]
async fn a_package_being_sent_is_neither_deleted_nor_pruned_until_its_hold_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("open");
    let web1 = stored(&store, "web", "sha256:1", "2025-01-01T00:00:00Z").await;
    let web2 = stored(&store, "web", "sha256:2", "2025-01-02T00:00:00Z").await;
    let info = store.get(web1).await.expect("web1");
    let hold = PackageHold::new(&info).expect("hold");
    // A second send holds it too (shared), as two hosts' uploads do.
    let second = PackageHold::new(&info).expect("shared");
    assert_eq!(
        store.delete(web1).await.expect_err("held").code(),
        deploy_protocol::ErrorCode::Conflict
    );
    let deleted = store.prune(1, None, Some(web2)).await.expect("prune");
    assert!(deleted.is_empty(), "{deleted:?}");
    assert!(store.package_path(web1, Compression::None).exists());
    drop((hold, second));
    let deleted: Vec<Uuid> = store
        .prune(1, None, Some(web2))
        .await
        .expect("prune")
        .iter()
        .map(|p| p.package_id)
        .collect();
    assert_eq!(deleted, [web1], "pruned once nothing sends it");
    let gone = PackageHold::new(&info);
    assert_eq!(
        gone.expect_err("gone").code(),
        deploy_protocol::ErrorCode::NotFound
    );
}

#[tokio::test]
async fn the_same_image_packaged_the_same_way_is_found_and_a_changed_file_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("open");
    let id = stored(&store, "web", "sha256:1", "2025-01-01T00:00:00Z").await;
    let tags = vec!["web:v1".to_owned()];
    let found = store
        .find_same("sha256:1", &tags, Compression::None, None, Some("web"))
        .await
        .expect("find");
    assert_eq!(found.map(|p| p.package_id), Some(id));
    for (image, compression, name) in [
        ("sha256:2", Compression::None, "web"),
        ("sha256:1", Compression::Gzip, "web"),
        ("sha256:1", Compression::None, "api"),
    ] {
        let other = store
            .find_same(image, &tags, compression, None, Some(name))
            .await
            .expect("find");
        assert!(other.is_none(), "{image} {compression} {name}");
    }
    std::fs::write(store.package_path(id, Compression::None), b"abcd").expect("grown");
    let changed = store
        .find_same("sha256:1", &tags, Compression::None, None, Some("web"))
        .await
        .expect("find");
    assert!(
        changed.is_none(),
        "a file not of its recorded size is not reused"
    );
}
