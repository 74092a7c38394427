//! Proving what Jetstream claims (`--jetstream-verify proof`): for every record a commit
//! touches, the PDS's `com.atproto.sync.getRecord` proof, checked against the repo's
//! signing key ([`tap_atproto::proof`]), must show the claimed CID (or, for a delete, no
//! record). Jetstream's own record JSON is never delivered in this mode: the proven bytes
//! are.
//!
//! A proof hangs from the PDS's head commit, which may be newer than the event's: a
//! record changed again since then proves a different CID, and is refused like a lie. The
//! repo is then resynced, which is always correct, only dearer; the events of the newer
//! commit arrive right after and are buffered meanwhile.
//!
//! Requests to one PDS host are paced by a token bucket ([`HostPace`]), so a burst of
//! events from one big PDS does not turn into a burst of requests against it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tap_atproto::Cid;
use tap_atproto::jetstream::{CommitOp, Operation};
use tap_atproto::proof::{ProofError, ProvenRecord, verify_record_proof};
use tap_atproto::syntax::{Did, Tid};
use tokio::time::Instant;

use crate::identity::{Identity, IdentityError};
use crate::resync::fetch::{FetchError, PdsClient, RepoStatus, host_of};

/// Largest proof accepted: a commit, a path of MST nodes and one record (records are at
/// most about 1 MiB).
pub const MAX_PROOF_BYTES: u64 = 2 * 1024 * 1024;
/// Hosts whose pace is remembered; past this, idle ones are forgotten.
const MAX_HOSTS: usize = 4096;

/// Why a claim was not proven.
#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    /// No verdict yet (PDS or identity unreachable, rate-limited): try again later.
    #[error("{0}")]
    Unavailable(String),
    /// The PDS's answer contradicts the claim, or cannot be checked at all: the repo is
    /// resynced.
    #[error("{0}")]
    Refuted(String),
}

impl From<IdentityError> for ProveError {
    fn from(e: IdentityError) -> Self {
        if e.is_transient() {
            Self::Unavailable(format!("identity lookup failed: {e}"))
        } else {
            Self::Refuted(format!("cannot verify: identity lookup failed: {e}"))
        }
    }
}

/// One operation, proven: the record after it (CID and bytes), or none for a delete.
#[derive(Debug, Clone)]
pub struct ProvenOp {
    /// The record now, when the operation created or updated it.
    pub record: Option<(Cid, Bytes)>,
}

/// What proving a commit's operations established.
#[derive(Debug, Clone)]
pub struct ProvenCommit {
    /// Per operation, in the order given.
    pub ops: Vec<ProvenOp>,
    /// The MST root the proofs were signed under, when every proof came from the event's
    /// own commit (otherwise a newer one: the root at the event's rev is not known).
    pub data: Option<Cid>,
}

/// A token bucket per host: `rate` requests a second, bursts of five seconds' worth. Pure:
/// the caller passes the clock.
#[derive(Debug)]
pub struct HostPace {
    rate: f64,
    burst: f64,
    hosts: HashMap<String, (f64, Instant)>,
}

impl HostPace {
    /// `rate` requests per second per host.
    #[must_use]
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            burst: rate * 5.0,
            hosts: HashMap::new(),
        }
    }

    /// Takes a token for `host` at `now`; returns how long to wait before using it.
    pub fn take(&mut self, host: &str, now: Instant) -> Duration {
        if self.hosts.len() >= MAX_HOSTS && !self.hosts.contains_key(host) {
            // A host whose bucket has refilled has nothing to remember.
            let (rate, burst) = (self.rate, self.burst);
            self.hosts.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = self
            .hosts
            .entry(host.to_owned())
            .or_insert((self.burst, now));
        let refilled = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate)
            .min(self.burst);
        *tokens = refilled - 1.0;
        *at = now;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / self.rate)
        }
    }
}

/// Proves claims against PDSes. Shared by the live workers.
pub struct Prover {
    pds: Arc<PdsClient>,
    identity: Identity,
    pace: Mutex<HostPace>,
}

impl Prover {
    /// A prover fetching through `pds`, at most `rate` proofs a second per PDS host.
    #[must_use]
    pub fn new(pds: Arc<PdsClient>, identity: Identity, rate: u32) -> Self {
        Self {
            pds,
            identity,
            pace: Mutex::new(HostPace::new(rate)),
        }
    }

    /// Proves every operation of `did`'s commit at `rev`.
    ///
    /// # Errors
    /// [`ProveError::Unavailable`] when no verdict could be had; [`ProveError::Refuted`]
    /// when the PDS contradicts a claim.
    pub async fn prove(
        &self,
        did: &Did,
        rev: &Tid,
        ops: &[&CommitOp],
    ) -> Result<ProvenCommit, ProveError> {
        let mut ident = self.identity.resolve_repo(did).await?;
        let mut refreshed = false;
        let mut proven = Vec::with_capacity(ops.len());
        let mut data = None;
        let mut same_commit = true;
        for op in ops {
            let path = op.path();
            let pds = ident.require_pds()?.clone();
            let wait = self
                .pace
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(&host_of(&pds), Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let car = self
                .pds
                .get_record(
                    &pds,
                    did,
                    op.collection.as_str(),
                    op.rkey.as_str(),
                    MAX_PROOF_BYTES,
                )
                .await
                .map_err(fetch_verdict)?
                .value;
            let record = loop {
                match verify_record_proof(&car, did, &path, ident.require_signing_key()?) {
                    Ok(record) => break record,
                    // The key may have rotated since it was cached: look it up once more.
                    Err(e) if e.is_signature() && !refreshed => {
                        refreshed = true;
                        ident = self.identity.refresh_repo(did).await?;
                    }
                    Err(e) => return Err(refuted(did, &path, &e)),
                }
            };
            check_claim(op, &record)?;
            if record.commit.rev == *rev {
                data = Some(record.commit.data);
            } else {
                same_commit = false;
            }
            proven.push(ProvenOp {
                record: record.record,
            });
        }
        Ok(ProvenCommit {
            ops: proven,
            data: data.filter(|_| same_commit),
        })
    }
}

impl Prover {
    /// What `did`'s PDS says of the account (`getRepoStatus`), after looking the identity
    /// up afresh (account changes often come with a move to another PDS). A PDS that has no
    /// such repo says it is deleted.
    ///
    /// # Errors
    /// [`ProveError::Unavailable`] when no answer could be had; [`ProveError::Refuted`]
    /// when the identity or the answer cannot be used.
    pub async fn account_status(&self, did: &Did) -> Result<RepoStatus, ProveError> {
        let ident = self.identity.refresh_repo(did).await?;
        let pds = ident.require_pds()?;
        match self.pds.repo_status(pds, did).await {
            Ok(status) => Ok(status),
            Err(FetchError::Status {
                status: 400,
                detail,
                ..
            }) if detail.contains("RepoNotFound") => Ok(RepoStatus {
                active: false,
                status: Some("deleted".into()),
            }),
            Err(e) => Err(fetch_verdict(e)),
        }
    }
}

/// Whether a verified proof shows what `op` claims, at the claim's rev or later.
fn check_claim(op: &CommitOp, proof: &ProvenRecord) -> Result<(), ProveError> {
    let path = op.path();
    if proof.commit.rev < op.rev {
        return Err(ProveError::Refuted(format!(
            "Jetstream claims {path} changed at rev {}, but its PDS's head is the older rev {}",
            op.rev.as_str(),
            proof.commit.rev.as_str()
        )));
    }
    let proven = proof.record.as_ref().map(|(cid, _)| cid);
    if proven == op.operation.cid() {
        return Ok(());
    }
    let claimed = match &op.operation {
        Operation::Create(cid) | Operation::Update(cid) => cid.to_string(),
        Operation::Delete => "deleted".into(),
    };
    let shown = proven.map_or_else(|| "absent".to_owned(), ToString::to_string);
    Err(ProveError::Refuted(format!(
        "Jetstream claims {path} is {claimed} at rev {}, but its PDS proves it {shown} at rev {}",
        op.rev.as_str(),
        proof.commit.rev.as_str()
    )))
}

fn refuted(did: &Did, path: &str, e: &ProofError) -> ProveError {
    ProveError::Refuted(format!("the proof of {did}/{path} does not verify: {e}"))
}

/// What a failed `getRecord` means: a passing fault, or an answer about the repo.
fn fetch_verdict(e: FetchError) -> ProveError {
    match &e {
        FetchError::RateLimited { .. } | FetchError::Transport { .. } => {
            ProveError::Unavailable(format!("proof unavailable: {e}"))
        }
        FetchError::Status { status, .. } if *status >= 500 => {
            ProveError::Unavailable(format!("proof unavailable: {e}"))
        }
        _ => ProveError::Refuted(format!("no proof: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_gets_its_burst_at_once_then_the_rate() {
        let mut pace = HostPace::new(10);
        let t0 = Instant::now();
        for _ in 0..50 {
            assert_eq!(pace.take("pds.a", t0), Duration::ZERO);
        }
        assert_eq!(pace.take("pds.a", t0), Duration::from_millis(100));
        assert_eq!(pace.take("pds.a", t0), Duration::from_millis(200));
        // Other hosts have their own bucket.
        assert_eq!(pace.take("pds.b", t0), Duration::ZERO);
        // A second later ten more tokens have come back (two were owed).
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..8 {
            assert_eq!(pace.take("pds.a", t1), Duration::ZERO);
        }
        assert!(pace.take("pds.a", t1) > Duration::ZERO);
    }

    #[test]
    fn the_pace_table_stays_bounded() {
        let mut pace = HostPace::new(10);
        let t0 = Instant::now();
        for n in 0..MAX_HOSTS * 2 {
            pace.take(&format!("h{n}"), t0 + Duration::from_secs(n as u64));
        }
        assert!(pace.hosts.len() <= MAX_HOSTS);
    }
}
