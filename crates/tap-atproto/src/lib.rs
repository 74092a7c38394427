//! tap-atproto: the atproto sync core of tap. Pure: no async runtime, no database, no HTTP.
//!
//! Module map:
//! - [`syntax`]: validated identifier newtypes (`Did`, `Handle`, `Nsid`, `RecordKey`, `Tid`,
//!   `AtUri`, `Datetime`) and `CollectionFilter`.
//! - [`hash`]: SHA-256, CID construction and parsing, `BlockMap`/`BlockSource`.
//! - [`cbor`]: zero-copy DAG-CBOR reader and canonical writer (atproto subset).
//! - [`atjson`]: DAG-CBOR record → atproto JSON transcoder (`record_to_json`) and back.
//! - [`car`]: CAR v1 reader (zero-copy slice and incremental stream), writer for tests.
//! - [`crypto`]: `PublicKey` (K-256, P-256; did:key / Multikey / legacy) and verification.
//! - [`did_doc`]: DID-document parsing: `#atproto` key, `#atproto_pds`, handle.
//! - [`commit`]: signed commit decode, unsigned re-encoding, signature check.
//! - [`mst`]: MST node codec, key heights, validating walk, mutable partial tree and Sync 1.1
//!   inversion (`invert_ops`), diffs.
//! - [`firehose`]: frame decoding (`decode_frame`) and `verify_commit_frame` (Sync 1.1).
//! - [`stream`]: bounded-memory streaming walk of a repo CAR (`RepoWalker`), any block
//!   order (spills to a temp file beyond a memory budget).
//! - [`writer`]: in-memory repo writer (signed commits, CAR exports, `#commit` frames with
//!   proofs) for tests, fixtures and tools; signing is supplied by the caller.

pub mod atjson;
pub mod car;
pub mod cbor;
pub mod commit;
pub mod crypto;
pub mod did_doc;
pub mod firehose;
pub mod hash;
pub mod mst;
pub mod stream;
pub mod syntax;
pub mod writer;

pub use atjson::record_to_json;
pub use cid::Cid;
pub use crypto::PublicKey;
pub use firehose::{Frame, VerifiedCommit, decode_frame, verify_commit_frame};
pub use stream::{RepoWalker, WalkLimits, WalkedRecord};
