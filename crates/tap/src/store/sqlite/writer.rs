//! The writer thread: the only write connection, folding whatever writes are queued into
//! one transaction (group commit), each in its own savepoint.

use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::super::StoreError;
use super::sq;

/// Capacity of the writer's command queue; callers wait (asynchronously) when it is full.
pub(super) const WRITE_QUEUE: usize = 1024;
/// Most commands folded into one transaction. Bounds the latency a command waits behind others
/// and the size of one WAL commit (a resync batch is up to 400 events of ~540 B).
const MAX_GROUP: usize = 64;

/// Counters of the writer, for tests and diagnostics.
#[derive(Debug, Default)]
pub(in crate::store) struct WriterStats {
    /// Transactions committed holding more than one command.
    pub(in crate::store) groups: AtomicU64,
    /// Commands committed as part of such a group.
    pub(in crate::store) grouped_jobs: AtomicU64,
    /// Groups that failed as a whole and were retried one command at a time.
    pub(in crate::store) fallbacks: AtomicU64,
}

pub(super) enum WriterMsg {
    Job(Box<dyn WriteJob>),
    /// Finish everything queued before this message, checkpoint, close, then acknowledge.
    Shutdown(oneshot::Sender<()>),
}

/// A queued write. `run` may be called more than once, each time on a rolled-back state.
pub(super) trait WriteJob: Send {
    /// Runs the statements inside the caller's transaction and keeps the result; returns
    /// whether it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Replaces the kept result: the transaction holding it did not commit.
    fn fail(&mut self, err: StoreError);
    /// Sends the kept result to the waiting caller.
    fn reply(self: Box<Self>);
}

pub(super) struct Job<T, F> {
    run: F,
    result: Option<Result<T, StoreError>>,
    reply: Option<oneshot::Sender<Result<T, StoreError>>>,
}

impl<T, F> Job<T, F>
where
    T: Send + 'static,
    F: Fn(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    /// The message that queues `run`; its result goes to `reply` after COMMIT.
    pub(super) fn queue(run: F, reply: oneshot::Sender<Result<T, StoreError>>) -> WriterMsg {
        WriterMsg::Job(Box::new(Self {
            run,
            result: None,
            reply: Some(reply),
        }))
    }
}

impl<T, F> WriteJob for Job<T, F>
where
    T: Send,
    F: Fn(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let result = (self.run)(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn fail(&mut self, err: StoreError) {
        self.result = Some(Err(err));
    }

    fn reply(mut self: Box<Self>) {
        let result = self.result.take().unwrap_or(Err(StoreError::Worker {
            op: "write",
            detail: "the write was never run".into(),
        }));
        if let Some(reply) = self.reply.take() {
            // The caller may have given up waiting; its write is committed regardless.
            let _ = reply.send(result);
        }
    }
}

pub(super) fn run_writer(
    conn: Connection,
    mut queue: mpsc::Receiver<WriterMsg>,
    stats: &WriterStats,
) {
    let mut group: Vec<Box<dyn WriteJob>> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = queue.blocking_recv() {
        let mut shutdown = None;
        match first {
            WriterMsg::Job(job) => group.push(job),
            WriterMsg::Shutdown(ack) => shutdown = Some(ack),
        }
        // Group commit: take whatever else is already waiting, without waiting for more.
        while shutdown.is_none() && group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(WriterMsg::Job(job)) => group.push(job),
                Ok(WriterMsg::Shutdown(ack)) => shutdown = Some(ack),
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            commit_group(&conn, &mut group, stats);
        }
        if let Some(ack) = shutdown {
            if let Err(err) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
                tracing::warn!(%err, "SQLite WAL checkpoint at close failed.");
            }
            drop(conn);
            let _ = ack.send(());
            return;
        }
    }
    tracing::debug!("All store handles dropped; SQLite writer stops.");
}

/// Commits `group` as one transaction, each command inside its own savepoint so a failing
/// command is rolled back alone and the others still commit. If the transaction as a whole is
/// lost (SQLite rolled it back, or COMMIT failed), every command is retried in a transaction of
/// its own, so one bad command never fails the others. Replies go out only after COMMIT.
fn commit_group(conn: &Connection, group: &mut Vec<Box<dyn WriteJob>>, stats: &WriterStats) {
    if group.len() == 1 {
        for job in group.drain(..) {
            commit_alone(conn, job);
        }
        return;
    }
    match run_group(conn, group) {
        Ok(()) => {
            stats.groups.fetch_add(1, Ordering::Relaxed);
            stats
                .grouped_jobs
                .fetch_add(group.len() as u64, Ordering::Relaxed);
            for job in group.drain(..) {
                job.reply();
            }
        }
        Err(err) => {
            stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%err, jobs = group.len(), "Group commit failed; retrying writes one by one.");
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            for job in group.drain(..) {
                commit_alone(conn, job);
            }
        }
    }
}

fn run_group(conn: &Connection, group: &mut [Box<dyn WriteJob>]) -> Result<(), StoreError> {
    const OP: &str = "group commit";
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sq(OP))?;
    for job in group.iter_mut() {
        conn.execute_batch("SAVEPOINT job").map_err(sq(OP))?;
        if job.run(conn) {
            conn.execute_batch("RELEASE job").map_err(sq(OP))?;
        } else if conn.is_autocommit() {
            // Some errors (I/O, disk full) make SQLite roll back the whole transaction.
            return Err(StoreError::Worker {
                op: OP,
                detail: "SQLite rolled back the transaction after a failed write".into(),
            });
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
                .map_err(sq(OP))?;
        }
    }
    conn.execute_batch("COMMIT").map_err(sq(OP))
}

fn commit_alone(conn: &Connection, mut job: Box<dyn WriteJob>) {
    const OP: &str = "commit";
    if let Err(err) = conn.execute_batch("BEGIN IMMEDIATE") {
        job.fail(sq(OP)(err));
        job.reply();
        return;
    }
    if job.run(conn)
        && let Err(err) = conn.execute_batch("COMMIT")
    {
        job.fail(sq(OP)(err));
    }
    if !conn.is_autocommit()
        && let Err(err) = conn.execute_batch("ROLLBACK")
    {
        tracing::error!(%err, "SQLite ROLLBACK failed.");
    }
    job.reply();
}
