//! Jetstream sends one event per operation; a commit of several operations arrives as
//! several events sharing one rev, possibly interleaved with other repos' events. The
//! [`Grouper`] puts each repo's run of same-rev events back together into one job, so
//! every operation of the commit is handled (and delivered) together. Pure: the reader
//! feeds it events and dispatches the jobs it hands back.
//!
//! A repo's group is closed by its next event with another rev, by any other event of the
//! same repo (ordering), by [`MAX_OPEN`] newer groups, or by the reader when the stream
//! pauses. Should a commit's operations still be split (a pause inside a commit), the
//! second part has the same rev as the first, and the engine accepts a claimed commit at
//! the stored rev for exactly that reason.

use std::collections::VecDeque;

use tap_atproto::jetstream::CommitOp;
use tap_atproto::syntax::{Did, Tid};

/// Groups kept open at once; the oldest is closed past this.
pub const MAX_OPEN: usize = 256;

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// A commit, as Jetstream claims it: its operations in stream order.
    Commit {
        /// The commit's rev.
        rev: Tid,
        /// Its operations.
        ops: Vec<CommitOp>,
    },
    /// The account's identity may have changed: look it up again.
    Identity,
    /// The account's hosting status changed.
    Account {
        /// Whether it is active.
        active: bool,
        /// Why not, when not.
        status: Option<String>,
    },
    /// An event about this repo that could not be read: resync the repo.
    Refused {
        /// Why it was refused.
        reason: String,
    },
}

/// One job for the live workers: what happened to one repo, and the stream positions
/// (`time_us`) it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The repo.
    pub did: Did,
    /// The `time_us` of every event the job covers.
    pub positions: Vec<i64>,
    /// What to do.
    pub kind: JobKind,
}

/// Open groups, oldest first.
#[derive(Debug, Default)]
pub struct Grouper {
    open: VecDeque<Job>,
}

impl Grouper {
    /// Takes one operation; appends to `ready` the jobs it closes.
    pub fn push_op(&mut self, op: CommitOp, time_us: i64, ready: &mut Vec<Job>) {
        if let Some(i) = self.open.iter().position(|j| j.did == op.did) {
            let same_rev =
                matches!(&self.open[i].kind, JobKind::Commit { rev, .. } if *rev == op.rev);
            if same_rev {
                let job = &mut self.open[i];
                job.positions.push(time_us);
                if let JobKind::Commit { ops, .. } = &mut job.kind {
                    ops.push(op);
                }
                return;
            }
            ready.extend(self.open.remove(i));
        }
        self.open.push_back(Job {
            did: op.did.clone(),
            positions: vec![time_us],
            kind: JobKind::Commit {
                rev: op.rev,
                ops: vec![op],
            },
        });
        if self.open.len() > MAX_OPEN {
            ready.extend(self.open.pop_front());
        }
    }

    /// Takes a job that is not an operation; the repo's open group (if any) goes first.
    pub fn push_other(&mut self, job: Job, ready: &mut Vec<Job>) {
        if let Some(i) = self.open.iter().position(|j| j.did == job.did) {
            ready.extend(self.open.remove(i));
        }
        ready.push(job);
    }

    /// Closes every open group (the stream paused or ended).
    pub fn flush(&mut self, ready: &mut Vec<Job>) {
        ready.extend(self.open.drain(..));
    }

    /// Whether any group is open.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tap_atproto::jetstream::Operation;

    fn op(did: &str, rev: &str, rkey: &str) -> CommitOp {
        CommitOp {
            did: Did::new(did).unwrap(),
            rev: Tid::new(rev).unwrap(),
            collection: "app.bsky.graph.starterpack".parse().unwrap(),
            rkey: rkey.parse().unwrap(),
            operation: Operation::Delete,
            record: None,
        }
    }

    fn summary(jobs: &[Job]) -> Vec<(String, Vec<i64>, usize)> {
        jobs.iter()
            .map(|j| {
                let ops = match &j.kind {
                    JobKind::Commit { ops, .. } => ops.len(),
                    _ => 0,
                };
                (j.did.to_string(), j.positions.clone(), ops)
            })
            .collect()
    }

    #[test]
    fn every_operation_of_a_multi_operation_commit_lands_in_one_job() {
        // indigo PR 1398 dropped all but the first of these: they share one rev.
        let mut g = Grouper::default();
        let mut ready = Vec::new();
        for (t, rkey) in [(1, "a"), (2, "b"), (3, "c")] {
            g.push_op(op("did:plc:a", "3l3qo2vutsw2b", rkey), t, &mut ready);
        }
        assert!(ready.is_empty(), "still open");
        g.push_op(op("did:plc:a", "3l3qo2vutsw2c", "d"), 4, &mut ready);
        assert_eq!(summary(&ready), [("did:plc:a".into(), vec![1, 2, 3], 3)]);
        ready.clear();
        g.flush(&mut ready);
        assert_eq!(summary(&ready), [("did:plc:a".into(), vec![4], 1)]);
        assert!(g.is_empty());
    }

    #[test]
    fn interleaved_repos_group_separately_and_other_events_keep_their_order() {
        let mut g = Grouper::default();
        let mut ready = Vec::new();
        g.push_op(op("did:plc:a", "3l3qo2vutsw2b", "1"), 1, &mut ready);
        g.push_op(op("did:plc:b", "3l3qo2vutsw2b", "1"), 2, &mut ready);
        g.push_op(op("did:plc:a", "3l3qo2vutsw2b", "2"), 3, &mut ready);
        assert!(ready.is_empty());
        let identity = Job {
            did: Did::new("did:plc:a").unwrap(),
            positions: vec![4],
            kind: JobKind::Identity,
        };
        g.push_other(identity, &mut ready);
        assert_eq!(
            summary(&ready),
            [
                ("did:plc:a".into(), vec![1, 3], 2),
                ("did:plc:a".into(), vec![4], 0)
            ]
        );
        ready.clear();
        g.flush(&mut ready);
        assert_eq!(summary(&ready), [("did:plc:b".into(), vec![2], 1)]);
    }

    #[test]
    fn the_oldest_group_closes_when_too_many_are_open() {
        let mut g = Grouper::default();
        let mut ready = Vec::new();
        for i in 0..=MAX_OPEN {
            let did = format!("did:plc:r{i}");
            g.push_op(op(&did, "3l3qo2vutsw2b", "k"), i as i64 + 1, &mut ready);
        }
        assert_eq!(summary(&ready), [("did:plc:r0".into(), vec![1], 1)]);
    }
}
