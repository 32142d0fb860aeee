//! A streaming gate for `docker save` archives on their way into `docker load`: one pass parses
//! the tar stream as Go's `archive/tar` (Docker's reader) would, refuses what a package must not
//! carry, and holds back the archive's tail until the end-of-archive checks have passed.
//!
//! Docker extracts the whole upload to a temp dir before it reads `manifest.json`, and fails the
//! load on a malformed tar. So bytes flow on as they are checked, but the tail (always including
//! the end-of-archive marker) is kept back; on a refusal the gate ends the stream where Go's reader
//! must fail: with a block that is not a valid header (bad checksum) when the reader expects a
//! header, or with nothing when it is inside an entry's data (a short entry is an error too).
//! Ending cleanly at a header boundary would look like a complete archive to Go, so it never does.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// Tar block size.
const BLOCK: usize = 512;
/// Bytes always held back behind the parse position.
pub const HOLD_BACK: usize = 10 * 1024;
/// Largest pax, GNU long-name, `manifest.json` or `repositories` entry read into memory
/// (Go's `archive/tar` refuses special files over 1 MiB too).
const MAX_CAPTURE: u64 = 1 << 20;
/// Entries an archive may hold (a `docker save` archive holds about four per layer).
const MAX_ENTRIES: usize = 100_000;
/// Total bytes of entry names kept for the end-of-archive checks.
const MAX_NAME_BYTES: usize = 16 << 20;
/// Longest entry path.
const MAX_PATH: usize = 4096;

/// Why an archive was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    /// The archive carries something a package may not (traversal, foreign tag, device...).
    #[error("{0}")]
    Refused(String),
    /// Not a readable tar stream (corrupt, truncated, not decompressible).
    #[error("corrupt archive: {0}")]
    Corrupt(String),
    /// It unpacks to more than the limit: a possible decompression bomb.
    #[error("archive unpacks to more than {limit} bytes (MAX_IMAGE_SIZE): refused as a possible decompression bomb")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
}

/// What an archive may contain.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The only tags `manifest.json` may set (the signed manifest's `image_tags`).
    pub allowed_tags: Vec<String>,
    /// Most bytes the decompressed archive may have.
    pub max_bytes: u64,
}

/// One image listed in the archive's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageEntry {
    /// Path of the image config, `<hex>.json`.
    pub config: String,
    /// Tags the load sets.
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    /// Paths of the layer tars, bottom first.
    pub layers: Vec<String>,
}

/// A checked archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSummary {
    /// The images in `manifest.json`.
    pub images: Vec<ImageEntry>,
    /// Decompressed bytes read.
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink(String),
    HardLink(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    Pax { global: bool },
    LongName,
    LongLink,
    Manifest,
    Repositories,
}

#[derive(Debug)]
enum State {
    /// Expecting a header block (or the first end-of-archive block).
    Header,
    /// One zero block read: expecting the second, or the end of the stream.
    ZeroSeen,
    /// Inside an entry's data and padding.
    Data {
        remaining: u64,
        padding: u64,
        capture: Option<(Capture, Vec<u8>)>,
        name: String,
    },
    /// After the end-of-archive marker.
    End,
}

/// Header fields that pax and GNU long-name entries set for the next entry.
#[derive(Debug, Default)]
struct Pending {
    pax: Vec<(String, String)>,
    long_name: Option<String>,
    long_link: Option<String>,
}

/// The incremental tar parser and policy check.
#[derive(Debug)]
pub struct Inspector {
    policy: Policy,
    allowed: Vec<String>,
    state: State,
    block: Vec<u8>,
    /// Decompressed bytes seen (including any after the end marker).
    total: u64,
    /// Archive bytes parsed (up to the end marker).
    offset: u64,
    /// Offsets at which Go's reader reads a header block, not yet released.
    header_offsets: VecDeque<u64>,
    /// Where the end-of-archive marker starts, once seen.
    end_at: Option<u64>,
    pending: Pending,
    entries: HashMap<String, Kind>,
    name_bytes: usize,
    images: Option<Vec<ImageEntry>>,
}

impl Inspector {
    /// A parser at the start of an archive.
    pub fn new(policy: Policy) -> Self {
        let allowed = policy
            .allowed_tags
            .iter()
            .map(|t| normalize_reference(t))
            .collect();
        Self {
            policy,
            allowed,
            state: State::Header,
            block: Vec::with_capacity(BLOCK),
            total: 0,
            offset: 0,
            header_offsets: VecDeque::from([0]),
            end_at: None,
            pending: Pending::default(),
            entries: HashMap::new(),
            name_bytes: 0,
            images: None,
        }
    }

    /// Parses `data`; returns how many of its bytes belong to the archive (bytes after the
    /// end-of-archive marker are not forwarded: Docker's reader stops there).
    pub fn feed(&mut self, mut data: &[u8]) -> Result<usize, ArchiveError> {
        self.total = self.total.saturating_add(data.len() as u64);
        if self.total > self.policy.max_bytes {
            return Err(ArchiveError::TooLarge {
                limit: self.policy.max_bytes,
            });
        }
        let mut used = 0;
        while !data.is_empty() {
            let n = match &mut self.state {
                State::End => break,
                State::Header | State::ZeroSeen => {
                    let n = (BLOCK - self.block.len()).min(data.len());
                    self.block.extend_from_slice(&data[..n]);
                    if self.block.len() == BLOCK {
                        let block = std::mem::take(&mut self.block);
                        self.offset += BLOCK as u64;
                        self.on_block(&block)?;
                        self.block = block;
                        self.block.clear();
                    }
                    n
                }
                State::Data {
                    remaining,
                    padding,
                    capture,
                    ..
                } => {
                    let n = if *remaining > 0 {
                        let n = (*remaining).min(data.len() as u64) as usize;
                        if let Some((_, buf)) = capture {
                            buf.extend_from_slice(&data[..n]);
                        }
                        *remaining -= n as u64;
                        n
                    } else {
                        let n = (*padding).min(data.len() as u64) as usize;
                        *padding -= n as u64;
                        n
                    };
                    self.offset += n as u64;
                    let done = matches!(
                        &self.state,
                        State::Data {
                            remaining: 0,
                            padding: 0,
                            ..
                        }
                    );
                    if done {
                        self.end_data()?;
                    }
                    n
                }
            };
            used += n;
            data = &data[n..];
        }
        Ok(used)
    }

    /// The parse position, counting a partly read header block.
    fn position(&self) -> u64 {
        self.offset + self.block.len() as u64
    }

    /// How far bytes may be released: never the end-of-archive marker before the checks passed.
    pub fn release_limit(&self) -> u64 {
        self.end_at.unwrap_or_else(|| self.position())
    }

    /// Forgets header positions before `offset` (those bytes were forwarded).
    pub fn released(&mut self, offset: u64) {
        while self.header_offsets.front().is_some_and(|&o| o < offset) {
            self.header_offsets.pop_front();
        }
    }

    /// Whether Go's reader reads a header block at `offset`.
    pub fn is_header_position(&self, offset: u64) -> bool {
        self.header_offsets.contains(&offset)
    }

    fn expect_header(&mut self) {
        self.state = State::Header;
        self.header_offsets.push_back(self.offset);
    }

    fn on_block(&mut self, block: &[u8]) -> Result<(), ArchiveError> {
        let zero = block.iter().all(|&b| b == 0);
        if matches!(self.state, State::ZeroSeen) {
            if !zero {
                return Err(corrupt("a zero block followed by a non-zero block"));
            }
            self.state = State::End;
            return Ok(());
        }
        if zero {
            self.end_at = Some(self.offset - BLOCK as u64);
            self.state = State::ZeroSeen;
            self.header_offsets.push_back(self.offset);
            return Ok(());
        }
        let header = parse_header(block)?;
        self.on_header(header)
    }

    fn on_header(&mut self, h: RawHeader) -> Result<(), ArchiveError> {
        let (capture, size) = match h.typeflag {
            b'x' | b'g' => (
                Some(Capture::Pax {
                    global: h.typeflag == b'g',
                }),
                h.size,
            ),
            b'L' => (Some(Capture::LongName), h.size),
            b'K' => (Some(Capture::LongLink), h.size),
            _ => {
                let pending = std::mem::take(&mut self.pending);
                let mut name = h.name;
                let mut link = h.linkname;
                let mut size = h.size;
                for (k, v) in pending.pax {
                    if v.is_empty() {
                        continue;
                    }
                    match k.as_str() {
                        "path" => name = v,
                        "linkpath" => link = v,
                        "size" => {
                            size = v
                                .parse::<i64>()
                                .ok()
                                .filter(|s| *s >= 0)
                                .ok_or_else(|| corrupt("invalid pax size"))?
                                as u64;
                        }
                        _ => {}
                    }
                }
                if let Some(n) = pending.long_name {
                    name = n;
                }
                if let Some(l) = pending.long_link {
                    link = l;
                }
                let mut typeflag = h.typeflag;
                if typeflag == 0 {
                    typeflag = if name.ends_with('/') { b'5' } else { b'0' };
                }
                let (kind, size) = match typeflag {
                    b'0' => (Kind::File, size),
                    b'5' => (Kind::Dir, 0),
                    b'2' => (Kind::Symlink(link), 0),
                    b'1' => (Kind::HardLink(link), 0),
                    b'3' | b'4' | b'6' => {
                        let what = match typeflag {
                            b'3' => "a character device",
                            b'4' => "a block device",
                            _ => "a FIFO",
                        };
                        return Err(refused(format!("entry {name:?} is {what}")));
                    }
                    other => return Err(refused(format!(
                        "entry {name:?} has tar type {:?}, which a docker save archive never uses",
                        other as char
                    ))),
                };
                let path = self.add_entry(&name, kind.clone())?;
                let capture = match (path.as_str(), &kind) {
                    ("manifest.json", Kind::File) => Some(Capture::Manifest),
                    ("repositories", Kind::File) => Some(Capture::Repositories),
                    ("manifest.json" | "repositories", _) => {
                        return Err(refused(format!(
                            "{path} must be a regular file in a docker save archive"
                        )))
                    }
                    _ => None,
                };
                return self.start_data(capture, size, path);
            }
        };
        self.start_data(capture, size, String::new())
    }

    fn start_data(
        &mut self,
        capture: Option<Capture>,
        size: u64,
        name: String,
    ) -> Result<(), ArchiveError> {
        if capture.is_some() && size > MAX_CAPTURE {
            return Err(refused(format!(
                "{} entry of {size} bytes is larger than {MAX_CAPTURE} bytes",
                if name.is_empty() {
                    "a tar extension"
                } else {
                    &name
                }
            )));
        }
        if size == 0 {
            self.state = State::Data {
                remaining: 0,
                padding: 0,
                capture: capture.map(|c| (c, Vec::new())),
                name,
            };
            return self.end_data();
        }
        let padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        self.state = State::Data {
            remaining: size,
            padding,
            capture: capture.map(|c| (c, Vec::with_capacity(size as usize))),
            name,
        };
        Ok(())
    }

    fn end_data(&mut self) -> Result<(), ArchiveError> {
        let state = std::mem::replace(&mut self.state, State::Header);
        self.expect_header();
        let State::Data { capture, .. } = state else {
            return Ok(());
        };
        let Some((capture, buf)) = capture else {
            return Ok(());
        };
        match capture {
            Capture::Pax { global } => {
                let records = parse_pax(&buf)?;
                // Go returns a global header as an entry of its own and Docker ignores it;
                // it also drops what earlier extension headers had set.
                if global {
                    self.pending = Pending::default();
                } else {
                    self.pending.pax = records;
                }
            }
            Capture::LongName => self.pending.long_name = Some(c_string(&buf)),
            Capture::LongLink => self.pending.long_link = Some(c_string(&buf)),
            Capture::Manifest => self.check_manifest(&buf)?,
            Capture::Repositories => self.check_repositories(&buf)?,
        }
        Ok(())
    }

    fn add_entry(&mut self, raw: &str, kind: Kind) -> Result<String, ArchiveError> {
        let path = normalize_path(raw).map_err(|why| refused(format!("entry {raw:?}: {why}")))?;
        if path.is_empty() && kind != Kind::Dir {
            return Err(refused(format!("entry {raw:?} names the archive root")));
        }
        if path.is_empty() {
            return Ok(path);
        }
        if path.len() > MAX_PATH {
            return Err(refused(format!(
                "an entry path is longer than {MAX_PATH} bytes"
            )));
        }
        if self.entries.len() >= MAX_ENTRIES || self.name_bytes + path.len() > MAX_NAME_BYTES {
            return Err(refused(format!(
                "more than {MAX_ENTRIES} entries: not a docker save archive"
            )));
        }
        if self.entries.contains_key(&path) {
            return Err(refused(format!(
                "entry {path:?} appears twice (a later copy would replace the checked one)"
            )));
        }
        self.name_bytes += path.len();
        self.entries.insert(path.clone(), kind);
        Ok(path)
    }

    fn check_manifest(&mut self, bytes: &[u8]) -> Result<(), ArchiveError> {
        let images: Vec<ImageEntry> = serde_json::from_slice(bytes)
            .map_err(|e| refused(format!("manifest.json is not a docker save manifest: {e}")))?;
        if images.len() != 1 {
            return Err(refused(format!(
                "manifest.json lists {} images; a package carries exactly one",
                images.len()
            )));
        }
        for tag in images.iter().flat_map(|i| i.repo_tags.iter().flatten()) {
            self.check_tag(tag, "manifest.json")?;
        }
        self.images = Some(images);
        Ok(())
    }

    fn check_repositories(&self, bytes: &[u8]) -> Result<(), ArchiveError> {
        let repos: HashMap<String, HashMap<String, String>> = serde_json::from_slice(bytes)
            .map_err(|e| refused(format!("repositories file is malformed: {e}")))?;
        for (repo, tags) in &repos {
            for tag in tags.keys() {
                self.check_tag(&format!("{repo}:{tag}"), "repositories")?;
            }
        }
        Ok(())
    }

    fn check_tag(&self, tag: &str, file: &str) -> Result<(), ArchiveError> {
        if !deploy_protocol::manifest::is_valid_image_reference(tag) {
            return Err(refused(format!(
                "{file} sets tag {tag:?}, which is not a plain name:tag reference"
            )));
        }
        if !self.allowed.contains(&normalize_reference(tag)) {
            return Err(refused(format!(
                "{file} would tag the image {tag:?}, which is not in the signed manifest's image_tags {:?}",
                self.policy.allowed_tags
            )));
        }
        Ok(())
    }

    /// The end-of-archive checks, once the decompressed stream has ended.
    pub fn finish(&mut self) -> Result<ArchiveSummary, ArchiveError> {
        match &self.state {
            State::End => {}
            State::ZeroSeen if self.block.is_empty() => {}
            State::Header if self.block.is_empty() => {
                return Err(corrupt(
                    "the archive ends without its end-of-archive marker (truncated?)",
                ))
            }
            State::Data { name, .. } if !name.is_empty() => {
                return Err(corrupt(format!("the archive is truncated inside {name:?}")))
            }
            _ => return Err(corrupt("the archive is truncated")),
        }
        let images = self.images.clone().ok_or_else(|| {
            refused("no manifest.json: not a docker save archive (legacy archives are not loaded)")
        })?;
        for (path, kind) in &self.entries {
            self.check_ancestors(path)?;
            match kind {
                Kind::Symlink(target) => self.check_symlink(path, target)?,
                Kind::HardLink(target) => {
                    let t = normalize_path(target).map_err(|why| {
                        refused(format!("hard link {path:?} -> {target:?}: {why}"))
                    })?;
                    if self.entries.get(&t) != Some(&Kind::File) {
                        return Err(refused(format!(
                            "hard link {path:?} -> {target:?} does not point to a regular file in the archive"
                        )));
                    }
                }
                Kind::Dir | Kind::File => {}
            }
        }
        for image in &images {
            for (what, name) in std::iter::once(("config", &image.config))
                .chain(image.layers.iter().map(|l| ("layer", l)))
            {
                if !self.resolves_to_file(name) {
                    return Err(refused(format!(
                        "manifest.json names {what} {name:?}, which is not in the archive"
                    )));
                }
            }
        }
        Ok(ArchiveSummary {
            images,
            bytes: self.total,
        })
    }

    fn check_ancestors(&self, path: &str) -> Result<(), ArchiveError> {
        let mut prefix = path;
        while let Some((parent, _)) = prefix.rsplit_once('/') {
            match self.entries.get(parent) {
                None | Some(Kind::Dir) => {}
                Some(_) => {
                    return Err(refused(format!(
                        "entry {path:?} lies beneath {parent:?}, which is not a directory"
                    )))
                }
            }
            prefix = parent;
        }
        Ok(())
    }

    /// A symlink must resolve inside the root without passing through another link (whose own
    /// target would change where it leads); it may end at one (that one is checked too).
    fn check_symlink(&self, path: &str, target: &str) -> Result<(), ArchiveError> {
        let refuse = |why: &str| refused(format!("symlink {path:?} -> {target:?} {why}"));
        if target.is_empty() || target.starts_with('/') {
            return Err(refuse("is empty or absolute"));
        }
        let mut at: Vec<&str> = path.split('/').collect();
        at.pop();
        let parts: Vec<&str> = target.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            match *part {
                "" | "." => {}
                ".." => {
                    if at.pop().is_none() {
                        return Err(refuse("leads outside the archive"));
                    }
                }
                name => {
                    at.push(name);
                    let traversed = i + 1 < parts.len();
                    if traversed
                        && !matches!(self.entries.get(&at.join("/")), None | Some(Kind::Dir))
                    {
                        return Err(refuse("passes through another link or a file"));
                    }
                }
            }
        }
        Ok(())
    }

    fn resolves_to_file(&self, name: &str) -> bool {
        let Ok(mut path) = normalize_path(name) else {
            return false;
        };
        for _ in 0..8 {
            match self.entries.get(&path) {
                Some(Kind::File) => return true,
                Some(Kind::HardLink(t)) => match normalize_path(t) {
                    Ok(t) => path = t,
                    Err(_) => return false,
                },
                Some(Kind::Symlink(t)) => {
                    let base = path.rsplit_once('/').map_or("", |(p, _)| p);
                    match resolve_lexically(base, t) {
                        Some(t) => path = t,
                        None => return false,
                    }
                }
                _ => return false,
            }
        }
        false
    }
}

/// The gate: an [`Inspector`] and the bytes it holds back.
#[derive(Debug)]
pub struct Gate {
    inspector: Inspector,
    held: BytesMut,
    /// Archive offset of `held[0]`: everything before was forwarded.
    forwarded: u64,
}

impl Gate {
    /// A gate for one archive.
    pub fn new(policy: Policy) -> Self {
        Self {
            inspector: Inspector::new(policy),
            held: BytesMut::new(),
            forwarded: 0,
        }
    }

    /// Checks `chunk` and returns what may be forwarded now (whole blocks, never the last
    /// [`HOLD_BACK`] bytes nor the end-of-archive marker).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Bytes, ArchiveError> {
        let used = self.inspector.feed(chunk)?;
        self.held.extend_from_slice(&chunk[..used]);
        let end = self.forwarded + self.held.len() as u64;
        let limit = end
            .saturating_sub(HOLD_BACK as u64)
            .min(self.inspector.release_limit());
        let limit = limit - limit % BLOCK as u64;
        if limit <= self.forwarded {
            return Ok(Bytes::new());
        }
        let out = self
            .held
            .split_to((limit - self.forwarded) as usize)
            .freeze();
        self.forwarded = limit;
        self.inspector.released(limit);
        Ok(out)
    }

    /// At the end of the decompressed stream: the remaining bytes when every check passed.
    pub fn finish(&mut self) -> Result<(Bytes, ArchiveSummary), ArchiveError> {
        let summary = self.inspector.finish()?;
        self.forwarded += self.held.len() as u64;
        Ok((std::mem::take(&mut self.held).freeze(), summary))
    }

    /// After a refusal: the bytes that make Docker's tar reader fail at the forwarded position.
    pub fn poison(&self) -> Bytes {
        if self.inspector.is_header_position(self.forwarded) {
            invalid_header()
        } else {
            // Inside an entry's data (a block-aligned cut always leaves data bytes owing):
            // ending the stream here is an unexpected EOF for Go's reader.
            Bytes::new()
        }
    }
}

/// A 512-byte block that no tar reader takes for a header: non-zero, with a wrong checksum.
pub fn invalid_header() -> Bytes {
    let mut block = vec![0u8; BLOCK];
    block[..22].copy_from_slice(b"refused-by-deploy-recv");
    block[148..156].copy_from_slice(b"0000000\0");
    block[257..263].copy_from_slice(b"ustar\0");
    Bytes::from(block)
}

struct RawHeader {
    name: String,
    linkname: String,
    size: u64,
    typeflag: u8,
}

fn refused(message: impl Into<String>) -> ArchiveError {
    ArchiveError::Refused(message.into())
}

fn corrupt(message: impl Into<String>) -> ArchiveError {
    ArchiveError::Corrupt(message.into())
}

/// Bytes up to the first NUL, as Go's `parseString`.
fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Go's `parseNumeric`: base-256 when the top bit is set, else octal padded with spaces/NULs.
fn parse_numeric(field: &[u8]) -> Option<i64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let inv = if field[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &c) in field.iter().enumerate() {
            let mut c = c ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 > 0 {
                return None;
            }
            x = (x << 8) | u64::from(c);
        }
        if x >> 63 > 0 {
            return None;
        }
        return Some(if inv == 0xff { !(x as i64) } else { x as i64 });
    }
    let start = field.iter().position(|&b| b != b' ' && b != 0)?;
    let end = field.iter().rposition(|&b| b != b' ' && b != 0)? + 1;
    let trimmed = &field[start..end];
    let digits = &trimmed[..trimmed
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(trimmed.len())];
    let s = std::str::from_utf8(digits).ok()?;
    if s.is_empty() || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u64::from_str_radix(s, 8)
        .ok()
        .and_then(|v| i64::try_from(v).ok())
}

fn parse_numeric_or_zero(field: &[u8]) -> Option<i64> {
    if field.iter().all(|&b| b == b' ' || b == 0) {
        return Some(0);
    }
    parse_numeric(field)
}

/// Parses one header block the way Go's `archive/tar` does (format detection, prefix rules).
fn parse_header(b: &[u8]) -> Result<RawHeader, ArchiveError> {
    // Go reads the checksum as octal only.
    let stored = if b[148] & 0x80 == 0 {
        parse_numeric_or_zero(&b[148..156])
    } else {
        None
    };
    let (mut unsigned, mut signed) = (0i64, 0i64);
    for (i, &c) in b.iter().enumerate() {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned += i64::from(c);
        signed += i64::from(c as i8);
    }
    if stored.is_none_or(|s| s != unsigned && s != signed) {
        return Err(corrupt("a tar header has a wrong checksum"));
    }
    let size = parse_numeric_or_zero(&b[124..136])
        .filter(|s| *s >= 0)
        .ok_or_else(|| corrupt("a tar header has an invalid size"))? as u64;
    let mut name = c_string(&b[0..100]);
    let linkname = c_string(&b[157..257]);
    let typeflag = b[156];
    let magic = &b[257..263];
    let version = &b[263..265];
    let prefix = if magic == b"ustar\0" && &b[508..512] == b"tar\0" {
        c_string(&b[345..476])
    } else if magic == b"ustar\0" {
        c_string(&b[345..500])
    } else if magic == b"ustar " && version == b" \0" {
        // GNU: atime/ctime live where USTAR has its prefix; Go falls back to reading a prefix
        // when they do not parse (archives of pre-1.8 Go writers).
        let times_ok = parse_numeric_or_zero(&b[345..357]).is_some()
            && parse_numeric_or_zero(&b[357..369]).is_some();
        let p = c_string(&b[345..500]);
        if !times_ok && p.is_ascii() {
            p
        } else {
            String::new()
        }
    } else {
        String::new()
    };
    if !prefix.is_empty() {
        name = format!("{prefix}/{name}");
    }
    Ok(RawHeader {
        name,
        linkname,
        size,
        typeflag,
    })
}

/// Go's `parsePAX`: `"%d %s=%s\n"` records; later keys win.
fn parse_pax(buf: &[u8]) -> Result<Vec<(String, String)>, ArchiveError> {
    let bad = || corrupt("a pax extended header is malformed");
    let mut out: Vec<(String, String)> = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let n: i64 = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if n < 5 || n as usize > rest.len() || n as usize <= space + 1 {
            return Err(bad());
        }
        let record = &rest[space + 1..n as usize];
        let (body, nl) = record.split_at(record.len() - 1);
        if nl != b"\n" {
            return Err(bad());
        }
        let eq = body.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        let key = String::from_utf8_lossy(&body[..eq]).into_owned();
        let value = String::from_utf8_lossy(&body[eq + 1..]).into_owned();
        if key.is_empty() || key.contains('\0') || value.contains('\0') {
            return Err(bad());
        }
        if key.starts_with("GNU.sparse") {
            return Err(refused("sparse files are not allowed in a package"));
        }
        out.retain(|(k, _)| *k != key);
        out.push((key, value));
        rest = &rest[n as usize..];
    }
    Ok(out)
}

/// An entry path made relative and clean: refuses absolute paths and `..`.
fn normalize_path(raw: &str) -> Result<String, &'static str> {
    if raw.starts_with('/') {
        return Err("absolute path");
    }
    if raw.contains('\0') {
        return Err("NUL in path");
    }
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("path contains `..`"),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

fn resolve_lexically(base: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut at: Vec<&str> = base.split('/').filter(|p| !p.is_empty()).collect();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                at.pop()?;
            }
            p => at.push(p),
        }
    }
    Some(at.join("/"))
}

/// `name:tag` as Docker stores it: `docker.io/library/` added to official images and
/// `docker.io/` to other Docker Hub names.
pub fn normalize_reference(reference: &str) -> String {
    let (first, rest) = reference.split_once('/').unwrap_or(("", reference));
    let is_host =
        !first.is_empty() && (first.contains('.') || first.contains(':') || first == "localhost");
    match (first, is_host) {
        ("", _) => format!("docker.io/library/{rest}"),
        ("index.docker.io" | "docker.io", true) if !rest.contains('/') => {
            format!("docker.io/library/{rest}")
        }
        ("index.docker.io", true) => format!("docker.io/{rest}"),
        (_, true) => reference.to_owned(),
        (_, false) => format!("docker.io/{reference}"),
    }
}

#[cfg(test)]
mod tests {
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
            refusal(&archive(&[TAG], |o| entry(o, "dev", b'3', b"", "")))
                .contains("character device")
        );
        assert!(
            refusal(&archive(&[TAG], |o| entry(o, "cfg.json", b'0', b"{}", ""))).contains("twice")
        );
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
}
