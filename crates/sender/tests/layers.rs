//! The layer cache against the real Docker engine: multi-layer images built `FROM scratch` with
//! the static busybox (a base image, and apps built `FROM` it, so their lower layer is shared and
//! stable), split from one `docker save`, compressed once, reused without any export.
//! Without a reachable engine these tests fail; they never skip.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use bollard::Docker;
use deploy_protocol::{Checksum, Compression, ErrorCode};
use deploy_sender::{prepare_image, sha256_digest, LayerCache, PreparedImage};
use deploy_sender::{CompressionOptions, NoProgress};
use deploy_testkit::tmpfs::Tmpfs;
use uuid::Uuid;

async fn docker() -> Docker {
    match deploy_sender::connect_docker().await {
        Ok(d) => d,
        Err(e) => {
            panic!("these tests need a Docker engine (DOCKER_HOST or /var/run/docker.sock): {e}")
        }
    }
}

/// Removes every image tag it made when dropped (newest first, so children go before bases).
#[derive(Default)]
struct Images {
    tags: Mutex<Vec<String>>,
}

impl Images {
    /// Builds `dockerfile` (its context holds `/bin/busybox` and `files`) as a new unique tag.
    fn build(&self, dockerfile: &str, files: &[(&str, &[u8])]) -> String {
        let tag = format!("deploy-sender-layers-tx/{}:v1", Uuid::new_v4().simple());
        self.tags.lock().expect("lock").push(tag.clone());
        deploy_testkit::images::build_with_cli(&tag, dockerfile, files);
        tag
    }

    /// A base (busybox plus a unique file) and an app on it with its own top layer of `top`.
    fn base(&self) -> String {
        let unique = Uuid::new_v4().to_string();
        self.build(
            "FROM scratch\nCOPY busybox /bin/busybox\nCOPY unique /etc/unique\n",
            &[("unique", unique.as_bytes())],
        )
    }

    fn app(&self, base: &str, top: &[u8]) -> String {
        self.build(
            &format!("FROM {base}\nCOPY top /srv/top\nCMD [\"/bin/busybox\",\"sleep\",\"60\"]\n"),
            &[("top", top)],
        )
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let tags = std::mem::take(&mut *self.tags.lock().unwrap_or_else(|e| e.into_inner()));
        for tag in tags.iter().rev() {
            let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
        }
    }
}

fn options(compression: Compression) -> CompressionOptions {
    CompressionOptions {
        compression,
        level: None,
        zstd_workers: 2,
    }
}

fn decompress(path: &Path, compression: Compression) -> Vec<u8> {
    let tool = match compression {
        Compression::None => return std::fs::read(path).expect("read"),
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .expect("decoder runs");
    assert!(out.status.success(), "{tool} -dc failed");
    out.stdout
}

/// Every blob is its layer, compressed: its BLAKE3 and size as recorded, its content the diffID.
fn assert_blobs_are_the_layers(image: &PreparedImage, compression: Compression) {
    for layer in &image.layers {
        let bytes = std::fs::read(&layer.blob.path).expect("blob file");
        assert_eq!(layer.blob.size, bytes.len() as u64);
        assert_eq!(layer.blob.blake3, Checksum::of(&bytes));
        let tar = decompress(&layer.blob.path, compression);
        assert_eq!(tar.len() as u64, layer.blob.uncompressed_size);
        assert_eq!(
            sha256_digest(&tar),
            layer.diff_id,
            "blob content is the layer"
        );
    }
    assert_eq!(sha256_digest(&image.config), image.image_id);
}

async fn prepare(docker: &Docker, cache: &LayerCache, tag: &str, c: Compression) -> PreparedImage {
    prepare_image(docker, cache, tag, &options(c), Arc::new(NoProgress))
        .await
        .expect("prepare")
}

#[tokio::test]
async fn an_image_is_split_and_compressed_once_then_served_from_the_cache_without_export() {
    let docker = docker().await;
    let images = Images::default();
    let base = images.base();
    let app = images.app(&base, b"top layer one");
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(dir.path(), u64::MAX).await.expect("cache");

    for compression in [Compression::Zstd, Compression::Gzip] {
        let first = prepare(&docker, &cache, &app, compression).await;
        assert_eq!(first.layers.len(), 3, "busybox, unique file, top");
        assert!(first.stats.exported);
        assert_eq!(first.stats.compressed_layers, 3);
        assert_eq!(first.layers[0].chain_id, first.layers[0].diff_id);
        assert_eq!(first.tags, vec![app.clone()]);
        assert_blobs_are_the_layers(&first, compression);
        drop(first);

        let again = prepare(&docker, &cache, &app, compression).await;
        assert!(!again.stats.exported, "all cached: no docker save");
        assert_eq!(again.stats.compressed_layers, 0);
        assert_eq!(again.stats.cached_layers, 3);
        assert_blobs_are_the_layers(&again, compression);
    }
}

#[tokio::test]
async fn a_changed_top_layer_is_the_only_layer_compressed_and_a_sibling_reuses_the_base() {
    let docker = docker().await;
    let images = Images::default();
    let base = images.base();
    let v1 = images.app(&base, b"version one");
    let v2 = images.app(&base, b"version two, a little longer");
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(dir.path(), u64::MAX).await.expect("cache");

    let first = prepare(&docker, &cache, &v1, Compression::Zstd).await;
    assert_eq!(first.stats.compressed_layers, 3);
    let second = prepare(&docker, &cache, &v2, Compression::Zstd).await;
    assert!(second.stats.exported);
    assert_eq!(second.stats.compressed_layers, 1, "only the new top layer");
    assert_eq!(second.stats.cached_layers, 2);
    assert_eq!(second.layers[..2], first.layers[..2], "the base is shared");
    assert_ne!(second.layers[2].diff_id, first.layers[2].diff_id);
    assert_blobs_are_the_layers(&second, Compression::Zstd);

    // The base alone: its layers are cached, its config is not: one export, nothing compressed.
    let base_only = prepare(&docker, &cache, &base, Compression::Zstd).await;
    assert_eq!(base_only.stats.compressed_layers, 0);
    assert_eq!(base_only.layers[..], first.layers[..2]);
}

#[tokio::test]
async fn the_cache_keeps_its_budget_by_evicting_least_recently_used_unpinned_blobs() {
    let docker = docker().await;
    let images = Images::default();
    let base = images.base();
    let a = images.app(&base, &vec![b'a'; 4096]);
    let b = images.app(&base, &vec![b'b'; 4096]);
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(dir.path(), 1).await.expect("cache");

    // A budget of one byte: everything of `a` stays while it is pinned, and goes after.
    let first = prepare(&docker, &cache, &a, Compression::Zstd).await;
    assert!(first.layers.iter().all(|l| l.blob.path.exists()), "pinned");
    let top_a = first.layers[2].blob.path.clone();
    drop(first);
    let second = prepare(&docker, &cache, &b, Compression::Zstd).await;
    assert_eq!(
        second.stats.compressed_layers, 1,
        "the base stayed: nothing was evicted between the two"
    );
    assert!(!top_a.exists(), "a's top layer was evicted");
    assert!(second.layers.iter().all(|l| l.blob.path.exists()));
    drop(second);

    let roomy = LayerCache::open(dir.path(), u64::MAX)
        .await
        .expect("reopen");
    let outcome = roomy.evict().await.expect("evict");
    assert_eq!(outcome.removed, 0);
}

#[tokio::test]
async fn layers_made_for_a_transfer_are_not_evicted_by_another_job_before_it_has_them_pinned() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let docker = docker().await;
    let images = Images::default();
    let app = images.app(&images.base(), &vec![b'c'; 64 * 1024]);
    let dir = tempfile::tempdir().expect("tempdir");
    // A budget of one byte: whatever is not pinned goes at the next eviction.
    let cache = LayerCache::open(dir.path(), 1).await.expect("cache");
    // Another job sharing the cache evicts all the while this one prepares.
    let stop = Arc::new(AtomicBool::new(false));
    let evictor = {
        let (other, stop) = (cache.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut runs = 0u32;
            while !stop.load(Ordering::Relaxed) {
                other.evict().await.expect("evict");
                runs += 1;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            runs
        })
    };
    let prepared = prepare(&docker, &cache, &app, Compression::Zstd).await;
    stop.store(true, Ordering::Relaxed);
    let runs = evictor.await.expect("evictor");
    assert!(runs > 0, "the other job evicted while this one prepared");
    assert_eq!(prepared.stats.compressed_layers, 3);
    for layer in &prepared.layers {
        assert!(
            layer.blob.path.exists(),
            "{} was evicted from under the transfer ({runs} evictions ran)",
            layer.diff_id
        );
    }
    assert_blobs_are_the_layers(&prepared, Compression::Zstd);
}

#[tokio::test]
async fn stale_temp_files_are_swept_and_an_inconsistent_entry_is_made_again() {
    let docker = docker().await;
    let images = Images::default();
    let app = images.app(&images.base(), b"x");
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::open(dir.path(), u64::MAX).await.expect("cache");
    let first = prepare(&docker, &cache, &app, Compression::Zstd).await;
    let top = first.layers[2].blob.clone();
    drop(first);

    // A crashed writer's temp file, and a blob cut short behind its record.
    let stale = dir.path().join("blobs").join(".tmp-crashed");
    std::fs::write(&stale, b"half").expect("temp");
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .append(true)
        .open(&stale)
        .and_then(|f| f.set_modified(old))
        .expect("age it");
    let bytes = std::fs::read(&top.path).expect("blob");
    std::fs::write(&top.path, &bytes[..bytes.len() / 2]).expect("truncate");

    let cache = LayerCache::open(dir.path(), u64::MAX)
        .await
        .expect("reopen");
    assert!(!stale.exists(), "swept at open");
    let again = prepare(&docker, &cache, &app, Compression::Zstd).await;
    assert_eq!(
        again.stats.compressed_layers, 1,
        "the cut blob is made again"
    );
    assert_eq!(again.layers[2].blob.blake3, top.blake3);
    assert_blobs_are_the_layers(&again, Compression::Zstd);
}

#[tokio::test]
async fn a_cache_disk_filling_up_mid_layer_fails_with_insufficient_storage_and_leaves_no_temp_file()
{
    let docker = docker().await;
    let images = Images::default();
    // 6 MiB that zstd cannot shrink: the top layer's blob cannot fit the 4 MiB disk.
    let mut noise = vec![0u8; 6 << 20];
    let mut hasher = blake3::Hasher::new();
    hasher.update(Uuid::new_v4().as_bytes());
    hasher.finalize_xof().fill(&mut noise);
    let app = images.app(&images.base(), &noise);
    let fs = Tmpfs::mount("4m");
    let cache = LayerCache::open(fs.path(), u64::MAX).await.expect("cache");

    let err = prepare_image(
        &docker,
        &cache,
        &app,
        &options(Compression::Zstd),
        Arc::new(NoProgress),
    )
    .await
    .expect_err("the disk fills up");
    assert_eq!(err.code(), ErrorCode::InsufficientStorage, "{err}");
    let left: Vec<String> = std::fs::read_dir(fs.path().join("blobs"))
        .expect("blobs dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|name| !name.starts_with(".tmp")),
        "no temp file is left: {left:?}"
    );

    // With room, the same cache makes the image (keeping whatever layers it committed before).
    fs.resize("64m");
    let again = prepare(&docker, &cache, &app, Compression::Zstd).await;
    assert!(
        again.stats.compressed_layers >= 1,
        "the top layer is made now"
    );
    assert_blobs_are_the_layers(&again, Compression::Zstd);
}
