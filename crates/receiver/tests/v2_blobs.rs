//! Protocol v2 blob uploads against a real receiver (in process, on loopback) and the main
//! Docker engine (read for its inventory; loads use unique tags, removed after): offsets are
//! strict, bad blobs are discarded whole, a cut connection or a full disk keeps what arrived.

mod common;

use common::v2::{layer_tar, patch_cut, settled_offset, synthetic, Built, V2};
use common::{guard, start_receiver, start_receiver_with, temp_dir, Guard};
use deploy_protocol::{Checksum, Compression, LayerState, ReleaseStatus};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tag(what: &str) -> String {
    format!("layers-rx-{what}-{}:v1", uuid::Uuid::new_v4().simple())
}

/// A new tag for `what`, and a guard that removes it from the main engine when dropped.
fn cleaned_tag(what: &str) -> (String, Guard) {
    let image = tag(what);
    let mut cleanup = guard();
    cleanup.remove_image(&image.clone());
    (image, cleanup)
}

/// How many completed blobs `by` (`upload` or `load`) decompressed and checked against their
/// diffID, from the receiver's `/metrics`.
async fn blob_checks(base: &str, by: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let name = format!("deploy_receiver_blob_checks_total{{by=\"{by}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&name))
        .map_or(0.0, |v| v.parse().expect("a number"))
}

/// Asserts that the main engine has neither `image` (the release's tag) nor the release's image.
async fn assert_nothing_loaded(image: &str, built: &Built) {
    let docker = common::docker().await;
    assert!(docker.inspect_image(image).await.is_err(), "nothing tagged");
    assert!(
        docker
            .inspect_image(&built.manifest.image_id.to_string())
            .await
            .is_err(),
        "nothing loaded"
    );
}

/// The receiver's address, for raw connections.
fn socket_addr(base: &str) -> std::net::SocketAddr {
    base.trim_start_matches("http://").parse().expect("addr")
}

async fn registered(v2: &V2, built: &Built) -> ReleaseStatus {
    let answer = v2.register(&built.manifest).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    serde_json::from_value(answer.body).expect("ReleaseStatus")
}

#[tokio::test]
async fn offsets_are_strict_and_a_mismatch_appends_nothing() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let v2 = V2::new(&receiver.base);
    let built = synthetic(&[layer_tar("a", 64 * 1024, 1)], Compression::None, &[]).await;
    let status = registered(&v2, &built).await;
    assert_eq!(status.layers[0].state, LayerState::Missing);
    let (blake3, blob) = built.blob(0);

    let wrong = v2.patch(&blake3, 5, &blob[5..]).await;
    assert_eq!(wrong.status, StatusCode::CONFLICT);
    assert_eq!(wrong.code(), "OFFSET_MISMATCH");
    assert_eq!(wrong.offset, Some(0));

    let first = v2.patch(&blake3, 0, &blob[..1000]).await;
    assert_eq!(first.status, StatusCode::NO_CONTENT, "{}", first.body);
    assert_eq!(first.offset, Some(1000));
    let again = v2.patch(&blake3, 500, &blob[500..]).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "OFFSET_MISMATCH")
    );
    assert_eq!(
        again.offset,
        Some(1000),
        "nothing appended at a wrong offset"
    );
    let head = v2.head(&blake3).await;
    assert_eq!(
        (head.offset, head.length),
        (Some(1000), Some(blob.len() as u64))
    );
    let status = v2.status(built.manifest.release_id).await;
    assert_eq!(status.body["layers"][0]["state"], "partial");
    assert_eq!(status.body["layers"][0]["offset"], 1000);

    let rest = v2.patch(&blake3, 1000, &blob[1000..]).await;
    assert_eq!(rest.status, StatusCode::NO_CONTENT, "{}", rest.body);
    assert_eq!(rest.offset, Some(blob.len() as u64));
    let status = v2.status(built.manifest.release_id).await;
    assert_eq!(status.body["layers"][0]["state"], "received");
    receiver.stop().await;
}

#[tokio::test]
async fn tampered_blob_is_discarded_whole_with_checksum_mismatch() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let v2 = V2::new(&receiver.base);
    let built = synthetic(&[layer_tar("a", 200 * 1024, 2)], Compression::Zstd, &[]).await;
    registered(&v2, &built).await;
    let (blake3, blob) = built.blob(0);
    let mut tampered = blob.to_vec();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x55;
    let answer = v2.patch(&blake3, 0, &tampered).await;
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        answer.body
    );
    assert_eq!(answer.code(), "CHECKSUM_MISMATCH");
    assert_eq!(
        v2.head(&blake3).await.offset,
        Some(0),
        "nothing of it is kept"
    );
    let partial = receiver.state.layers().blobs().partial_path(&blake3);
    assert!(!partial.exists());
    let good = v2.patch(&blake3, 0, blob).await;
    assert_eq!(good.status, StatusCode::NO_CONTENT, "{}", good.body);
    receiver.stop().await;
}

#[tokio::test]
async fn a_layer_whose_content_does_not_match_its_diff_id_is_refused() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let v2 = V2::new(&receiver.base);
    let signed = layer_tar("signed", 10 * 1024, 3);
    let other = layer_tar("other", 10 * 1024, 4);
    let mut built = synthetic(&[signed], Compression::Gzip, &[]).await;
    // The blob entry names (and hashes) a blob whose content is another layer.
    let liar = common::v2::compress(&other, Compression::Gzip).await;
    let liar_blake3 = Checksum::of(&liar);
    built.manifest.layers[0].blob.blake3 = liar_blake3;
    built.manifest.layers[0].blob.size = liar.len() as u64;
    registered(&v2, &built).await;
    let answer = v2.patch(&liar_blake3, 0, &liar).await;
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        answer.body
    );
    assert_eq!(answer.code(), "CHECKSUM_MISMATCH");
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("diffID"),
        "{}",
        answer.body
    );
    assert_eq!(v2.head(&liar_blake3).await.offset, Some(0));
    let load = v2.load(built.manifest.release_id).await;
    assert_eq!(
        (load.status, load.code()),
        (StatusCode::CONFLICT, "LAYERS_MISSING")
    );
    receiver.stop().await;
}

#[tokio::test]
async fn a_blob_no_signed_release_names_is_not_found() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let v2 = V2::new(&receiver.base);
    let bytes = b"no release names me".to_vec();
    let blake3 = Checksum::of(&bytes);
    let answer = v2.patch(&blake3, 0, &bytes).await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::NOT_FOUND, "NOT_FOUND")
    );
    assert_eq!(v2.head(&blake3).await.status, StatusCode::NOT_FOUND);
    assert!(!receiver
        .state
        .layers()
        .blobs()
        .partial_path(&blake3)
        .exists());
    receiver.stop().await;
}

/// The status line and headers of the answer on a raw connection (within 10 s).
async fn answer_head(raw: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), raw.read(&mut byte))
            .await
            .expect("the answer within 10 s")
            .expect("the answer, not a reset");
        assert_eq!(read, 1, "connection closed before the answer: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A `PATCH` whose body stalls is answered `408 TIMEOUT` (which a sender retries from the
/// offset), with the bytes it sent kept and reported in `Upload-Offset`.
#[tokio::test]
async fn a_stalled_patch_is_a_timeout_with_what_it_sent_kept() {
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), |c| c.upload_idle_timeout_secs = 1).await;
    let v2 = V2::new(&receiver.base);
    let built = synthetic(
        &[layer_tar("stall", 256 * 1024, 41)],
        Compression::None,
        &[],
    )
    .await;
    registered(&v2, &built).await;
    let addr = socket_addr(&receiver.base);
    let (blake3, blob) = built.blob(0);
    // The head and 10000 bytes, then nothing, the connection held open.
    let mut raw = patch_cut(addr, &blake3, 0, blob.len(), &blob[..10_000]).await;
    let head = answer_head(&mut raw).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(head.contains("upload-offset: 10000\r\n"), "{head}");
    drop(raw);
    assert_eq!(v2.head(&blake3).await.offset, Some(10_000));
    let rest = v2.patch(&blake3, 10_000, &blob[10_000..]).await;
    assert_eq!(rest.status, StatusCode::NO_CONTENT, "{}", rest.body);
    receiver.stop().await;
}

/// A `PATCH` that finds every upload slot taken is answered `429 BUSY` while its client is still
/// sending a large body, nothing of that body is written, and the same body goes in once the
/// slot is free. The receiver reads and discards a refused body while it answers: a client that
/// writes its whole body before reading (as a sender behind a proxy effectively does) otherwise
/// gets a reset instead of the `429` (this test's raw client did, every time, before the drain),
/// and a sender counts a reset as an interruption, not as "busy, wait".
#[tokio::test]
async fn a_busy_patch_is_answered_while_its_body_is_still_coming_and_writes_none_of_it() {
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), |c| c.max_concurrent_uploads = 1).await;
    let v2 = V2::new(&receiver.base);
    let tars = [
        layer_tar("slow", 64 * 1024, 11),
        layer_tar("big", 24 << 20, 12),
    ];
    let built = synthetic(&tars, Compression::None, &[]).await;
    registered(&v2, &built).await;
    let addr = socket_addr(&receiver.base);
    let in_flight = |want: i64| {
        let gauge = receiver.state.metrics().uploads_in_flight().clone();
        async move {
            let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while gauge.get() != want {
                assert!(
                    std::time::Instant::now() < give_up,
                    "uploads in flight: {} (want {want})",
                    gauge.get()
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    // Holds the one upload slot: its head and 100 bytes sent, the rest withheld.
    let (slow, slow_blob) = built.blob(0);
    let holder = patch_cut(addr, &slow, 0, slow_blob.len(), &slow_blob[..100]).await;
    in_flight(1).await;
    let (big, big_blob) = built.blob(1);
    for round in 1..=3 {
        let answer = v2
            .try_patch(&big, 0, big_blob.to_vec())
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:?} instead of the 429"));
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::TOO_MANY_REQUESTS, "BUSY"),
            "round {round}: {}",
            answer.body
        );
    }
    // A client that writes its whole body before it reads (as one behind a proxy may): the
    // receiver reads the body on after answering, so the write completes and the 429 is there.
    let mut raw = patch_cut(addr, &big, 0, big_blob.len(), &[]).await;
    raw.write_all(big_blob)
        .await
        .expect("the whole body written: the receiver drains it after answering");
    let head = answer_head(&mut raw).await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    drop(raw);
    assert_eq!(v2.head(&big).await.offset, Some(0), "nothing of it written");
    drop(holder);
    in_flight(0).await;
    let sent = v2.patch(&big, 0, big_blob).await;
    assert_eq!(sent.status, StatusCode::NO_CONTENT, "{}", sent.body);
    receiver.stop().await;
}

#[tokio::test]
async fn an_oversized_blob_is_refused() {
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), |c| c.max_package_size = 100 * 1024).await;
    let v2 = V2::new(&receiver.base);
    // Declared over MAX_PACKAGE_SIZE: the release is refused.
    let big = synthetic(&[layer_tar("big", 200 * 1024, 5)], Compression::None, &[]).await;
    let answer = v2.register(&big.manifest).await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "PACKAGE_TOO_LARGE")
    );
    // A body past the signed size: refused, never written past it.
    let small = synthetic(&[layer_tar("small", 20 * 1024, 6)], Compression::None, &[]).await;
    registered(&v2, &small).await;
    let (blake3, blob) = small.blob(0);
    let mut longer = blob.to_vec();
    longer.extend_from_slice(&[0u8; 4096]);
    let answer = v2.patch(&blake3, 0, &longer).await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "PACKAGE_TOO_LARGE")
    );
    let held = answer.offset.expect("Upload-Offset");
    assert!(held <= blob.len() as u64);
    assert_eq!(v2.head(&blake3).await.offset, Some(held));
    let rest = v2.patch(&blake3, held, &blob[held as usize..]).await;
    assert_eq!(rest.status, StatusCode::NO_CONTENT, "{}", rest.body);
    receiver.stop().await;
}

#[tokio::test]
async fn a_connection_cut_at_several_points_resumes_from_the_durable_offset() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let v2 = V2::new(&receiver.base);
    let (image, mut cleanup) = cleaned_tag("cut");
    let tars = [layer_tar("one", 3 << 20, 7), layer_tar("two", 1 << 20, 8)];
    let built = synthetic(&tars, Compression::None, &[&image]).await;
    cleanup.remove_image(&built.manifest.image_id.to_string());
    registered(&v2, &built).await;
    let addr = socket_addr(&receiver.base);
    let mut kept_exactly = 0;
    for layer in 0..2 {
        let (blake3, blob) = built.blob(layer);
        let size = blob.len();
        let mut held = 0usize;
        for cut in [0, 1, 4096 + 7, size / 2, size - 1] {
            if cut < held {
                continue;
            }
            let stream = patch_cut(addr, &blake3, held as u64, size - held, &blob[held..cut]).await;
            drop(stream);
            // What the receiver read before the cut is kept; bytes of a connection that went
            // before its body was read are not, and are sent again from the offset it reports.
            let offset = settled_offset(&v2, &blake3).await as usize;
            assert!(
                (held..=cut).contains(&offset),
                "offset {offset} after a cut at {cut}, {held} held before"
            );
            kept_exactly += usize::from(offset == cut);
            held = offset;
        }
        let rest = v2.patch(&blake3, held as u64, &blob[held..]).await;
        assert_eq!(rest.status, StatusCode::NO_CONTENT, "{}", rest.body);
    }
    eprintln!("10 cuts: {kept_exactly} kept every byte sent before the cut");
    assert!(kept_exactly > 0, "no cut kept what it sent");
    let load = v2.load(built.manifest.release_id).await;
    assert_eq!(load.status, StatusCode::OK, "{}", load.body);
    assert_eq!(load.body["image_id"], built.manifest.image_id.to_string());
    let docker = common::docker().await;
    let inspect = docker.inspect_image(&image).await.expect("loaded");
    assert_eq!(
        inspect.id.as_deref(),
        Some(built.manifest.image_id.to_string().as_str())
    );
    receiver.stop().await;
}

#[tokio::test]
async fn a_release_naming_a_layer_nobody_holds_or_sent_is_layers_missing_until_sent() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let v2 = V2::new(&receiver.base);
    let (image, mut cleanup) = cleaned_tag("missing");
    let tars = [
        layer_tar("base", 32 * 1024, 9),
        layer_tar("top", 16 * 1024, 10),
    ];
    let built = synthetic(&tars, Compression::Zstd, &[&image]).await;
    cleanup.remove_image(&built.manifest.image_id.to_string());
    registered(&v2, &built).await;
    let (top, top_blob) = built.blob(1);
    assert_eq!(
        v2.patch(&top, 0, top_blob).await.status,
        StatusCode::NO_CONTENT
    );
    let load = v2.load(built.manifest.release_id).await;
    assert_eq!(
        (load.status, load.code()),
        (StatusCode::CONFLICT, "LAYERS_MISSING")
    );
    assert_eq!(
        load.body["missing_diff_ids"],
        serde_json::json!([built.manifest.layers[0].diff_id])
    );
    let docker = common::docker().await;
    assert!(
        docker.inspect_image(&image).await.is_err(),
        "nothing tagged"
    );
    let (base, base_blob) = built.blob(0);
    assert_eq!(
        v2.patch(&base, 0, base_blob).await.status,
        StatusCode::NO_CONTENT
    );
    let load = v2.load(built.manifest.release_id).await;
    assert_eq!(load.status, StatusCode::OK, "{}", load.body);
    let inspect = docker.inspect_image(&image).await.expect("loaded");
    assert_eq!(
        inspect.id.as_deref(),
        Some(built.manifest.image_id.to_string().as_str())
    );
    receiver.stop().await;
}

#[tokio::test]
async fn a_load_whose_stream_carries_an_error_fails_and_tags_nothing() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let v2 = V2::new(&receiver.base);
    let (image, mut cleanup) = cleaned_tag("broken");
    // A "layer" that is not a tar: its diffID is honest, so it passes the blob checks, and
    // Docker's load fails on it (an `errorDetail` in the load stream).
    let mut garbage = vec![0u8; 10_000];
    blake3::Hasher::new()
        .update(b"garbage")
        .finalize_xof()
        .fill(&mut garbage);
    let built = synthetic(&[garbage], Compression::None, &[&image]).await;
    cleanup.remove_image(&built.manifest.image_id.to_string());
    registered(&v2, &built).await;
    let (blake3, blob) = built.blob(0);
    assert_eq!(
        v2.patch(&blake3, 0, blob).await.status,
        StatusCode::NO_CONTENT
    );
    let load = v2.load(built.manifest.release_id).await;
    assert_eq!(
        (load.status, load.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "LOAD_FAILED"),
        "{}",
        load.body
    );
    let docker = common::docker().await;
    assert!(
        docker.inspect_image(&image).await.is_err(),
        "nothing tagged"
    );
    receiver.stop().await;
}

/// Waits up to `within` for `task`; `None` if it is still running.
async fn finished_within<T>(
    task: &mut tokio::task::JoinHandle<T>,
    within: std::time::Duration,
) -> Option<T> {
    tokio::time::timeout(within, task)
        .await
        .ok()
        .map(|r| r.expect("task"))
}

/// Asks for `built`'s load with `?await_blobs=true` before any byte of blob `i` is sent, sends
/// its first half, and checks the load is still waiting; returns the load and that half's length.
async fn load_waiting_on_half_of(
    v2: &V2,
    built: &Built,
    i: usize,
) -> (tokio::task::JoinHandle<common::v2::Answer>, usize) {
    let id = built.manifest.release_id;
    let loader = V2::new(&v2.base);
    let mut load = tokio::spawn(async move { loader.load_awaiting(id).await });
    let (blake3, blob) = built.blob(i);
    let half = blob.len() / 2;
    assert_eq!(
        v2.patch(&blake3, 0, &blob[..half]).await.status,
        StatusCode::NO_CONTENT
    );
    assert!(
        finished_within(&mut load, std::time::Duration::from_millis(400))
            .await
            .is_none(),
        "the load waits for the rest of the blob"
    );
    (load, half)
}

#[tokio::test]
async fn an_awaited_load_reads_the_blobs_as_they_arrive() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let v2 = V2::new(&receiver.base);
    let (image, mut cleanup) = cleaned_tag("awaited");
    let tars = [
        layer_tar("base", 3 << 20, 21),
        layer_tar("top", 64 * 1024, 22),
    ];
    let built = synthetic(&tars, Compression::Zstd, &[&image]).await;
    cleanup.remove_image(&built.manifest.image_id.to_string());
    registered(&v2, &built).await;

    // The load is asked for before any byte of either blob was sent.
    let (mut load, half) = load_waiting_on_half_of(&v2, &built, 0).await;
    let (base, base_blob) = built.blob(0);
    assert_eq!(
        v2.patch(&base, half as u64, &base_blob[half..])
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    let (top, top_blob) = built.blob(1);
    assert_eq!(
        v2.patch(&top, 0, top_blob).await.status,
        StatusCode::NO_CONTENT
    );
    let answer = finished_within(&mut load, std::time::Duration::from_secs(60))
        .await
        .expect("the load ends once the last blob arrived");
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    // The base blob completed while the load was reading it: its PATCH took the load's check of
    // the content instead of decompressing the blob a second time. (The top blob may complete
    // before the load reaches it; then its PATCH checks it itself.)
    let (by_load, by_upload) = (
        blob_checks(&receiver.base, "load").await,
        blob_checks(&receiver.base, "upload").await,
    );
    assert!(by_load >= 1.0, "load {by_load}, upload {by_upload}");
    assert_eq!(by_load + by_upload, 2.0, "one check per blob");
    let docker = common::docker().await;
    let inspect = docker.inspect_image(&image).await.expect("loaded");
    assert_eq!(
        inspect.id.as_deref(),
        Some(built.manifest.image_id.to_string().as_str())
    );
    // Both blobs are in the engine now: their files go once their uploads are done with them.
    let blobs = receiver.state.layers().blobs();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (blobs.complete_path(&base).exists() || blobs.complete_path(&top).exists())
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!blobs.complete_path(&base).exists() && !blobs.complete_path(&top).exists());
    receiver.stop().await;
}

#[tokio::test]
async fn an_awaited_blob_that_is_not_the_signed_one_loads_nothing() {
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), |c| c.upload_idle_timeout_secs = 2).await;
    let v2 = V2::new(&receiver.base);
    let (image, mut cleanup) = cleaned_tag("awaited-bad");
    let built = synthetic(
        &[layer_tar("only", 2 << 20, 23)],
        Compression::Zstd,
        &[&image],
    )
    .await;
    cleanup.remove_image(&built.manifest.image_id.to_string());
    registered(&v2, &built).await;
    let id = built.manifest.release_id;
    // The load is following the blob when the bad bytes come.
    let (mut load, half) = load_waiting_on_half_of(&v2, &built, 0).await;
    let (blake3, blob) = built.blob(0);
    let mut tampered = blob[half..].to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x55;
    let answer = v2.patch(&blake3, half as u64, &tampered).await;
    assert_eq!(answer.code(), "CHECKSUM_MISMATCH", "{}", answer.body);
    let load = finished_within(&mut load, std::time::Duration::from_secs(30))
        .await
        .expect("the load fails once the blob is known to be bad");
    assert_eq!(
        (load.status, load.code()),
        (StatusCode::CONFLICT, "LAYERS_MISSING"),
        "the discarded blob is missing again: {}",
        load.body
    );
    assert_nothing_loaded(&image, &built).await;
    // Sent again, intact, it loads.
    assert_eq!(
        v2.patch(&blake3, 0, blob).await.status,
        StatusCode::NO_CONTENT
    );
    let load = v2.load(id).await;
    assert_eq!(load.status, StatusCode::OK, "{}", load.body);
    receiver.stop().await;
}

#[tokio::test]
async fn an_awaited_layer_that_is_not_its_diff_id_loads_nothing_and_its_patch_checks_it_itself() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let v2 = V2::new(&receiver.base);
    let (image, mut cleanup) = cleaned_tag("awaited-liar");
    // The signed blob entry names a blob (its BLAKE3 and size right) whose content is another
    // layer of the same size: only the diffID check can tell.
    let signed = layer_tar("signed", 2 << 20, 25);
    let other = layer_tar("other", 2 << 20, 26);
    assert_eq!(signed.len(), other.len());
    let mut built = synthetic(&[signed], Compression::Zstd, &[&image]).await;
    cleanup.remove_image(&built.manifest.image_id.to_string());
    let liar = common::v2::compress(&other, Compression::Zstd).await;
    let liar_blake3 = Checksum::of(&liar);
    built.manifest.layers[0].blob.blake3 = liar_blake3;
    built.manifest.layers[0].blob.size = liar.len() as u64;
    built.blobs.insert(liar_blake3, liar.clone());
    registered(&v2, &built).await;
    let (mut load, half) = load_waiting_on_half_of(&v2, &built, 0).await;
    let answer = v2.patch(&liar_blake3, half as u64, &liar[half..]).await;
    // The load's own check failed, so it gave no verdict: the PATCH decompressed the blob itself.
    assert_eq!(answer.code(), "CHECKSUM_MISMATCH", "{}", answer.body);
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("diffID"),
        "{}",
        answer.body
    );
    assert_eq!(blob_checks(&receiver.base, "load").await, 0.0);
    assert_eq!(
        v2.head(&liar_blake3).await.offset,
        Some(0),
        "discarded whole"
    );
    let load = finished_within(&mut load, std::time::Duration::from_secs(30))
        .await
        .expect("the load fails");
    assert_ne!(load.status, StatusCode::OK, "{}", load.body);
    assert_nothing_loaded(&image, &built).await;
    receiver.stop().await;
}

#[tokio::test]
async fn an_awaited_blob_that_never_comes_is_layers_missing_after_the_idle_timeout() {
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), |c| c.upload_idle_timeout_secs = 1).await;
    let v2 = V2::new(&receiver.base);
    let (image, mut cleanup) = cleaned_tag("awaited-never");
    let mut built = synthetic(
        &[layer_tar("only", 64 * 1024, 24)],
        Compression::Zstd,
        &[&image],
    )
    .await;
    cleanup.remove_image(&built.manifest.image_id.to_string());
    let mut spec = common::web_spec(&format!("awaited-never-{}", uuid::Uuid::new_v4().simple()));
    spec.image = Some(image.clone());
    built.manifest.deployment = Some(spec);
    registered(&v2, &built).await;
    for (what, path) in [
        (
            "load",
            deploy_protocol::release::paths::release_load(built.manifest.release_id),
        ),
        (
            "deploy",
            deploy_protocol::release::paths::release_deploy(built.manifest.release_id),
        ),
    ] {
        let started = std::time::Instant::now();
        let answer = v2
            .json(
                reqwest::Method::POST,
                &format!("{path}?await_blobs=true"),
                &serde_json::Value::Null,
            )
            .await;
        let waited = started.elapsed();
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::CONFLICT, "LAYERS_MISSING"),
            "{what}: {}",
            answer.body
        );
        assert_eq!(
            answer.body["missing_diff_ids"],
            serde_json::json!([built.manifest.layers[0].diff_id]),
            "{what}"
        );
        assert!(
            waited >= std::time::Duration::from_secs(1),
            "{what} waited for the blob: {waited:?}"
        );
    }
    let docker = common::docker().await;
    assert!(
        docker.inspect_image(&image).await.is_err(),
        "nothing tagged"
    );
    receiver.stop().await;
}
