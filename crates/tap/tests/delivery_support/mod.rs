//! Shared helpers of the delivery tests: an in-process tap with its outbox handle, event
//! builders that the `@atproto/tap` client accepts, a `/channel` WebSocket client that sees
//! every frame (including how the connection ends), and condition waits.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tap::outbox::Outbox;
use tap::store::{EventId, NewEvent, RepoWrite, Store};
use tap::wire::{Action, IdentityEvent, IdentityStatus, RecordEvent};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Generous upper bound for anything that should happen "soon".
pub const SOON: Duration = Duration::from_secs(15);

/// A tap running in-process, with the producers' outbox handle (the shared harness).
pub use crate::common::TestTap as Tap;
use tap_testkit::wait::poll_until;
pub use tap_testkit::wait::wait_until;

impl Tap {
    /// Appends one repo event (all of `events` for `did`) through the producers' path.
    pub async fn append(&self, did: &str, events: Vec<NewEvent>) -> Vec<EventId> {
        append(&self.outbox, did, events).await
    }

    pub async fn outbox_len(&self) -> u64 {
        self.store.outbox_count().await.unwrap()
    }

    /// Waits until the outbox table holds exactly `n` rows.
    pub async fn wait_outbox_len(&self, n: u64) {
        let store = self.store.clone();
        wait_until(&format!("outbox holds {n} rows"), SOON, || {
            let store = store.clone();
            async move { store.outbox_count().await.unwrap() == n }
        })
        .await;
    }
}

pub async fn append(outbox: &Outbox, did: &str, events: Vec<NewEvent>) -> Vec<EventId> {
    let mut write = RepoWrite::new(did.parse().unwrap());
    write.events = events;
    outbox.append(write).await.expect("append")
}

/// Writes events straight to the store (as a previous run would have left them).
pub async fn store_events(store: &Store, did: &str, events: Vec<NewEvent>) -> Vec<EventId> {
    let mut write = RepoWrite::new(did.parse().unwrap());
    write.events = events;
    store.apply(write).await.expect("store apply")
}

/// A DID the client's syntax check accepts; distinct for distinct `n`.
pub fn did(n: usize) -> String {
    let mut s = String::new();
    let mut v = n;
    for _ in 0..24 {
        s.push(char::from(b'a' + u8::try_from(v % 26).unwrap()));
        v /= 26;
    }
    format!("did:plc:{s}")
}

/// A valid CID string for `seed`.
pub fn cid(seed: &str) -> String {
    tap_atproto::hash::cid_for_cbor(seed.as_bytes()).to_string()
}

/// A record-create event of `did`, record key `rkey`, with a small post as the record.
pub fn record(did: &str, rkey: &str, live: bool) -> NewEvent {
    post(did, rkey, live, &format!("post {rkey}"))
}

/// A record event whose record text has `pad` bytes (for size-sensitive tests).
pub fn big_record(did: &str, rkey: &str, live: bool, pad: usize) -> NewEvent {
    post(did, rkey, live, &"x".repeat(pad))
}

fn post(did: &str, rkey: &str, live: bool, text: &str) -> NewEvent {
    let record_json = format!(
        r#"{{"$type":"app.bsky.feed.post","createdAt":"2024-01-01T00:00:00.000Z","text":"{text}"}}"#
    );
    let cid = cid(&format!("{did}/{rkey}"));
    NewEvent {
        live,
        payload: RecordEvent {
            live,
            did,
            rev: "3kb3fge5lm32x",
            collection: "app.bsky.feed.post",
            rkey,
            action: Action::Create,
            cid: Some(&cid),
            record_json: Some(&record_json),
            unverified: false,
        }
        .payload(),
    }
}

/// An identity event (stored with `live = false`, as the Go tap does).
pub fn identity(did: &str, handle: &str) -> NewEvent {
    NewEvent {
        live: false,
        payload: IdentityEvent {
            did,
            handle,
            is_active: true,
            status: IdentityStatus::Active,
        }
        .payload(),
    }
}

/// Short label of a received event: its rkey (records) or `identity:<handle>`.
pub fn label(event: &Value) -> String {
    match event["type"].as_str() {
        Some("record") => event["record"]["rkey"].as_str().unwrap().to_owned(),
        Some("identity") => format!("identity:{}", event["identity"]["handle"].as_str().unwrap()),
        other => panic!("unexpected event type {other:?}: {event}"),
    }
}

pub fn event_did(event: &Value) -> String {
    match event["type"].as_str() {
        Some("record") => event["record"]["did"].as_str().unwrap().to_owned(),
        _ => event["identity"]["did"].as_str().unwrap().to_owned(),
    }
}

pub fn event_id(event: &Value) -> u64 {
    event["id"].as_u64().unwrap()
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The server sent a close frame (never acceptable for tap).
    CloseFrame(Option<u16>),
    /// TCP ended without a closing handshake (what the `@atproto/tap` client needs).
    Abnormal,
}

/// Something the client read.
#[derive(Debug)]
pub enum Frame {
    Event(Value),
    Pong(Vec<u8>),
    Ended(Ending),
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A `/channel` client.
pub struct Client {
    ws: Ws,
    pub ended: bool,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_with(addr, None).await
    }

    pub async fn connect_with(addr: SocketAddr, password: Option<&str>) -> Self {
        let mut request = format!("ws://{addr}/channel")
            .into_client_request()
            .unwrap();
        if let Some(pw) = password {
            request.headers_mut().insert(
                "authorization",
                tap::api::basic_header("admin", pw).parse().unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket upgrade");
        Self { ws, ended: false }
    }

    /// Connects over a socket with a tiny receive buffer, so the server's writes block
    /// as soon as the client stops reading.
    pub async fn connect_small_window(addr: SocketAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(
            format!("ws://{addr}/channel"),
            MaybeTlsStream::Plain(stream),
        )
        .await
        .expect("websocket upgrade");
        Self { ws, ended: false }
    }

    /// The next frame, or `None` if nothing arrives within `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<Frame> {
        assert!(!self.ended, "read after the connection ended");
        loop {
            let msg = match tokio::time::timeout(timeout, self.ws.next()).await {
                Err(_) => return None,
                Ok(msg) => msg,
            };
            let frame = match msg {
                None => Frame::Ended(Ending::Abnormal),
                Some(Ok(Message::Text(text))) => {
                    Frame::Event(serde_json::from_str(text.as_str()).expect("frames are JSON"))
                }
                Some(Ok(Message::Binary(_))) => panic!("tap sends text frames only"),
                Some(Ok(Message::Ping(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Pong(p))) => Frame::Pong(p.to_vec()),
                Some(Ok(Message::Close(c))) => {
                    Frame::Ended(Ending::CloseFrame(c.map(|c| u16::from(c.code))))
                }
                Some(Err(
                    tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    )
                    | tungstenite::Error::Io(_)
                    | tungstenite::Error::ConnectionClosed
                    | tungstenite::Error::AlreadyClosed,
                )) => Frame::Ended(Ending::Abnormal),
                Some(Err(e)) => panic!("websocket error: {e}"),
            };
            if matches!(frame, Frame::Ended(_)) {
                self.ended = true;
            }
            return Some(frame);
        }
    }

    /// The next event; panics on timeout, pong or end.
    pub async fn event(&mut self) -> Value {
        match self.next_frame(SOON).await {
            Some(Frame::Event(v)) => v,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// Events until (and including) the one whose label is `until`.
    pub async fn events_until(&mut self, until: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let ev = self.event().await;
            let done = label(&ev) == until;
            out.push(ev);
            if done {
                return out;
            }
        }
    }

    /// How the connection ends; panics if an event arrives first or nothing within `timeout`.
    pub async fn ending(&mut self, timeout: Duration) -> Ending {
        loop {
            match self.next_frame(timeout).await {
                Some(Frame::Ended(e)) => return e,
                Some(Frame::Pong(_)) => {}
                Some(Frame::Event(v)) => panic!("expected the connection to end, got {v}"),
                None => panic!("the connection did not end within {timeout:?}"),
            }
        }
    }

    pub async fn ack(&mut self, id: u64) {
        self.send_text(&format!(r#"{{"type":"ack","id":{id}}}"#))
            .await;
    }

    pub async fn ack_all(&mut self, events: &[Value]) {
        for ev in events {
            self.ws
                .feed(Message::text(format!(
                    r#"{{"type":"ack","id":{}}}"#,
                    event_id(ev)
                )))
                .await
                .unwrap();
        }
        self.ws.flush().await.unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_owned())).await.unwrap();
    }

    pub async fn send(&mut self, msg: Message) {
        self.ws.send(msg).await.unwrap();
    }

    /// Drops the TCP connection without a closing handshake.
    pub fn drop_connection(self) {
        drop(self);
    }
}

/// Per-DID ordering check over a sequence of first deliveries (each event acked right after
/// it was received): a live event arrives after every earlier event of its DID and before
/// every later one. `events` maps id → (did, live).
pub fn assert_order_allowed(received: &[u64], events: &HashMap<u64, (String, bool)>) {
    let mut first_pos: HashMap<u64, usize> = HashMap::new();
    for (pos, id) in received.iter().enumerate() {
        first_pos.entry(*id).or_insert(pos);
    }
    for (id, (did, live)) in events {
        if !*live {
            continue;
        }
        let Some(&pos) = first_pos.get(id) else {
            continue;
        };
        for (other, (other_did, _)) in events {
            if other_did != did || other == id {
                continue;
            }
            let Some(&other_pos) = first_pos.get(other) else {
                continue;
            };
            if other < id {
                assert!(
                    other_pos < pos,
                    "live event {id} of {did} was delivered before earlier event {other}"
                );
            } else {
                assert!(
                    other_pos > pos,
                    "event {other} of {did} was delivered before earlier live event {id}"
                );
            }
        }
    }
}

/// The `tap` binary running as a child process (killed when dropped). Its JSON log lines
/// are collected; the bound address comes from the start-up line.
pub struct TapProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// `--db-url` for a test database.
pub fn db_url_arg(url: &tap::store::DatabaseUrl) -> String {
    match url {
        tap::store::DatabaseUrl::Sqlite(path) => format!("sqlite://{path}"),
        tap::store::DatabaseUrl::Postgres(url) => url.clone(),
    }
}

impl TapProcess {
    /// Starts `tap run` on `db` bound to `bind` (e.g. `127.0.0.1:0`) with `extra` flags; the
    /// relay and PLC point at a closed loopback port, so nothing leaves the machine.
    pub async fn spawn(db: &tap::store::DatabaseUrl, bind: &str, extra: &[&str]) -> Self {
        Self::spawn_with(db, bind, extra, &[]).await
    }

    /// [`spawn`](Self::spawn) with environment variables; `--relay-url` and `--plc-url` in
    /// `extra` replace the closed-port defaults.
    pub async fn spawn_with(
        db: &tap::store::DatabaseUrl,
        bind: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        use std::io::{BufRead, BufReader};
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tap"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .arg("run")
            .arg(format!("--db-url={}", db_url_arg(db)))
            .arg(format!("--bind={bind}"))
            // The fakes and the local network are on loopback.
            .arg("--allow-private-network");
        for flag in ["--relay-url", "--plc-url"] {
            if !extra.iter().any(|e| e.starts_with(flag)) {
                cmd.arg(format!("{flag}=http://127.0.0.1:1"));
            }
        }
        cmd.args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        let mut child = cmd.spawn().expect("tap binary starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let started = tokio::time::timeout(SOON, async {
            while let Some(line) = lines.recv().await {
                if line.contains("Starting tap.") {
                    return Some(line);
                }
            }
            None
        })
        .await
        .expect("tap logs its start-up line in time")
        .expect("tap logs its start-up line before exiting");
        let log: Value = serde_json::from_str(&started).unwrap();
        let addr = log["addr"].as_str().unwrap().parse().unwrap();
        Self { child, addr, lines }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits for the process to end on its own (a failpoint killed it, or it failed).
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = &mut self.child;
        poll_until("tap to exit", Duration::from_secs(60), || {
            let status = child.try_wait().unwrap();
            async move { status }
        })
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -KILL`, then reaps the process.
    pub fn kill9(&mut self) {
        let status = std::process::Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "killed, not exited: {status:?}");
    }

    /// `kill -TERM` and waits for a clean exit.
    pub async fn terminate(&mut self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let child = &mut self.child;
        let status = poll_until("tap to stop", Duration::from_secs(40), || {
            let status = child.try_wait().unwrap();
            async move { status }
        })
        .await;
        assert!(status.success(), "tap exits cleanly on SIGTERM: {status:?}");
    }

    /// Log lines printed so far (drains them).
    pub fn drain_logs(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            out.push(line);
        }
        out
    }

    /// `outbox_buffer` from `/stats/outbox-buffer`.
    pub async fn outbox_buffer(&self, password: Option<&str>) -> u64 {
        let mut req = reqwest::Client::new().get(self.url("/stats/outbox-buffer"));
        if let Some(pw) = password {
            req = req.basic_auth("admin", Some(pw));
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        v["outbox_buffer"].as_u64().unwrap()
    }
}

impl Drop for TapProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
