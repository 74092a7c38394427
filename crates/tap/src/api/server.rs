//! Serving the API with inbound limits `axum::serve` does not have: at most
//! `max_connections` connections at once (more wait in the listen backlog), and a request
//! head must arrive within `header_timeout` (a client that opens a connection and sends
//! nothing, or trickles its headers, or idles on keep-alive, is closed). WebSocket sessions
//! leave this count once upgraded; `/channel` has its own cap.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long open requests may finish once the server stops.
const DRAIN: Duration = Duration::from_secs(5);
/// Pause after an accept error (out of file descriptors, …) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The inbound limits (`--max-connections`, `--http-header-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a client has to send a whole request head (also bounds keep-alive idling).
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until `stop`, then lets open requests finish for a
/// moment. Accept errors (out of file descriptors, a connection reset before it was
/// accepted) are logged and retried: they pass.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            () = stop.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "Accepting an API connection failed; retrying.");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, connection).await;
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(DRAIN, connections.wait()).await;
}

/// Raises this process's soft limit on open files to the hard limit, as the Go runtime does
/// for the original tap: each connection is a file, and the default soft limit (often 1024)
/// would cap connections far below `--max-connections`. Returns the limit now in force.
#[must_use]
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.maximum.is_some() && limit.current != limit.maximum {
        limit.current = limit.maximum;
        if setrlimit(Resource::Nofile, limit).is_err() {
            return getrlimit(Resource::Nofile).current;
        }
    }
    limit.current
}
