//! Designed shutdown: one root cancellation token, and a tracker so every spawned task is
//! awaited. Order (docs/architecture.md): stop intake, drain in-flight work under a
//! deadline, flush cursors and acks under their own deadline, stop HTTP, close the store.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How long in-flight work may take to finish after shutdown is requested.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// How long the final flushes (cursor, acks, store) may take. Separate from the drain so a
/// slow drain never eats the time needed to save state.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(10);

/// The shutdown tree shared by every stage.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A fresh, untriggered shutdown tree.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Token cancelled when shutdown starts; every loop selects on it.
    #[must_use]
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Tracker that owns every spawned task.
    #[must_use]
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Starts shutdown.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Waits for every tracked task, up to `deadline`. Returns `false` on timeout.
    pub async fn wait_tasks(&self, deadline: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// A task that ended when it must not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    /// The task's name (the stage it belongs to).
    pub task: &'static str,
    /// Whether it panicked (else it returned before shutdown started).
    pub panicked: bool,
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.panicked {
            "panicked"
        } else {
            "stopped unexpectedly"
        };
        write!(f, "task {} {how}", self.task)
    }
}

/// Watches the long-running tasks: a task that panics, or that returns before shutdown
/// started, is a failure of the whole process (its stage no longer does its work while
/// `/health` would still answer), so the first one is reported for an ordered shutdown
/// and a non-zero exit.
#[derive(Clone, Debug)]
pub struct Supervisor {
    tracker: TaskTracker,
    stopping: CancellationToken,
    failure: watch::Sender<Option<TaskFailure>>,
}

impl Supervisor {
    /// Tasks spawned through it are tracked by `tracker`; returning is expected once
    /// `stopping` is cancelled.
    #[must_use]
    pub fn new(tracker: TaskTracker, stopping: CancellationToken) -> Self {
        Self {
            tracker,
            stopping,
            failure: watch::Sender::new(None),
        }
    }

    /// A supervisor of tasks tracked by `tracker` (awaited at another step of the
    /// shutdown) that reports to the same place.
    #[must_use]
    pub fn with_tracker(&self, tracker: TaskTracker) -> Self {
        Self {
            tracker,
            ..self.clone()
        }
    }

    /// Spawns a task that runs until shutdown.
    pub fn spawn<F>(&self, task: &'static str, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(self.watch(task, true, fut));
    }

    /// Spawns a task that may finish its work and return; only a panic is a failure.
    pub fn spawn_finite<F>(&self, task: &'static str, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(self.watch(task, false, fut));
    }

    /// `fut`, reporting a panic (or, if `endless`, a return before shutdown) as a failure.
    /// For tasks the app spawns and awaits itself.
    pub fn watch<F>(
        &self,
        task: &'static str,
        endless: bool,
        fut: F,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stopping = self.stopping.clone();
        let failure = self.failure.clone();
        async move {
            let panicked = AssertUnwindSafe(fut).catch_unwind().await.is_err();
            if panicked || (endless && !stopping.is_cancelled()) {
                let report = TaskFailure { task, panicked };
                tracing::error!(task, panicked, "A task ended unexpectedly; tap stops.");
                failure.send_if_modified(|first| {
                    let unset = first.is_none();
                    if unset {
                        *first = Some(report);
                    }
                    unset
                });
            }
        }
    }

    /// The first failure so far.
    #[cfg(test)]
    fn failure(&self) -> Option<TaskFailure> {
        self.failure.borrow().clone()
    }

    /// A receiver that sees the first failure.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Option<TaskFailure>> {
        self.failure.subscribe()
    }

    /// Resolves at the first failure.
    pub async fn failed(&self) -> TaskFailure {
        let mut rx = self.failure.subscribe();
        loop {
            if let Some(f) = rx.borrow_and_update().clone() {
                return f;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is *called*, not
/// when the future is first polled, so a signal that arrives during start-up is not lost
/// (and does not kill the process with the default action).
///
pub fn signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supervisor() -> (Supervisor, CancellationToken) {
        let stopping = CancellationToken::new();
        (
            Supervisor::new(TaskTracker::new(), stopping.clone()),
            stopping,
        )
    }

    #[tokio::test]
    async fn a_panicking_task_is_reported_with_its_name() {
        let (sup, _) = supervisor();
        sup.spawn("doomed", async { panic!("boom") });
        let failure = tokio::time::timeout(Duration::from_secs(10), sup.failed())
            .await
            .unwrap();
        assert_eq!(
            failure,
            TaskFailure {
                task: "doomed",
                panicked: true
            }
        );
        assert_eq!(failure.to_string(), "task doomed panicked");
    }

    #[tokio::test]
    async fn an_endless_task_that_returns_before_shutdown_is_a_failure_and_the_first_one_wins() {
        let (sup, _) = supervisor();
        sup.spawn("quitter", async {});
        let first = tokio::time::timeout(Duration::from_secs(10), sup.failed())
            .await
            .unwrap();
        assert_eq!(first.task, "quitter");
        assert!(!first.panicked);
        sup.spawn("later", async { panic!("second") });
        sup.tracker.close();
        sup.tracker.wait().await;
        assert_eq!(sup.failure().map(|f| f.task), Some("quitter"));
    }

    #[tokio::test]
    async fn tasks_ending_after_shutdown_or_finite_ones_are_no_failure() {
        let (sup, stopping) = supervisor();
        sup.spawn_finite("loader", async {});
        stopping.cancel();
        sup.spawn("worker", async {});
        sup.tracker.close();
        sup.tracker.wait().await;
        assert_eq!(sup.failure(), None);
    }
}
