//! The PDS side of a resync: `com.atproto.sync.getRepo`, streamed, with a whole-request
//! timeout (`--repo-fetch-timeout`, which also bounds a body that trickles in), a stall
//! timeout between reads, and a per-host pause after a 429 so a rate-limiting PDS is
//! left alone for a while.
//!
//! Both timeouts count only the time tap waits on the PDS, not the time it spends
//! waiting for outbox capacity between reads: a slow consumer slows the download down
//! (TCP flow control holds the PDS back) instead of failing it, which would make the next
//! attempt download the whole repo again.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tap_atproto::Cid;
use tap_atproto::car::{Car, CarLimits, read_car};
use tap_atproto::hash::BlockMap;
use tap_atproto::syntax::{Did, Tid};
use url::Url;

use crate::ledger::{Ledger, PdsCall, Source};
use crate::netguard;

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
    #[error("{method} from {host} answered {status}{detail}")]
    Status {
        /// The XRPC method.
        method: &'static str,
        /// PDS host.
        host: String,
        /// HTTP status.
        status: u16,
        /// `: <error name>` from an XRPC error body, when there is one.
        detail: String,
    },
    /// The PDS's address is not one tap fetches from (crate::netguard): a verdict on the
    /// repo's DID document, not a passing fault.
    #[error("{reason}")]
    Refused {
        /// What was refused.
        reason: String,
    },
    /// The PDS does not implement the method (remembered per host).
    #[error("{host} does not implement {method}")]
    Unsupported {
        /// The XRPC method.
        method: &'static str,
        /// PDS host.
        host: String,
    },
    /// The answer is larger than the caller allows.
    #[error("{method} from {host}: answer larger than {limit} bytes")]
    TooLarge {
        /// The XRPC method.
        method: &'static str,
        /// PDS host.
        host: String,
        /// The limit.
        limit: u64,
    },
    /// The answer is not what the method returns (bad JSON, a CAR that does not read).
    #[error("{method} from {host}: {reason}")]
    Malformed {
        /// The XRPC method.
        method: &'static str,
        /// PDS host.
        host: String,
        /// What was wrong.
        reason: String,
    },
    /// The request failed (connection, timeout, body read).
    #[error("{method} from {host} failed: {reason}")]
    Transport {
        /// The XRPC method.
        method: &'static str,
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
    /// Hosts that answered a sparse call with "not implemented": they get full fetches.
    no_sparse: Mutex<HashSet<String>>,
    fetch_timeout: Duration,
    /// `--repo-fetch-min-rate`, bytes per second (0: no minimum).
    min_rate: u64,
    ledger: Ledger,
    allow_private_network: bool,
}

/// The method names tap calls.
const GET_REPO: &str = "com.atproto.sync.getRepo";
const GET_LATEST_COMMIT: &str = "com.atproto.sync.getLatestCommit";
const GET_BLOCKS: &str = "com.atproto.sync.getBlocks";
const GET_RECORD: &str = "com.atproto.sync.getRecord";
const GET_REPO_STATUS: &str = "com.atproto.sync.getRepoStatus";

/// Longest a `getRecord` proof may take, body included: a proof is a few kilobytes, and a
/// live event waits on it.
pub const PROOF_TIMEOUT: Duration = Duration::from_secs(30);

/// A PDS's answer to `getLatestCommit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatestCommit {
    /// The head commit's CID.
    pub cid: Cid,
    /// Its rev.
    pub rev: Tid,
}

/// A PDS's answer to `getRepoStatus`: the account's hosting status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoStatus {
    /// Whether the account is active.
    pub active: bool,
    /// Why not, when not (`takendown`, `suspended`, `deactivated`, …).
    pub status: Option<String>,
}

/// A small answer and the bytes it cost.
#[derive(Debug)]
pub struct Small<T> {
    /// The answer.
    pub value: T,
    /// Body bytes downloaded.
    pub bytes: u64,
}

/// The span over which a body must keep up the minimum rate.
pub const PACE_WINDOW: Duration = Duration::from_secs(30);

/// The minimum-rate rule (`--repo-fetch-min-rate`): over every [`PACE_WINDOW`] a body must
/// bring at least `min_rate` bytes per second on average. A PDS trickling a byte a second
/// is not silent, so the stall timeout never fires; without this it could hold a worker
/// for the whole fetch timeout, and five such hosts every worker. Pure: the caller passes
/// the clock.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    min_rate: u64,
    window_start: Instant,
    window_bytes: u64,
}

impl Pace {
    /// A body starting at `now`; `min_rate` 0 disables the rule.
    #[must_use]
    pub fn new(min_rate: u64, now: Instant) -> Self {
        Self {
            min_rate,
            window_start: now,
            window_bytes: 0,
        }
    }

    /// `bytes` arrived at `now`. Fails with the reason when a whole window fell short.
    ///
    /// # Errors
    /// The body is slower than the minimum rate.
    pub fn record(&mut self, bytes: u64, now: Instant) -> Result<(), String> {
        self.window_bytes += bytes;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < PACE_WINDOW {
            return Ok(());
        }
        let needed = self.min_rate.saturating_mul(elapsed.as_secs());
        if self.window_bytes < needed {
            return Err(format!(
                "the body came at {} bytes in {} s, below --repo-fetch-min-rate {} bytes/s",
                self.window_bytes,
                elapsed.as_secs(),
                self.min_rate
            ));
        }
        self.window_start = now;
        self.window_bytes = 0;
        Ok(())
    }
}

/// A `getRepo` body being read. Timeouts run only inside [`RepoBody::chunk`].
pub struct RepoBody {
    resp: reqwest::Response,
    host: String,
    ledger: Ledger,
    /// Body bytes read so far.
    read: u64,
    /// What is left of the whole-request budget.
    remaining: Duration,
    pace: Pace,
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
            Ok(Ok(chunk)) => {
                let Some(bytes) = &chunk else {
                    return Ok(chunk);
                };
                self.read += bytes.len() as u64;
                self.ledger.downloaded(
                    Source::Pds(PdsCall::GetRepo),
                    Some(&self.host),
                    bytes.len() as u64,
                );
                match self.pace.record(bytes.len() as u64, Instant::now()) {
                    Ok(()) => return Ok(chunk),
                    Err(slow) => slow,
                }
            }
            Ok(Err(e)) => format!("failed while reading: {e}"),
            Err(_) if self.remaining.is_zero() => "the repo fetch timeout ran out".to_owned(),
            Err(_) => format!("the body stalled for {}s", wait.as_secs()),
        };
        Err(FetchError::Transport {
            method: GET_REPO,
            host: self.host.clone(),
            reason,
        })
    }

    /// Body bytes read so far.
    #[must_use]
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

impl PdsClient {
    /// A client whose requests (body included) may wait on the network for
    /// `fetch_timeout` in all.
    ///
    /// # Errors
    /// The TLS configuration cannot be loaded.
    pub fn new(
        fetch_timeout: Duration,
        min_rate: u64,
        ledger: Ledger,
        allow_private_network: bool,
    ) -> Result<Self, reqwest::Error> {
        // No client-wide timeouts: they would also run while tap is not reading. PDS
        // endpoints come from DID documents anyone can publish: only public addresses.
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("tap/", env!("CARGO_PKG_VERSION")));
        let http = netguard::guard(builder, allow_private_network).build()?;
        Ok(Self {
            http,
            paused: Mutex::new(HashMap::new()),
            no_sparse: Mutex::new(HashSet::new()),
            fetch_timeout,
            min_rate,
            ledger,
            allow_private_network,
        })
    }

    /// Starts `getRepo` for `did` on `pds` and returns the response, whose body the caller
    /// streams. Refuses at once while the host is paused after a 429.
    ///
    /// # Errors
    /// [`FetchError`]; `RateLimited` means "try later", not a failure of the repo.
    pub async fn get_repo(&self, pds: &Url, did: &Did) -> Result<RepoBody, FetchError> {
        let started = Instant::now();
        let (resp, host) = self
            .start(
                pds,
                GET_REPO,
                &[("did", did.as_str())],
                "application/vnd.ipld.car",
            )
            .await?;
        Ok(RepoBody {
            resp,
            host,
            ledger: self.ledger.clone(),
            read: 0,
            remaining: self.fetch_timeout.saturating_sub(started.elapsed()),
            pace: Pace::new(self.min_rate, Instant::now()),
        })
    }

    /// `com.atproto.sync.getLatestCommit`: the PDS's head for `did` (unproven: a hint of
    /// whether anything changed, never a substitute for the signed commit).
    ///
    /// # Errors
    /// [`FetchError`]; `Unsupported` when the PDS lacks the method.
    pub async fn latest_commit(
        &self,
        pds: &Url,
        did: &Did,
    ) -> Result<Small<LatestCommit>, FetchError> {
        let query = [("did", did.as_str())];
        let (body, host) = self
            .small(
                pds,
                GET_LATEST_COMMIT,
                &query,
                "application/json",
                PdsCall::GetLatestCommit,
                4096,
            )
            .await?;
        let malformed = |reason: String| FetchError::Malformed {
            method: GET_LATEST_COMMIT,
            host: host.clone(),
            reason,
        };
        #[derive(serde::Deserialize)]
        struct Raw {
            cid: String,
            rev: String,
        }
        let raw: Raw = serde_json::from_slice(&body).map_err(|e| malformed(e.to_string()))?;
        let cid = Cid::try_from(raw.cid.as_str()).map_err(|e| malformed(format!("cid: {e}")))?;
        let rev = Tid::new(&raw.rev).map_err(|e| malformed(format!("rev: {e}")))?;
        Ok(Small {
            value: LatestCommit { cid, rev },
            bytes: body.len() as u64,
        })
    }

    /// `com.atproto.sync.getBlocks` for `cids`: a CAR of those blocks, read whole (at most
    /// `limit` bytes) and hash-checked block by block.
    ///
    /// # Errors
    /// [`FetchError`]; `Malformed` for a CAR that does not read or a block that does not hash
    /// to its CID.
    pub async fn get_blocks(
        &self,
        pds: &Url,
        did: &Did,
        cids: &[Cid],
        limit: u64,
    ) -> Result<Small<BlockMap>, FetchError> {
        let texts: Vec<String> = cids.iter().map(ToString::to_string).collect();
        let mut query: Vec<(&str, &str)> = vec![("did", did.as_str())];
        query.extend(texts.iter().map(|c| ("cids", c.as_str())));
        let answer = self
            .car(pds, GET_BLOCKS, PdsCall::GetBlocks, &query, limit)
            .await?;
        Ok(Small {
            value: answer.value.blocks,
            bytes: answer.bytes,
        })
    }

    /// `getRepo?since=<rev>`: the blocks the PDS wrote after `since` (the new commit, the
    /// changed MST nodes, the new records), held in memory, at most `limit` bytes.
    ///
    /// # Errors
    /// [`FetchError`]; [`FetchError::TooLarge`] past `limit`, [`FetchError::Malformed`] for
    /// a CAR that does not read or a block that does not hash.
    pub async fn get_repo_since(
        &self,
        pds: &Url,
        did: &Did,
        since: &Tid,
        limit: u64,
    ) -> Result<Small<Car>, FetchError> {
        let query = [("did", did.as_str()), ("since", since.as_str())];
        self.car(pds, GET_REPO, PdsCall::GetRepo, &query, limit)
            .await
    }

    /// `com.atproto.sync.getRepoStatus`: the account's hosting status as its PDS says.
    ///
    /// # Errors
    /// [`FetchError`]; `Status` 400 with `RepoNotFound` when the PDS has no such repo.
    pub async fn repo_status(&self, pds: &Url, did: &Did) -> Result<RepoStatus, FetchError> {
        let query = [("did", did.as_str())];
        let (body, host) = self
            .small(
                pds,
                GET_REPO_STATUS,
                &query,
                "application/json",
                PdsCall::GetRepoStatus,
                4096,
            )
            .await?;
        #[derive(serde::Deserialize)]
        struct Raw {
            active: bool,
            #[serde(default)]
            status: Option<String>,
        }
        let raw: Raw = serde_json::from_slice(&body).map_err(|e| FetchError::Malformed {
            method: GET_REPO_STATUS,
            host,
            reason: e.to_string(),
        })?;
        Ok(RepoStatus {
            active: raw.active,
            status: raw.status,
        })
    }

    /// `com.atproto.sync.getRecord`: the proof CAR of one record (the signed head commit,
    /// the MST nodes on its path, the record when present), at most `limit` bytes, within
    /// [`PROOF_TIMEOUT`].
    ///
    /// # Errors
    /// [`FetchError`], as for [`PdsClient::get_blocks`].
    pub async fn get_record(
        &self,
        pds: &Url,
        did: &Did,
        collection: &str,
        rkey: &str,
        limit: u64,
    ) -> Result<Small<Car>, FetchError> {
        let query = [
            ("did", did.as_str()),
            ("collection", collection),
            ("rkey", rkey),
        ];
        let call = self.car(pds, GET_RECORD, PdsCall::GetRecord, &query, limit);
        tokio::time::timeout(PROOF_TIMEOUT, call)
            .await
            .map_err(|_| FetchError::Transport {
                method: GET_RECORD,
                host: host_of(pds),
                reason: "no proof in time".into(),
            })?
    }

    /// A CAR answer of at most `limit` bytes, read whole, every block hash-checked.
    async fn car(
        &self,
        pds: &Url,
        method: &'static str,
        call: PdsCall,
        query: &[(&str, &str)],
        limit: u64,
    ) -> Result<Small<Car>, FetchError> {
        let (body, host) = self
            .small(pds, method, query, "application/vnd.ipld.car", call, limit)
            .await?;
        let bytes = body.len() as u64;
        let limits = CarLimits {
            max_total_bytes: limit,
            ..CarLimits::repo()
        };
        let car = read_car(body, limits).map_err(|e| FetchError::Malformed {
            method,
            host,
            reason: e.to_string(),
        })?;
        Ok(Small { value: car, bytes })
    }

    /// Whether `pds` is known to lack the calls of a sparse fetch.
    #[must_use]
    pub fn lacks_sparse(&self, pds: &Url) -> bool {
        self.no_sparse
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&host_of(pds))
    }

    /// Sends `GET {pds}/xrpc/{method}?{query}`; a success gives the response to read.
    async fn start(
        &self,
        pds: &Url,
        method: &'static str,
        query: &[(&str, &str)],
        accept: &'static str,
    ) -> Result<(reqwest::Response, String), FetchError> {
        let host = host_of(pds);
        netguard::check_url(pds, self.allow_private_network)
            .map_err(|reason| FetchError::Refused { reason })?;
        if self.is_paused(&host) {
            return Err(FetchError::RateLimited { host });
        }
        let transport = |reason: String| FetchError::Transport {
            method,
            host: host.clone(),
            reason,
        };
        let mut url = pds
            .join(&format!("/xrpc/{method}"))
            .map_err(|e| transport(e.to_string()))?;
        url.query_pairs_mut().extend_pairs(query);
        let send = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, accept)
            .send();
        let resp = tokio::time::timeout(self.fetch_timeout, send)
            .await
            .map_err(|_| transport("no answer in time".into()))?
            .map_err(|e| transport(e.to_string()))?;
        let status = resp.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            self.pause(&host);
            return Err(FetchError::RateLimited { host });
        }
        if status.is_success() {
            return Ok((resp, host));
        }
        // XRPC errors carry a small JSON body naming the error (RepoNotFound, …). Read at
        // most 4 KiB of it, chunk by chunk (a compressed body could inflate to anything),
        // for at most 5 s; what is read is counted.
        let name = self
            .error_name(resp, &host, PdsCall::for_method(method))
            .await;
        // 501, or an XRPC "not implemented" name, or a bare 404 (no such route): the host
        // lacks the call. A 404 naming an error (RepoNotFound…) is about the repo, not the host.
        let unsupported = status.as_u16() == 501
            || matches!(
                name.as_deref(),
                Some("MethodNotImplemented" | "XRPCNotSupported")
            )
            || (status.as_u16() == 404 && name.is_none());
        if unsupported && method != GET_REPO {
            self.no_sparse
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(host.clone());
            return Err(FetchError::Unsupported { method, host });
        }
        Err(FetchError::Status {
            method,
            host,
            status: status.as_u16(),
            detail: name.map(|n| format!(": {n}")).unwrap_or_default(),
        })
    }

    /// The XRPC error name of an error answer, from at most 4 KiB of its body.
    async fn error_name(
        &self,
        mut resp: reqwest::Response,
        host: &str,
        call: PdsCall,
    ) -> Option<String> {
        const MAX: usize = 4096;
        let mut body = Vec::new();
        let read = async {
            while let Ok(Some(chunk)) = resp.chunk().await {
                self.ledger
                    .downloaded(Source::Pds(call), Some(host), chunk.len() as u64);
                body.extend_from_slice(&chunk);
                if body.len() > MAX {
                    return false;
                }
            }
            true
        };
        let whole = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .unwrap_or(false);
        if !whole {
            return None;
        }
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
    }

    /// A whole answer of at most `limit` bytes, counted in the ledger as `call`.
    async fn small(
        &self,
        pds: &Url,
        method: &'static str,
        query: &[(&str, &str)],
        accept: &'static str,
        call: PdsCall,
        limit: u64,
    ) -> Result<(bytes::Bytes, String), FetchError> {
        let started = Instant::now();
        let (mut resp, host) = self.start(pds, method, query, accept).await?;
        let mut body = bytes::BytesMut::new();
        let mut pace = Pace::new(self.min_rate, Instant::now());
        loop {
            let left = self.fetch_timeout.saturating_sub(started.elapsed());
            let chunk = tokio::time::timeout(left.min(STALL_TIMEOUT), resp.chunk())
                .await
                .map_err(|_| FetchError::Transport {
                    method,
                    host: host.clone(),
                    reason: "the answer stalled or the fetch timeout ran out".into(),
                })?
                .map_err(|e| FetchError::Transport {
                    method,
                    host: host.clone(),
                    reason: format!("failed while reading: {e}"),
                })?;
            let Some(chunk) = chunk else { break };
            self.ledger
                .downloaded(Source::Pds(call), Some(&host), chunk.len() as u64);
            pace.record(chunk.len() as u64, Instant::now())
                .map_err(|reason| FetchError::Transport {
                    method,
                    host: host.clone(),
                    reason,
                })?;
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(FetchError::TooLarge {
                    method,
                    host,
                    limit,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body.freeze(), host))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_slower_than_the_minimum_rate_over_a_window_is_cut() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut pace = Pace::new(1024, t0);
        // Anything goes within the first window.
        assert!(pace.record(1, at(29)).is_ok());
        // 40 KiB over the first 30 s keeps up; the next window starts fresh.
        assert!(pace.record(40 * 1024, at(30)).is_ok());
        assert!(pace.record(10, at(45)).is_ok());
        let err = pace.record(10, at(61)).unwrap_err();
        assert!(err.contains("below --repo-fetch-min-rate 1024"), "{err}");
        // Disabled: never cut.
        let mut off = Pace::new(0, t0);
        assert!(off.record(0, at(3600)).is_ok());
    }
}
