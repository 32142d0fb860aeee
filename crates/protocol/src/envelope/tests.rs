//! Known-answer vectors (also published in docs/PROTOCOL.md; computed independently with Python's
//! `hmac` and `blake3`) and the refusal cases of verification.

use super::*;

const KEY: &[u8] = b"kat-secret-0123456789abcdef0123456789";
const TIMESTAMP: i64 = 1_761_393_600;
const NONCE: &str = "0123456789abcdefABCDEF_-";
const MANIFEST: &str = r#"{"package_id":"643f58f6-4f40-4ecf-921f-0001187a7fd6","package_checksum":"4aab45689d1790f080f90ec0c755e60ac5735fc47a667e149f0a6316434cdea4","package_size":43022336,"compression":"gzip"}"#;

fn ring() -> KeyRing {
    let mut ring = KeyRing::new();
    ring.insert("default", KEY);
    ring
}

fn upload_headers() -> SignatureHeaders {
    SignatureHeaders::sign(
        "default",
        KEY,
        "POST",
        "/deployment/upload",
        &Checksum::of(MANIFEST.as_bytes()),
        TIMESTAMP,
        NONCE.into(),
    )
}

#[test]
fn known_answer_upload() {
    let digest = Checksum::of(MANIFEST.as_bytes());
    assert_eq!(
        digest.to_hex(),
        "c6ba3ccf9f46a4a824113279c9ba77c1972ba32b96082253514dc0a53e6ed809"
    );
    let canonical = CanonicalRequest {
        method: "POST",
        path_and_query: "/deployment/upload",
        timestamp: TIMESTAMP,
        nonce: NONCE,
        key_id: "default",
        content_digest: &digest,
    };
    assert_eq!(
        canonical.to_canonical_string(),
        "DEPLOY-HMAC-SHA256\nPOST\n/deployment/upload\n1761393600\n0123456789abcdefABCDEF_-\ndefault\nc6ba3ccf9f46a4a824113279c9ba77c1972ba32b96082253514dc0a53e6ed809"
    );
    assert_eq!(
        canonical.sign(KEY),
        "da0d4c89bf46af33fde4f57876b40daaea6bc976fb992d4b9aab3ed74c29fb4e"
    );
}

#[test]
fn known_answer_empty_body_with_query() {
    let headers = SignatureHeaders::sign(
        "default",
        KEY,
        "GET",
        "/deployments?limit=10",
        &Checksum::empty(),
        TIMESTAMP,
        NONCE.into(),
    );
    assert_eq!(
        headers.signature,
        "b963811450b76d695998e3e12c27d7c9fcc7ff803a6faa526c556d4e00d2c50a"
    );
}

#[test]
fn verify_accepts_the_signed_request() {
    let h = upload_headers();
    assert_eq!(
        h.verify(
            &ring(),
            "POST",
            "/deployment/upload",
            &Checksum::of(MANIFEST.as_bytes()),
            TIMESTAMP,
            300
        ),
        Ok(())
    );
}

#[test]
fn verify_refuses_each_altered_field() {
    let h = upload_headers();
    let digest = Checksum::of(MANIFEST.as_bytes());
    let r = ring();
    assert_eq!(
        h.verify(&r, "PUT", "/deployment/upload", &digest, TIMESTAMP, 300),
        Err(AuthError::BadSignature)
    );
    assert_eq!(
        h.verify(&r, "POST", "/deployment/full", &digest, TIMESTAMP, 300),
        Err(AuthError::BadSignature)
    );
    assert_eq!(
        h.verify(
            &r,
            "POST",
            "/deployment/upload?x=1",
            &digest,
            TIMESTAMP,
            300
        ),
        Err(AuthError::BadSignature)
    );
    assert_eq!(
        h.verify(
            &r,
            "POST",
            "/deployment/upload",
            &Checksum::empty(),
            TIMESTAMP,
            300
        ),
        Err(AuthError::BadSignature)
    );
    let mut other = h.clone();
    other.nonce = "0123456789abcdefABCDEF_x".into();
    assert_eq!(
        other.verify(&r, "POST", "/deployment/upload", &digest, TIMESTAMP, 300),
        Err(AuthError::BadSignature)
    );
    let mut other = h.clone();
    other.timestamp += 1;
    assert_eq!(
        other.verify(&r, "POST", "/deployment/upload", &digest, TIMESTAMP, 300),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn verify_refuses_wrong_key_and_unknown_key_id() {
    let digest = Checksum::of(MANIFEST.as_bytes());
    let wrong = SignatureHeaders::sign(
        "default",
        b"another key",
        "POST",
        "/deployment/upload",
        &digest,
        TIMESTAMP,
        NONCE.into(),
    );
    assert_eq!(
        wrong.verify(
            &ring(),
            "POST",
            "/deployment/upload",
            &digest,
            TIMESTAMP,
            300
        ),
        Err(AuthError::BadSignature)
    );
    let unknown = SignatureHeaders::sign(
        "old",
        KEY,
        "POST",
        "/deployment/upload",
        &digest,
        TIMESTAMP,
        NONCE.into(),
    );
    assert_eq!(
        unknown.verify(
            &ring(),
            "POST",
            "/deployment/upload",
            &digest,
            TIMESTAMP,
            300
        ),
        Err(AuthError::UnknownKeyId("old".into()))
    );
}

#[test]
fn key_rotation_accepts_either_id() {
    let mut r = KeyRing::parse_list("old=first-secret, new=second=secret").expect("parses");
    assert_eq!(r.get("new"), Some(&b"second=secret"[..]));
    r.insert("default", KEY);
    let digest = Checksum::empty();
    for (id, key) in [
        ("old", &b"first-secret"[..]),
        ("new", &b"second=secret"[..]),
    ] {
        let h = SignatureHeaders::sign(
            id,
            key,
            "GET",
            "/deployments",
            &digest,
            TIMESTAMP,
            NONCE.into(),
        );
        assert_eq!(
            h.verify(&r, "GET", "/deployments", &digest, TIMESTAMP, 300),
            Ok(())
        );
    }
    assert!(KeyRing::parse_list("nokey").is_err());
    assert!(KeyRing::parse_list("a=").is_err());
    assert!(
        !format!("{r:?}").contains("secret"),
        "Debug must not print secrets"
    );
}

#[test]
fn skew_boundary_is_inclusive_at_max_and_refused_beyond() {
    let digest = Checksum::of(MANIFEST.as_bytes());
    let h = upload_headers();
    for now in [TIMESTAMP - 300, TIMESTAMP + 300] {
        assert_eq!(
            h.verify(&ring(), "POST", "/deployment/upload", &digest, now, 300),
            Ok(())
        );
    }
    for now in [TIMESTAMP - 301, TIMESTAMP + 301] {
        assert!(matches!(
            h.verify(&ring(), "POST", "/deployment/upload", &digest, now, 300),
            Err(AuthError::TimestampSkew { .. })
        ));
    }
}

#[test]
fn parse_checks_header_forms() {
    let good = upload_headers();
    let pairs = good.to_pairs();
    let lookup = |over: Option<(&'static str, &'static str)>| {
        let pairs = pairs.clone();
        move |name: &'static str| -> Option<String> {
            if let Some((n, v)) = over {
                if n == name {
                    return if v.is_empty() {
                        None
                    } else {
                        Some(v.to_owned())
                    };
                }
            }
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        }
    };
    let parse = |over| {
        let get = lookup(over);
        let owned: Vec<(&'static str, Option<String>)> = [
            HEADER_KEY_ID,
            HEADER_TIMESTAMP,
            HEADER_NONCE,
            HEADER_SIGNATURE,
        ]
        .iter()
        .map(|n| (*n, get(n)))
        .collect();
        SignatureHeaders::parse(|n| {
            owned
                .iter()
                .find(|(k, _)| *k == n)
                .and_then(|(_, v)| v.as_deref())
        })
    };
    assert_eq!(parse(None), Ok(good));
    assert_eq!(
        parse(Some((HEADER_NONCE, ""))),
        Err(AuthError::MissingHeader(HEADER_NONCE))
    );
    assert!(matches!(
        parse(Some((HEADER_NONCE, "short"))),
        Err(AuthError::InvalidHeader { .. })
    ));
    assert!(matches!(
        parse(Some((HEADER_NONCE, "0123456789abcdef!!"))),
        Err(AuthError::InvalidHeader { .. })
    ));
    assert!(matches!(
        parse(Some((HEADER_TIMESTAMP, "12.5"))),
        Err(AuthError::InvalidHeader { .. })
    ));
    assert!(matches!(
        parse(Some((
            HEADER_SIGNATURE,
            "DA0D4C89BF46AF33FDE4F57876B40DAAEA6BC976FB992D4B9AAB3ED74C29FB4E"
        ))),
        Err(AuthError::InvalidHeader { .. })
    ));
}

#[test]
fn nonce_form() {
    assert!(is_valid_nonce(&new_nonce()));
    assert!(is_valid_nonce(&"a".repeat(64)));
    assert!(!is_valid_nonce(&"a".repeat(65)));
    assert!(!is_valid_nonce(&"a".repeat(15)));
}
