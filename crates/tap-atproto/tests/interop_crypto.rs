//! Signature verification and did:key parsing against the interop `crypto/*.json` vectors,
//! plus cross-checks with keys and signatures minted by the pure-Rust k256/p256 crates.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly on broken fixtures"
)]
mod common;

use base64::Engine as _;
use tap_atproto::crypto::{KeyError, KeyType, PublicKey};

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(s.trim_end_matches('='))
        .unwrap()
}

#[test]
fn interop_crypto_signature_fixtures() {
    let Some(dir) = common::interop_dir() else {
        return;
    };
    let fixtures = common::json(&dir, "crypto/signature-fixtures.json");
    let mut checked = 0;
    for f in fixtures.as_array().unwrap() {
        let comment = f["comment"].as_str().unwrap();
        let msg = b64(f["messageBase64"].as_str().unwrap());
        let sig = b64(f["signatureBase64"].as_str().unwrap());
        let from_did = PublicKey::from_did_key(f["publicKeyDid"].as_str().unwrap()).unwrap();
        let from_legacy = PublicKey::from_verification_method(
            f["didDocSuite"].as_str().unwrap(),
            f["publicKeyMultibase"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(
            from_did, from_legacy,
            "{comment}: did:key and legacy multibase disagree"
        );
        let expected = f["validSignature"].as_bool().unwrap();
        for key in [&from_did, &from_legacy] {
            assert_eq!(key.verify(&msg, &sig).is_ok(), expected, "{comment}");
        }
        let tags: Vec<&str> = f["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        if tags.contains(&"high-s") {
            assert_eq!(
                from_did.verify(&msg, &sig),
                Err(KeyError::HighS),
                "{comment}"
            );
        }
        if tags.contains(&"der-encoded") {
            assert!(
                matches!(
                    from_did.verify(&msg, &sig),
                    Err(KeyError::BadSignatureLength(_))
                ),
                "{comment}"
            );
        }
        checked += 1;
    }
    println!("interop crypto signatures: {checked} vectors checked");
}

#[test]
fn interop_crypto_did_key_vectors() {
    let Some(dir) = common::interop_dir() else {
        return;
    };
    let mut checked = 0;
    for f in common::json(&dir, "crypto/w3c_didkey_K256.json")
        .as_array()
        .unwrap()
    {
        let sk_bytes = hex(f["privateKeyBytesHex"].as_str().unwrap());
        let sk = k256::ecdsa::SigningKey::from_slice(&sk_bytes).unwrap();
        let point = sk.verifying_key().to_sec1_point(true);
        let pk = PublicKey::from_sec1(KeyType::K256, point.as_bytes()).unwrap();
        let did = f["publicDidKey"].as_str().unwrap();
        assert_eq!(pk.to_did_key(), did);
        assert_eq!(PublicKey::from_did_key(did).unwrap(), pk);
        checked += 1;
    }
    for f in common::json(&dir, "crypto/w3c_didkey_P256.json")
        .as_array()
        .unwrap()
    {
        let (_, sk_bytes) =
            multibase::decode(format!("z{}", f["privateKeyBytesBase58"].as_str().unwrap()))
                .unwrap();
        let sk = p256::ecdsa::SigningKey::from_slice(&sk_bytes).unwrap();
        let point = sk.verifying_key().to_sec1_point(true);
        let pk = PublicKey::from_sec1(KeyType::P256, point.as_bytes()).unwrap();
        let did = f["publicDidKey"].as_str().unwrap();
        assert_eq!(pk.to_did_key(), did);
        assert_eq!(
            PublicKey::from_did_key(did).unwrap().key_type(),
            KeyType::P256
        );
        checked += 1;
    }
    println!("interop crypto did:key: {checked} vectors checked");
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn signatures_minted_by_k256_and_p256_verify_and_their_high_s_twins_do_not() {
    use k256::ecdsa::signature::Signer as _;
    let msg = b"atproto commit bytes";
    let k = k256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
    let kpk = PublicKey::from_sec1(
        KeyType::K256,
        k.verifying_key().to_sec1_point(true).as_bytes(),
    )
    .unwrap();
    let ksig: k256::ecdsa::Signature = k.sign(msg);
    kpk.verify(msg, &ksig.to_bytes()).unwrap();
    assert!(kpk.verify(b"other", &ksig.to_bytes()).is_err());
    assert_eq!(
        kpk.verify(msg, &high_s_twin(&ksig.to_bytes(), K256_N)),
        Err(KeyError::HighS)
    );

    let p = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
    let ppk = PublicKey::from_sec1(
        KeyType::P256,
        p.verifying_key().to_sec1_point(true).as_bytes(),
    )
    .unwrap();
    let psig: p256::ecdsa::Signature = p.sign(msg);
    let psig = psig.normalize_s();
    ppk.verify(msg, &psig.to_bytes()).unwrap();
    assert_eq!(
        ppk.verify(msg, &high_s_twin(&psig.to_bytes(), P256_N)),
        Err(KeyError::HighS)
    );
    // Uncompressed points parse to the same key.
    let unc = PublicKey::from_sec1(
        KeyType::P256,
        p.verifying_key().to_sec1_point(false).as_bytes(),
    )
    .unwrap();
    assert_eq!(unc, ppk);
}

const K256_N: [u8; 32] = [
    0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE,
    0xBA, 0xAE, 0xDC, 0xE6, 0xAF, 0x48, 0xA0, 0x3B, 0xBF, 0xD2, 0x5E, 0x8C, 0xD0, 0x36, 0x41, 0x41,
];
const P256_N: [u8; 32] = [
    0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    0xBC, 0xE6, 0xFA, 0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63, 0x25, 0x51,
];

/// (r, n - s): the same signature with the other S.
fn high_s_twin(sig: &[u8], n: [u8; 32]) -> Vec<u8> {
    let mut out = sig[..32].to_vec();
    let mut s = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(n[i]) - i16::from(sig[32 + i]) - borrow;
        borrow = if d < 0 {
            d += 256;
            1
        } else {
            0
        };
        s[i] = d as u8;
    }
    out.extend_from_slice(&s);
    out
}
