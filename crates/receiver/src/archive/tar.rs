//! Tar header decoding as Go's `archive/tar` (Docker's reader) does it, and path and reference helpers.

use super::*;

pub(super) struct RawHeader {
    pub(super) name: String,
    pub(super) linkname: String,
    pub(super) size: u64,
    pub(super) typeflag: u8,
}

pub(super) fn refused(message: impl Into<String>) -> ArchiveError {
    ArchiveError::Refused(message.into())
}

pub(super) fn corrupt(message: impl Into<String>) -> ArchiveError {
    ArchiveError::Corrupt(message.into())
}

/// Bytes up to the first NUL, as Go's `parseString`.
pub(super) fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Go's `parseNumeric`: base-256 when the top bit is set, else octal padded with spaces/NULs.
pub(super) fn parse_numeric(field: &[u8]) -> Option<i64> {
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

pub(super) fn parse_numeric_or_zero(field: &[u8]) -> Option<i64> {
    if field.iter().all(|&b| b == b' ' || b == 0) {
        return Some(0);
    }
    parse_numeric(field)
}

/// Parses one header block the way Go's `archive/tar` does (format detection, prefix rules).
pub(super) fn parse_header(b: &[u8]) -> Result<RawHeader, ArchiveError> {
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
pub(super) fn parse_pax(buf: &[u8]) -> Result<Vec<(String, String)>, ArchiveError> {
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
pub(super) fn normalize_path(raw: &str) -> Result<String, &'static str> {
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

pub(super) fn resolve_lexically(base: &str, target: &str) -> Option<String> {
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
