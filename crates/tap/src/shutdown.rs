//! Designed shutdown: one root cancellation token, and a tracker so every spawned task is
//! awaited. Order (docs/architecture.md): stop intake, drain in-flight work under a
//! deadline, flush cursors and acks under their own deadline, stop HTTP, close the store.

use std::time::Duration;

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
