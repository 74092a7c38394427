//! tap-atproto: the atproto sync core of tap — bytes in, verified protocol values out.
//! Pure: no async runtime, no database, no HTTP, no logging policy.
//!
//! # Module map
//!
//! | module | owns | key items |
//! |---|---|---|
//! | [`syntax`] | identifier syntax (interop vectors) | [`syntax::Did`], [`syntax::Handle`], [`syntax::Nsid`], [`syntax::RecordKey`], [`syntax::Tid`] (also the repo `rev`), [`syntax::AtUri`], [`syntax::AtIdentifier`], [`syntax::Datetime`], [`syntax::CollectionFilter`], [`syntax::split_record_path`] |
//! | [`hash`] | SHA-256, CIDs, block maps | [`hash::sha256`], [`hash::cid_for_cbor`], [`hash::BlockMap`], [`hash::BlockSource`] |
//! | [`cbor`] | zero-copy DAG-CBOR reader, canonical writer | [`cbor::Reader`], `write_*` |
//! | [`atjson`] | record DAG-CBOR ↔ atproto JSON | [`record_to_json`], [`atjson::json_to_cbor`] |
//! | [`car`] | CAR v1 reading (slice + stream) with hash checks and caps | [`car::read_car`], [`car::CarSlice`], [`car::CarStream`], [`car::CarLimits`] |
//! | [`crypto`] | keys and signature checks (K-256, P-256, low-S, 64-byte only) | [`PublicKey`] (`from_did_key`, `from_multikey`, `from_verification_method`, `from_did_doc`, `verify`) |
//! | [`did_doc`] | DID-document fields atproto uses | [`did_doc::DidDocument`] (`parse`, `atproto_key`, `pds_endpoint`, `handle`) |
//! | [`commit`] | signed commits (v3) | [`commit::Commit`] (`decode`, `unsigned_bytes`, `verify_signature`) |
//! | [`mst`] | MST codec, heights, walk, mutable partial tree, Sync 1.1 inversion, diffs | [`mst::Mst`], [`mst::invert_ops`], [`mst::walk_tree`], [`mst::diff_sorted`], [`mst::diff_trees`] |
//! | [`firehose`] | `subscribeRepos` frames and commit verification | [`decode_frame`] → [`Frame`], [`verify_commit_frame`] → [`VerifiedCommit`], [`firehose::verify_sync_frame`] |
//! | [`jetstream`] | Jetstream v1 JSON events (claims, not proofs) | [`jetstream::parse_event`] → [`jetstream::Positioned`] |
//! | [`record_filter`] | record-content rules (`--record-filters`): parse, order by reference, evaluate | [`record_filter::RuleSet`], [`record_filter::Rule`], [`record_filter::Facts`] |
//! | [`proof`] | `getRecord` proofs: one key's value (or absence) under a signed commit | [`proof::verify_record_proof`], [`proof::record_proof_blocks`] |
//! | [`resolution`] | handle resolution answers: well-known bodies, `_atproto` TXT texts | [`resolution::did_from_well_known`], [`resolution::did_from_txt`] |
//! | [`stream`] | bounded-memory whole-repo walk (`getRepo` CARs, any block order) | [`RepoWalker`], [`WalkLimits`], [`WalkedRecord`] |
//! | [`writer`] | building repos, proof CARs and frames (tests, tools) | [`writer::RepoWriter`], [`writer::encode_commit_frame`] |
//!
//! # Typical use (the daemon)
//!
//! ```text
//! live:    let frame = decode_frame(&ws_message, &FrameLimits::default())?;
//!          if let Frame::Commit(c) = frame { let v = verify_commit_frame(&c, &key)?; … v.ops … }
//! resync:  let mut w = RepoWalker::new(Some(did), Some(key), WalkLimits::default());
//!          for chunk in body { w.push(&chunk)?; while let Some(r) = w.next_record()? { … } }
//!          w.finish()?; while let Some(r) = w.next_record()? { … }
//! records: record_to_json(&r.bytes, &mut json_buf)?;   // on error: emit the CID without a body
//! keys:    let key = DidDocument::parse(&doc_json)?.atproto_key()?;  // cache per DID
//! ```
//!
//! Every error is a typed enum per module (`<Module>Error`); no function panics on
//! untrusted input (fuzzed: `fuzz/`, property-tested: `tests/properties.rs`).

pub mod atjson;
pub mod car;
pub mod cbor;
pub mod commit;
pub mod crypto;
pub mod did_doc;
pub mod firehose;
pub mod hash;
pub mod jetstream;
pub mod mst;
pub mod proof;
pub mod record_filter;
pub mod resolution;
pub mod stream;
pub mod syntax;
pub mod writer;

pub use atjson::record_to_json;
pub use cid::Cid;
pub use crypto::PublicKey;
pub use firehose::{Frame, VerifiedCommit, decode_frame, verify_commit_frame};
pub use stream::{RepoWalker, WalkLimits, WalkedRecord};
