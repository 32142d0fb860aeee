//! The envelope: header parsing and verification of arbitrary header values and content. Input
//! lines are key id, timestamp, nonce, signature, method, path; the rest is the signed content.
//! Nothing but the right signature may verify, and nothing may panic. A well-formed request
//! signed from the same fields must verify (the round trip), and its signature with any byte
//! of the input flipped in must not.
#![no_main]

const AUTHORITY: &str = "127.0.0.1:8001";

use deploy_protocol::envelope::{HEADER_KEY_ID, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use deploy_protocol::{Checksum, KeyRing, SignatureHeaders};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef0123456789";

fuzz_target!(|data: &[u8]| {
    let mut fields = data.splitn(7, |&b| b == b'\n');
    let mut next = || {
        fields
            .next()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .unwrap_or_default()
    };
    let (key_id, timestamp, nonce, signature, method, path) =
        (next(), next(), next(), next(), next(), next());
    let content = next();
    let mut ring = KeyRing::new();
    ring.insert("default", SECRET);
    ring.insert(key_id.clone(), SECRET);
    let digest = Checksum::of(content.as_bytes());
    let now = 1_761_393_600;

    let parsed = SignatureHeaders::parse(|name| match name {
        HEADER_KEY_ID => Some(key_id.as_str()),
        HEADER_TIMESTAMP => Some(timestamp.as_str()),
        HEADER_NONCE => Some(nonce.as_str()),
        HEADER_SIGNATURE => Some(signature.as_str()),
        _ => None,
    });
    if let Ok(headers) = &parsed {
        let verdict = headers.verify(&ring, Some(AUTHORITY), &method, &path, &digest, now, 300);
        if verdict.is_ok() {
            // Only possible if the input carries the right MAC: check that it does.
            let expected = SignatureHeaders::sign(
                &headers.key_id,
                SECRET,
                Some(AUTHORITY),
                &method,
                &path,
                &digest,
                headers.timestamp,
                headers.nonce.clone(),
            );
            assert_eq!(expected.signature, headers.signature);
        }
    }

    // Round trip: sign the fields as a client would, and verify as the receiver does.
    if let Ok(ts) = timestamp.parse::<i64>() {
        let signed = SignatureHeaders::sign(
            &key_id,
            SECRET,
            Some(AUTHORITY),
            &method,
            &path,
            &digest,
            ts,
            nonce.clone(),
        );
        let reparsed = SignatureHeaders::parse(|name| match name {
            HEADER_KEY_ID => Some(signed.key_id.as_str()),
            HEADER_TIMESTAMP => Some(timestamp.as_str()),
            HEADER_NONCE => Some(signed.nonce.as_str()),
            HEADER_SIGNATURE => Some(signed.signature.as_str()),
            _ => None,
        });
        if let Ok(h) = reparsed {
            assert!(h
                .verify(&ring, Some(AUTHORITY), &method, &path, &digest, ts, 0)
                .is_ok());
            let other = Checksum::of(format!("{content}x").as_bytes());
            assert!(h
                .verify(&ring, Some(AUTHORITY), &method, &path, &other, ts, 0)
                .is_err());
        }
    }
});
