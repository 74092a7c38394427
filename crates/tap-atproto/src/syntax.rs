//! Syntax newtypes of atproto identifiers (DID, handle, NSID, record key, TID, AT-URI,
//! datetime) and the collection-filter pattern. Every constructor validates exactly as the
//! interop vectors (`syntax/*.txt`) say; a value of one of these types is always valid.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a valid identifier of some kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {reason}")]
pub struct SyntaxError {
    /// Which syntax was expected ("DID", "handle", ...).
    pub kind: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn err<T>(kind: &'static str, reason: &'static str) -> Result<T, SyntaxError> {
    Err(SyntaxError { kind, reason })
}

/// Implements the string-newtype boilerplate: `as_str`, `Display`, `FromStr`, `TryFrom`,
/// `AsRef<str>` and serde as a validated string.
macro_rules! string_newtype {
    ($name:ident, $validate:path) => {
        impl $name {
            /// Validates `s` and wraps it.
            ///
            /// # Errors
            /// [`SyntaxError`] when `s` is not valid syntax for this type.
            pub fn new(s: impl Into<String>) -> Result<Self, SyntaxError> {
                let s = s.into();
                $validate(&s)?;
                Ok(Self(s))
            }

            /// The identifier as it was given.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Unwraps into the owned string.
            #[must_use]
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = SyntaxError;
            fn from_str(s: &str) -> Result<Self, SyntaxError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = SyntaxError;
            fn try_from(s: String) -> Result<Self, SyntaxError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = SyntaxError;
            fn try_from(s: &str) -> Result<Self, SyntaxError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(s.into_owned()).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A DID (`did:method:identifier`), e.g. `did:plc:7iza6de2dwap2sbkpav7c6c6`. Max 2048 chars.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Did(String);
string_newtype!(Did, validate_did);

impl Did {
    /// The method part (`plc` in `did:plc:…`).
    #[must_use]
    pub fn method(&self) -> &str {
        self.0[4..].split(':').next().unwrap_or_default()
    }
}

/// Checks DID syntax: `did:` + lowercase method + `:` + `[A-Za-z0-9._:%-]*`, not ending in
/// `:` or `%`, at most 2048 characters.
///
/// # Errors
/// [`SyntaxError`] describing the first problem found.
pub fn validate_did(s: &str) -> Result<(), SyntaxError> {
    const K: &str = "DID";
    if s.len() > 2048 {
        return err(K, "longer than 2048 characters");
    }
    let Some(rest) = s.strip_prefix("did:") else {
        return err(K, "must start with \"did:\"");
    };
    let Some((method, id)) = rest.split_once(':') else {
        return err(K, "missing method separator");
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_lowercase()) {
        return err(K, "method must be lowercase letters");
    }
    if id.is_empty() {
        return err(K, "empty identifier");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'%' | b'-'))
    {
        return err(K, "identifier has a disallowed character");
    }
    if matches!(id.as_bytes().last(), Some(b':' | b'%')) {
        return err(K, "identifier must not end with ':' or '%'");
    }
    Ok(())
}

/// A handle (a DNS name such as `alice.bsky.social`). Kept as given; compare with
/// [`Handle::normalized`] for case-insensitive equality.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Handle(String);
string_newtype!(Handle, validate_handle);

impl Handle {
    /// The handle lower-cased (handles are case-insensitive).
    #[must_use]
    pub fn normalized(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

/// Checks handle syntax: at most 253 ASCII chars, two or more dot-separated labels of 1–63
/// `[A-Za-z0-9-]` not starting or ending with `-`, and a last label starting with a letter.
///
/// # Errors
/// [`SyntaxError`] describing the first problem found.
pub fn validate_handle(s: &str) -> Result<(), SyntaxError> {
    const K: &str = "handle";
    if s.len() > 253 {
        return err(K, "longer than 253 characters");
    }
    let mut labels = 0usize;
    let mut last = "";
    for label in s.split('.') {
        check_dns_label(label, K)?;
        labels += 1;
        last = label;
    }
    if labels < 2 {
        return err(K, "needs at least two labels");
    }
    if !last.as_bytes()[0].is_ascii_alphabetic() {
        return err(K, "last label must start with a letter");
    }
    Ok(())
}

fn check_dns_label(label: &str, kind: &'static str) -> Result<(), SyntaxError> {
    let b = label.as_bytes();
    if b.is_empty() || b.len() > 63 {
        return err(kind, "segment must be 1 to 63 characters");
    }
    if !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-') {
        return err(kind, "segment has a disallowed character");
    }
    if b[0] == b'-' || b[b.len() - 1] == b'-' {
        return err(kind, "segment must not start or end with '-'");
    }
    Ok(())
}

/// Either a DID or a handle (the authority of an AT-URI, or an API argument).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AtIdentifier {
    /// A DID.
    Did(Did),
    /// A handle.
    Handle(Handle),
}

impl AtIdentifier {
    /// The identifier as a string.
    #[must_use]
    pub fn as_str(&self) -> &str {
        match self {
            Self::Did(d) => d.as_str(),
            Self::Handle(h) => h.as_str(),
        }
    }
}

impl FromStr for AtIdentifier {
    type Err = SyntaxError;
    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        if s.starts_with("did:") {
            Ok(Self::Did(Did::new(s)?))
        } else {
            Handle::new(s).map(Self::Handle).map_err(|_| SyntaxError {
                kind: "AT identifier",
                reason: "neither a DID nor a handle",
            })
        }
    }
}

impl fmt::Display for AtIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A namespaced identifier (`app.bsky.feed.post`): a reversed domain plus a name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nsid(String);
string_newtype!(Nsid, validate_nsid);

impl Nsid {
    /// The final (name) segment, e.g. `post`.
    #[must_use]
    pub fn name(&self) -> &str {
        self.0.rsplit('.').next().unwrap_or_default()
    }

    /// The reversed-domain authority, e.g. `app.bsky.feed`.
    #[must_use]
    pub fn authority(&self) -> &str {
        self.0.rsplit_once('.').map(|(a, _)| a).unwrap_or_default()
    }
}

/// Checks NSID syntax: at most 317 ASCII chars, three or more segments; the first starts with
/// a letter, middle segments are DNS labels, the last (the name) is a letter followed by
/// letters and digits; every segment 1–63 chars.
///
/// # Errors
/// [`SyntaxError`] describing the first problem found.
pub fn validate_nsid(s: &str) -> Result<(), SyntaxError> {
    const K: &str = "NSID";
    if s.len() > 317 {
        return err(K, "longer than 317 characters");
    }
    let Some((domain, name)) = s.rsplit_once('.') else {
        return err(K, "needs at least three segments");
    };
    check_nsid_domain(domain, K)?;
    if domain.split('.').count() < 2 {
        return err(K, "needs at least three segments");
    }
    let nb = name.as_bytes();
    if nb.is_empty() || nb.len() > 63 {
        return err(K, "name must be 1 to 63 characters");
    }
    if !nb[0].is_ascii_alphabetic() || !nb.iter().all(u8::is_ascii_alphanumeric) {
        return err(K, "name must be a letter followed by letters and digits");
    }
    Ok(())
}

/// Checks the reversed-domain part of an NSID (or of a collection-filter prefix).
fn check_nsid_domain(domain: &str, kind: &'static str) -> Result<(), SyntaxError> {
    for (i, seg) in domain.split('.').enumerate() {
        check_dns_label(seg, kind)?;
        if i == 0 && !seg.as_bytes()[0].is_ascii_alphabetic() {
            return err(kind, "first segment must start with a letter");
        }
    }
    Ok(())
}

/// A record key (`self`, a TID, ...): 1–512 chars of `[A-Za-z0-9._~:-]`, not `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordKey(String);
string_newtype!(RecordKey, validate_record_key);

/// Checks record-key syntax.
///
/// # Errors
/// [`SyntaxError`] describing the first problem found.
pub fn validate_record_key(s: &str) -> Result<(), SyntaxError> {
    const K: &str = "record key";
    if s.is_empty() || s.len() > 512 {
        return err(K, "must be 1 to 512 characters");
    }
    if s == "." || s == ".." {
        return err(K, "must not be '.' or '..'");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'-'))
    {
        return err(K, "has a disallowed character");
    }
    Ok(())
}

/// The base32-sortable alphabet of TIDs.
const TID_ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";

/// A timestamp identifier: 13 base32-sortable chars encoding 53 bits of microseconds since
/// the Unix epoch and 10 bits of clock id. Also used as a repo revision (`rev`); string
/// order equals time order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tid([u8; 13]);

impl Tid {
    /// Validates and wraps `s`.
    ///
    /// # Errors
    /// [`SyntaxError`] when `s` is not a TID.
    pub fn new(s: &str) -> Result<Self, SyntaxError> {
        validate_tid(s)?;
        let mut b = [0u8; 13];
        b.copy_from_slice(s.as_bytes());
        Ok(Self(b))
    }

    /// Builds the TID for `micros` since the Unix epoch (low 53 bits) and `clock_id` (low
    /// 10 bits).
    #[must_use]
    pub fn from_parts(micros: u64, clock_id: u16) -> Self {
        let v = ((micros & ((1 << 53) - 1)) << 10) | u64::from(clock_id & 0x3ff);
        let mut b = [0u8; 13];
        for (i, slot) in b.iter_mut().enumerate() {
            let shift = 5 * (12 - i);
            *slot = TID_ALPHABET[((v >> shift) & 31) as usize];
        }
        Self(b)
    }

    /// The 64-bit value (timestamp << 10 | clock id).
    #[must_use]
    pub fn to_u64(&self) -> u64 {
        self.0.iter().fold(0u64, |acc, c| {
            let d = TID_ALPHABET.iter().position(|a| a == c).unwrap_or(0) as u64;
            (acc << 5) | d
        })
    }

    /// Microseconds since the Unix epoch.
    #[must_use]
    pub fn timestamp_micros(&self) -> u64 {
        self.to_u64() >> 10
    }

    /// The TID as a string slice.
    #[must_use]
    pub fn as_str(&self) -> &str {
        // Only ASCII from TID_ALPHABET is ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Checks TID syntax: 13 chars of `234567a-z`, the first one of `234567a-j` (high bit 0).
///
/// # Errors
/// [`SyntaxError`] describing the problem.
pub fn validate_tid(s: &str) -> Result<(), SyntaxError> {
    const K: &str = "TID";
    let b = s.as_bytes();
    if b.len() != 13 {
        return err(K, "must be 13 characters");
    }
    if !b.iter().all(|c| TID_ALPHABET.contains(c)) {
        return err(K, "not base32-sortable");
    }
    if !matches!(b[0], b'2'..=b'7' | b'a'..=b'j') {
        return err(K, "high bit must be zero");
    }
    Ok(())
}

impl fmt::Display for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Tid {
    type Err = SyntaxError;
    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        Self::new(s)
    }
}

impl serde::Serialize for Tid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Tid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// An AT-URI: `at://` authority (DID or handle), optionally `/collection` and `/rkey`.
/// No query, no fragment, no trailing slash, at most 8 KiB.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AtUri(String);
string_newtype!(AtUri, validate_at_uri);

impl AtUri {
    /// Builds `at://{did}/{collection}/{rkey}`.
    #[must_use]
    pub fn for_record(did: &Did, collection: &Nsid, rkey: &RecordKey) -> Self {
        Self(format!("at://{did}/{collection}/{rkey}"))
    }

    fn parts(&self) -> (&str, Option<&str>, Option<&str>) {
        let rest = &self.0[5..];
        let mut it = rest.splitn(3, '/');
        let auth = it.next().unwrap_or_default();
        (auth, it.next(), it.next())
    }

    /// The authority (a DID or handle string).
    #[must_use]
    pub fn authority(&self) -> &str {
        self.parts().0
    }

    /// The collection segment, if any.
    #[must_use]
    pub fn collection(&self) -> Option<&str> {
        self.parts().1
    }

    /// The record-key segment, if any.
    #[must_use]
    pub fn rkey(&self) -> Option<&str> {
        self.parts().2
    }
}

/// Checks AT-URI syntax (the strict form used by the interop vectors).
///
/// # Errors
/// [`SyntaxError`] describing the first problem found.
pub fn validate_at_uri(s: &str) -> Result<(), SyntaxError> {
    const K: &str = "AT-URI";
    if s.len() > 8 * 1024 {
        return err(K, "longer than 8 KiB");
    }
    let Some(rest) = s.strip_prefix("at://") else {
        return err(K, "must start with \"at://\"");
    };
    let mut it = rest.split('/');
    let auth = it.next().unwrap_or_default();
    if auth.parse::<AtIdentifier>().is_err() {
        return err(K, "authority is neither a DID nor a handle");
    }
    if let Some(coll) = it.next()
        && validate_nsid(coll).is_err()
    {
        return err(K, "collection is not an NSID");
    }
    if let Some(rkey) = it.next()
        && validate_record_key(rkey).is_err()
    {
        return err(K, "invalid record key");
    }
    if it.next().is_some() {
        return err(K, "too many path segments");
    }
    Ok(())
}

/// A record path inside a repo: `collection/rkey`, the MST key.
///
/// # Errors
/// [`SyntaxError`] unless `path` is a valid NSID, `/`, and a valid record key.
pub fn split_record_path(path: &str) -> Result<(Nsid, RecordKey), SyntaxError> {
    let Some((c, r)) = path.split_once('/') else {
        return err("record path", "missing '/'");
    };
    Ok((Nsid::new(c)?, RecordKey::new(r)?))
}

/// An atproto datetime (RFC 3339 / ISO 8601 intersection, timezone required, e.g.
/// `1985-04-12T23:20:50.123Z`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Datetime(String);
string_newtype!(Datetime, validate_datetime);

/// Checks atproto datetime syntax and that the value is a real instant not before year 0.
///
/// # Errors
/// [`SyntaxError`] describing the first problem found.
pub fn validate_datetime(s: &str) -> Result<(), SyntaxError> {
    const K: &str = "datetime";
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(part.iter().fold(0u32, |a, d| a * 10 + u32::from(d - b'0')))
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return err(K, "not YYYY-MM-DDTHH:MM:SS");
    }
    let (Some(year), Some(month), Some(day), Some(hour), Some(min), Some(sec)) = (
        digits(0..4),
        digits(5..7),
        digits(8..10),
        digits(11..13),
        digits(14..16),
        digits(17..19),
    ) else {
        return err(K, "not YYYY-MM-DDTHH:MM:SS");
    };
    let mut i = 19;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 20 {
            return err(K, "bad fractional seconds");
        }
    }
    let tz = &b[i..];
    let offset_minutes: i64 = if tz == b"Z" {
        0
    } else if tz.len() == 6 && (tz[0] == b'+' || tz[0] == b'-') && tz[3] == b':' {
        let (Some(h), Some(m)) = (digits(i + 1..i + 3), digits(i + 4..i + 6)) else {
            return err(K, "bad timezone offset");
        };
        if tz == b"-00:00" {
            return err(K, "-00:00 is not allowed");
        }
        if h > 23 || m > 59 {
            return err(K, "bad timezone offset");
        }
        let v = i64::from(h * 60 + m);
        if tz[0] == b'-' { -v } else { v }
    } else {
        return err(K, "timezone required (Z or ±HH:MM)");
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return err(K, "month out of range"),
    };
    if day == 0 || day > days_in_month || hour > 23 || min > 59 || sec > 59 {
        return err(K, "field out of range");
    }
    // Normalised to UTC the instant must not fall before 0000-01-01T00:00:00Z.
    if year == 0 && month == 1 && day == 1 && i64::from(hour * 60 + min) - offset_minutes < 0 {
        return err(K, "normalises to a negative year");
    }
    Ok(())
}

/// Checks the loose CID string syntax of the interop vectors: 8–256 chars of
/// `[A-Za-z0-9+=]`, and not a CIDv0 (`Qmb…`). Use [`crate::Cid`] to actually parse one.
///
/// # Errors
/// [`SyntaxError`] describing the problem.
pub fn validate_cid_string(s: &str) -> Result<(), SyntaxError> {
    const K: &str = "CID";
    if s.len() < 8 || s.len() > 256 {
        return err(K, "must be 8 to 256 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'=')
    {
        return err(K, "has a disallowed character");
    }
    if s.starts_with("Qmb") {
        return err(K, "CIDv0 is not supported");
    }
    Ok(())
}

/// A collection filter: an exact NSID, `prefix.*` where `*` is a whole last segment, or `*`
/// alone (everything). `app.bsky.*` matches `app.bsky.feed.post` but not `app.bskyx.post`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CollectionFilter(String);
string_newtype!(CollectionFilter, validate_collection_filter);

impl CollectionFilter {
    /// Whether `nsid` is selected by this filter (segment-boundary semantics).
    #[must_use]
    pub fn matches(&self, nsid: &Nsid) -> bool {
        self.matches_str(nsid.as_str())
    }

    /// Like [`CollectionFilter::matches`] for an unvalidated collection string.
    #[must_use]
    pub fn matches_str(&self, collection: &str) -> bool {
        if self.0 == "*" {
            return true;
        }
        match self.0.strip_suffix('*') {
            // The prefix keeps its trailing '.', so matching is at a segment boundary.
            Some(prefix) => collection.len() > prefix.len() && collection.starts_with(prefix),
            None => collection == self.0,
        }
    }

    /// Whether this is a wildcard pattern rather than one exact NSID.
    #[must_use]
    pub fn is_wildcard(&self) -> bool {
        self.0.ends_with('*')
    }
}

/// Checks a collection filter: `*`, `seg(.seg)*.*`, or a full NSID.
///
/// # Errors
/// [`SyntaxError`] when `*` appears other than as the whole last segment, or the rest is
/// not NSID syntax.
pub fn validate_collection_filter(s: &str) -> Result<(), SyntaxError> {
    const K: &str = "collection filter";
    if s == "*" {
        return Ok(());
    }
    if let Some(prefix) = s.strip_suffix(".*") {
        if prefix.contains('*') {
            return err(K, "'*' is only allowed as the whole last segment");
        }
        if prefix.len() > 253 {
            return err(K, "prefix too long");
        }
        return check_nsid_domain(prefix, K);
    }
    if s.contains('*') {
        return err(K, "'*' is only allowed as the whole last segment");
    }
    validate_nsid(s).map_err(|e| SyntaxError {
        kind: K,
        reason: e.reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tid_round_trips_through_parts() {
        let t = Tid::from_parts(1_700_000_000_000_000, 42);
        let back = Tid::new(t.as_str()).unwrap();
        assert_eq!(back.timestamp_micros(), 1_700_000_000_000_000);
        assert_eq!(back.to_u64() & 0x3ff, 42);
        assert!(Tid::from_parts(1, 0) < Tid::from_parts(2, 0));
    }

    #[test]
    fn collection_filter_matches_at_segment_boundaries() {
        let f = CollectionFilter::new("app.bsky.*").unwrap();
        assert!(f.matches(&Nsid::new("app.bsky.feed.post").unwrap()));
        assert!(!f.matches(&Nsid::new("app.bskyx.feed.post").unwrap()));
        assert!(
            CollectionFilter::new("*")
                .unwrap()
                .matches_str("com.example.thing")
        );
        let exact = CollectionFilter::new("app.bsky.feed.post").unwrap();
        assert!(exact.matches_str("app.bsky.feed.post"));
        assert!(!exact.matches_str("app.bsky.feed.postx"));
        for bad in [
            "app.bsky.feed*",
            "app.*.post",
            "*.bsky",
            "app.bsky.**",
            "",
            ".*",
        ] {
            assert!(CollectionFilter::new(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn serde_round_trips_as_string_and_rejects_invalid() {
        let d: Did = serde_json::from_str("\"did:plc:abc\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"did:plc:abc\"");
        assert!(serde_json::from_str::<Did>("\"nope\"").is_err());
        assert_eq!(d.method(), "plc");
    }

    #[test]
    fn at_uri_exposes_parts() {
        let u = AtUri::new("at://did:plc:x/app.bsky.feed.post/3jzfcijpj2z2a").unwrap();
        assert_eq!(u.authority(), "did:plc:x");
        assert_eq!(u.collection(), Some("app.bsky.feed.post"));
        assert_eq!(u.rkey(), Some("3jzfcijpj2z2a"));
    }
}
