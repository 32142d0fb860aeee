//! Unit tests of the gate: chunking, traversal, links, tags, bombs, truncation.

use super::tar::*;
use super::*;

const TAG: &str = "deploy/app:v1";

/// A raw ustar header block with a valid checksum.
fn header(name: &str, typeflag: u8, size: u64, link: &str) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..name.len()].copy_from_slice(name.as_bytes());
    b[100..107].copy_from_slice(b"0000644");
    b[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    b[136..147].copy_from_slice(b"00000000000");
    b[156] = typeflag;
    b[157..157 + link.len()].copy_from_slice(link.as_bytes());
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    set_checksum(&mut b);
    b
}

fn set_checksum(b: &mut [u8]) {
    b[148..156].copy_from_slice(b"        ");
    let sum: u32 = b.iter().map(|&c| u32::from(c)).sum();
    b[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
}

fn entry(out: &mut Vec<u8>, name: &str, typeflag: u8, data: &[u8], link: &str) {
    out.extend(header(name, typeflag, data.len() as u64, link));
    data_blocks(out, data);
}

fn data_blocks(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
}

fn pax(out: &mut Vec<u8>, records: &[(&str, &str)]) {
    let mut data = Vec::new();
    for (k, v) in records {
        let body = format!(" {k}={v}\n");
        let mut n = body.len() + 1;
        while format!("{n}{body}").len() != n {
            n += 1;
        }
        data.extend(format!("{n}{body}").bytes());
    }
    entry(out, "PaxHeader", b'x', &data, "");
}

/// A docker-save-shaped archive; `extra` adds entries before manifest.json.
fn archive(tags: &[&str], extra: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    entry(&mut out, "abc/", b'5', b"", "");
    entry(&mut out, "abc/layer.tar", b'0', &[7u8; 3000], "");
    entry(&mut out, "def/", b'5', b"", "");
    entry(&mut out, "def/layer.tar", b'2', b"", "../abc/layer.tar");
    entry(&mut out, "cfg.json", b'0', b"{}", "");
    extra(&mut out);
    let manifest = serde_json::json!([{"Config": "cfg.json", "RepoTags": tags, "Layers": ["abc/layer.tar", "def/layer.tar"]}]);
    entry(
        &mut out,
        "manifest.json",
        b'0',
        manifest.to_string().as_bytes(),
        "",
    );
    out.extend([0u8; 2 * BLOCK]);
    out
}

fn policy() -> Policy {
    Policy {
        allowed_tags: vec![TAG.into()],
        max_bytes: 1 << 30,
        omitted_layers: Vec::new(),
    }
}

/// Runs a whole archive through a gate in `chunk`-sized pieces: the forwarded bytes and
/// the verdict (with the poison appended on refusal).
fn run(
    bytes: &[u8],
    chunk: usize,
    policy: Policy,
) -> (Vec<u8>, Result<ArchiveSummary, ArchiveError>) {
    let mut gate = Gate::new(policy);
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk) {
        match gate.push(piece) {
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => {
                out.extend_from_slice(&gate.poison());
                return (out, Err(e));
            }
        }
    }
    match gate.finish() {
        Ok((rest, summary)) => {
            out.extend_from_slice(&rest);
            (out, Ok(summary))
        }
        Err(e) => {
            out.extend_from_slice(&gate.poison());
            (out, Err(e))
        }
    }
}

fn refusal(bytes: &[u8]) -> String {
    match run(bytes, 700, policy()).1 {
        Err(e) => e.to_string(),
        Ok(s) => panic!("accepted: {s:?}"),
    }
}

#[test]
fn a_docker_save_archive_passes_unchanged_whatever_the_chunking() {
    let bytes = archive(&[TAG], |_| {});
    for chunk in [1, 511, 512, 4096, 1 << 20] {
        let (out, verdict) = run(&bytes, chunk, policy());
        let summary = verdict.expect("accepted");
        assert_eq!(out, bytes, "chunk {chunk}");
        assert_eq!(summary.images[0].layers.len(), 2);
        assert_eq!(summary.bytes, bytes.len() as u64);
    }
}

#[test]
fn official_image_names_match_their_normalized_form() {
    let mut p = policy();
    p.allowed_tags = vec!["docker.io/library/busybox:1".into()];
    assert!(run(&archive(&["busybox:1"], |_| {}), 512, p).1.is_ok());
    assert_eq!(normalize_reference("a/b:1"), "docker.io/a/b:1");
    assert_eq!(
        normalize_reference("localhost:5000/b:1"),
        "localhost:5000/b:1"
    );
}

#[test]
fn undeclared_tags_are_refused_in_manifest_and_repositories() {
    assert!(refusal(&archive(&["other/app:v1"], |_| {}))
        .contains("not in the signed manifest's image_tags"));
    let repositories = archive(&[TAG], |out| {
        entry(
            out,
            "repositories",
            b'0',
            br#"{"evil/app":{"v9":"abc"}}"#,
            "",
        );
    });
    assert!(refusal(&repositories).contains("evil/app:v9"));
}

#[test]
fn traversal_is_refused_in_names_pax_paths_and_gnu_long_names() {
    let plain = archive(&[TAG], |out| entry(out, "x/../../evil", b'0', b"", ""));
    assert!(refusal(&plain).contains("`..`"));
    let by_pax = archive(&[TAG], |out| {
        pax(out, &[("path", "../evil")]);
        entry(out, "innocent", b'0', b"x", "");
    });
    assert!(refusal(&by_pax).contains("../evil"));
    let by_long_name = archive(&[TAG], |out| {
        entry(out, "././@LongLink", b'L', b"../../evil\0", "");
        entry(out, "innocent", b'0', b"x", "");
    });
    assert!(refusal(&by_long_name).contains("../../evil"));
    let absolute = archive(&[TAG], |out| entry(out, "/etc/evil", b'0', b"", ""));
    assert!(refusal(&absolute).contains("absolute"));
}

#[test]
fn links_must_stay_inside_and_not_pass_through_other_links() {
    let escape = archive(&[TAG], |out| {
        entry(out, "abc/l", b'2', b"", "../../etc/passwd")
    });
    assert!(refusal(&escape).contains("leads outside the archive"));
    let long_link = archive(&[TAG], |out| {
        entry(out, "././@LongLink", b'K', b"/etc/shadow\0", "");
        entry(out, "abc/l2", b'2', b"", "fine");
    });
    assert!(refusal(&long_link).contains("absolute"));
    let through = archive(&[TAG], |out| {
        entry(out, "up", b'2', b"", "abc");
        entry(out, "abc/deep/x", b'0', b"", "");
        entry(out, "sneaky", b'2', b"", "up/../..");
    });
    assert!(refusal(&through).contains("passes through another link"));
    let beneath = archive(&[TAG], |out| {
        entry(out, "dir", b'2', b"", "abc");
        entry(out, "dir/file", b'0', b"x", "");
    });
    assert!(refusal(&beneath).contains("beneath"));
    let hard_to_symlink = archive(&[TAG], |out| entry(out, "h", b'1', b"", "def/layer.tar"));
    assert!(refusal(&hard_to_symlink).contains("hard link"));
    let hard_ok = archive(&[TAG], |out| entry(out, "h", b'1', b"", "abc/layer.tar"));
    assert!(run(&hard_ok, 512, policy()).1.is_ok());
}

#[test]
fn devices_duplicates_and_missing_layers_are_refused() {
    assert!(
        refusal(&archive(&[TAG], |o| entry(o, "dev", b'3', b"", ""))).contains("character device")
    );
    assert!(refusal(&archive(&[TAG], |o| entry(o, "cfg.json", b'0', b"{}", ""))).contains("twice"));
    let mut missing = Vec::new();
    entry(&mut missing, "cfg.json", b'0', b"{}", "");
    let manifest = serde_json::json!([{"Config": "cfg.json", "RepoTags": [TAG], "Layers": ["nope/layer.tar"]}]);
    entry(
        &mut missing,
        "manifest.json",
        b'0',
        manifest.to_string().as_bytes(),
        "",
    );
    missing.extend([0u8; 2 * BLOCK]);
    assert!(refusal(&missing).contains("not in the archive"));
    let mut none = Vec::new();
    entry(&mut none, "x", b'0', b"1", "");
    none.extend([0u8; 2 * BLOCK]);
    assert!(refusal(&none).contains("no manifest.json"));
}

#[test]
fn sizes_follow_go_base256_pax_and_header_only_rules() {
    let bytes = archive(&[TAG], |out| {
        // base-256 size field
        let mut h = header("b256", b'0', 0, "");
        h[124..136].fill(0);
        h[124] = 0x80;
        h[134..136].copy_from_slice(&1000u16.to_be_bytes());
        set_checksum(&mut h);
        out.extend(h);
        data_blocks(out, &[1u8; 1000]);
        // pax size overrides the header's
        pax(out, &[("size", "1500")]);
        out.extend(header("paxsized", b'0', 0, ""));
        data_blocks(out, &[2u8; 1500]);
        // a directory's size field carries no data
        out.extend(header("sized-dir/", b'5', 4096, ""));
    });
    let (out, verdict) = run(&bytes, 333, policy());
    verdict.expect("in sync with Go's reader");
    assert_eq!(out, bytes);
}

#[test]
fn bombs_and_truncation_are_refused() {
    let bytes = archive(&[TAG], |_| {});
    let small = Policy {
        max_bytes: 2048,
        ..policy()
    };
    assert!(matches!(
        run(&bytes, 512, small).1,
        Err(ArchiveError::TooLarge { .. })
    ));
    let cut = &bytes[..bytes.len() - 2 * BLOCK];
    assert!(matches!(
        run(cut, 512, policy()).1,
        Err(ArchiveError::Corrupt(_))
    ));
    assert!(matches!(
        run(&bytes[..1000], 512, policy()).1,
        Err(ArchiveError::Corrupt(_))
    ));
    let mut bad = bytes.clone();
    bad[100] ^= 1;
    assert!(matches!(
        run(&bad, 512, policy()).1,
        Err(ArchiveError::Corrupt(_))
    ));
}

#[test]
fn a_refusal_ends_the_stream_where_go_must_fail() {
    // At a header position: the poison block, which is not a valid header.
    let at_header = archive(&[TAG], |out| {
        for i in 0..100 {
            entry(out, &format!("pad-{i}"), b'0', b"", "");
        }
        entry(out, "fifo", b'6', b"", "");
    });
    let (out, verdict) = run(&at_header, 4096, policy());
    assert!(verdict.is_err());
    assert_eq!(out.len() % BLOCK, 0);
    assert_eq!(&out[out.len() - BLOCK..], &invalid_header()[..]);
    assert!(parse_header(&invalid_header()).is_err());
    assert_eq!(&out[..out.len() - BLOCK], &at_header[..out.len() - BLOCK]);
    // Inside an entry's data: nothing more, the entry is short.
    let in_data = archive(&[TAG], |out| {
        entry(out, "big", b'0', &[9u8; 64 * 1024], "");
        entry(out, "fifo", b'6', b"", "");
    });
    let (out, verdict) = run(&in_data, 64 * 1024, policy());
    assert!(verdict.is_err());
    assert_eq!(&out[..], &in_data[..out.len()]);
    assert!(out.len() + HOLD_BACK <= in_data.len());
    // The end-of-archive marker never leaves before the end checks.
    let bytes = archive(&[TAG], |out| entry(out, "big", b'0', &[9u8; 64 * 1024], ""));
    let mut gate = Gate::new(policy());
    let forwarded = gate.push(&bytes).expect("no refusal before the end");
    assert!(forwarded.len() + HOLD_BACK <= bytes.len());
    let (rest, _) = gate.finish().expect("accepted");
    assert_eq!([forwarded, rest].concat(), bytes);
}
