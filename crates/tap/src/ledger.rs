//! The byte ledger: every byte tap downloads, attributed to where it came from (relay,
//! Jetstream, each PDS call, PLC, handle resolution, relay listing pages), to the PDS host, and, for record
//! bytes, to the collection and to whether the filters kept them.
//!
//! Counts are of HTTP bodies and WebSocket messages as tap reads them (after any transfer
//! decoding), not of TCP segments; `GET /stats/bandwidth` says so. Hosts and collections
//! come from the network, so their tables are bounded: past [`MAX_TRACKED`] distinct names
//! new ones are counted under `other`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Value, json};

use crate::telemetry as t;

/// Distinct hosts, and distinct collections, given a row of their own.
pub const MAX_TRACKED: usize = 1024;
/// Rows shown by name in `/stats/bandwidth`; the rest are summed under `other`.
pub const SHOWN: usize = 20;

/// Where downloaded bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The relay's firehose (`subscribeRepos`).
    Relay,
    /// Jetstream (`--jetstream-url`).
    Jetstream,
    /// The relay's repo listing (`listRepos`, `listReposByCollection`).
    RelayListing,
    /// A PDS call.
    Pds(PdsCall),
    /// The PLC directory.
    Plc,
    /// Handle and `did:web` resolution over HTTPS (and the test resolver).
    WellKnown,
}

/// The PDS calls tap makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PdsCall {
    /// `com.atproto.sync.getRepo`.
    GetRepo,
    /// `com.atproto.sync.getLatestCommit`.
    GetLatestCommit,
    /// `com.atproto.sync.getBlocks`.
    GetBlocks,
    /// `com.atproto.sync.getRecord` (Jetstream proofs).
    GetRecord,
    /// `com.atproto.sync.getRepoStatus` (Jetstream account events, confirmed).
    GetRepoStatus,
}

impl PdsCall {
    /// The call of an XRPC method name (`getRepo` for any other).
    #[must_use]
    pub fn for_method(method: &str) -> Self {
        match method.rsplit('.').next() {
            Some("getLatestCommit") => Self::GetLatestCommit,
            Some("getBlocks") => Self::GetBlocks,
            Some("getRecord") => Self::GetRecord,
            Some("getRepoStatus") => Self::GetRepoStatus,
            _ => Self::GetRepo,
        }
    }
}

impl Source {
    const ALL: [Self; 10] = [
        Self::Relay,
        Self::Jetstream,
        Self::RelayListing,
        Self::Pds(PdsCall::GetRepo),
        Self::Pds(PdsCall::GetLatestCommit),
        Self::Pds(PdsCall::GetBlocks),
        Self::Pds(PdsCall::GetRecord),
        Self::Pds(PdsCall::GetRepoStatus),
        Self::Plc,
        Self::WellKnown,
    ];

    /// The name in `/stats/bandwidth` and the Prometheus `source` label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relay => "relay.firehose",
            Self::Jetstream => "jetstream",
            Self::RelayListing => "relay.listing",
            Self::Pds(PdsCall::GetRepo) => "pds.getRepo",
            Self::Pds(PdsCall::GetLatestCommit) => "pds.getLatestCommit",
            Self::Pds(PdsCall::GetBlocks) => "pds.getBlocks",
            Self::Pds(PdsCall::GetRecord) => "pds.getRecord",
            Self::Pds(PdsCall::GetRepoStatus) => "pds.getRepoStatus",
            Self::Plc => "plc",
            Self::WellKnown => "handle_resolution",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// Record bytes of one collection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordBytes {
    /// Kept by the filters (sent to consumers).
    pub delivered: u64,
    /// Downloaded but dropped by the filters.
    pub discarded: u64,
}

/// Counts per name, with at most [`MAX_TRACKED`] names.
#[derive(Debug, Default)]
struct Bounded<T> {
    rows: HashMap<String, T>,
    other: T,
}

impl<T: Default> Bounded<T> {
    fn row(&mut self, name: &str) -> &mut T {
        // Looked up by `&str` first: the name is copied only the first time it is seen.
        if !self.rows.contains_key(name) {
            if self.rows.len() >= MAX_TRACKED {
                return &mut self.other;
            }
            self.rows.insert(name.to_owned(), T::default());
        }
        self.rows.get_mut(name).unwrap_or(&mut self.other)
    }
}

#[derive(Debug, Default)]
struct Books {
    hosts: Bounded<u64>,
    collections: Bounded<RecordBytes>,
}

/// The ledger. Cheap to clone; all clones count into one.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    sources: Arc<[AtomicU64; Source::ALL.len()]>,
    books: Arc<Mutex<Books>>,
}

impl Ledger {
    /// `bytes` downloaded from `source` (`host`: the PDS or other server, when one applies).
    pub fn downloaded(&self, source: Source, host: Option<&str>, bytes: u64) {
        self.sources[source.index()].fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!(t::BYTES_DOWNLOADED, "source" => source.as_str()).increment(bytes);
        if let Some(host) = host {
            *self.books().hosts.row(host) += bytes;
        }
    }

    /// A record's `bytes` of `collection` arrived; `kept` when the filters want it.
    pub fn record(&self, collection: &str, bytes: u64, kept: bool) {
        let mut books = self.books();
        let row = books.collections.row(collection);
        if kept {
            row.delivered += bytes;
        } else {
            row.discarded += bytes;
        }
        drop(books);
        let fate = if kept { "delivered" } else { "discarded" };
        metrics::counter!(t::RECORD_BYTES, "fate" => fate).increment(bytes);
    }

    /// Bytes downloaded from `source` so far.
    #[must_use]
    pub fn total_of(&self, source: Source) -> u64 {
        self.sources[source.index()].load(Ordering::Relaxed)
    }

    /// Bytes downloaded from every source.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.sources.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The `GET /stats/bandwidth` document.
    #[must_use]
    pub fn report(&self) -> Value {
        let by_source: serde_json::Map<String, Value> = Source::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), json!(self.total_of(*s))))
            .collect();
        let books = self.books();
        let mut hosts: Vec<(&String, u64)> =
            books.hosts.rows.iter().map(|(h, n)| (h, *n)).collect();
        hosts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let shown_hosts: serde_json::Map<String, Value> = hosts
            .iter()
            .take(SHOWN)
            .map(|(h, n)| ((*h).clone(), json!(n)))
            .collect();
        let other_hosts = books.hosts.other + hosts.iter().skip(SHOWN).map(|(_, n)| n).sum::<u64>();
        let mut collections: Vec<(&String, RecordBytes)> = books
            .collections
            .rows
            .iter()
            .map(|(c, r)| (c, *r))
            .collect();
        collections.sort_by(|a, b| {
            let size = |r: &RecordBytes| r.delivered + r.discarded;
            size(&b.1).cmp(&size(&a.1)).then(a.0.cmp(b.0))
        });
        let mut other = books.collections.other;
        for (_, r) in collections.iter().skip(SHOWN) {
            other.delivered += r.delivered;
            other.discarded += r.discarded;
        }
        let row = |r: &RecordBytes| {
            json!({
                "downloaded": r.delivered + r.discarded,
                "delivered": r.delivered,
                "discarded": r.discarded,
            })
        };
        let shown_collections: serde_json::Map<String, Value> = collections
            .iter()
            .take(SHOWN)
            .map(|(c, r)| ((*c).clone(), row(r)))
            .collect();
        let records = collections
            .iter()
            .fold(books.collections.other, |mut sum, (_, r)| {
                sum.delivered += r.delivered;
                sum.discarded += r.discarded;
                sum
            });
        let total = self.total();
        let record_total = records.delivered + records.discarded;
        json!({
            "counted": "HTTP bodies and WebSocket messages as read, after transfer decoding",
            "total": total,
            "by_source": by_source,
            "by_host": { "top": shown_hosts, "other": other_hosts },
            "records": row(&records),
            "structure": total.saturating_sub(record_total),
            "by_collection": { "top": shown_collections, "other": row(&other) },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_across_sources_hosts_and_collections() {
        let ledger = Ledger::default();
        ledger.downloaded(Source::Relay, None, 1000);
        ledger.downloaded(Source::Pds(PdsCall::GetRepo), Some("pds.a"), 700);
        ledger.downloaded(Source::Pds(PdsCall::GetBlocks), Some("pds.b"), 300);
        ledger.downloaded(Source::Plc, Some("plc"), 50);
        ledger.record("app.bsky.feed.post", 400, false);
        ledger.record("app.bsky.actor.profile", 100, true);
        let r = ledger.report();
        assert_eq!(r["total"], 2050);
        assert_eq!(r["by_source"]["relay.firehose"], 1000);
        assert_eq!(r["by_source"]["pds.getRepo"], 700);
        assert_eq!(r["by_host"]["top"]["pds.a"], 700);
        assert_eq!(r["records"]["downloaded"], 500);
        assert_eq!(r["records"]["delivered"], 100);
        assert_eq!(r["structure"], 1550);
        assert_eq!(
            r["by_collection"]["top"]["app.bsky.feed.post"]["discarded"],
            400
        );
    }

    #[test]
    fn hosts_and_collections_beyond_the_bound_are_counted_as_other() {
        let ledger = Ledger::default();
        for n in 0..MAX_TRACKED + 10 {
            ledger.downloaded(Source::Plc, Some(&format!("h{n}")), 1);
            ledger.record(&format!("c.n{n}"), 1, true);
        }
        let r = ledger.report();
        assert_eq!(
            r["by_host"]["top"].as_object().map(|o| o.len()),
            Some(SHOWN)
        );
        assert_eq!(r["by_host"]["other"], (MAX_TRACKED + 10 - SHOWN) as u64);
        assert_eq!(r["records"]["delivered"], (MAX_TRACKED + 10) as u64);
        assert_eq!(
            r["by_collection"]["other"]["delivered"],
            (MAX_TRACKED + 10 - SHOWN) as u64
        );
        let books = ledger.books();
        assert_eq!(books.hosts.rows.len(), MAX_TRACKED, "memory stays bounded");
    }
}
