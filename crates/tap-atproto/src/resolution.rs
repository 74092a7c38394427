//! What handle resolution answers say (atproto handle spec): the body of
//! `https://<handle>/.well-known/atproto-did` and the texts of the `_atproto.<handle>` TXT
//! records. Both come from hosts anyone can run; the readers take any bytes and return a
//! DID or the reason there is none. Whether the DID's document names the handle back is
//! the caller's check.

use crate::syntax::Did;

/// Largest well-known body read as a DID (a DID is at most 2 KiB, the atproto limit).
pub const MAX_WELL_KNOWN_BYTES: usize = 2048;

/// Why an answer names no DID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolutionError {
    /// The well-known body is not one DID.
    #[error("well-known body is not a DID")]
    NotADid,
    /// A `did=` TXT record does not hold a DID.
    #[error("DNS: {0:?} is not a DID")]
    BadTxt(String),
    /// The TXT records name different DIDs.
    #[error("DNS: several different DIDs")]
    Conflicting,
}

/// The DID of a `/.well-known/atproto-did` body: the whole body, surrounding whitespace
/// trimmed, at most [`MAX_WELL_KNOWN_BYTES`].
///
/// # Errors
/// [`ResolutionError::NotADid`] for anything else.
pub fn did_from_well_known(body: &[u8]) -> Result<Did, ResolutionError> {
    if body.len() > MAX_WELL_KNOWN_BYTES {
        return Err(ResolutionError::NotADid);
    }
    std::str::from_utf8(body)
        .ok()
        .and_then(|s| Did::new(s.trim()).ok())
        .ok_or(ResolutionError::NotADid)
}

/// The DID named by `_atproto` TXT record texts: every `did=` record must hold the same
/// DID; other records are ignored. `Ok(None)` when there is no `did=` record.
///
/// # Errors
/// [`ResolutionError::BadTxt`] for a `did=` record without a DID,
/// [`ResolutionError::Conflicting`] for records naming different DIDs.
pub fn did_from_txt<S: AsRef<str>>(
    texts: impl IntoIterator<Item = S>,
) -> Result<Option<Did>, ResolutionError> {
    let mut found: Option<Did> = None;
    for text in texts {
        let text = text.as_ref();
        let Some(value) = text.strip_prefix("did=") else {
            continue;
        };
        let did = Did::new(value.trim()).map_err(|_| ResolutionError::BadTxt(text.to_owned()))?;
        match &found {
            Some(existing) if *existing != did => return Err(ResolutionError::Conflicting),
            _ => found = Some(did),
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_known_body_is_one_did_with_whitespace_around_it() {
        assert_eq!(
            did_from_well_known(b" did:plc:abc\n").unwrap().as_str(),
            "did:plc:abc"
        );
        for bad in [&b"did:plc:abc did:plc:def"[..], b"<html>", b"\xff\xfe", b""] {
            assert_eq!(did_from_well_known(bad), Err(ResolutionError::NotADid));
        }
        let huge = format!("did:plc:{}", "a".repeat(MAX_WELL_KNOWN_BYTES));
        assert_eq!(
            did_from_well_known(huge.as_bytes()),
            Err(ResolutionError::NotADid)
        );
    }

    #[test]
    fn txt_records_yield_the_did_they_agree_on() {
        let one = did_from_txt(["v=spf1 -all", "did=did:plc:abc"]).unwrap();
        assert_eq!(one.unwrap().as_str(), "did:plc:abc");
        assert_eq!(
            did_from_txt(["did=did:plc:abc", "did=did:plc:abc"])
                .unwrap()
                .unwrap()
                .as_str(),
            "did:plc:abc"
        );
        assert_eq!(did_from_txt(["v=spf1"]), Ok(None));
        assert_eq!(did_from_txt(Vec::<String>::new()), Ok(None));
        assert_eq!(
            did_from_txt(["did=did:plc:abc", "did=did:plc:def"]),
            Err(ResolutionError::Conflicting)
        );
        assert!(matches!(
            did_from_txt(["did=nope"]),
            Err(ResolutionError::BadTxt(_))
        ));
    }
}
