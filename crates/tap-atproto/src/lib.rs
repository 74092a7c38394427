//! tap-atproto: the atproto sync core of tap. Pure: no async runtime, no database, no HTTP.
//!
//! Module map:
//! - [`syntax`]: validated identifier newtypes (`Did`, `Handle`, `Nsid`, `RecordKey`, `Tid`,
//!   `AtUri`, `Datetime`) and `CollectionFilter`.
//! - [`hash`]: SHA-256, CID construction and parsing, `BlockMap`/`BlockSource`.
//! - [`cbor`]: zero-copy DAG-CBOR reader and canonical writer (atproto subset).
//! - [`atjson`]: DAG-CBOR record → atproto JSON transcoder (`record_to_json`) and back.

pub mod atjson;
pub mod cbor;
pub mod hash;
pub mod syntax;

pub use atjson::record_to_json;
pub use cid::Cid;
