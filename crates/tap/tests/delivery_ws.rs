//! `/channel` delivery against an in-process tap (original-behaviour.md §3.3, §3.5,
//! decisions.md rows 6–7): acks delete events, per-DID ordering over a real socket,
//! sharding across clients, redelivery timing, fire-and-forget, and how connections end.
//!
//! "Withheld" checks are deterministic, not timed: events of another DID (sentinels)
//! appended after the event under test travel the same FIFO path, so when a sentinel
//! arrives first the event under test was held back by the ordering rules.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod delivery_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Backend, TestDb, test_config};
use delivery_support::{
    Client, Ending, Frame, SOON, Tap, big_record, did, event_did, event_id, identity, label,
    record, wait_until,
};
use serde_json::{Value, json};
use tap::config::DeliveryMode;
use tokio_tungstenite::tungstenite::Message;

async fn sqlite_tap(configure: impl FnOnce(&mut tap::Config)) -> (Tap, TestDb) {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut cfg = test_config(&db);
    configure(&mut cfg);
    (Tap::start(cfg).await, db)
}

fn labels(events: &[Value]) -> Vec<String> {
    events.iter().map(label).collect()
}

fn label_set(events: &[Value]) -> HashSet<String> {
    events.iter().map(label).collect()
}

/// Appends a sentinel event of an unrelated DID and reads up to it: returns what arrived
/// before it. Everything the ordering rules released earlier arrives before it.
async fn released_before_sentinel(tap: &Tap, client: &mut Client, name: &str) -> Vec<String> {
    tap.append(&did(999), vec![record(&did(999), name, false)])
        .await;
    let mut got = labels(&client.events_until(name).await);
    got.pop();
    got
}

async fn stat_outbox_buffer(tap: &Tap) -> u64 {
    let v: Value = reqwest::get(tap.url("/stats/outbox-buffer"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["outbox_buffer"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_mode_delivers_events_and_deletes_them_once_acked() {
    let (tap, _db) = sqlite_tap(|_| {}).await;
    let a = did(1);
    let ids = tap
        .append(
            &a,
            vec![
                record(&a, "h1", false),
                record(&a, "h2", false),
                record(&a, "h3", false),
            ],
        )
        .await;
    let mut client = Client::connect(tap.addr).await;
    let events = vec![
        client.event().await,
        client.event().await,
        client.event().await,
    ];
    assert_eq!(labels(&events), ["h1", "h2", "h3"]);
    for (ev, id) in events.iter().zip(&ids) {
        assert_eq!(event_id(ev), id.0);
        assert_eq!(ev["type"], "record");
        assert_eq!(ev["record"]["did"], a.as_str());
        assert_eq!(ev["record"]["live"], false);
    }
    assert_eq!(stat_outbox_buffer(&tap).await, 3, "unacked events stay");
    client.ack_all(&events[..2]).await;
    wait_until("two acked events are deleted", SOON, || async {
        stat_outbox_buffer(&tap).await == 1
    })
    .await;
    client.ack(event_id(&events[2])).await;
    // Duplicate and unknown acks are harmless.
    client.ack(event_id(&events[0])).await;
    client.ack(424_242).await;
    wait_until("the outbox is empty", SOON, || async {
        stat_outbox_buffer(&tap).await == 0
    })
    .await;
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_ordering_example_h1_h2_l1_h3_h4_l2_h5_over_a_socket() {
    let (tap, _db) = sqlite_tap(|_| {}).await;
    let a = did(1);
    let mut client = Client::connect(tap.addr).await;
    for (name, live) in [
        ("h1", false),
        ("h2", false),
        ("l1", true),
        ("h3", false),
        ("h4", false),
        ("l2", true),
        ("h5", false),
    ] {
        tap.append(&a, vec![record(&a, name, live)]).await;
    }
    let step1 = client.events_until("h2").await;
    assert_eq!(labels(&step1), ["h1", "h2"]);
    assert!(
        released_before_sentinel(&tap, &mut client, "s1")
            .await
            .is_empty(),
        "l1 waits for h1, h2"
    );
    client.ack(event_id(&step1[0])).await;
    assert!(
        released_before_sentinel(&tap, &mut client, "s2")
            .await
            .is_empty(),
        "l1 waits for h2 too"
    );
    client.ack(event_id(&step1[1])).await;
    let l1 = client.event().await;
    assert_eq!(label(&l1), "l1");
    assert!(
        released_before_sentinel(&tap, &mut client, "s3")
            .await
            .is_empty(),
        "h3 waits for l1"
    );
    client.ack(event_id(&l1)).await;
    let step3 = vec![client.event().await, client.event().await];
    assert_eq!(label_set(&step3), HashSet::from(["h3".into(), "h4".into()]));
    assert!(
        released_before_sentinel(&tap, &mut client, "s4")
            .await
            .is_empty(),
        "l2 waits for h3, h4"
    );
    client.ack_all(&step3).await;
    let l2 = client.event().await;
    assert_eq!(label(&l2), "l2");
    assert!(
        released_before_sentinel(&tap, &mut client, "s5")
            .await
            .is_empty(),
        "h5 waits for l2"
    );
    client.ack(event_id(&l2)).await;
    assert_eq!(label(&client.event().await), "h5");
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_live_events_go_out_one_at_a_time() {
    let (tap, _db) = sqlite_tap(|_| {}).await;
    let a = did(1);
    for name in ["l1", "l2", "l3"] {
        tap.append(&a, vec![record(&a, name, true)]).await;
    }
    let mut client = Client::connect(tap.addr).await;
    for (i, name) in ["l1", "l2", "l3"].into_iter().enumerate() {
        let ev = client.event().await;
        assert_eq!(label(&ev), name);
        assert!(
            released_before_sentinel(&tap, &mut client, &format!("s{i}"))
                .await
                .is_empty(),
            "nothing follows {name} before its ack"
        );
        client.ack(event_id(&ev)).await;
    }
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_events_are_not_barriers_but_live_events_are() {
    let (tap, _db) = sqlite_tap(|_| {}).await;
    let a = did(1);
    tap.append(&a, vec![identity(&a, "alice.test")]).await;
    tap.append(&a, vec![record(&a, "h1", false)]).await;
    tap.append(&a, vec![identity(&a, "alice2.test")]).await;
    tap.append(&a, vec![record(&a, "l1", true)]).await;
    tap.append(&a, vec![identity(&a, "alice3.test")]).await;
    let mut client = Client::connect(tap.addr).await;
    let first = vec![
        client.event().await,
        client.event().await,
        client.event().await,
    ];
    assert_eq!(
        labels(&first),
        ["identity:alice.test", "h1", "identity:alice2.test"],
        "identity events fly together with historical ones, unacked"
    );
    assert_eq!(first[0]["identity"]["is_active"], true);
    assert_eq!(first[0]["identity"]["status"], "active");
    assert!(
        released_before_sentinel(&tap, &mut client, "s1")
            .await
            .is_empty(),
        "the live event waits for all three"
    );
    client.ack_all(&first).await;
    let l1 = client.event().await;
    assert_eq!(label(&l1), "l1");
    assert!(
        released_before_sentinel(&tap, &mut client, "s2")
            .await
            .is_empty(),
        "an identity event waits for a live one"
    );
    client.ack(event_id(&l1)).await;
    assert_eq!(label(&client.event().await), "identity:alice3.test");
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_live_event_blocks_a_later_historical_one_until_acked() {
    let (tap, _db) = sqlite_tap(|_| {}).await;
    let a = did(1);
    let mut client = Client::connect(tap.addr).await;
    tap.append(&a, vec![record(&a, "l1", true)]).await;
    tap.append(&a, vec![record(&a, "h1", false)]).await;
    let l1 = client.event().await;
    assert_eq!(label(&l1), "l1");
    assert!(
        released_before_sentinel(&tap, &mut client, "s1")
            .await
            .is_empty()
    );
    client.ack(event_id(&l1)).await;
    assert_eq!(label(&client.event().await), "h1");
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_clients_share_the_stream_each_event_to_exactly_one() {
    let (tap, _db) = sqlite_tap(|_| {}).await;
    const CLIENTS: usize = 3;
    const DIDS: usize = 30;
    const PER_DID: usize = 100;
    let mut tasks = Vec::new();
    let (done_tx, _) = tokio::sync::watch::channel(false);
    for _ in 0..CLIENTS {
        let mut client = Client::connect(tap.addr).await;
        let mut done = done_tx.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                tokio::select! {
                    _ = done.changed() => return got,
                    frame = client.next_frame(Duration::from_secs(60)) => match frame {
                        Some(Frame::Event(ev)) => {
                            client.ack(event_id(&ev)).await;
                            got.push(event_id(&ev));
                        }
                        other => panic!("unexpected {other:?}"),
                    },
                }
            }
        }));
    }
    let mut all = HashSet::new();
    for d in 0..DIDS {
        let owner = did(d);
        for chunk in 0..PER_DID / 10 {
            let events = (0..10)
                .map(|i| record(&owner, &format!("r{}", chunk * 10 + i), i % 5 == 4))
                .collect();
            all.extend(tap.append(&owner, events).await.into_iter().map(|id| id.0));
        }
    }
    tap.wait_outbox_len(0).await;
    done_tx.send(true).unwrap();
    let mut union = HashSet::new();
    let mut per_client = Vec::new();
    for task in tasks {
        let got = task.await.unwrap();
        per_client.push(got.len());
        for id in got {
            assert!(union.insert(id), "event {id} was delivered twice");
        }
    }
    assert_eq!(union, all, "every event was delivered");
    assert!(
        per_client.iter().filter(|&&n| n > 0).count() >= 2,
        "the stream is shared between clients: {per_client:?}"
    );
    tap.stop().await;
}

async fn events_wait_for_the_first_client(mode: DeliveryMode) {
    let (tap, _db) = sqlite_tap(|c| c.delivery = mode).await;
    let a = did(1);
    let ids: Vec<u64> = tap
        .append(
            &a,
            (0..5)
                .map(|i| record(&a, &format!("h{i}"), false))
                .collect(),
        )
        .await
        .into_iter()
        .map(|id| id.0)
        .collect();
    let b = did(2);
    let live = tap.append(&b, vec![record(&b, "l1", true)]).await[0].0;
    let mut client = Client::connect(tap.addr).await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(event_id(&client.event().await));
    }
    got.sort_unstable();
    let mut want = ids;
    want.push(live);
    assert_eq!(got, want);
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_produced_with_no_client_wait_for_the_first_one_ack_mode() {
    events_wait_for_the_first_client(DeliveryMode::WebSocketAck).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_produced_with_no_client_wait_for_the_first_one_fire_and_forget() {
    events_wait_for_the_first_client(DeliveryMode::FireAndForget).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pings_are_answered_with_pongs() {
    let (tap, _db) = sqlite_tap(|_| {}).await;
    let mut client = Client::connect(tap.addr).await;
    client
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await;
    match client.next_frame(SOON).await {
        Some(Frame::Pong(p)) => assert_eq!(p, b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_client_frame_drops_only_that_connection_without_a_close_frame() {
    let (tap, _db) = sqlite_tap(|_| {}).await;
    let mut good = Client::connect(tap.addr).await;
    for (i, bad) in [
        "not json",
        r#"{"type":"ack","id":"5"}"#,
        r#"{"type":"ack","id":-1}"#,
        r#"{"type":7,"id":1}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let mut client = Client::connect(tap.addr).await;
        client.send_text(bad).await;
        assert_eq!(client.ending(SOON).await, Ending::Abnormal, "{bad}");
        // The other client keeps working, and tap keeps running.
        let a = did(i);
        let id = tap.append(&a, vec![record(&a, "x", true)]).await[0].0;
        let ev = good.event().await;
        assert_eq!(event_id(&ev), id);
        good.ack(id).await;
        let health = reqwest::get(tap.url("/health")).await.unwrap();
        assert_eq!(health.status(), 200);
    }
    // Valid variants: extra keys, other types, binary frames are all fine.
    let a = did(50);
    let id = tap.append(&a, vec![record(&a, "y", true)]).await[0].0;
    let ev = good.event().await;
    good.send_text(r#"{"type":"hello"}"#).await;
    good.send_text(&format!(r#"{{"id":{id},"type":"ack","extra":[1,2]}}"#))
        .await;
    good.send(Message::Binary(
        format!(r#"{{"type":"ack","id":{id}}}"#).into_bytes().into(),
    ))
    .await;
    assert_eq!(event_id(&ev), id);
    // The acked live event no longer blocks its DID.
    tap.append(&a, vec![record(&a, "z", true)]).await;
    assert_eq!(label(&good.event().await), "z");
    tap.wait_outbox_len(1).await;
    tap.stop().await;
    assert_eq!(
        good.ending(SOON).await,
        Ending::Abnormal,
        "no close frame at shutdown either"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_connections_without_a_close_frame() {
    let (tap, _db) = sqlite_tap(|_| {}).await;
    let mut busy = Client::connect(tap.addr).await;
    let a = did(1);
    tap.append(&a, vec![record(&a, "h1", false)]).await;
    assert_eq!(label(&busy.event().await), "h1");
    let mut idle = Client::connect(tap.addr).await;
    tap.stop().await;
    assert_eq!(
        busy.ending(SOON).await,
        Ending::Abnormal,
        "client with an unacked event"
    );
    assert_eq!(idle.ending(SOON).await, Ending::Abnormal, "idle client");
}

/// End to end over a real socket: an unacked event comes again on the same connection after
/// the retry timeout, and a client that reconnects is sent it again. The exact rule (once
/// per timeout, never while nobody is connected, one copy for the next client) is proven
/// under tokio's paused clock in `outbox::scheduler`'s tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_event_is_resent_on_the_connection_and_to_the_next_client() {
    let timeout = Duration::from_millis(300);
    let (tap, _db) = sqlite_tap(|c| c.retry_timeout = timeout).await;
    let a = did(1);
    let id = tap.append(&a, vec![record(&a, "h1", false)]).await[0].0;
    let mut client = Client::connect(tap.addr).await;
    let first = Instant::now();
    assert_eq!(event_id(&client.event().await), id);
    assert_eq!(event_id(&client.event().await), id, "resent, not acked");
    assert!(first.elapsed() >= timeout, "not before the retry timeout");
    client.drop_connection();
    let mut client = Client::connect(tap.addr).await;
    assert_eq!(
        event_id(&client.event().await),
        id,
        "redelivered to the next client"
    );
    client.ack(id).await;
    tap.wait_outbox_len(0).await;
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_and_forget_deletes_an_event_once_it_is_written() {
    let (tap, _db) = sqlite_tap(|c| c.delivery = DeliveryMode::FireAndForget).await;
    let a = did(1);
    let mut client = Client::connect(tap.addr).await;
    let ids = tap
        .append(&a, vec![record(&a, "h1", false), record(&a, "l1", true)])
        .await;
    // l1 waits for h1 to be written, then goes out without any ack from the client.
    assert_eq!(label(&client.event().await), "h1");
    assert_eq!(label(&client.event().await), "l1");
    tap.wait_outbox_len(0).await;
    // Client messages, even malformed ones, are read and ignored.
    client.send_text("not json").await;
    tap.append(&a, vec![record(&a, "l2", true)]).await;
    assert_eq!(label(&client.event().await), "l2");
    assert_eq!(ids.len(), 2);
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fire_and_forget_failed_write_puts_the_events_back_for_the_next_connection() {
    let (tap, _db) = sqlite_tap(|c| c.delivery = DeliveryMode::FireAndForget).await;
    let a = did(1);
    // 300 × 64 KiB: one write batch is far larger than every socket buffer on the way, so
    // the session is stuck mid-write when the client goes away.
    let mut slow = Client::connect_small_window(tap.addr).await;
    let historical: Vec<u64> = tap
        .append(
            &a,
            (0..300)
                .map(|i| big_record(&a, &format!("h{i}"), false, 64 * 1024))
                .collect(),
        )
        .await
        .into_iter()
        .map(|id| id.0)
        .collect();
    // The batch holds the outbox's whole payload budget, so the live write waits for
    // capacity until the historical events have been written to a consumer.
    let live = {
        let outbox = tap.outbox.clone();
        let a = a.clone();
        tokio::spawn(async move {
            let live = vec![record(&a, "l1", true)];
            delivery_support::append(&outbox, &a, live).await[0].0
        })
    };
    // One frame read proves the session has taken a batch and is writing it.
    let first = slow.event().await;
    assert_eq!(event_id(&first), historical[0]);
    slow.drop_connection();

    let mut client = Client::connect(tap.addr).await;
    let mut seen = HashSet::new();
    let live_seen = loop {
        let ev = client.event().await;
        let id = event_id(&ev);
        if ev["record"]["live"] == true {
            break id;
        }
        assert_eq!(event_did(&ev), a);
        seen.insert(id);
    };
    assert_eq!(live_seen, live.await.unwrap());
    assert!(
        seen.contains(&historical[0]),
        "the event of the failed batch is sent again"
    );
    assert_eq!(
        seen,
        historical.iter().copied().collect::<HashSet<_>>(),
        "every historical event reaches the next connection before the live one"
    );
    tap.wait_outbox_len(0).await;
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_in_webhook_mode_is_400() {
    let (tap, _db) = sqlite_tap(|c| {
        c.delivery = DeliveryMode::Webhook {
            url: url::Url::parse("http://127.0.0.1:1/hook").unwrap(),
        };
    })
    .await;
    let resp = reqwest::get(tap.url("/channel")).await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"message": "websocket not available in webhook mode"})
    );
    // An upgrade attempt is refused the same way.
    let err = tokio_tungstenite::connect_async(format!("ws://{}/channel", tap.addr))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 400),
        other => panic!("expected an HTTP 400, got {other}"),
    }
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_from_any_connection_count() {
    let (tap, _db) = sqlite_tap(|_| {}).await;
    let a = did(1);
    let mut first = Client::connect(tap.addr).await;
    let id = tap.append(&a, vec![record(&a, "l1", true)]).await[0].0;
    assert_eq!(event_id(&first.event().await), id);
    let mut second = Client::connect(tap.addr).await;
    second.ack(id).await;
    drop(second);
    tap.append(&a, vec![record(&a, "l2", true)]).await;
    assert_eq!(
        label(&first.event().await),
        "l2",
        "the ack on another connection released the barrier"
    );
    tap.stop().await;
}

/// Unacked events hold their payload bytes: once they fill the outbox's memory budget a
/// producer waits (however few events that is), and acks let it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_wait_while_unacked_payloads_fill_the_memory_budget() {
    let (tap, _db) = sqlite_tap(|_| {}).await;
    let a = did(1);
    let size = 64 * 1024;
    let n = tap::outbox::capacity::PAYLOAD_BUDGET / size;
    let held = tap
        .append(
            &a,
            (0..n)
                .map(|i| big_record(&a, &format!("h{i}"), false, size))
                .collect(),
        )
        .await;
    let mut next = {
        let outbox = tap.outbox.clone();
        let a = a.clone();
        tokio::spawn(async move {
            let more = vec![big_record(&a, "more", false, size)];
            delivery_support::append(&outbox, &a, more).await[0].0
        })
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut next)
            .await
            .is_err(),
        "a write beyond the budget waits while nothing is acked"
    );
    let mut client = Client::connect(tap.addr).await;
    for _ in 0..n {
        let ev = client.event().await;
        client.ack(event_id(&ev)).await;
    }
    let id = tokio::time::timeout(SOON, next)
        .await
        .expect("the write goes through once the held events are acked")
        .unwrap();
    assert!(id > held.last().unwrap().0);
    let ev = client.event().await;
    assert_eq!(event_id(&ev), id);
    client.ack(id).await;
    tap.wait_outbox_len(0).await;
    tap.stop().await;
}

/// Issue 10, defect 10: a client that stops reading blocked its session's writer with no
/// timeout; the events it had taken were never resent and their DID stayed blocked.
/// Now the blocked write times out and the events go to the other clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gives_its_events_back_to_the_others() {
    let (tap, _db) = sqlite_tap(|c| {
        c.channel_timeout = Duration::from_secs(1);
        c.retry_timeout = Duration::from_secs(3600);
    })
    .await;
    let a = did(1);
    // Never read from: its tiny window and a batch far bigger than every socket buffer on
    // the way leave the session's writer blocked.
    let _stuck = Client::connect_small_window(tap.addr).await;
    let ids: Vec<u64> = tap
        .append(
            &a,
            (0..100)
                .map(|i| big_record(&a, &format!("h{i}"), false, 64 * 1024))
                .collect(),
        )
        .await
        .into_iter()
        .map(|id| id.0)
        .collect();
    let mut client = Client::connect(tap.addr).await;
    let mut seen = HashSet::new();
    while seen.len() < ids.len() {
        let ev = client.event().await;
        client.ack(event_id(&ev)).await;
        seen.insert(event_id(&ev));
    }
    assert_eq!(seen, ids.iter().copied().collect::<HashSet<_>>());
    tap.wait_outbox_len(0).await;
    tap.stop().await;
}

/// Defect 10, the quiet case: a client that reads nothing at all answers no ping; its
/// session ends after --channel-timeout and what it was sent goes to the others at once,
/// without waiting for --retry-timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_and_its_unacked_events_go_to_the_others() {
    let (tap, _db) = sqlite_tap(|c| {
        c.channel_timeout = Duration::from_secs(1);
        c.retry_timeout = Duration::from_secs(3600);
    })
    .await;
    let a = did(1);
    let mut silent = Client::connect(tap.addr).await;
    let id = tap.append(&a, vec![record(&a, "l1", true)]).await[0].0;
    // The only session takes it; its client reads it, then never reads (or acks) again.
    assert_eq!(event_id(&silent.event().await), id);
    let mut client = Client::connect(tap.addr).await;
    let ev = client.event().await;
    assert_eq!(event_id(&ev), id);
    assert_eq!(label(&ev), "l1");
    client.ack(id).await;
    tap.wait_outbox_len(0).await;
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_beyond_the_cap_are_refused_until_one_ends() {
    let (tap, _db) = sqlite_tap(|c| c.max_channel_sessions = 2).await;
    let first = Client::connect(tap.addr).await;
    let _second = Client::connect(tap.addr).await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/channel", tap.addr)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            assert!(body.contains("--max-channel-sessions 2"), "{body}");
        }
        other => panic!("a third session was not refused: {other:?}"),
    }
    drop(first);
    let third = tap_testkit::wait::poll_until(
        "a free session slot",
        std::time::Duration::from_secs(10),
        || async {
            tokio_tungstenite::connect_async(format!("ws://{}/channel", tap.addr))
                .await
                .ok()
        },
    )
    .await;
    drop(third);
    tap.stop().await;
}
