//! How both services show durations, ids and errors in records, messages and logs.

use std::time::Duration;

/// Whole milliseconds of `d`, saturating (the unit of every `*_ms` field).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The first 12 characters of a Docker id, without its `sha256:` prefix (as `docker ps` shows it).
pub fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    id.get(..12).unwrap_or(id)
}

/// The causes of an error joined by `: `, or the error itself when it has none. Callers name
/// what they were doing (`GET {url}: ...`), and an HTTP client's own top message only repeats
/// the URL, so it is left out.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    if causes.is_empty() {
        e.to_string()
    } else {
        causes.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_drop_the_digest_prefix() {
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
    }

    #[test]
    fn an_error_chain_names_every_source() {
        #[derive(Debug, thiserror::Error)]
        #[error("sending to http://x/ failed")]
        struct Outer(#[source] Middle);
        #[derive(Debug, thiserror::Error)]
        #[error("connect error")]
        struct Middle(#[source] std::io::Error);
        let e = Outer(Middle(std::io::Error::other("connection refused")));
        assert_eq!(error_chain(&e), "connect error: connection refused");
        assert_eq!(
            error_chain(&std::io::Error::other("disk full")),
            "disk full"
        );
        assert_eq!(millis(Duration::from_micros(2500)), 2);
    }
}
