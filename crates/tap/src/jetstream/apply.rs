//! Jetstream jobs into the repo state machine: a claimed commit is admitted like a
//! firehose commit (same gate, same per-DID lock), proven ([`super::prove`]) or passed on
//! marked unverified, and settled by the engine (applied, buffered during a resync);
//! identity and account events go to the same engine calls as their firehose twins.

use std::sync::Arc;

use tap_atproto::jetstream::{CommitOp, Operation};
use tap_atproto::syntax::{Did, Tid};

use super::group::{Job, JobKind};
use super::prove::{ProveError, ProvenCommit, Prover};
use crate::live::dispatch::{Handler, Job as LiveJob};
use crate::repos::engine::{Engine, EngineError, Outcome};
use crate::repos::prepared::{OpChange, PreparedCommit, PreparedOp, record_json};
use crate::telemetry as t;

impl LiveJob for Job {
    fn did(&self) -> Option<&str> {
        Some(self.did.as_str())
    }

    fn positions(&self) -> &[i64] {
        &self.positions
    }

    fn describe(&self) -> String {
        match &self.kind {
            JobKind::Commit { rev, ops } => format!(
                "Jetstream commit {} ({} operations, time_us {:?})",
                rev.as_str(),
                ops.len(),
                self.positions.first()
            ),
            _ => format!("Jetstream event (time_us {:?})", self.positions.first()),
        }
    }
}

/// Handles Jetstream jobs; `prover` is `None` with `--jetstream-verify none`.
#[derive(Clone)]
pub struct JetstreamHandler {
    engine: Engine,
    prover: Option<Arc<Prover>>,
}

impl JetstreamHandler {
    /// A handler proving claims with `prover`, or trusting them without one.
    #[must_use]
    pub fn new(engine: Engine, prover: Option<Arc<Prover>>) -> Self {
        Self { engine, prover }
    }

    async fn commit(&self, did: &Did, rev: &Tid, ops: &[CommitOp]) -> Result<Outcome, EngineError> {
        let engine = &self.engine;
        let _guard = engine.locks().lock(did.as_str()).await;
        let scope = engine.scope();
        let collections = ops.iter().map(|op| op.collection.as_str());
        let repo = match engine
            .admit_commit(did.as_str(), rev.as_str(), collections, &scope, true)
            .await?
        {
            Ok(repo) => repo,
            Err(outcome) => return Ok(outcome),
        };
        // Signal collections are asked of Jetstream too; their operations only track.
        let mut wanted: Vec<&CommitOp> = ops
            .iter()
            .filter(|op| scope.wants_collection(op.collection.as_str()))
            .collect();
        if repo.rev.as_ref() == Some(rev) {
            wanted = self.not_yet_applied(did, wanted).await?;
        }
        if wanted.is_empty() {
            return Ok(Outcome::Skipped("no wanted operations not yet applied"));
        }
        let prepared = match &self.prover {
            None => {
                for op in &wanted {
                    let bytes = op.record.as_ref().map_or(0, String::len);
                    engine
                        .ledger()
                        .record(op.collection.as_str(), bytes as u64, true);
                }
                unverified(rev, &wanted, repo.prev_data.clone())
            }
            Some(prover) => match prover.prove(did, rev, &wanted).await {
                Ok(proven) => {
                    metrics::counter!(t::COMMITS_VERIFIED).increment(1);
                    self.proven_commit(rev, &wanted, proven, repo.prev_data.clone())
                }
                Err(ProveError::Unavailable(reason)) => {
                    return Err(EngineError::ProofUnavailable(reason));
                }
                Err(ProveError::Refuted(reason)) => {
                    metrics::counter!(t::COMMITS_REJECTED, "reason" => "proof").increment(1);
                    return engine.desynchronize(did.as_str(), &reason).await;
                }
            },
        };
        engine.settle_commit(did, &repo, prepared).await
    }
}

impl JetstreamHandler {
    /// At the rev tap holds: a replay after a reconnect or restart, the rest of a split
    /// commit, or a commit a resync's snapshot already brought in. What the record index
    /// already holds was delivered; the rest is returned.
    async fn not_yet_applied<'a>(
        &self,
        did: &Did,
        ops: Vec<&'a CommitOp>,
    ) -> Result<Vec<&'a CommitOp>, EngineError> {
        let mut fresh = Vec::with_capacity(ops.len());
        for op in ops {
            let held = self
                .engine
                .store()
                .record_cid(did.as_str(), op.collection.as_str(), op.rkey.as_str())
                .await?;
            if held.as_deref() != op.operation.cid().map(ToString::to_string).as_deref() {
                fresh.push(op);
            }
        }
        Ok(fresh)
    }

    /// The commit to settle from proven operations: the proven records (never Jetstream's
    /// JSON), and the MST root the proofs hang from when it is this rev's (otherwise the
    /// stored one, unchanged).
    fn proven_commit(
        &self,
        rev: &Tid,
        ops: &[&CommitOp],
        proven: ProvenCommit,
        stored_data: Option<String>,
    ) -> PreparedCommit {
        let ops = ops
            .iter()
            .zip(proven.ops)
            .map(|(op, proven)| {
                let record = proven.record.as_ref().and_then(|(_, bytes)| {
                    self.engine
                        .ledger()
                        .record(op.collection.as_str(), bytes.len() as u64, true);
                    record_json(bytes)
                });
                PreparedOp {
                    collection: op.collection.as_str().to_owned(),
                    rkey: op.rkey.as_str().to_owned(),
                    change: change_of(&op.operation),
                    record,
                }
            })
            .collect();
        PreparedCommit {
            rev: rev.as_str().to_owned(),
            data: proven
                .data
                .map(|c| c.to_string())
                .or(stored_data)
                .unwrap_or_default(),
            prev_data: None,
            ops,
            unverified: false,
        }
    }
}

/// A claimed commit taken as Jetstream sent it (`--jetstream-verify none`).
fn unverified(rev: &Tid, ops: &[&CommitOp], stored_data: Option<String>) -> PreparedCommit {
    PreparedCommit {
        rev: rev.as_str().to_owned(),
        data: stored_data.unwrap_or_default(),
        prev_data: None,
        ops: ops
            .iter()
            .map(|op| PreparedOp {
                collection: op.collection.as_str().to_owned(),
                rkey: op.rkey.as_str().to_owned(),
                change: change_of(&op.operation),
                record: op.record.clone(),
            })
            .collect(),
        unverified: true,
    }
}

fn change_of(operation: &Operation) -> OpChange {
    match operation {
        Operation::Create(cid) => OpChange::Create(cid.to_string()),
        Operation::Update(cid) => OpChange::Update(cid.to_string()),
        Operation::Delete => OpChange::Delete,
    }
}

impl Handler for JetstreamHandler {
    type Job = Job;

    async fn handle(&self, job: &Job) -> Result<Outcome, EngineError> {
        match &job.kind {
            JobKind::Commit { rev, ops } => self.commit(&job.did, rev, ops).await,
            JobKind::Identity => self.engine.identity_changed(&job.did).await,
            JobKind::Account { active, status } => match &self.prover {
                None => {
                    self.engine
                        .account_changed(&job.did, *active, status.as_deref())
                        .await
                }
                // Jetstream's word on an account is a claim like any other: its PDS decides.
                Some(prover) => match prover.account_status(&job.did).await {
                    Ok(confirmed) => {
                        self.engine
                            .account_changed(
                                &job.did,
                                confirmed.active,
                                confirmed.status.as_deref(),
                            )
                            .await
                    }
                    Err(ProveError::Unavailable(reason)) => {
                        Err(EngineError::ProofUnavailable(reason))
                    }
                    Err(ProveError::Refuted(reason)) => {
                        tracing::info!(did = %job.did, reason, "Jetstream account event not confirmed; ignored.");
                        Ok(Outcome::Skipped("account status not confirmed by the PDS"))
                    }
                },
            },
            JobKind::Refused { reason } => {
                let reason = format!("a Jetstream event could not be read: {reason}");
                self.engine.desynchronize(job.did.as_str(), &reason).await
            }
        }
    }

    fn engine(&self) -> &Engine {
        &self.engine
    }
}
