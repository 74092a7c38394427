//! Syntax validators against the interop `syntax/*.txt` vectors.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly on broken fixtures"
)]
mod common;

use tap_atproto::syntax::{
    AtIdentifier, AtUri, Datetime, Did, Handle, Nsid, RecordKey, Tid, validate_cid_string,
};

type Check = fn(&str) -> bool;

#[test]
fn interop_syntax_vectors_accept_valid_and_reject_invalid() {
    let Some(dir) = common::interop_dir() else {
        return;
    };
    let cases: &[(&str, Check, &[&str], &[&str])] = &[
        (
            "DID",
            |s| Did::new(s).is_ok(),
            &["did_syntax_valid.txt"],
            &["did_syntax_invalid.txt"],
        ),
        (
            "handle",
            |s| Handle::new(s).is_ok(),
            &["handle_syntax_valid.txt"],
            &["handle_syntax_invalid.txt"],
        ),
        (
            "NSID",
            |s| Nsid::new(s).is_ok(),
            &["nsid_syntax_valid.txt"],
            &["nsid_syntax_invalid.txt"],
        ),
        (
            "record key",
            |s| RecordKey::new(s).is_ok(),
            &["recordkey_syntax_valid.txt"],
            &["recordkey_syntax_invalid.txt"],
        ),
        (
            "TID",
            |s| Tid::new(s).is_ok(),
            &["tid_syntax_valid.txt"],
            &["tid_syntax_invalid.txt"],
        ),
        (
            "AT-URI",
            |s| AtUri::new(s).is_ok(),
            &["aturi_syntax_valid.txt"],
            &["aturi_syntax_invalid.txt"],
        ),
        (
            "AT identifier",
            |s| s.parse::<AtIdentifier>().is_ok(),
            &["atidentifier_syntax_valid.txt"],
            &["atidentifier_syntax_invalid.txt"],
        ),
        (
            "CID",
            |s| validate_cid_string(s).is_ok(),
            &["cid_syntax_valid.txt"],
            &["cid_syntax_invalid.txt"],
        ),
        (
            "datetime",
            |s| Datetime::new(s).is_ok(),
            &["datetime_syntax_valid.txt"],
            &["datetime_syntax_invalid.txt", "datetime_parse_invalid.txt"],
        ),
    ];
    let mut checked = 0usize;
    let mut failures = Vec::new();
    for (kind, check, valid, invalid) in cases {
        for f in *valid {
            for line in common::vector_lines(&dir, &format!("syntax/{f}")) {
                checked += 1;
                if !check(&line) {
                    failures.push(format!("{kind}: valid rejected: {:?}", truncate(&line)));
                }
            }
        }
        for f in *invalid {
            for line in common::vector_lines(&dir, &format!("syntax/{f}")) {
                checked += 1;
                if check(&line) {
                    failures.push(format!("{kind}: invalid accepted: {:?}", truncate(&line)));
                }
            }
        }
    }
    println!("interop syntax: {checked} vectors checked");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}
