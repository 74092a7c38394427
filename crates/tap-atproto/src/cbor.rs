//! A small zero-copy DAG-CBOR reader and canonical writer for the hot paths (MST nodes,
//! record transcoding, commits). The reader enforces the atproto subset of DAG-CBOR:
//! definite lengths, minimal integer heads, tag 42 only, no floats, no `undefined`.

use cid::Cid;

use crate::hash;

/// Why a DAG-CBOR value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CborError {
    /// The input ended inside a value.
    #[error("unexpected end of input at byte {0}")]
    Eof(usize),
    /// The input is not valid atproto DAG-CBOR.
    #[error("invalid DAG-CBOR at byte {pos}: {what}")]
    Invalid {
        /// Byte offset of the offending head.
        pos: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// A value was expected to be of another type.
    #[error("expected {expected} at byte {pos}")]
    Type {
        /// Byte offset of the offending head.
        pos: usize,
        /// What was expected.
        expected: &'static str,
    },
    /// Nesting deeper than the reader allows.
    #[error("nesting deeper than {0} levels")]
    TooDeep(usize),
    /// Bytes after the end of the top-level value.
    #[error("trailing bytes after the value")]
    Trailing,
}

/// Maximum nesting of arrays/maps accepted anywhere (prevents stack exhaustion).
pub const MAX_DEPTH: usize = 64;

/// Major types.
pub mod major {
    /// Unsigned integer.
    pub const UINT: u8 = 0;
    /// Negative integer.
    pub const NINT: u8 = 1;
    /// Byte string.
    pub const BYTES: u8 = 2;
    /// Text string.
    pub const TEXT: u8 = 3;
    /// Array.
    pub const ARRAY: u8 = 4;
    /// Map.
    pub const MAP: u8 = 5;
    /// Tag.
    pub const TAG: u8 = 6;
    /// Simple values and floats.
    pub const SIMPLE: u8 = 7;
}

/// A decoded item head: major type and argument (length, value, tag number or simple value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Major type (0–7).
    pub major: u8,
    /// The head's argument; for major 7, the simple value (20 false, 21 true, 22 null).
    pub arg: u64,
    /// Offset of the head in the input.
    pub pos: usize,
}

/// A cursor over a DAG-CBOR buffer. All returned slices borrow the input.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    #[must_use]
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Current offset.
    #[must_use]
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Whether all input was consumed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Errors unless all input was consumed.
    ///
    /// # Errors
    /// [`CborError::Trailing`].
    pub fn finish(&self) -> Result<(), CborError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(CborError::Trailing)
        }
    }

    fn invalid<T>(&self, pos: usize, what: &'static str) -> Result<T, CborError> {
        Err(CborError::Invalid { pos, what })
    }

    /// Reads one item head, enforcing minimal-length arguments and definite lengths.
    ///
    /// # Errors
    /// [`CborError`] on truncation, indefinite lengths, reserved or float encodings.
    #[inline]
    pub fn head(&mut self) -> Result<Head, CborError> {
        let pos = self.pos;
        let Some(&ib) = self.buf.get(pos) else {
            return Err(CborError::Eof(pos));
        };
        let major = ib >> 5;
        let info = ib & 0x1f;
        let (arg, len) = match info {
            0..=23 => (u64::from(info), 1),
            24..=27 => {
                let n = 1usize << (info - 24);
                let Some(bytes) = self.buf.get(pos + 1..pos + 1 + n) else {
                    return Err(CborError::Eof(pos));
                };
                let v = bytes.iter().fold(0u64, |a, b| (a << 8) | u64::from(*b));
                if major == major::SIMPLE {
                    return self.invalid(pos, "floats and extended simple values are not allowed");
                }
                let min = match info {
                    24 => 24,
                    25 => 0x100,
                    26 => 0x1_0000,
                    _ => 0x1_0000_0000,
                };
                if v < min {
                    return self.invalid(pos, "non-minimal integer encoding");
                }
                (v, 1 + n)
            }
            31 => return self.invalid(pos, "indefinite lengths are not allowed"),
            _ => return self.invalid(pos, "reserved additional info"),
        };
        if major == major::SIMPLE && !(20..=22).contains(&arg) {
            return self.invalid(pos, "only false, true and null simple values are allowed");
        }
        self.pos = pos + len;
        Ok(Head { major, arg, pos })
    }

    /// Peeks at the next head without consuming it.
    ///
    /// # Errors
    /// As [`Reader::head`].
    pub fn peek(&self) -> Result<Head, CborError> {
        self.clone().head()
    }

    /// Takes `n` raw bytes.
    ///
    /// # Errors
    /// [`CborError::Eof`] when fewer remain.
    #[inline]
    pub fn take(&mut self, n: u64) -> Result<&'a [u8], CborError> {
        let start = self.pos;
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| start.checked_add(n))
            .filter(|e| *e <= self.buf.len())
            .ok_or(CborError::Eof(start))?;
        self.pos = end;
        Ok(&self.buf[start..end])
    }

    fn expect(&mut self, m: u8, expected: &'static str) -> Result<Head, CborError> {
        let h = self.head()?;
        if h.major != m {
            return Err(CborError::Type {
                pos: h.pos,
                expected,
            });
        }
        Ok(h)
    }

    /// Reads a map head and returns the number of pairs.
    ///
    /// # Errors
    /// [`CborError::Type`] when the next item is not a map.
    pub fn map_len(&mut self) -> Result<u64, CborError> {
        Ok(self.expect(major::MAP, "map")?.arg)
    }

    /// Reads an array head and returns the number of items.
    ///
    /// # Errors
    /// [`CborError::Type`] when the next item is not an array.
    pub fn array_len(&mut self) -> Result<u64, CborError> {
        Ok(self.expect(major::ARRAY, "array")?.arg)
    }

    /// Reads a text string as raw (unvalidated) UTF-8 bytes.
    ///
    /// # Errors
    /// [`CborError::Type`] when the next item is not a text string.
    pub fn text_bytes(&mut self) -> Result<&'a [u8], CborError> {
        let h = self.expect(major::TEXT, "text string")?;
        self.take(h.arg)
    }

    /// Reads a UTF-8-validated text string.
    ///
    /// # Errors
    /// [`CborError`] when not a text string or not UTF-8.
    pub fn text(&mut self) -> Result<&'a str, CborError> {
        let pos = self.pos;
        let b = self.text_bytes()?;
        std::str::from_utf8(b).map_err(|_| CborError::Invalid {
            pos,
            what: "text is not UTF-8",
        })
    }

    /// Reads a byte string.
    ///
    /// # Errors
    /// [`CborError::Type`] when the next item is not a byte string.
    pub fn bytes(&mut self) -> Result<&'a [u8], CborError> {
        let h = self.expect(major::BYTES, "byte string")?;
        self.take(h.arg)
    }

    /// Reads an unsigned integer.
    ///
    /// # Errors
    /// [`CborError::Type`] when the next item is not an unsigned integer.
    pub fn uint(&mut self) -> Result<u64, CborError> {
        Ok(self.expect(major::UINT, "unsigned integer")?.arg)
    }

    /// Reads a signed integer in the i64 range.
    ///
    /// # Errors
    /// [`CborError`] when not an integer or out of range.
    pub fn int(&mut self) -> Result<i64, CborError> {
        let h = self.head()?;
        match h.major {
            major::UINT => i64::try_from(h.arg).map_err(|_| CborError::Invalid {
                pos: h.pos,
                what: "integer out of i64 range",
            }),
            major::NINT => i64::try_from(h.arg)
                .map(|v| -1 - v)
                .map_err(|_| CborError::Invalid {
                    pos: h.pos,
                    what: "integer out of i64 range",
                }),
            _ => Err(CborError::Type {
                pos: h.pos,
                expected: "integer",
            }),
        }
    }

    /// Reads a boolean.
    ///
    /// # Errors
    /// [`CborError::Type`] when the next item is not `true`/`false`.
    pub fn bool(&mut self) -> Result<bool, CborError> {
        let h = self.head()?;
        match (h.major, h.arg) {
            (major::SIMPLE, 20) => Ok(false),
            (major::SIMPLE, 21) => Ok(true),
            _ => Err(CborError::Type {
                pos: h.pos,
                expected: "boolean",
            }),
        }
    }

    /// Consumes a `null` if one is next; returns whether it did.
    ///
    /// # Errors
    /// On a malformed head.
    pub fn null(&mut self) -> Result<bool, CborError> {
        if self.buf.get(self.pos) == Some(&0xf6) {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// Reads a CID link (tag 42 around a byte string `0x00 ‖ cid`) and returns the binary
    /// CID bytes (without the `0x00` prefix), not yet parsed.
    ///
    /// # Errors
    /// [`CborError`] when the next item is not a well-formed link.
    pub fn link_bytes(&mut self) -> Result<&'a [u8], CborError> {
        let h = self.expect(major::TAG, "CID link")?;
        if h.arg != 42 {
            return self.invalid(h.pos, "only tag 42 is allowed");
        }
        self.link_body(h.pos)
    }

    /// The byte-string part of a link, after its tag head.
    fn link_body(&mut self, pos: usize) -> Result<&'a [u8], CborError> {
        let b = self.bytes()?;
        match b.split_first() {
            Some((0, rest)) if !rest.is_empty() => Ok(rest),
            _ => self.invalid(pos, "CID link must be 0x00 followed by a binary CID"),
        }
    }

    /// Reads and parses a CID link.
    ///
    /// # Errors
    /// [`CborError`] when the next item is not a valid CIDv1 link.
    pub fn link(&mut self) -> Result<Cid, CborError> {
        let pos = self.pos;
        let b = self.link_bytes()?;
        hash::parse_cid_exact(b).ok_or(CborError::Invalid {
            pos,
            what: "malformed CID",
        })
    }

    /// Reads a link or `null`.
    ///
    /// # Errors
    /// [`CborError`] when the next item is neither.
    pub fn nullable_link(&mut self) -> Result<Option<Cid>, CborError> {
        if self.null()? {
            Ok(None)
        } else {
            self.link().map(Some)
        }
    }

    /// Skips one complete value, validating it as strictly as the transcoder would
    /// (UTF-8 text, string map keys, tag 42 only), without canonical-order checks.
    ///
    /// # Errors
    /// [`CborError`] on any malformed or disallowed item.
    pub fn skip_value(&mut self, depth: usize) -> Result<(), CborError> {
        if depth > MAX_DEPTH {
            return Err(CborError::TooDeep(MAX_DEPTH));
        }
        let h = self.head()?;
        match h.major {
            major::UINT | major::NINT | major::SIMPLE => {}
            major::BYTES => {
                self.take(h.arg)?;
            }
            major::TEXT => {
                let b = self.take(h.arg)?;
                if std::str::from_utf8(b).is_err() {
                    return self.invalid(h.pos, "text is not UTF-8");
                }
            }
            major::ARRAY => {
                for _ in 0..h.arg {
                    self.skip_value(depth + 1)?;
                }
            }
            major::MAP => {
                for _ in 0..h.arg {
                    self.text()?;
                    self.skip_value(depth + 1)?;
                }
            }
            _ => {
                if h.arg != 42 {
                    return self.invalid(h.pos, "only tag 42 is allowed");
                }
                let b = self.link_body(h.pos)?;
                if hash::parse_cid_exact(b).is_none() {
                    return self.invalid(h.pos, "malformed CID");
                }
            }
        }
        Ok(())
    }
}

/// DAG-CBOR canonical map-key order: shorter keys first, then bytewise.
#[must_use]
#[inline]
pub fn canonical_key_less(a: &[u8], b: &[u8]) -> bool {
    (a.len(), a) < (b.len(), b)
}

/// Appends an item head with the shortest encoding of `arg`.
#[inline]
pub fn write_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    if arg < 24 {
        out.push(m | arg as u8);
    } else if arg <= 0xff {
        out.extend_from_slice(&[m | 24, arg as u8]);
    } else if arg <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(arg as u16).to_be_bytes());
    } else if arg <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(arg as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

/// Appends a text string.
pub fn write_text(out: &mut Vec<u8>, s: &str) {
    write_head(out, major::TEXT, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Appends a byte string.
pub fn write_bytes(out: &mut Vec<u8>, b: &[u8]) {
    write_head(out, major::BYTES, b.len() as u64);
    out.extend_from_slice(b);
}

/// Appends a signed integer.
pub fn write_int(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        write_head(out, major::UINT, v as u64);
    } else {
        write_head(out, major::NINT, (-1 - v) as u64);
    }
}

/// Appends `null`.
pub fn write_null(out: &mut Vec<u8>) {
    out.push(0xf6);
}

/// Appends a boolean.
pub fn write_bool(out: &mut Vec<u8>, v: bool) {
    out.push(if v { 0xf5 } else { 0xf4 });
}

/// Appends a CID link (tag 42).
pub fn write_link(out: &mut Vec<u8>, cid: &Cid) {
    let mut raw = [0u8; 80];
    let n = hash::write_cid_bytes(cid, &mut raw);
    out.extend_from_slice(&[0xd8, 42]);
    write_head(out, major::BYTES, n as u64 + 1);
    out.push(0);
    out.extend_from_slice(&raw[..n]);
}

/// Appends a link or `null`.
pub fn write_nullable_link(out: &mut Vec<u8>, cid: Option<&Cid>) {
    match cid {
        Some(c) => write_link(out, c),
        None => write_null(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_must_be_minimal_and_definite() {
        assert!(Reader::new(&[0x18, 0x05]).head().is_err());
        assert!(Reader::new(&[0x9f]).head().is_err());
        assert!(Reader::new(&[0xfb, 0, 0, 0, 0, 0, 0, 0, 0]).head().is_err());
        assert!(Reader::new(&[0xf7]).head().is_err());
        let mut v = Vec::new();
        write_head(&mut v, major::UINT, 300);
        assert_eq!(Reader::new(&v).uint().unwrap(), 300);
    }

    #[test]
    fn link_round_trips() {
        let cid = hash::cid_for_cbor(b"x");
        let mut v = Vec::new();
        write_link(&mut v, &cid);
        let mut r = Reader::new(&v);
        assert_eq!(r.link().unwrap(), cid);
        r.finish().unwrap();
    }

    #[test]
    fn int_range_is_checked() {
        assert_eq!(Reader::new(&[0x20]).int().unwrap(), -1);
        let mut v = Vec::new();
        write_head(&mut v, major::NINT, u64::MAX);
        assert!(Reader::new(&v).int().is_err());
    }
}
