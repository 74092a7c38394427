//! The PDS side of a resync: `com.atproto.sync.getRepo`, streamed, with a whole-request
//! timeout (`--repo-fetch-timeout`, which also bounds a body that trickles in), a stall
//! timeout between reads, and a per-host pause after a 429 so a rate-limiting PDS is
//! left alone for a while.
//!
//! Both timeouts count only the time tap waits on the PDS, not the time it spends
//! waiting for outbox capacity between reads: a slow consumer slows the download down
//! (TCP flow control holds the PDS back) instead of failing it, which would make the next
//! attempt download the whole repo again.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tap_atproto::syntax::Did;
use url::Url;

/// How long a PDS that answered 429 is left alone.
pub const RATE_LIMIT_PAUSE: Duration = Duration::from_secs(10);
/// Longest silence between two body chunks.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The PDS rate-limited us (now or recently).
    #[error("PDS {host} is rate limiting")]
    RateLimited {
        /// PDS host.
        host: String,
    },
    /// The PDS answered with an error status.
    #[error("getRepo from {host} answered {status}{detail}")]
    Status {
        /// PDS host.
        host: String,
        /// HTTP status.
        status: u16,
        /// `: <error name>` from an XRPC error body, when there is one.
        detail: String,
    },
    /// The request failed (connection, timeout, body read).
    #[error("getRepo from {host} failed: {reason}")]
    Transport {
        /// PDS host.
        host: String,
        /// What failed.
        reason: String,
    },
}

/// An HTTP client for PDSes, shared by the resync workers.
pub struct PdsClient {
    http: reqwest::Client,
    paused: Mutex<HashMap<String, Instant>>,
    fetch_timeout: Duration,
}

/// A `getRepo` body being read. Timeouts run only inside [`RepoBody::chunk`].
pub struct RepoBody {
    resp: reqwest::Response,
    host: String,
    /// What is left of the whole-request budget.
    remaining: Duration,
}

impl RepoBody {
    /// The next piece of the body; `None` at its end.
    ///
    /// # Errors
    /// `Transport` when the PDS is silent for [`STALL_TIMEOUT`], the budget is spent, or
    /// the connection fails.
    pub async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, FetchError> {
        let wait = self.remaining.min(STALL_TIMEOUT);
        let started = Instant::now();
        let read = tokio::time::timeout(wait, self.resp.chunk()).await;
        self.remaining = self.remaining.saturating_sub(started.elapsed());
        let reason = match read {
            Ok(Ok(chunk)) => return Ok(chunk),
            Ok(Err(e)) => format!("failed while reading: {e}"),
            Err(_) if self.remaining.is_zero() => "the repo fetch timeout ran out".to_owned(),
            Err(_) => format!("the body stalled for {}s", wait.as_secs()),
        };
        Err(FetchError::Transport {
            host: self.host.clone(),
            reason,
        })
    }

    /// `host[:port]` of the PDS.
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl PdsClient {
    /// A client whose requests (body included) may wait on the network for
    /// `fetch_timeout` in all.
    ///
    /// # Errors
    /// The TLS configuration cannot be loaded.
    pub fn new(fetch_timeout: Duration) -> Result<Self, reqwest::Error> {
        // No client-wide timeouts: they would also run while tap is not reading.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("tap/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            paused: Mutex::new(HashMap::new()),
            fetch_timeout,
        })
    }

    /// Starts `getRepo` for `did` on `pds` and returns the response, whose body the caller
    /// streams. Refuses at once while the host is paused after a 429.
    ///
    /// # Errors
    /// [`FetchError`]; `RateLimited` means "try later", not a failure of the repo.
    pub async fn get_repo(&self, pds: &Url, did: &Did) -> Result<RepoBody, FetchError> {
        let host = host_of(pds);
        if self.is_paused(&host) {
            return Err(FetchError::RateLimited { host });
        }
        let mut url =
            pds.join("/xrpc/com.atproto.sync.getRepo")
                .map_err(|e| FetchError::Transport {
                    host: host.clone(),
                    reason: e.to_string(),
                })?;
        url.query_pairs_mut().append_pair("did", did.as_str());
        let started = Instant::now();
        let send = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/vnd.ipld.car")
            .send();
        let resp = tokio::time::timeout(self.fetch_timeout, send)
            .await
            .map_err(|_| FetchError::Transport {
                host: host.clone(),
                reason: "no answer in time".into(),
            })?
            .map_err(|e| FetchError::Transport {
                host: host.clone(),
                reason: e.to_string(),
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            self.pause(&host);
            return Err(FetchError::RateLimited { host });
        }
        if !status.is_success() {
            // XRPC errors carry a small JSON body naming the error (RepoNotFound, …).
            let detail = match tokio::time::timeout(Duration::from_secs(5), resp.bytes()).await {
                Ok(Ok(body)) if body.len() <= 4096 => {
                    serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| {
                            v.get("error")
                                .and_then(|e| e.as_str())
                                .map(|e| format!(": {e}"))
                        })
                        .unwrap_or_default()
                }
                _ => String::new(),
            };
            return Err(FetchError::Status {
                host,
                status: status.as_u16(),
                detail,
            });
        }
        Ok(RepoBody {
            resp,
            host,
            remaining: self.fetch_timeout.saturating_sub(started.elapsed()),
        })
    }

    fn is_paused(&self, host: &str) -> bool {
        let mut paused = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
        match paused.get(host) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                paused.remove(host);
                false
            }
            None => false,
        }
    }

    fn pause(&self, host: &str) {
        self.paused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(host.to_owned(), Instant::now() + RATE_LIMIT_PAUSE);
    }
}

/// `host[:port]` of a PDS URL (the metric label and pause key).
#[must_use]
pub fn host_of(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => url.to_string(),
    }
}
