//! The walked snapshot against the stored record index: index changes and historical
//! events, written in batches each guarded by "the repo is still resyncing".

use std::sync::Arc;

use serde_json::Value;
use tap_atproto::Cid;
use tap_atproto::stream::RepoWalker;
use tap_atproto::syntax::{Did, Tid};

use super::deferred::Deferred;
use super::diff::{Change, CollectionMerge};
use super::{BATCH, ResyncError};
use crate::repos::engine::Engine;
use crate::repos::filter::Scope;
use crate::repos::prepared::record_json;
use crate::repos::rules::{self, SnapshotFacts};
use crate::store::{
    EventStorage, NewEvent, RecordChange, RepoState, RepoWrite, Store, WriteCondition,
};
use crate::wire::{Action, RecordEvent};

/// Stored index rows read per page.
const INDEX_PAGE: usize = 1000;

/// Turns the walked snapshot into index changes and historical events.
pub(super) struct Snapshot<'a> {
    engine: &'a Engine,
    store: &'a Store,
    did: &'a Did,
    stored_rev: Option<Tid>,
    rev: Option<String>,
    /// Collection being merged, and its merge state.
    current: Option<(String, CollectionMerge)>,
    /// Collections seen in the snapshot (to find stored collections that vanished).
    seen: Vec<String>,
    /// `InMemoryBackfill` when the index was empty at the start: no merge, all creates.
    storage: EventStorage,
    /// Emit unchanged records too (as creates): the rerun of an undelivered backfill.
    replay: bool,
    write: RepoWrite,
    /// Record bytes of the current run of one collection, not yet in the ledger
    /// (`collection`, bytes kept, bytes discarded): records come in key order, so the
    /// ledger is told once per collection instead of once per record.
    tally: Option<(String, u64, u64)>,
    /// The filters and rules this snapshot is judged by, taken once at its start.
    scope: Arc<Scope>,
    /// The delivered records other rules read, as they are decided.
    facts: SnapshotFacts,
    /// Records of collections whose rules read other records, kept on disk until what
    /// they read is decided (the repo's key order may bring them first).
    deferred: Deferred,
}

impl<'a> Snapshot<'a> {
    /// A snapshot of `did` to merge against what is stored. `replay`: emit unchanged
    /// records too (the rerun of a backfill whose events may not all have been delivered).
    /// `scope`: the filters and rules to judge by; `defer_cap`: most bytes of records kept
    /// on disk for their rules (the repo's size cap).
    pub(super) fn new(
        engine: &'a Engine,
        did: &'a Did,
        stored_rev: Option<Tid>,
        storage: EventStorage,
        replay: bool,
        scope: Arc<Scope>,
        defer_cap: u64,
    ) -> Self {
        Self {
            facts: SnapshotFacts::new(did.as_str(), scope.rules()),
            deferred: Deferred::new(defer_cap),
            scope,
            engine,
            store: engine.store(),
            did,
            stored_rev,
            rev: None,
            current: None,
            seen: Vec::new(),
            storage,
            replay,
            write: Self::empty_write(did, storage),
            tally: None,
        }
    }

    /// Counts a downloaded record's bytes towards the byte ledger, as kept or discarded
    /// (by the collection filters or a rule).
    fn tally(&mut self, collection: &str, bytes: u64, kept: bool) {
        let (k, d) = if kept { (bytes, 0) } else { (0, bytes) };
        match &mut self.tally {
            Some((c, kept, dropped)) if c == collection => {
                *kept += k;
                *dropped += d;
            }
            _ => {
                self.settle_tally();
                self.tally = Some((collection.to_owned(), k, d));
            }
        }
    }

    fn settle_tally(&mut self) {
        if let Some((collection, kept, dropped)) = self.tally.take() {
            let ledger = self.engine.ledger();
            if kept > 0 {
                ledger.record(&collection, kept, true);
            }
            if dropped > 0 {
                ledger.record(&collection, dropped, false);
            }
        }
    }

    fn empty_write(did: &Did, storage: EventStorage) -> RepoWrite {
        let mut w = RepoWrite::new(did.clone());
        w.condition = WriteCondition::RepoInState(RepoState::Resyncing);
        w.storage = storage;
        w
    }

    /// Whether the index was empty at the start, so there is nothing to merge against.
    fn is_first_backfill(&self) -> bool {
        self.storage == EventStorage::InMemoryBackfill
    }

    /// Sets the snapshot's rev, which every event it emits carries (deletes included, also
    /// when no wanted record set it first); it must not be older than what tap applied.
    pub(super) fn set_rev(&mut self, rev: &str) -> Result<(), ResyncError> {
        if let Some(stored) = &self.stored_rev
            && rev < stored.as_str()
        {
            return Err(ResyncError::Failed(format!(
                "snapshot rev {rev} is older than the stored rev {stored}"
            )));
        }
        self.rev.get_or_insert_with(|| rev.to_owned());
        Ok(())
    }

    /// Feeds every record the walker has ready.
    pub(super) async fn drain(&mut self, walker: &mut RepoWalker) -> Result<(), ResyncError> {
        while let Some(record) = walker.next_record()? {
            let rev = walker
                .commit()
                .map(|c| c.rev)
                .ok_or_else(|| ResyncError::Failed("record before commit".into()))?;
            self.record(&rev, &record.path, &record.cid, Some(&record.bytes))
                .await?;
        }
        Ok(())
    }

    /// One record of the snapshot at `rev`, in key order (`path` is `collection/rkey`).
    /// `bytes` is `None` for a record an incremental fetch proved unchanged from the index,
    /// so it was not downloaded: it can only merge as unchanged.
    pub(super) async fn record(
        &mut self,
        rev: &Tid,
        path: &str,
        cid: &Cid,
        bytes: Option<&[u8]>,
    ) -> Result<(), ResyncError> {
        if self.rev.is_none() {
            self.set_rev(rev.as_str())?;
        }
        let Some((collection, rkey)) = path.split_once('/') else {
            return Ok(()); // not a record path; the Go tap skips these too
        };
        if !self.scope.wants_collection(collection) {
            if let Some(bytes) = bytes {
                self.tally(collection, bytes.len() as u64, false);
            }
            return Ok(());
        }
        if self.scope.rules().is_dependent(collection) {
            // Judged once what its rule reads is decided: after the walk.
            let Some(bytes) = bytes else {
                return Err(unfetched(path));
            };
            return self
                .deferred
                .push(collection, rkey, cid, bytes)
                .map_err(deferral_failed);
        }
        self.judge(collection, rkey, cid, bytes).await
    }

    /// Applies the collection's rule to a wanted record and merges it if it is delivered;
    /// one that is not counts as absent, so the merge deletes it if it was delivered before.
    /// `bytes` is `None` for a record the index proved unchanged: it was delivered, and a
    /// rule that reads only the record says the same of the same record.
    async fn judge(
        &mut self,
        collection: &str,
        rkey: &str,
        cid: &Cid,
        bytes: Option<&[u8]>,
    ) -> Result<(), ResyncError> {
        let scope = Arc::clone(&self.scope);
        let rules = scope.rules();
        let json = bytes.map(record_json);
        let rule = rules.rule(collection);
        let value = match (&json, rule.is_some() || rules.is_referenced(collection)) {
            (Some(json), true) => rules::record_value(json.as_deref()),
            _ => Value::Null,
        };
        let kept = match (rule, &json) {
            (Some(rule), Some(_)) => rules::holds(
                rule,
                self.did.as_str(),
                collection,
                rkey,
                &value,
                &self.facts,
            ),
            _ => true,
        };
        if let Some(bytes) = bytes {
            self.tally(collection, bytes.len() as u64, kept);
        }
        if !kept {
            return Ok(());
        }
        if !self.facts.note(rules, collection, rkey, &value) {
            return Err(ResyncError::Failed(format!(
                "record filters: more than {} referenced records in one repo",
                rules::MAX_FACTS
            )));
        }
        self.merge(collection, rkey, cid, json).await
    }

    /// Merges a delivered record with the index. `json`: `None` when the record was not
    /// downloaded (proved unchanged), `Some(None)` when it has no readable body.
    async fn merge(
        &mut self,
        collection: &str,
        rkey: &str,
        cid: &Cid,
        json: Option<Option<String>>,
    ) -> Result<(), ResyncError> {
        let path = || format!("{collection}/{rkey}");
        if self.is_first_backfill() {
            let Some(json) = json else {
                return Err(unfetched(&path()));
            };
            let cid = cid.to_string();
            let create = Change::Create {
                rkey: rkey.to_owned(),
            };
            return self
                .add(collection, create, Some((&cid, json.as_deref())))
                .await;
        }
        if self.current.as_ref().is_none_or(|(c, _)| c != collection) {
            self.finish_collection().await?;
            self.seen.push(collection.to_owned());
            self.current = Some((collection.to_owned(), CollectionMerge::new()));
        }
        let cid = cid.to_string();
        let mut changes = Vec::new();
        loop {
            let done = match &mut self.current {
                Some((_, merge)) => merge.push(rkey, &cid, &mut changes),
                None => true,
            };
            if done {
                break;
            }
            self.refill().await?;
        }
        let announced = changes.iter().any(
            |c| matches!(c, Change::Create { rkey: k } | Change::Update { rkey: k } if k == rkey),
        );
        if self.replay && !announced {
            changes.push(Change::Create {
                rkey: rkey.to_owned(),
            });
        }
        let json = match json {
            Some(json) => json,
            // The index changed under the fetch that trusted it: no verdict on the repo,
            // the next attempt fetches again.
            None if announced => return Err(unfetched(&path())),
            None => None,
        };
        for change in changes {
            self.add(collection, change, Some((&cid, json.as_deref())))
                .await?;
        }
        Ok(())
    }

    /// Judges the deferred records, each collection after every collection its rule reads.
    async fn judge_deferred(&mut self) -> Result<(), ResyncError> {
        let scope = Arc::clone(&self.scope);
        for collection in scope.rules().dependent_order() {
            let Some(mut reader) = self
                .deferred
                .reader(collection.as_str())
                .map_err(deferral_failed)?
            else {
                continue;
            };
            while let Some(entry) = reader.next().map_err(deferral_failed)? {
                self.judge(
                    collection.as_str(),
                    &entry.rkey,
                    &entry.cid,
                    Some(&entry.bytes),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Reads the next page of the current collection's stored rows.
    async fn refill(&mut self) -> Result<(), ResyncError> {
        let Some((collection, merge)) = &mut self.current else {
            return Ok(());
        };
        let after = (
            collection.clone(),
            merge.stored_resume_key().unwrap_or("").to_owned(),
        );
        let page = self
            .store
            .records_page(self.did.as_str(), Some(after), INDEX_PAGE)
            .await?;
        let mine: Vec<(String, String)> = page
            .into_iter()
            .take_while(|r| r.collection == *collection)
            .map(|r| (r.rkey, r.cid))
            .collect();
        // A short page (the index ended, or ran into the next collection) is the last.
        let last = mine.len() < INDEX_PAGE;
        merge.feed_stored(mine, last);
        Ok(())
    }

    /// Ends the current collection: stored rows after the snapshot's last record of it are
    /// deletes, emitted a page at a time (memory stays bounded however many there are).
    async fn finish_collection(&mut self) -> Result<(), ResyncError> {
        let Some(collection) = self.current.as_ref().map(|(c, _)| c.clone()) else {
            return Ok(());
        };
        let mut changes = Vec::new();
        loop {
            let done = match &mut self.current {
                Some((_, merge)) => merge.finish(&mut changes),
                None => true,
            };
            for change in changes.drain(..) {
                self.add(&collection, change, None).await?;
            }
            if done {
                break;
            }
            self.refill().await?;
        }
        self.current = None;
        Ok(())
    }

    /// Stored collections absent from the snapshot: every record in them was deleted.
    async fn delete_vanished_collections(&mut self) -> Result<(), ResyncError> {
        // Only the collections the snapshot did not have are read again.
        let mut vanished = self.store.record_collections(self.did.as_str()).await?;
        vanished.retain(|c| !self.seen.contains(c));
        for collection in vanished {
            let wanted = self.scope.wants_collection(&collection);
            let mut last_rkey = String::new();
            loop {
                let page = self
                    .store
                    .records_page(
                        self.did.as_str(),
                        Some((collection.clone(), last_rkey.clone())),
                        INDEX_PAGE,
                    )
                    .await?;
                let rows: Vec<_> = page
                    .into_iter()
                    .take_while(|r| r.collection == collection)
                    .collect();
                let done = rows.len() < INDEX_PAGE;
                for row in rows {
                    last_rkey.clone_from(&row.rkey);
                    if wanted {
                        self.add(&collection, Change::Delete { rkey: row.rkey }, None)
                            .await?;
                    } else {
                        // No longer wanted by the filters: forget it silently.
                        self.write.records.push(RecordChange::Delete {
                            collection: collection.clone(),
                            rkey: row.rkey,
                        });
                        if self.write.records.len() >= BATCH {
                            self.flush().await?;
                        }
                    }
                }
                if done {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn add(
        &mut self,
        collection: &str,
        change: Change,
        record: Option<(&str, Option<&str>)>,
    ) -> Result<(), ResyncError> {
        let (action, rkey) = match change {
            Change::Create { rkey } => (Action::Create, rkey),
            Change::Update { rkey } => (Action::Update, rkey),
            Change::Delete { rkey } => (Action::Delete, rkey),
        };
        let (cid, json) = match (action, record) {
            (Action::Delete, _) | (_, None) => (None, None),
            (_, Some((cid, json))) => (Some(cid), json),
        };
        let payload = RecordEvent {
            live: false,
            did: self.did.as_str(),
            rev: self.rev.as_deref().unwrap_or_default(),
            collection,
            rkey: &rkey,
            action,
            cid,
            record_json: json,
            unverified: false,
        }
        .payload();
        self.write.events.push(NewEvent {
            live: false,
            payload,
        });
        self.write.records.push(match cid {
            Some(cid) => RecordChange::Put {
                collection: collection.to_owned(),
                rkey,
                cid: cid.to_owned(),
            },
            None => RecordChange::Delete {
                collection: collection.to_owned(),
                rkey,
            },
        });
        if self.write.events.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ResyncError> {
        if self.write.events.is_empty() && self.write.records.is_empty() {
            return Ok(());
        }
        let write = std::mem::replace(&mut self.write, Self::empty_write(self.did, self.storage));
        self.engine.outbox().append(write).await?;
        crate::failpoint::hit("resync-batch-written");
        Ok(())
    }

    pub(super) async fn finish(mut self) -> Result<(), ResyncError> {
        self.judge_deferred().await?;
        if !self.is_first_backfill() {
            self.finish_collection().await?;
            self.delete_vanished_collections().await?;
        }
        self.flush().await
    }
}

impl Drop for Snapshot<'_> {
    /// Whatever became of the resync, the bytes were downloaded.
    fn drop(&mut self) {
        self.settle_tally();
    }
}

/// The deferred-records file failed (this machine's disk, or its cap): no verdict on the
/// repo, retried later.
fn deferral_failed(e: std::io::Error) -> ResyncError {
    ResyncError::Transient(format!("record filters: {e}"))
}

/// A record left unfetched because the index held it, which the index does not hold after
/// all: it changed under the fetch that relied on it. No verdict on the repo; the next
/// attempt fetches again.
fn unfetched(path: &str) -> ResyncError {
    ResyncError::Transient(format!("{path} differs from the index the fetch relied on"))
}
