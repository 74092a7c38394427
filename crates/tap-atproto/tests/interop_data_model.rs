//! DAG-CBOR ↔ atproto JSON against the interop `data-model/*.json` vectors.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly on broken fixtures"
)]
mod common;

use base64::Engine as _;
use tap_atproto::atjson::{json_to_cbor, record_to_json};
use tap_atproto::hash::cid_for_cbor;

#[test]
fn interop_data_model_fixtures_round_trip() {
    let Some(dir) = common::interop_dir() else {
        return;
    };
    let fixtures = common::json(&dir, "data-model/data-model-fixtures.json");
    let mut checked = 0;
    for f in fixtures.as_array().unwrap() {
        let cbor = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(f["cbor_base64"].as_str().unwrap())
            .unwrap();
        let mut out = Vec::new();
        record_to_json(&cbor, &mut out).unwrap();
        let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(got, f["json"], "CBOR → JSON");
        assert_eq!(json_to_cbor(&f["json"]).unwrap(), cbor, "JSON → CBOR");
        assert_eq!(cid_for_cbor(&cbor).to_string(), f["cid"].as_str().unwrap());
        checked += 1;
    }
    let valid = common::json(&dir, "data-model/data-model-valid.json");
    for v in valid.as_array().unwrap() {
        let cbor = json_to_cbor(&v["json"]).unwrap_or_else(|e| panic!("{}: {e}", v["note"]));
        let mut out = Vec::new();
        record_to_json(&cbor, &mut out).unwrap();
        checked += 1;
    }
    let invalid = common::json(&dir, "data-model/data-model-invalid.json");
    for v in invalid.as_array().unwrap() {
        assert!(json_to_cbor(&v["json"]).is_err(), "accepted: {}", v["note"]);
        checked += 1;
    }
    println!("interop data-model: {checked} vectors checked");
}

#[test]
fn interop_data_model_invalid_values_are_rejected_by_the_transcoder_too() {
    let Some(dir) = common::interop_dir() else {
        return;
    };
    // Encode the invalid JSON leniently (as a careless writer would) and check that the
    // CBOR → JSON direction refuses it as well, where the problem survives encoding.
    let invalid = common::json(&dir, "data-model/data-model-invalid.json");
    let mut checked = 0;
    for v in invalid.as_array().unwrap() {
        let Ok(cbor) = serde_ipld_dagcbor::to_vec(&v["json"]) else {
            continue;
        };
        let mut out = Vec::new();
        let note = v["note"].as_str().unwrap();
        let res = record_to_json(&cbor, &mut out);
        if note.contains("$type")
            || note.contains("blob")
            || note.contains("float")
            || note.contains("top-level")
        {
            assert!(res.is_err(), "transcoder accepted: {note}");
            checked += 1;
        }
    }
    println!("interop data-model (transcoder side): {checked} vectors checked");
}
