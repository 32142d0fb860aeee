//! Known-answer vectors (also published in docs/PROTOCOL.md; computed independently with Python's
//! `hmac` and `blake3`) and the refusal cases of verification.

use super::*;

const KEY: &[u8] = b"kat-secret-0123456789abcdef0123456789";
const TIMESTAMP: i64 = 1_761_393_600;
const NONCE: &str = "0123456789abcdefABCDEF_-";
const AUTHORITY: &str = "192.168.86.200:8001";
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
        Some(AUTHORITY),
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
        authority: Some(AUTHORITY),
        path_and_query: "/deployment/upload",
        timestamp: TIMESTAMP,
        nonce: NONCE,
        key_id: "default",
        content_digest: &digest,
    };
    assert_eq!(
        canonical.to_canonical_string(),
        "DEPLOY-HMAC-SHA256\nPOST\n192.168.86.200:8001\n/deployment/upload\n1761393600\n0123456789abcdefABCDEF_-\ndefault\nc6ba3ccf9f46a4a824113279c9ba77c1972ba32b96082253514dc0a53e6ed809"
    );
    assert_eq!(
        canonical.sign(KEY),
        "85cb8f0016122097c5f29e9799bff6d0555203fe55e7226b0a0257eaff0946ab"
    );
    // The same request for another receiver is another signature.
    let other = CanonicalRequest {
        authority: Some("192.168.86.201:8001"),
        ..canonical
    };
    assert_eq!(
        other.sign(KEY),
        "555a2dfa8c6fb9b901a93b087e27a4f2c2de0f17e2f443defad4765ec31ba5c0"
    );
    let v6 = CanonicalRequest {
        authority: Some("[::1]:8001"),
        ..canonical
    };
    assert_eq!(
        v6.sign(KEY),
        "121d75b78ef00dbdd0edaf5ed2e7a945f3a64afee144f2288c9989150f178ac6"
    );
}

#[test]
fn known_answer_empty_body_with_query() {
    let headers = SignatureHeaders::sign(
        "default",
        KEY,
        Some("Deploy.Example.COM"),
        "GET",
        "/deployments?limit=10",
        &Checksum::empty(),
        TIMESTAMP,
        NONCE.into(),
    );
    assert_eq!(
        headers.signature,
        "0ad0f0c9a5f3ac43004bb8dd74e6e375c510b448fb22ad10ff5bdbfb09269dcd"
    );
}

#[test]
fn known_answers_of_the_unbound_form() {
    let upload = SignatureHeaders::sign(
        "default",
        KEY,
        None,
        "POST",
        "/deployment/upload",
        &Checksum::of(MANIFEST.as_bytes()),
        TIMESTAMP,
        NONCE.into(),
    );
    assert_eq!(
        upload.signature,
        "da0d4c89bf46af33fde4f57876b40daaea6bc976fb992d4b9aab3ed74c29fb4e"
    );
    let list = SignatureHeaders::sign(
        "default",
        KEY,
        None,
        "GET",
        "/deployments?limit=10",
        &Checksum::empty(),
        TIMESTAMP,
        NONCE.into(),
    );
    assert_eq!(
        list.signature,
        "b963811450b76d695998e3e12c27d7c9fcc7ff803a6faa526c556d4e00d2c50a"
    );
}

#[test]
fn a_signature_is_bound_to_its_authority() {
    let h = upload_headers();
    let digest = Checksum::of(MANIFEST.as_bytes());
    let verify = |authority| {
        h.verify(
            &ring(),
            authority,
            "POST",
            "/deployment/upload",
            &digest,
            TIMESTAMP,
            300,
        )
    };
    assert_eq!(verify(Some(AUTHORITY)), Ok(()));
    assert_eq!(
        verify(Some("192.168.86.200:8002")),
        Err(AuthError::BadSignature)
    );
    assert_eq!(
        verify(Some("192.168.86.201:8001")),
        Err(AuthError::BadSignature)
    );
    assert_eq!(verify(Some("192.168.86.200")), Err(AuthError::BadSignature));
    assert_eq!(verify(None), Err(AuthError::BadSignature));
}

#[test]
fn authority_forms() {
    for good in [
        "a",
        "deploy.example.com",
        "10.0.0.1:8001",
        "[::1]:8001",
        "[fe80::1]",
        "h_1:65535",
    ] {
        assert!(is_valid_authority(good), "{good}");
    }
    for bad in [
        "", ":8001", "a:", "a:0", "a:65536", "a:+1", "a:80:80", "u@h", "h/x", "h h", "::1", "[::1",
        "[x]:1", "[::1]x", "h\t", "h:008001",
    ] {
        assert!(!is_valid_authority(bad), "{bad}");
    }
}

#[test]
fn timestamps_are_canonical() {
    for good in ["0", "1", "1761393600"] {
        assert!(is_canonical_timestamp(good), "{good}");
    }
    for bad in [
        "",
        "+1761393600",
        "01761393600",
        "-5",
        " 1",
        "1761393600 ",
        "1e9",
        "0x10",
        "1_000",
    ] {
        assert!(!is_canonical_timestamp(bad), "{bad}");
    }
}

#[test]
fn verify_accepts_the_signed_request() {
    let h = upload_headers();
    assert_eq!(
        h.verify(
            &ring(),
            Some(AUTHORITY),
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
        h.verify(
            &r,
            Some(AUTHORITY),
            "PUT",
            "/deployment/upload",
            &digest,
            TIMESTAMP,
            300
        ),
        Err(AuthError::BadSignature)
    );
    assert_eq!(
        h.verify(
            &r,
            Some(AUTHORITY),
            "POST",
            "/deployment/full",
            &digest,
            TIMESTAMP,
            300
        ),
        Err(AuthError::BadSignature)
    );
    assert_eq!(
        h.verify(
            &r,
            Some(AUTHORITY),
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
            Some(AUTHORITY),
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
        other.verify(
            &r,
            Some(AUTHORITY),
            "POST",
            "/deployment/upload",
            &digest,
            TIMESTAMP,
            300
        ),
        Err(AuthError::BadSignature)
    );
    let mut other = h.clone();
    other.timestamp += 1;
    assert_eq!(
        other.verify(
            &r,
            Some(AUTHORITY),
            "POST",
            "/deployment/upload",
            &digest,
            TIMESTAMP,
            300
        ),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn verify_refuses_wrong_key_and_unknown_key_id() {
    let digest = Checksum::of(MANIFEST.as_bytes());
    let wrong = SignatureHeaders::sign(
        "default",
        b"another key",
        Some(AUTHORITY),
        "POST",
        "/deployment/upload",
        &digest,
        TIMESTAMP,
        NONCE.into(),
    );
    assert_eq!(
        wrong.verify(
            &ring(),
            Some(AUTHORITY),
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
        Some(AUTHORITY),
        "POST",
        "/deployment/upload",
        &digest,
        TIMESTAMP,
        NONCE.into(),
    );
    assert_eq!(
        unknown.verify(
            &ring(),
            Some(AUTHORITY),
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
            Some(AUTHORITY),
            "GET",
            "/deployments",
            &digest,
            TIMESTAMP,
            NONCE.into(),
        );
        assert_eq!(
            h.verify(
                &r,
                Some(AUTHORITY),
                "GET",
                "/deployments",
                &digest,
                TIMESTAMP,
                300
            ),
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
            h.verify(
                &ring(),
                Some(AUTHORITY),
                "POST",
                "/deployment/upload",
                &digest,
                now,
                300
            ),
            Ok(())
        );
    }
    for now in [TIMESTAMP - 301, TIMESTAMP + 301] {
        assert!(matches!(
            h.verify(
                &ring(),
                Some(AUTHORITY),
                "POST",
                "/deployment/upload",
                &digest,
                now,
                300
            ),
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
    for ts in ["12.5", "+1761393600", "01761393600", "-1"] {
        assert!(matches!(
            parse(Some((HEADER_TIMESTAMP, ts))),
            Err(AuthError::InvalidHeader { .. })
        ));
    }
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
