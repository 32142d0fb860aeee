//! Property tests of the HMAC envelope: a request is signed, then every signed field (authority, method, path,
//! query, timestamp, nonce, key id, signed content) and every character of the signature is
//! changed, one at a time; the receiver's check (`SignatureHeaders::parse` then `verify`, exactly
//! as `deploy-receiver` runs them) must refuse every single mutation.
//!
//! The skew window is opened wide for these checks and a mutated key id is put in the key ring
//! with the same secret, so a mutation can only be caught by the MAC itself, never by the clock
//! or the key lookup: the test proves each field is *bound by the signature*.
//!
//! Figures: `cargo test -p deploy-protocol --test envelope_mutations -- --nocapture` prints how
//! many mutations were tried and how many were accepted (always 0).

use std::sync::atomic::{AtomicU64, Ordering};

use deploy_protocol::envelope::{HEADER_KEY_ID, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use deploy_protocol::{AuthError, Checksum, KeyRing, SignatureHeaders};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Everything a receiver sees of a signed request.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    authority: String,
    method: String,
    path: String,
    query: Option<String>,
    content: Vec<u8>,
    key_id: String,
    timestamp: String,
    nonce: String,
    signature: String,
}

impl Seen {
    fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// The receiver's check, as `deploy-receiver`'s `auth::authenticate` runs it.
fn check(seen: &Seen, secret: &[u8], now: i64) -> Result<(), AuthError> {
    let headers = SignatureHeaders::parse(|name| match name {
        HEADER_KEY_ID => Some(seen.key_id.as_str()),
        HEADER_TIMESTAMP => Some(seen.timestamp.as_str()),
        HEADER_NONCE => Some(seen.nonce.as_str()),
        HEADER_SIGNATURE => Some(seen.signature.as_str()),
        _ => None,
    })?;
    // Whatever key id arrives is known, with the right secret: only the MAC can refuse it.
    let mut ring = KeyRing::new();
    ring.insert(seen.key_id.clone(), secret.to_vec());
    headers.verify(
        &ring,
        Some(&seen.authority),
        &seen.method,
        &seen.path_and_query(),
        &Checksum::of(&seen.content),
        now,
        u64::MAX,
    )
}

#[derive(Debug, Clone)]
struct Case {
    secret: Vec<u8>,
    authority: String,
    method: String,
    path: String,
    query: Option<String>,
    content: Vec<u8>,
    key_id: String,
    timestamp: i64,
    nonce: String,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(any::<u8>(), 1..64),
        "[a-z0-9.-]{1,30}(:[1-9][0-9]{0,3})?",
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE"]),
        "/[a-z0-9/_.-]{0,40}",
        proptest::option::of("[a-z0-9=&_-]{1,24}"),
        proptest::collection::vec(any::<u8>(), 0..300),
        "[A-Za-z0-9._-]{1,40}",
        0i64..8_000_000_000i64,
        "[A-Za-z0-9_-]{16,64}",
    )
        .prop_map(
            |(secret, authority, method, path, query, content, key_id, timestamp, nonce)| Case {
                secret,
                authority,
                method: method.to_owned(),
                path,
                query,
                content,
                key_id,
                timestamp,
                nonce,
            },
        )
}

fn signed(case: &Case) -> Seen {
    let mut seen = Seen {
        authority: case.authority.clone(),
        method: case.method.clone(),
        path: case.path.clone(),
        query: case.query.clone(),
        content: case.content.clone(),
        key_id: case.key_id.clone(),
        timestamp: case.timestamp.to_string(),
        nonce: case.nonce.clone(),
        signature: String::new(),
    };
    seen.signature = SignatureHeaders::sign(
        &case.key_id,
        &case.secret,
        Some(&case.authority),
        &case.method,
        &seen.path_and_query(),
        &Checksum::of(&case.content),
        case.timestamp,
        case.nonce.clone(),
    )
    .signature;
    seen
}

/// A different character of the same class (`[A-Za-z0-9_.-]` stays in it), so form checks pass
/// and the mutation reaches the MAC.
fn other_char(c: char) -> char {
    match c {
        'a' => 'b',
        'Z' => 'Y',
        '9' => '0',
        '-' => '_',
        '_' => '-',
        '.' => '-',
        '/' => 'x',
        c if c.is_ascii_alphanumeric() => (c as u8 + 1) as char,
        _ => 'a',
    }
}

/// Each string with one character changed, one removed, one added.
fn string_mutations(s: &str, min_len: usize, max_len: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    for i in 0..chars.len() {
        let mut changed = chars.clone();
        changed[i] = other_char(chars[i]);
        out.push(changed.iter().collect());
        if chars.len() > min_len {
            let mut removed = chars.clone();
            removed.remove(i);
            out.push(removed.iter().collect());
        }
    }
    if chars.len() < max_len {
        out.push(format!("{s}a"));
        out.push(format!("a{s}"));
    }
    out.retain(|m| m != s);
    out
}

/// Every single-field mutation of `seen` (signature kept): (field, mutated request).
fn field_mutations(seen: &Seen) -> Vec<(&'static str, Seen)> {
    let mut out = Vec::new();
    let with = |f: &dyn Fn(&mut Seen)| {
        let mut m = seen.clone();
        f(&mut m);
        m
    };
    for method in [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "post", "POST ",
    ] {
        if method != seen.method {
            out.push(("method", with(&|m| m.method = method.into())));
        }
    }
    for authority in string_mutations(&seen.authority, 1, 255) {
        out.push(("authority", with(&|m| m.authority = authority.clone())));
    }
    for path in string_mutations(&seen.path, 1, 200) {
        out.push(("path", with(&|m| m.path = path.clone())));
    }
    match &seen.query {
        None => out.push(("query", with(&|m| m.query = Some("x=1".into())))),
        Some(q) => {
            out.push(("query", with(&|m| m.query = None)));
            out.push(("query", with(&|m| m.query = Some(String::new()))));
            for query in string_mutations(q, 1, 200) {
                out.push(("query", with(&|m| m.query = Some(query.clone()))));
            }
        }
    }
    let ts: i64 = seen.timestamp.parse().unwrap_or_default();
    for delta in [1i64, -1, 2, 60, -300, 301, 1 << 31, -(1 << 40)] {
        let t = ts.saturating_add(delta);
        out.push(("timestamp", with(&|m| m.timestamp = t.to_string())));
    }
    for nonce in string_mutations(&seen.nonce, 16, 64) {
        out.push(("nonce", with(&|m| m.nonce = nonce.clone())));
    }
    for key_id in string_mutations(&seen.key_id, 1, 128) {
        out.push(("key_id", with(&|m| m.key_id = key_id.clone())));
    }
    // The signed content (a JSON body, or the manifest part): one bit of every byte flipped,
    // then truncated, extended, emptied.
    for i in 0..seen.content.len() {
        out.push(("content", with(&|m| m.content[i] ^= 1 << (i % 8) as u8)));
    }
    if !seen.content.is_empty() {
        out.push((
            "content",
            with(&|m| {
                m.content.pop();
            }),
        ));
        out.push(("content", with(&|m| m.content.clear())));
    }
    out.push(("content", with(&|m| m.content.push(0))));
    out.push(("content", with(&|m| m.content.push(b'\n'))));
    out
}

/// Every signature with one hex character replaced by each of the 15 others, plus upper-cased
/// letters, truncated and extended forms.
fn signature_mutations(signature: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = signature.as_bytes();
    for i in 0..bytes.len() {
        for c in b"0123456789abcdef" {
            if *c != bytes[i] {
                let mut m = bytes.to_vec();
                m[i] = *c;
                out.push(String::from_utf8_lossy(&m).into_owned());
            }
        }
        if bytes[i].is_ascii_lowercase() {
            let mut m = bytes.to_vec();
            m[i] = bytes[i].to_ascii_uppercase();
            out.push(String::from_utf8_lossy(&m).into_owned());
        }
    }
    out.push(signature[..signature.len() - 1].to_owned());
    out.push(format!("{signature}0"));
    out.push(String::new());
    out
}

#[test]
fn no_single_mutation_of_a_signed_request_is_accepted() {
    let tried = AtomicU64::new(0);
    let refused_by_mac = AtomicU64::new(0);
    let signature_tried = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 256,
        // Deterministic per run is not needed; a failure prints its minimal case.
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&cases(), |case| {
        let seen = signed(&case);
        prop_assert_eq!(check(&seen, &case.secret, case.timestamp), Ok(()));
        for (field, mutated) in field_mutations(&seen) {
            tried.fetch_add(1, Ordering::Relaxed);
            let verdict = check(&mutated, &case.secret, case.timestamp);
            prop_assert!(verdict.is_err(), "{field} mutation accepted: {mutated:?}");
            if verdict == Err(AuthError::BadSignature) {
                refused_by_mac.fetch_add(1, Ordering::Relaxed);
            }
        }
        for signature in signature_mutations(&seen.signature) {
            tried.fetch_add(1, Ordering::Relaxed);
            signature_tried.fetch_add(1, Ordering::Relaxed);
            let mutated = Seen {
                signature: signature.clone(),
                ..seen.clone()
            };
            let verdict = check(&mutated, &case.secret, case.timestamp);
            prop_assert!(verdict.is_err(), "signature {signature:?} accepted");
            if verdict == Err(AuthError::BadSignature) {
                refused_by_mac.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The right request under another secret.
        tried.fetch_add(1, Ordering::Relaxed);
        let mut other = case.secret.clone();
        other[0] ^= 0x80;
        prop_assert_eq!(
            check(&seen, &other, case.timestamp),
            Err(AuthError::BadSignature)
        );
        refused_by_mac.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let tried = tried.load(Ordering::Relaxed);
    eprintln!(
        "envelope mutations: {tried} tried over 256 signed requests ({} of the signature, \
         {} refused by the MAC itself, the rest by header form checks), 0 accepted",
        signature_tried.load(Ordering::Relaxed),
        refused_by_mac.load(Ordering::Relaxed),
    );
    assert!(tried > 100_000, "only {tried} mutations tried");
}

#[test]
fn field_mutations_reach_the_mac_not_just_the_form_checks() {
    // A control for the test above: form-preserving mutations of each field are refused by the
    // signature, which is what shows the field is signed.
    let case = Case {
        secret: b"kat-secret-0123456789abcdef0123456789".to_vec(),
        authority: "192.168.86.200:8001".into(),
        method: "POST".into(),
        path: "/deployment/upload".into(),
        query: Some("limit=10".into()),
        content: br#"{"package_id":"643f58f6-4f40-4ecf-921f-0001187a7fd6"}"#.to_vec(),
        key_id: "default".into(),
        timestamp: 1_761_393_600,
        nonce: "0123456789abcdefABCDEF_-".into(),
    };
    let seen = signed(&case);
    let mut by_field = std::collections::BTreeMap::<&str, (u32, u32)>::new();
    for (field, mutated) in field_mutations(&seen) {
        let entry = by_field.entry(field).or_default();
        entry.0 += 1;
        if check(&mutated, &case.secret, case.timestamp) == Err(AuthError::BadSignature) {
            entry.1 += 1;
        }
    }
    for field in [
        "authority",
        "method",
        "path",
        "query",
        "timestamp",
        "nonce",
        "key_id",
        "content",
    ] {
        let (tried, by_mac) = by_field.get(field).copied().unwrap_or_default();
        assert!(tried > 0, "no {field} mutation");
        assert!(
            by_mac > 0,
            "no {field} mutation reached the MAC: {by_field:?}"
        );
    }
}
