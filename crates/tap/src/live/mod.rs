//! What the two live sources share: per-DID ordered workers ([`dispatch`]), the cursor
//! as a low-water mark ([`cursor`]) and its saver. The relay firehose
//! ([`crate::firehose`]) and Jetstream ([`crate::jetstream`]) each read their stream,
//! turn it into jobs, and hand them to these.

pub mod cursor;
pub mod dispatch;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::shutdown::Supervisor;
use crate::status::Progress;
use crate::store::{Store, StoreError};
use cursor::SeqTracker;

/// An upstream WebSocket.
pub type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How opening an upstream socket ended.
pub enum Opened {
    /// Connected.
    Socket(Box<Socket>),
    /// Tap is stopping.
    Stopped,
    /// It failed, for this reason.
    Failed(String),
}

/// Opens an upstream WebSocket (the relay's or Jetstream's) with tap's user agent, messages
/// capped at `max_message` bytes, within `timeout`, unless `stop` comes first.
pub async fn open_socket(
    url: &Url,
    max_message: usize,
    timeout: Duration,
    stop: &CancellationToken,
) -> Opened {
    let mut request = match url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => return Opened::Failed(e.to_string()),
    };
    if let Ok(ua) = concat!("tap/", env!("CARGO_PKG_VERSION")).parse() {
        request.headers_mut().insert("user-agent", ua);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), false);
    tokio::select! {
        () = stop.cancelled() => Opened::Stopped,
        r = tokio::time::timeout(timeout, connect) => match r {
            Ok(Ok((socket, _))) => Opened::Socket(Box::new(socket)),
            Ok(Err(e)) => Opened::Failed(e.to_string()),
            Err(_) => Opened::Failed("connect timed out".into()),
        },
    }
}

/// What the app keeps to stop a live stage in order.
pub struct StageHandle {
    saver: tokio::task::JoinHandle<()>,
    saver_stop: CancellationToken,
}

impl StageHandle {
    /// After the reader and workers are done: saves the final cursor and stops the saver.
    pub async fn flush(self) {
        self.saver_stop.cancel();
        let _ = self.saver.await;
    }
}

/// Where a stage's first connection starts: the cursor stored under `key`, unless
/// `no_replay`.
///
/// # Errors
/// The stored cursor cannot be read.
pub async fn start_cursor(
    store: &Store,
    key: &str,
    no_replay: bool,
) -> Result<Option<i64>, StoreError> {
    let stored = store.firehose_cursor(key).await?;
    if no_replay {
        tracing::info!(stored = ?stored, "Ignoring the saved cursor (--no-replay).");
        return Ok(None);
    }
    Ok(stored)
}

/// Starts the cursor saver (the task `name`) of a stage whose cursor is stored under `key`: it persists the
/// low-water mark of `seqs` every `interval` when it moved, and once more when the handle
/// is flushed (after the workers, so its last save covers them).
pub fn spawn_saver(
    name: &'static str,
    store: Store,
    key: String,
    seqs: Arc<Mutex<SeqTracker>>,
    progress: Arc<Progress>,
    interval: Duration,
    supervisor: &Supervisor,
) -> StageHandle {
    let saver_stop = CancellationToken::new();
    let saver = tokio::spawn(supervisor.watch(
        name,
        true,
        run_cursor_saver(store, key, seqs, progress, interval, saver_stop.clone()),
    ));
    StageHandle { saver, saver_stop }
}

async fn run_cursor_saver(
    store: Store,
    key: String,
    seqs: Arc<Mutex<SeqTracker>>,
    progress: Arc<Progress>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut saved: Option<i64> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        crate::failpoint::hit("cursor-saver-tick");
        let mark = seqs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .low_water_mark();
        if let Some(mark) = mark
            && saved != Some(mark)
        {
            match store.save_firehose_cursor(&key, mark).await {
                Ok(()) => {
                    saved = Some(mark);
                    progress.set_firehose_seq(mark);
                }
                Err(error) => tracing::warn!(%error, mark, "Failed to save the live cursor."),
            }
        }
        if stopping {
            if let Some(mark) = saved {
                tracing::info!(cursor = mark, "Saved the live cursor.");
            }
            return;
        }
    }
}
