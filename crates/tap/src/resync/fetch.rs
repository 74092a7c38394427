//! The PDS side of a resync: `com.atproto.sync.getRepo`, streamed, with a whole-request
//! timeout (`--repo-fetch-timeout`, which also bounds a body that trickles in), a stall
//! timeout between reads, and a per-host pause after a 429 so a rate-limiting PDS is
//! left alone for a while.

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
}

impl PdsClient {
    /// A client whose requests (body included) time out after `fetch_timeout`.
    ///
    /// # Errors
    /// The TLS configuration cannot be loaded.
    pub fn new(fetch_timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(fetch_timeout)
            .read_timeout(STALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("tap/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            paused: Mutex::new(HashMap::new()),
        })
    }

    /// Starts `getRepo` for `did` on `pds` and returns the response, whose body the caller
    /// streams. Refuses at once while the host is paused after a 429.
    ///
    /// # Errors
    /// [`FetchError`]; `RateLimited` means "try later", not a failure of the repo.
    pub async fn get_repo(&self, pds: &Url, did: &Did) -> Result<reqwest::Response, FetchError> {
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
        let resp = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/vnd.ipld.car")
            .send()
            .await
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
        Ok(resp)
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
