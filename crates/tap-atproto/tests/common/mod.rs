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
