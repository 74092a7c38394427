//! Resync: fetch a whole repo from its PDS, verify it, diff it against the record index,
//! emit historical events, then cut over to live processing atomically.

pub mod diff;
