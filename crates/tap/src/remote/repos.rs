//! `tap repos add|remove|resync|info|list`: the repo routes of the HTTP API from the
//! command line. Exit status 0 on success, 1 when tap refuses the request, 2 when it
//! cannot be asked.

use std::io::BufRead;
use std::process::ExitCode;

use serde_json::{Value, json};

use super::{Client, RemoteError};
use crate::config::{Repos, ReposCommand};

/// Most repos asked per `GET /repos` page (the API's maximum).
const PAGE: u64 = 1000;

/// Runs `tap repos …`.
pub async fn run(cmd: &Repos) -> ExitCode {
    let client = match Client::new(&cmd.remote) {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    let result = match &cmd.command {
        ReposCommand::Add(dids) => post(&client, "/repos/add", dids).await,
        ReposCommand::Remove(dids) => post(&client, "/repos/remove", dids).await,
        ReposCommand::Resync(dids) => post(&client, "/repos/resync", dids).await,
        ReposCommand::Info(did) => client
            .get(&format!("/info/{}", urlencode(did)))
            .await
            .map(|info| println!("{info:#}")),
        ReposCommand::List { state, limit } => list(&client, state.as_deref(), *limit).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(&e),
    }
}

fn failed(e: &RemoteError) -> ExitCode {
    eprintln!("tap repos: {e}");
    ExitCode::from(if e.is_unreachable() { 2 } else { 1 })
}

/// The DIDs given, or else one per line of standard input.
fn dids_or_stdin(dids: &[String]) -> Vec<String> {
    if !dids.is_empty() {
        return dids.to_vec();
    }
    std::io::stdin()
        .lock()
        .lines()
        .map_while(Result::ok)
        .map(|line| line.trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect()
}

async fn post(client: &Client, path: &str, dids: &[String]) -> Result<(), RemoteError> {
    let dids = dids_or_stdin(dids);
    let answer = client.post(path, &json!({ "dids": dids })).await?;
    match answer {
        Some(answer) => println!("{answer:#}"),
        None => println!("ok: {} DIDs sent to {path}", dids.len()),
    }
    Ok(())
}

/// One line per repo: did, state, records, handle, error (tab-separated, for `cut`/`awk`).
fn line(repo: &Value) -> String {
    let text = |k: &str| repo[k].as_str().unwrap_or("").replace(['\t', '\n'], " ");
    format!(
        "{}\t{}\t{}\t{}\t{}",
        text("did"),
        text("state"),
        repo["records"],
        text("handle"),
        text("error")
    )
}

async fn list(client: &Client, state: Option<&str>, limit: Option<u64>) -> Result<(), RemoteError> {
    let mut left = limit.unwrap_or(u64::MAX);
    let mut cursor = String::new();
    while left > 0 {
        let mut path = format!("/repos?limit={}", left.min(PAGE));
        if let Some(state) = state {
            path.push_str(&format!("&state={}", urlencode(state)));
        }
        if !cursor.is_empty() {
            path.push_str(&format!("&cursor={}", urlencode(&cursor)));
        }
        let page = client.get(&path).await?;
        for repo in page["repos"].as_array().into_iter().flatten() {
            println!("{}", line(repo));
            left -= 1;
        }
        match page["cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    Ok(())
}

/// Percent-encodes a path segment or query value (a `did:web` may carry `%3A` for a port,
/// which must reach tap as written).
fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_repo_is_one_tab_separated_line_even_with_a_multiline_error() {
        let repo = json!({"did": "did:plc:a", "state": "error", "records": 12,
                          "handle": "a.test", "error": "PDS said\tno\nreally"});
        assert_eq!(
            line(&repo),
            "did:plc:a\terror\t12\ta.test\tPDS said no really"
        );
    }
}
