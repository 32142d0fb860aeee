//! The tar gate in front of `docker load`: arbitrary archive bytes, fed in arbitrary chunk sizes.
//! It must never panic, never forward more than it was given, forward a prefix of the input
//! (bytes are checked, not rewritten), and give the same verdict however the stream is chunked.
#![no_main]

use deploy_receiver::archive::{Gate, Policy};
use libfuzzer_sys::fuzz_target;

fn run(data: &[u8], chunk: usize) -> (Vec<u8>, bool) {
    let mut gate = Gate::new(Policy {
        allowed_tags: vec!["fuzz/app:v1".into(), "busybox:latest".into()],
        max_bytes: 8 << 20,
        omitted_layers: Vec::new(),
    });
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        match gate.push(piece) {
            Ok(b) => out.extend_from_slice(&b),
            Err(_) => return (out, false),
        }
    }
    match gate.finish() {
        Ok((rest, _)) => {
            out.extend_from_slice(&rest);
            (out, true)
        }
        Err(_) => (out, false),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, archive)) = data.split_first() else {
        return;
    };
    let chunk = 1 + (first as usize) * 37;
    let (out, ok) = run(archive, chunk);
    assert!(out.len() <= archive.len());
    assert_eq!(&archive[..out.len()], &out[..], "the gate rewrote bytes");
    let (_, ok_whole) = run(archive, archive.len().max(1));
    assert_eq!(ok, ok_whole, "verdict depends on chunking");
});
