//! Delivery throughput: events/s delivered over `/channel` and acked, from a pre-filled
//! outbox to an empty one (rows deleted), with 1 and 4 WebSocket consumers, and published
//! into a NATS JetStream stream (`TAP_TEST_NATS_URL`, default nats://127.0.0.1:4222) and
//! acknowledged by it.
//!
//! Each run: a fresh SQLite database is filled with `TAP_BENCH_EVENTS` historical events
//! (default 200 000; ~540-byte payloads, 1 000 DIDs) before tap starts; the clock starts
//! when tap starts (backlog loading included) and stops when every event was acked by a
//! consumer and the outbox table is empty. Consumers ack every event, pipelined (a reader
//! task parses the id, a writer task batches ack frames). Baseline in the same run: the
//! store alone (page the outbox in, delete it in batches of 1 000), the ceiling for this
//! machine's disk.
//!
//! `cargo bench -p tap --bench delivery` (median of `TAP_BENCH_REPS` runs, default 3).
//! Without `--bench` (e.g. `cargo test --benches`) it runs once with 2 000 events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tap::config::Config;
use tap::store::{DatabaseUrl, EventId, NewEvent, RepoWrite, Store, StoreOptions};
use tap::wire::{Action, RecordEvent};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

const DIDS: usize = 1000;

fn did(n: usize) -> String {
    let mut s = String::from("did:plc:");
    let mut v = n;
    for _ in 0..24 {
        s.push(char::from(b'a' + u8::try_from(v % 26).unwrap()));
        v /= 26;
    }
    s
}

/// A realistic post record event, ~540 bytes.
fn event(did: &str, i: usize) -> NewEvent {
    let rkey = format!("3l{i:011}");
    let text = "Delivery benchmark post with a realistic amount of text, like a \
                typical post.";
    let record_json = format!(
        r#"{{"$type":"app.bsky.feed.post","createdAt":"2024-11-22T09:00:00.000Z","langs":["en"],"text":"{text}","facets":[{{"index":{{"byteStart":0,"byteEnd":8}},"features":[{{"$type":"app.bsky.richtext.facet#tag","tag":"atproto"}}]}}]}}"#
    );
    let cid = tap_atproto::hash::cid_for_cbor(rkey.as_bytes()).to_string();
    NewEvent {
        live: false,
        payload: RecordEvent {
            live: false,
            did,
            rev: "3lbxyz2abcd2k",
            collection: "app.bsky.feed.post",
            rkey: &rkey,
            action: Action::Create,
            cid: Some(&cid),
            record_json: Some(&record_json),
            unverified: false,
        }
        .payload(),
    }
}

async fn prefill(store: &Store, n: usize) -> usize {
    let per_write = 500;
    let mut written = 0;
    let mut bytes = 0;
    while written < n {
        let owner = did(written / per_write % DIDS);
        let mut write = RepoWrite::new(owner.parse().unwrap());
        write.events = (written..(written + per_write).min(n))
            .map(|i| event(&owner, i))
            .collect();
        bytes += write.events.iter().map(|e| e.payload.len()).sum::<usize>();
        written += write.events.len();
        store.apply(write).await.unwrap();
    }
    bytes / n.max(1)
}

/// Reads frames and acks every id; returns how many it acked.
async fn consume(addr: std::net::SocketAddr, stop: tokio::sync::watch::Receiver<bool>) -> u64 {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/channel"))
        .await
        .unwrap();
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<u64>(65_536);
    let writer = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(1024);
        let mut n = 0u64;
        while rx.recv_many(&mut ids, 1024).await > 0 {
            for id in ids.drain(..) {
                sink.feed(Message::text(format!(r#"{{"type":"ack","id":{id}}}"#)))
                    .await
                    .unwrap();
                n += 1;
            }
            sink.flush().await.unwrap();
        }
        n
    });
    let mut stop = stop;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    // Frames start with {"id":N, (the wire contract).
                    let rest = &text.as_str()[6..];
                    let end = rest.find(',').unwrap();
                    let id: u64 = rest[..end].parse().unwrap();
                    if tx.send(id).await.is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    drop(tx);
    writer.await.unwrap()
}

struct Run {
    secs: f64,
    events: usize,
}

/// Where the events go: `/channel` with this many consumers, or a JetStream stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    Channel(usize),
    Nats,
}

async fn run_delivery(n: usize, sink: Sink) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let url = DatabaseUrl::Sqlite(dir.path().join("tap.db").to_string_lossy().into_owned());
    let store = Store::open(&url, StoreOptions::default()).await.unwrap();
    prefill(&store, n).await;
    store.close().await;

    let consumers = match sink {
        Sink::Channel(c) => c,
        Sink::Nats => 0,
    };
    let stream = format!("bench_{}_{}", std::process::id(), rand_suffix());
    let nats_url =
        std::env::var("TAP_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let mut cfg = Config::defaults();
    if sink == Sink::Nats {
        cfg.delivery = tap::config::DeliveryMode::Nats(tap::config::NatsTarget {
            url: nats_url.clone(),
            stream: stream.clone(),
            subject_prefix: stream.clone(),
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(120),
        });
    }
    cfg.bind = "127.0.0.1:0".into();
    cfg.database = url;
    cfg.relay_url = url::Url::parse("http://127.0.0.1:1").unwrap();
    cfg.plc_url = url::Url::parse("http://127.0.0.1:1").unwrap();
    cfg.outbox_only = true;
    let start = Instant::now();
    let app = tap::App::bind(cfg).await.unwrap();
    let addr = app.local_addr().unwrap();
    let store = app.store().clone();
    let (stop_app, app_stopped) = oneshot::channel::<()>();
    let app_task = tokio::spawn(app.run(async move {
        let _ = app_stopped.await;
    }));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let clients: Vec<_> = (0..consumers)
        .map(|_| tokio::spawn(consume(addr, stop_rx.clone())))
        .collect();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if store.outbox_count().await.unwrap() == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "delivery stalled"
        );
    }
    let secs = start.elapsed().as_secs_f64();
    stop_tx.send(true).unwrap();
    let mut acked = 0;
    for c in clients {
        acked += c.await.unwrap();
    }
    assert!(
        acked >= (n * consumers.min(1)) as u64,
        "{acked} acks for {n} events"
    );
    let _ = stop_app.send(());
    app_task.await.unwrap().unwrap();
    if sink == Sink::Nats {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.unwrap());
        let mut info = js.get_stream(&stream).await.unwrap();
        assert_eq!(info.info().await.unwrap().state.messages, n as u64);
        js.delete_stream(&stream).await.unwrap();
    }
    Run { secs, events: n }
}

/// A few digits that differ between runs of one process.
fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

async fn run_store_only(n: usize) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let url = DatabaseUrl::Sqlite(dir.path().join("tap.db").to_string_lossy().into_owned());
    let store = Store::open(&url, StoreOptions::default()).await.unwrap();
    prefill(&store, n).await;
    let start = Instant::now();
    let mut after: Option<EventId> = None;
    loop {
        let rows = store.load_outbox(after, 1000).await.unwrap();
        let Some(last) = rows.last() else { break };
        after = Some(last.id);
        let ids: Vec<EventId> = rows.iter().map(|r| r.id).collect();
        store.delete_acked(&ids).await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(store.outbox_count().await.unwrap(), 0);
    store.close().await;
    Run { secs, events: n }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("TAP_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 200_000 } else { 2_000 });
    let reps: usize = std::env::var("TAP_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 3 } else { 1 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bytes = {
            let e = event(&did(0), 0);
            e.payload.len()
        };
        println!("delivery bench: {n} events of ~{bytes} B payload, {reps} runs each");
        // TAP_BENCH_ONLY=store|1|4|nats runs one scenario (for profiling).
        let only = std::env::var("TAP_BENCH_ONLY").unwrap_or_default();
        let mut results = Vec::new();
        if only.is_empty() || only == "store" {
            let mut rates = Vec::new();
            for _ in 0..reps {
                let r = run_store_only(n).await;
                rates.push(r.events as f64 / r.secs);
            }
            results.push(("baseline: store only (page in + delete)", median(rates)));
        }
        // The sinks alternate within each repetition, so a noisy minute hits them alike.
        let sinks: Vec<(&str, &str, Sink)> = [
            (
                "1",
                "delivered+acked, 1 /channel consumer",
                Sink::Channel(1),
            ),
            (
                "4",
                "delivered+acked, 4 /channel consumers",
                Sink::Channel(4),
            ),
            ("nats", "published+acked by JetStream", Sink::Nats),
        ]
        .into_iter()
        .filter(|(key, _, _)| only.is_empty() || only == *key)
        .collect();
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); sinks.len()];
        for _ in 0..reps {
            for ((_, name, sink), rates) in sinks.iter().zip(&mut rates) {
                let r = run_delivery(n, *sink).await;
                let rate = r.events as f64 / r.secs;
                println!("  {name}: {:.2} s, {rate:.0} events/s", r.secs);
                rates.push(rate);
            }
        }
        for ((_, name, _), rates) in sinks.iter().zip(rates) {
            results.push((*name, median(rates)));
        }
        for (name, rate) in results {
            println!("{name:45} median {rate:>10.0} events/s");
        }
    });
}
