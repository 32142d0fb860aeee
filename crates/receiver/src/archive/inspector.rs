//! The incremental tar parser and the policy it applies entry by entry.

use std::collections::{HashMap, VecDeque};

use super::tar::*;
use super::*;

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
                    other => {
                        return Err(refused(format!(
                        "entry {name:?} has tar type {:?}, which a docker save archive never uses",
                        other as char
                    )))
                    }
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
                let may_be_omitted =
                    what == "layer" && self.policy.omitted_layers.iter().any(|o| o == name);
                if !may_be_omitted && !self.resolves_to_file(name) {
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
