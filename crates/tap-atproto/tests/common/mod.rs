//! Shared helpers for interop tests: locate the vector directory and read vector files.
#![allow(dead_code)]

use std::path::PathBuf;

/// The interop vector directory: `$TAP_INTEROP_DIR`, else `<workspace>/../shared/interop`.
/// Returns `None` (after printing a skip line) when it is missing outside CI; panics when
/// it is missing under `CI=true`.
pub fn interop_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("TAP_INTEROP_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/interop"),
    };
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "interop vectors missing at {} (required under CI=true)",
            dir.display()
        );
    }
    println!("SKIP: interop vectors not found at {}", dir.display());
    None
}

/// Reads `rel` under the interop directory as a string.
pub fn read(dir: &std::path::Path, rel: &str) -> String {
    std::fs::read_to_string(dir.join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The vector lines of a syntax `.txt` file: every line that is neither empty nor a
/// `#` comment, kept byte for byte (leading/trailing whitespace is significant).
pub fn vector_lines(dir: &std::path::Path, rel: &str) -> Vec<String> {
    read(dir, rel)
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Parses a JSON vector file.
pub fn json(dir: &std::path::Path, rel: &str) -> serde_json::Value {
    serde_json::from_str(&read(dir, rel)).unwrap_or_else(|e| panic!("parsing {rel}: {e}"))
}

/// A deterministic K-256 key: the verifying `PublicKey` and a signer closure for
/// `tap_atproto::writer`.
pub fn k256_signer(seed: u8) -> (tap_atproto::PublicKey, impl Fn(&[u8]) -> Vec<u8>) {
    use k256::ecdsa::signature::Signer as _;
    let sk = k256::ecdsa::SigningKey::from_slice(&[seed.max(1); 32]).unwrap();
    let pk = tap_atproto::PublicKey::from_sec1(
        tap_atproto::crypto::KeyType::K256,
        sk.verifying_key().to_sec1_point(true).as_bytes(),
    )
    .unwrap();
    (pk, move |msg: &[u8]| {
        let sig: k256::ecdsa::Signature = sk.sign(msg);
        sig.to_bytes().to_vec()
    })
}

/// A small like record as DAG-CBOR; `n` makes it unique.
pub fn like_record(n: u64) -> Vec<u8> {
    tap_atproto::atjson::json_to_cbor(&serde_json::json!({
        "$type": "app.bsky.feed.like",
        "createdAt": format!("2024-01-01T00:00:{:02}.{:06}Z", n % 60, n),
        "subject": {
            "cid": "bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454",
            "uri": format!("at://did:plc:abc/app.bsky.feed.post/{n}")
        }
    }))
    .unwrap()
}

/// The MST path of the `n`-th like.
pub fn like_path(n: u64) -> String {
    format!(
        "app.bsky.feed.like/{}",
        tap_atproto::syntax::Tid::from_parts(1_700_000_000_000_000 + n * 1000, 0)
    )
}
