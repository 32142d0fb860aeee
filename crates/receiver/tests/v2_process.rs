//! Protocol v2 blob uploads under faults the receiver process must survive: SIGKILL mid-blob
//! and restart (the real binary as a child process), and a disk that fills up mid-blob (a small
//! tmpfs as PACKAGE_DIR). Loopback and the main Docker engine only.

mod common;

use std::time::{Duration, Instant};

use common::v2::{layer_tar, patch_cut, settled_offset, synthetic, V2};
use common::{guard, start_daemon, start_receiver_with, temp_dir};
use deploy_protocol::Compression;
use deploy_testkit::tmpfs::Tmpfs;
use reqwest::StatusCode;

#[tokio::test]
async fn receiver_sigkilled_mid_blob_resumes_from_its_durable_offset_after_restart() {
    let dir = temp_dir();
    let (packages, state) = (dir.path().join("packages"), dir.path().join("state"));
    let daemon = start_daemon(&packages, &state, &[]);
    let v2 = V2::new(&daemon.base);
    let image = format!("layers-rx-sigkill-{}:v1", uuid::Uuid::new_v4().simple());
    let mut cleanup = guard();
    cleanup.remove_image(&image.clone());
    let built = synthetic(
        &[layer_tar("big", 16 << 20, 11)],
        Compression::None,
        &[&image],
    )
    .await;
    cleanup.remove_image(&built.manifest.image_id.to_string());
    let answer = v2.register(&built.manifest).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let (blake3, blob) = built.blob(0);
    let sent = 10 << 20;
    let _open = patch_cut(daemon.addr, &blake3, 0, blob.len(), &blob[..sent]).await;
    let partial = packages.join("blobs/partial").join(blake3.to_hex());
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < sent as u64 {
        assert!(
            Instant::now() < deadline,
            "the receiver never wrote the first {sent} bytes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.sigkill();

    let daemon = start_daemon(&packages, &state, &[]);
    let v2 = V2::new(&daemon.base);
    let head = v2.head(&blake3).await;
    assert_eq!(head.status, StatusCode::OK);
    let held = head.offset.expect("Upload-Offset");
    assert_eq!(
        held, sent as u64,
        "the bytes written before the kill are the durable offset"
    );
    let rest = v2.patch(&blake3, held, &blob[held as usize..]).await;
    assert_eq!(rest.status, StatusCode::NO_CONTENT, "{}", rest.body);
    let status = v2.status(built.manifest.release_id).await;
    assert_eq!(status.body["layers"][0]["state"], "received");
    let load = v2.load(built.manifest.release_id).await;
    assert_eq!(load.status, StatusCode::OK, "{}", load.body);
    assert_eq!(load.body["image_id"], built.manifest.image_id.to_string());
    drop(daemon);
}

#[tokio::test]
async fn a_blob_the_disk_cannot_hold_is_refused_up_front_and_a_disk_filling_up_mid_blob_is_507_kept_for_a_resume(
) {
    let fs = Tmpfs::mount("40m");
    let state_dir = temp_dir();
    let receiver = start_receiver_with(fs.path(), |c| {
        c.package_dir = fs.path().join("packages");
        c.state_dir = Some(state_dir.path().to_owned());
    })
    .await;
    let v2 = V2::new(&receiver.base);
    let built = synthetic(&[layer_tar("fill", 12 << 20, 12)], Compression::None, &[]).await;
    let answer = v2.register(&built.manifest).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    let (blake3, blob) = built.blob(0);

    // Admitted (12 MiB fit in 40 with the 16 MiB margin); 4 MiB arrive, then something else
    // fills the disk, and the rest of the body no longer fits.
    let first = 4 << 20;
    let mut open = patch_cut(receiver.addr, &blake3, 0, blob.len(), &blob[..first]).await;
    let partial = receiver.state.layers().blobs().partial_path(&blake3);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < first as u64 {
        assert!(Instant::now() < deadline, "the first 4 MiB never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let filler = fs.path().join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).expect("filler");
        while file.write_all(&[0u8; 1 << 20]).is_ok() {}
    }
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = open.write_all(&blob[first..]).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), open.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
    }
    let held = settled_offset(&v2, &blake3).await;
    assert!(held > 0 && held < blob.len() as u64, "{held}");
    assert_eq!(
        std::fs::metadata(&partial).map(|m| m.len()).ok(),
        Some(held),
        "the partial is kept"
    );

    // With 10 MiB free again the rest (under 8 MiB) would fit, but not with the 16 MiB margin a
    // disk needs to keep taking the nonce log's writes: refused before a byte is written.
    {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .expect("open the filler");
        let len = file.metadata().expect("filler size").len();
        file.set_len(len.saturating_sub(10 << 20))
            .expect("shrink the filler");
    }
    assert!(blob.len() as u64 - held < 10 << 20);
    let refused = v2.patch(&blake3, held, &blob[held as usize..]).await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::INSUFFICIENT_STORAGE, "INSUFFICIENT_STORAGE"),
        "{}",
        refused.body
    );
    assert_eq!(refused.offset, Some(held));
    assert_eq!(
        std::fs::metadata(&partial).map(|m| m.len()).ok(),
        Some(held)
    );

    // Space again: the blob resumes from what was kept.
    std::fs::remove_file(&filler).expect("remove the filler");
    let rest = v2.patch(&blake3, held, &blob[held as usize..]).await;
    assert_eq!(rest.status, StatusCode::NO_CONTENT, "{}", rest.body);
    assert_eq!(rest.offset, Some(blob.len() as u64));
    receiver.stop().await;
}
