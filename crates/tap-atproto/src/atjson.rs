//! The atproto data model between DAG-CBOR and JSON: a direct, allocation-free transcoder
//! from record bytes to atproto JSON (`{"$link"}`, `{"$bytes"}`, blobs as maps), and the
//! cold-path reverse (`serde_json::Value` → canonical DAG-CBOR) used by tests and builders.

use base64::Engine as _;
use cid::Cid;

use crate::cbor::{self, CborError, MAX_DEPTH, Reader, major};
use crate::hash;

/// Why a value is not valid atproto data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// Malformed or disallowed DAG-CBOR.
    #[error(transparent)]
    Cbor(#[from] CborError),
    /// A record (the top level) must be a map/object.
    #[error("top-level value is not a map")]
    NotAMap,
    /// Map keys must be strings, in canonical order, without duplicates.
    #[error("map keys not in canonical order or duplicated")]
    KeyOrder,
    /// `$type` must be a non-empty string.
    #[error("$type must be a non-empty string")]
    BadType,
    /// A `$type: "blob"` map lacks a link `ref`, string `mimeType` or integer `size`.
    #[error("malformed blob")]
    BadBlob,
    /// A `$link` object is malformed.
    #[error("malformed $link")]
    BadLink,
    /// A `$bytes` object is malformed.
    #[error("malformed $bytes")]
    BadBytes,
    /// Non-integral numbers are not part of the data model.
    #[error("floats are not allowed")]
    Float,
    /// Nested deeper than the limit.
    #[error("nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// An integer JSON consumers cannot hold exactly: beyond ±(2^53 − 1), which
    /// `@atproto/tap` 0.4 refuses (and then never acks the event).
    #[error("integer beyond the safe JSON range")]
    UnsafeInteger,
}

/// Largest integer magnitude JSON consumers hold exactly (JavaScript's safe integers).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Transcodes one DAG-CBOR record (a map) to atproto JSON, appending to `out`.
///
/// Links become `{"$link":"b…"}`, byte strings `{"$bytes":"…"}` (standard base64, no
/// padding), blobs stay maps (checked for `ref`/`mimeType`/`size`). On error `out` may hold
/// a partial value: truncate it to its previous length.
///
/// # Errors
/// [`DataError`] when the bytes are not a canonical atproto record.
pub fn record_to_json(cbor_bytes: &[u8], out: &mut Vec<u8>) -> Result<(), DataError> {
    let mut r = Reader::new(cbor_bytes);
    if r.peek()?.major != major::MAP {
        return Err(DataError::NotAMap);
    }
    out.reserve(cbor_bytes.len() * 3 / 2 + 16);
    value_to_json(&mut r, out, 0)?;
    r.finish()?;
    Ok(())
}

/// Transcodes any single DAG-CBOR data-model value to JSON (not only maps).
///
/// # Errors
/// As [`record_to_json`].
pub fn value_to_json(r: &mut Reader<'_>, out: &mut Vec<u8>, depth: usize) -> Result<(), DataError> {
    if depth > MAX_DEPTH {
        return Err(DataError::TooDeep);
    }
    let h = r.head()?;
    match h.major {
        major::UINT if h.arg > MAX_SAFE_INTEGER => return Err(DataError::UnsafeInteger),
        major::UINT => push_u64(out, h.arg, false),
        // A negative integer is -1 - arg.
        major::NINT if h.arg >= MAX_SAFE_INTEGER => return Err(DataError::UnsafeInteger),
        major::NINT => push_u64(out, h.arg + 1, true),
        major::BYTES => {
            let b = r.take(h.arg)?;
            out.extend_from_slice(b"{\"$bytes\":\"");
            push_base64(out, b);
            out.extend_from_slice(b"\"}");
        }
        major::TEXT => {
            let b = r.take(h.arg)?;
            push_json_text(out, b).map_err(|()| CborError::Invalid {
                pos: h.pos,
                what: "text is not UTF-8",
            })?;
        }
        major::ARRAY => {
            out.push(b'[');
            for i in 0..h.arg {
                if i > 0 {
                    out.push(b',');
                }
                value_to_json(r, out, depth + 1)?;
            }
            out.push(b']');
        }
        major::MAP => map_to_json(r, out, h.arg, depth)?,
        major::TAG => {
            if h.arg != 42 {
                return Err(CborError::Invalid {
                    pos: h.pos,
                    what: "only tag 42 is allowed",
                }
                .into());
            }
            let b = r.bytes()?;
            let cid = match b.split_first() {
                Some((0, rest)) if hash::parse_cid_exact(rest).is_some() => rest,
                _ => return Err(DataError::BadLink),
            };
            out.extend_from_slice(b"{\"$link\":\"");
            hash::push_cid_string_from_bytes(cid, out);
            out.extend_from_slice(b"\"}");
        }
        _ => out.extend_from_slice(match h.arg {
            20 => b"false".as_slice(),
            21 => b"true".as_slice(),
            _ => b"null".as_slice(),
        }),
    }
    Ok(())
}

fn map_to_json(
    r: &mut Reader<'_>,
    out: &mut Vec<u8>,
    n: u64,
    depth: usize,
) -> Result<(), DataError> {
    out.push(b'{');
    let mut prev: &[u8] = &[];
    // Blob shape tracking: (type is "blob", ref is a link, mimeType is text, size is int).
    let mut blob = [false; 4];
    for i in 0..n {
        let kpos = r.position();
        let key = r.text_bytes()?;
        if i > 0 && !cbor::canonical_key_less(prev, key) {
            return Err(DataError::KeyOrder);
        }
        prev = key;
        if i > 0 {
            out.push(b',');
        }
        push_json_text(out, key).map_err(|()| CborError::Invalid {
            pos: kpos,
            what: "key is not UTF-8",
        })?;
        out.push(b':');
        let next = r.peek()?;
        match key {
            b"$type" => {
                if next.major != major::TEXT || next.arg == 0 {
                    return Err(DataError::BadType);
                }
                let mut look = r.clone();
                blob[0] = look.text_bytes()? == b"blob";
            }
            b"ref" => blob[1] = next.major == major::TAG,
            b"mimeType" => blob[2] = next.major == major::TEXT,
            b"size" => blob[3] = matches!(next.major, major::UINT | major::NINT),
            _ => {}
        }
        value_to_json(r, out, depth + 1)?;
    }
    if blob[0] && !(blob[1] && blob[2] && blob[3]) {
        return Err(DataError::BadBlob);
    }
    out.push(b'}');
    Ok(())
}

fn push_u64(out: &mut Vec<u8>, mut v: u64, negative: bool) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if negative {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[i..]);
}

fn push_base64(out: &mut Vec<u8>, b: &[u8]) {
    let start = out.len();
    let n = b.len().div_ceil(3) * 4;
    out.resize(start + n, 0);
    let written = base64::engine::general_purpose::STANDARD_NO_PAD
        .encode_slice(b, &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + written);
}

/// Appends `s` as a JSON string literal, escaping exactly as serde_json does.
pub fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // A &str is valid UTF-8, so the validating writer cannot fail.
    let _ = push_json_text(out, s.as_bytes());
}

/// [`push_json_string`] for a `String` buffer: the same escaping, byte for byte.
pub fn push_json_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    // Every escaped byte is ASCII, so the plain runs between them end on char boundaries.
    scan_json_text(s.as_bytes(), |piece| match piece {
        Piece::Plain(run) => out.push_str(&s[run]),
        Piece::Escape(esc) => out.push_str(esc),
        Piece::Control(b) => {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    });
    out.push('"');
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// One step of a JSON string literal's content.
enum Piece {
    /// Input bytes copied as they are.
    Plain(std::ops::Range<usize>),
    /// A two-character escape.
    Escape(&'static str),
    /// A control character without a short escape: `\u00XX`.
    Control(u8),
}

/// Splits `bytes` into the pieces of its JSON escaping (serde_json's choices), in order, and
/// says whether every byte was ASCII.
#[inline]
fn scan_json_text(bytes: &[u8], mut emit: impl FnMut(Piece)) -> bool {
    let mut ascii = true;
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let piece = match b {
            b'"' => Piece::Escape("\\\""),
            b'\\' => Piece::Escape("\\\\"),
            b'\n' => Piece::Escape("\\n"),
            b'\r' => Piece::Escape("\\r"),
            b'\t' => Piece::Escape("\\t"),
            0x08 => Piece::Escape("\\b"),
            0x0c => Piece::Escape("\\f"),
            0..=0x1f => Piece::Control(b),
            0x80.. => {
                ascii = false;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        };
        if start < i {
            emit(Piece::Plain(start..i));
        }
        emit(piece);
        i += 1;
        start = i;
    }
    if start < bytes.len() {
        emit(Piece::Plain(start..bytes.len()));
    }
    ascii
}

/// Appends the UTF-8 `bytes` as a JSON string literal (serde_json's escaping), validating
/// UTF-8 on the way; only strings containing non-ASCII bytes pay for a full UTF-8 check.
///
/// # Errors
/// `Err(())` when `bytes` is not UTF-8 (`out` then holds a partial literal).
#[expect(
    clippy::result_unit_err,
    reason = "callers attach their own position-carrying error"
)]
pub fn push_json_text(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), ()> {
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let ascii = scan_json_text(bytes, |piece| match piece {
        Piece::Plain(run) => out.extend_from_slice(&bytes[run]),
        Piece::Escape(esc) => out.extend_from_slice(esc.as_bytes()),
        Piece::Control(b) => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[usize::from(b >> 4)],
            HEX[usize::from(b & 15)],
        ]),
    });
    if !ascii && std::str::from_utf8(bytes).is_err() {
        return Err(());
    }
    out.push(b'"');
    Ok(())
}

/// Converts an atproto JSON value (a record: the top level must be an object) to canonical
/// DAG-CBOR. Integral floats (`123.0`) become integers; other floats are rejected.
///
/// # Errors
/// [`DataError`] when the JSON is not valid atproto data.
pub fn json_to_cbor(v: &serde_json::Value) -> Result<Vec<u8>, DataError> {
    if !v.is_object() {
        return Err(DataError::NotAMap);
    }
    let mut out = Vec::new();
    json_value_to_cbor(v, &mut out, 0)?;
    Ok(out)
}

fn json_value_to_cbor(
    v: &serde_json::Value,
    out: &mut Vec<u8>,
    depth: usize,
) -> Result<(), DataError> {
    use serde_json::Value;
    if depth > MAX_DEPTH {
        return Err(DataError::TooDeep);
    }
    match v {
        Value::Null => cbor::write_null(out),
        Value::Bool(b) => cbor::write_bool(out, *b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                cbor::write_int(out, i);
            } else if let Some(f) = n.as_f64() {
                if f.fract() != 0.0 || !f.is_finite() || f.abs() > 9_007_199_254_740_991.0 {
                    return Err(DataError::Float);
                }
                cbor::write_int(out, f as i64);
            } else {
                return Err(DataError::Float);
            }
        }
        Value::String(s) => cbor::write_text(out, s),
        Value::Array(a) => {
            cbor::write_head(out, major::ARRAY, a.len() as u64);
            for item in a {
                json_value_to_cbor(item, out, depth + 1)?;
            }
        }
        Value::Object(m) => {
            if let Some(l) = m.get("$link") {
                let (Value::String(s), 1) = (l, m.len()) else {
                    return Err(DataError::BadLink);
                };
                let cid = Cid::try_from(s.as_str()).map_err(|_| DataError::BadLink)?;
                cbor::write_link(out, &cid);
                return Ok(());
            }
            if let Some(b) = m.get("$bytes") {
                let (Value::String(s), 1) = (b, m.len()) else {
                    return Err(DataError::BadBytes);
                };
                let raw = base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(s.trim_end_matches('='))
                    .map_err(|_| DataError::BadBytes)?;
                cbor::write_bytes(out, &raw);
                return Ok(());
            }
            if let Some(t) = m.get("$type") {
                match t {
                    Value::String(s) if !s.is_empty() => {
                        if s == "blob" {
                            let ok = m
                                .get("ref")
                                .and_then(|r| r.get("$link"))
                                .is_some_and(Value::is_string)
                                && m.get("mimeType").is_some_and(Value::is_string)
                                && m.get("size").is_some_and(|s| s.is_i64() || s.is_u64());
                            if !ok {
                                return Err(DataError::BadBlob);
                            }
                        }
                    }
                    _ => return Err(DataError::BadType),
                }
            }
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by(|a, b| (a.len(), a.as_bytes()).cmp(&(b.len(), b.as_bytes())));
            cbor::write_head(out, major::MAP, keys.len() as u64);
            for k in keys {
                cbor::write_text(out, k);
                json_value_to_cbor(&m[k.as_str()], out, depth + 1)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_byte_like_serde_json_and_rejects_bad_utf8() {
        for len in 0..20 {
            for b in 0u8..=0x7f {
                let s: String = std::iter::repeat_n('a', len)
                    .chain([b as char])
                    .chain("xyz\u{e9}".chars())
                    .collect();
                let mut out = Vec::new();
                push_json_string(&mut out, &s);
                let expected = serde_json::to_string(&s).unwrap();
                assert_eq!(String::from_utf8(out).unwrap(), expected);
                let mut text = String::new();
                push_json_str(&mut text, &s);
                assert_eq!(text, expected, "the String writer escapes the same");
            }
        }
        assert!(push_json_text(&mut Vec::new(), b"abcdefgh\xff").is_err());
        assert!(push_json_text(&mut Vec::new(), b"\xc3").is_err());
    }

    #[test]
    fn escapes_like_serde_json() {
        let s = "a\"b\\c\n\u{1}\u{7f}é😀\t";
        let mut out = Vec::new();
        push_json_string(&mut out, s);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            serde_json::to_string(s).unwrap()
        );
    }

    #[test]
    fn transcodes_integers_links_and_bytes() {
        let safe = MAX_SAFE_INTEGER as i64;
        let v = serde_json::json!({"a": -5, "b": {"$bytes": "AQI"}, "c": -safe, "d": [true, null], "e": safe});
        let cbor = json_to_cbor(&v).unwrap();
        let mut out = Vec::new();
        record_to_json(&cbor, &mut out).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            v
        );
    }

    /// Issue 10, defect 13: `@atproto/tap` 0.4 parses events strictly and never acks one
    /// with an integer it cannot hold exactly, which would block the repo's later events;
    /// such a record goes without a body, like any record tap cannot transcode.
    #[test]
    fn integers_beyond_the_safe_json_range_are_refused() {
        let safe = MAX_SAFE_INTEGER as i64;
        for n in [safe + 1, -safe - 1, i64::MIN, i64::MAX] {
            let cbor = json_to_cbor(&serde_json::json!({"n": n})).unwrap();
            assert_eq!(
                record_to_json(&cbor, &mut Vec::new()),
                Err(DataError::UnsafeInteger),
                "{n}"
            );
        }
        // {"n": u64::MAX}, beyond what JSON input can express.
        let big = [&[0xa1, 0x61, b'n', 0x1b][..], &[0xff; 8]].concat();
        assert_eq!(
            record_to_json(&big, &mut Vec::new()),
            Err(DataError::UnsafeInteger)
        );
    }

    #[test]
    fn rejects_unsorted_keys_and_trailing_bytes() {
        // {"b":1,"a":2}
        let unsorted = [0xa2, 0x61, b'b', 0x01, 0x61, b'a', 0x02];
        assert_eq!(
            record_to_json(&unsorted, &mut Vec::new()),
            Err(DataError::KeyOrder)
        );
        let trailing = [0xa0, 0x00];
        assert!(record_to_json(&trailing, &mut Vec::new()).is_err());
        assert_eq!(
            record_to_json(&[0x01], &mut Vec::new()),
            Err(DataError::NotAMap)
        );
    }
}
