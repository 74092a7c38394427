//! Repo commit objects (version 3): decoding, canonical unsigned re-encoding (the bytes the
//! signature covers; `prev` always written, as null when absent), and signature checks.

use cid::Cid;

use crate::cbor::{self, CborError, Reader, major};
use crate::crypto::{KeyError, PublicKey};
use crate::syntax::{Did, SyntaxError, Tid};

/// Why a commit block is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// Malformed DAG-CBOR.
    #[error("malformed commit: {0}")]
    Cbor(#[from] CborError),
    /// A required field is missing or has the wrong type.
    #[error("malformed commit: {0}")]
    Field(&'static str),
    /// `did` or `rev` is not valid syntax.
    #[error("malformed commit: {0}")]
    Syntax(#[from] SyntaxError),
    /// Only version 3 commits are supported.
    #[error("unsupported commit version {0}")]
    Version(i64),
    /// The signature does not verify with the given key.
    #[error("commit signature: {0}")]
    Signature(#[from] KeyError),
}

/// A decoded, not yet verified, signed commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The repo's DID.
    pub did: Did,
    /// Always 3.
    pub version: i64,
    /// Root CID of the MST.
    pub data: Cid,
    /// Revision (a TID), increasing with every commit.
    pub rev: Tid,
    /// Previous commit (usually null in v3).
    pub prev: Option<Cid>,
    /// Signature over the unsigned encoding (64 bytes when valid).
    pub sig: Vec<u8>,
}

impl Commit {
    /// Decodes a commit block (any key order; unknown keys are rejected since the
    /// signature would not cover them).
    ///
    /// # Errors
    /// [`CommitError`] when the block is not a version-3 commit.
    pub fn decode(bytes: &[u8]) -> Result<Self, CommitError> {
        let mut r = Reader::new(bytes);
        let n = r.map_len()?;
        let (mut did, mut version, mut data, mut rev, mut prev, mut sig) =
            (None, None, None, None, None, None);
        for _ in 0..n {
            match r.text()? {
                "did" => did = Some(Did::new(r.text()?)?),
                "version" => version = Some(r.int()?),
                "data" => data = Some(r.link()?),
                "rev" => rev = Some(Tid::new(r.text()?)?),
                "prev" => prev = Some(r.nullable_link()?),
                "sig" => sig = Some(r.bytes()?.to_vec()),
                _ => return Err(CommitError::Field("unknown field")),
            }
        }
        r.finish()?;
        let version = version.ok_or(CommitError::Field("missing version"))?;
        if version != 3 {
            return Err(CommitError::Version(version));
        }
        Ok(Self {
            did: did.ok_or(CommitError::Field("missing did"))?,
            version,
            data: data.ok_or(CommitError::Field("missing data"))?,
            rev: rev.ok_or(CommitError::Field("missing rev"))?,
            prev: prev.flatten(),
            sig: sig.ok_or(CommitError::Field("missing sig"))?,
        })
    }

    /// The canonical DAG-CBOR of the commit without `sig`: the signed message.
    #[must_use]
    pub fn unsigned_bytes(&self) -> Vec<u8> {
        self.encode(None)
    }

    /// The canonical DAG-CBOR of the signed commit (what its CID is computed over).
    #[must_use]
    pub fn signed_bytes(&self) -> Vec<u8> {
        self.encode(Some(&self.sig))
    }

    fn encode(&self, sig: Option<&[u8]>) -> Vec<u8> {
        // Canonical key order: did, rev, sig (3 chars), data, prev (4), version (7).
        let mut out = Vec::with_capacity(160);
        cbor::write_head(&mut out, major::MAP, if sig.is_some() { 6 } else { 5 });
        cbor::write_text(&mut out, "did");
        cbor::write_text(&mut out, self.did.as_str());
        cbor::write_text(&mut out, "rev");
        cbor::write_text(&mut out, self.rev.as_str());
        if let Some(s) = sig {
            cbor::write_text(&mut out, "sig");
            cbor::write_bytes(&mut out, s);
        }
        cbor::write_text(&mut out, "data");
        cbor::write_link(&mut out, &self.data);
        cbor::write_text(&mut out, "prev");
        cbor::write_nullable_link(&mut out, self.prev.as_ref());
        cbor::write_text(&mut out, "version");
        cbor::write_int(&mut out, self.version);
        out
    }

    /// Verifies the signature with `key`.
    ///
    /// # Errors
    /// [`CommitError::Signature`] when it does not verify (bad length, high-S, wrong key).
    pub fn verify_signature(&self, key: &PublicKey) -> Result<(), CommitError> {
        Ok(key.verify(&self.unsigned_bytes(), &self.sig)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash;

    #[test]
    fn decode_and_reencode_is_identity_for_canonical_input() {
        let c = Commit {
            did: Did::new("did:plc:abc").unwrap(),
            version: 3,
            data: hash::cid_for_cbor(b"\xa0"),
            rev: Tid::from_parts(1_700_000_000_000_000, 1),
            prev: None,
            sig: vec![7; 64],
        };
        let bytes = c.signed_bytes();
        let d = Commit::decode(&bytes).unwrap();
        assert_eq!(d, c);
        assert_eq!(d.signed_bytes(), bytes);
        // serde_ipld_dagcbor agrees that the encoding is canonical.
        let v: ipld_core::ipld::Ipld = serde_ipld_dagcbor::from_slice(&bytes).unwrap();
        assert_eq!(serde_ipld_dagcbor::to_vec(&v).unwrap(), bytes);
    }

    #[test]
    fn wrong_version_is_rejected() {
        let mut c = Commit {
            did: Did::new("did:plc:abc").unwrap(),
            version: 2,
            data: hash::cid_for_cbor(b"\xa0"),
            rev: Tid::from_parts(1, 1),
            prev: None,
            sig: vec![],
        };
        assert_eq!(
            Commit::decode(&c.signed_bytes()),
            Err(CommitError::Version(2))
        );
        c.version = 3;
        assert!(Commit::decode(&c.signed_bytes()).is_ok());
    }
}
