//! tap's admin API: the repos it tracks, what it knows of one, identity look-ups, status.

use serde_json::Value;
use url::Url;

use crate::ClientError;

/// The admin API of one tap.
#[derive(Debug, Clone)]
pub struct Admin {
    base: Url,
    password: Option<String>,
    http: reqwest::Client,
}

impl Admin {
    /// The API at `base` (e.g. `http://127.0.0.1:2480`), with tap's `--admin-password` if it
    /// has one.
    #[must_use]
    pub fn new(base: Url, password: Option<String>) -> Self {
        Self {
            base,
            password,
            http: reqwest::Client::new(),
        }
    }

    /// `POST /repos/add`: track these repos (backfilled, then followed live).
    ///
    /// # Errors
    /// [`ClientError`]; `Status` 400 names an invalid DID, and nothing was added.
    pub async fn add(&self, dids: &[&str]) -> Result<(), ClientError> {
        self.post_dids("/repos/add", dids).await
    }

    /// `POST /repos/remove`: stop tracking these repos (their events are deleted).
    ///
    /// # Errors
    /// As [`Admin::add`].
    pub async fn remove(&self, dids: &[&str]) -> Result<(), ClientError> {
        self.post_dids("/repos/remove", dids).await
    }

    /// `POST /repos/resync`: fetch these repos again from scratch.
    ///
    /// # Errors
    /// As [`Admin::add`].
    pub async fn resync(&self, dids: &[&str]) -> Result<(), ClientError> {
        self.post_dids("/repos/resync", dids).await
    }

    /// `GET /info/{did}`: the repo's state, records, rev, error.
    ///
    /// # Errors
    /// [`ClientError`]; `Status` 404 for a repo tap does not track.
    pub async fn info(&self, did: &str) -> Result<Value, ClientError> {
        self.get(&format!("/info/{did}")).await
    }

    /// `GET /resolve/{did}`: the DID document and verified handle.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn resolve(&self, did: &str) -> Result<Value, ClientError> {
        self.get(&format!("/resolve/{did}")).await
    }

    /// `GET /status.json`: the status document (backfill, lag, delivery, diagnoses).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn status(&self) -> Result<Value, ClientError> {
        self.get("/status.json").await
    }

    async fn post_dids(&self, path: &str, dids: &[&str]) -> Result<(), ClientError> {
        let body = tap_api::DidList {
            dids: Some(dids.iter().map(|d| (*d).to_owned()).collect()),
        };
        let request = self.http.post(self.url(path)?).json(&body);
        self.send(request).await.map(drop)
    }

    async fn get(&self, path: &str) -> Result<Value, ClientError> {
        let response = self.send(self.http.get(self.url(path)?)).await?;
        Ok(response.json().await?)
    }

    fn url(&self, path: &str) -> Result<Url, ClientError> {
        self.base
            .join(path)
            .map_err(|e| ClientError::Url(e.to_string()))
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let request = match &self.password {
            Some(p) => request.basic_auth("admin", Some(p)),
            None => request,
        };
        let response = request.send().await?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized);
        }
        if !status.is_success() {
            return Err(ClientError::Status {
                status: status.as_u16(),
                message: response.text().await.unwrap_or_default(),
            });
        }
        Ok(response)
    }
}
