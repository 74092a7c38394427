//! Crash safety of delivery (original-behaviour.md §4.3, decisions.md rows 5 and 14), on
//! SQLite and PostgreSQL: the real `tap` binary is killed with SIGKILL while holding
//! delivered-but-unacked events; after a restart on the same database every unacked event
//! comes again with its id, live flag and payload, in an order the per-DID rules allow.
//! Event ids keep growing across restarts, even after the outbox was emptied.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod delivery_support;

use std::collections::{HashMap, HashSet};

use common::{TestDb, test_config};
use delivery_support::{
    Client, SOON, Tap, TapProcess, assert_order_allowed, did, event_id, identity, record,
    store_events, wait_until,
};
use serde_json::Value;
use tap::store::{EventId, NewEvent, Store, StoreOptions};

/// What the database held before the first start: id → (did, live, frame JSON).
type Expected = HashMap<u64, (String, bool, Value)>;

async fn seed(store: &Store) -> Expected {
    let (a, b, c, d) = (did(1), did(2), did(3), did(4));
    let plan: Vec<(&str, Vec<NewEvent>)> = vec![
        (
            &a,
            vec![record(&a, "a-h1", false), record(&a, "a-h2", false)],
        ),
        (&b, vec![record(&b, "b-l1", true)]),
        (&a, vec![record(&a, "a-l1", true)]),
        (
            &c,
            (1..=5)
                .map(|i| record(&c, &format!("c-h{i}"), false))
                .collect(),
        ),
        (&a, vec![record(&a, "a-h3", false)]),
        (&d, vec![identity(&d, "dee.test")]),
        (&b, vec![record(&b, "b-l2", true)]),
    ];
    let mut expected = Expected::new();
    for (owner, events) in plan {
        let ids = store_events(store, owner, events.clone()).await;
        for (id, ev) in ids.into_iter().zip(events) {
            let frame: Value = serde_json::from_str(&tap::wire::frame(id, &ev.payload)).unwrap();
            expected.insert(id.0, (owner.to_string(), ev.live, frame));
        }
    }
    expected
}

fn check_event(ev: &Value, expected: &Expected) {
    let id = event_id(ev);
    let (_, live, frame) = expected
        .get(&id)
        .unwrap_or_else(|| panic!("unexpected event {ev}"));
    assert_eq!(ev, frame, "same id, payload and live flag");
    if ev["type"] == "record" {
        assert_eq!(ev["record"]["live"].as_bool(), Some(*live));
    }
}

async fn crash_with_unacked_events_then_restart_redelivers_them(db: TestDb) {
    let store = Store::open(&db.url, StoreOptions::default()).await.unwrap();
    let expected = seed(&store).await;
    store.close().await;
    let max_before = *expected.keys().max().unwrap();

    // First run: take the first wave (every event the ordering rules release without acks),
    // ack two of them, then die without warning.
    let mut tap = TapProcess::spawn(&db.url, "127.0.0.1:0", &[]).await;
    let mut client = Client::connect(tap.addr).await;
    // a-h1, a-h2, b-l1, c-h1..5, dee's identity: 9 events; a-l1, a-h3 and b-l2 wait.
    let mut first_wave = Vec::new();
    for _ in 0..9 {
        let ev = client.event().await;
        check_event(&ev, &expected);
        first_wave.push(event_id(&ev));
    }
    let acked: HashSet<u64> = first_wave
        .iter()
        .copied()
        .filter(|id| expected[id].0 == did(3))
        .take(2)
        .collect();
    for id in &acked {
        client.ack(*id).await;
    }
    tap.kill9();
    assert_eq!(
        client.ending(SOON).await,
        delivery_support::Ending::Abnormal
    );

    // Second run on the same database: everything not acked comes again; acking as we go
    // lets the barriers open.
    let tap = TapProcess::spawn(&db.url, "127.0.0.1:0", &[]).await;
    let mut client = Client::connect(tap.addr).await;
    let must_see: HashSet<u64> = expected
        .keys()
        .copied()
        .filter(|id| !acked.contains(id))
        .collect();
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    while !must_see.is_subset(&seen) {
        let ev = client.event().await;
        check_event(&ev, &expected);
        let id = event_id(&ev);
        order.push(id);
        seen.insert(id);
        client.ack(id).await;
    }
    let by_id: HashMap<u64, (String, bool)> = expected
        .iter()
        .map(|(id, (d, live, _))| (*id, (d.clone(), *live)))
        .collect();
    assert_order_allowed(&order, &by_id);
    wait_until("the outbox is empty", SOON, || async {
        tap.outbox_buffer(None).await == 0
    })
    .await;
    let mut tap = tap;
    tap.kill9();

    // Third start, with an empty outbox: new ids are still larger than every id before.
    let app = Tap::start(test_config(&db)).await;
    let e = did(5);
    let new_id = app.append(&e, vec![record(&e, "e-h1", false)]).await[0];
    assert!(new_id > EventId(max_before), "{new_id} > {max_before}");
    let mut client = Client::connect(app.addr).await;
    assert_eq!(event_id(&client.event().await), new_id.0);
    app.stop().await;
}

on_both_backends!(
    crash_with_unacked_events,
    crash_with_unacked_events_then_restart_redelivers_them
);

async fn acks_are_flushed_at_shutdown_and_ids_keep_growing(db: TestDb) {
    let tap = Tap::start(test_config(&db)).await;
    let a = did(1);
    let ids = tap
        .append(
            &a,
            (0..20)
                .map(|i| record(&a, &format!("h{i}"), false))
                .collect(),
        )
        .await;
    let mut client = Client::connect(tap.addr).await;
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(client.event().await);
    }
    client.ack_all(&got).await;
    // Wait until the actor has the acks (the deleter has not necessarily run yet).
    let b = did(2);
    tap.append(&b, vec![record(&b, "l1", true)]).await;
    let ev = client.event().await;
    client.ack(event_id(&ev)).await;
    tap.append(&b, vec![record(&b, "l2", true)]).await;
    let l2 = client.event().await;
    assert_eq!(delivery_support::label(&l2), "l2");
    // l2 stays unacked; everything else must be gone after a graceful stop.
    tap.stop().await;
    let store = Store::open(&db.url, StoreOptions::default()).await.unwrap();
    let left = store.load_outbox(None, 100).await.unwrap();
    assert_eq!(
        left.iter().map(|r| r.id.0).collect::<Vec<_>>(),
        [event_id(&l2)],
        "acked events are deleted at shutdown"
    );
    store.close().await;

    let tap = Tap::start(test_config(&db)).await;
    let mut client = Client::connect(tap.addr).await;
    let again = client.event().await;
    assert_eq!(again, l2, "the unacked event comes again, unchanged");
    client.ack(event_id(&again)).await;
    tap.wait_outbox_len(0).await;
    tap.stop().await;

    // Empty outbox, fresh start: ids continue above everything seen.
    let tap = Tap::start(test_config(&db)).await;
    let next = tap.append(&a, vec![record(&a, "after", false)]).await[0];
    assert!(next.0 > event_id(&l2) && next > *ids.last().unwrap());
    tap.stop().await;
}

on_both_backends!(
    acks_flushed_at_shutdown,
    acks_are_flushed_at_shutdown_and_ids_keep_growing
);

/// Issue 10, defect 13: what `@atproto/tap` 0.4 does, played against the real binary. It
/// queues acks while disconnected and sends them first thing on its next connection, here
/// to a restarted tap that holds those events again (some released, some waiting behind a
/// live barrier), plus ids that no longer exist; and it stops for good at any close frame,
/// so a graceful restart must only drop the connection. Nothing may stay stranded.
async fn queued_acks_flushed_after_a_restart_strand_nothing(db: TestDb) {
    let store = Store::open(&db.url, StoreOptions::default()).await.unwrap();
    let expected = seed(&store).await;
    store.close().await;
    let mut tap = TapProcess::spawn(&db.url, "127.0.0.1:0", &[]).await;
    let mut client = Client::connect(tap.addr).await;
    // The first wave (9 events, see above), handled but not acked: the client queues them.
    let mut queued = Vec::new();
    for _ in 0..9 {
        let ev = client.event().await;
        check_event(&ev, &expected);
        queued.push(event_id(&ev));
    }
    tap.terminate().await;
    assert_eq!(
        client.ending(SOON).await,
        delivery_support::Ending::Abnormal,
        "a graceful stop sends no close frame (0.4 would never reconnect)"
    );

    let tap = TapProcess::spawn(&db.url, "127.0.0.1:0", &[]).await;
    let mut client = Client::connect(tap.addr).await;
    // The flush: every queued ack, and two for ids that never existed or are long gone.
    for id in queued.iter().copied().chain([0, u64::MAX >> 1]) {
        client.ack(id).await;
    }
    let rest: HashSet<u64> = expected
        .keys()
        .copied()
        .filter(|id| !queued.contains(id))
        .collect();
    let mut seen = HashSet::new();
    while !rest.is_subset(&seen) {
        let ev = client.event().await;
        check_event(&ev, &expected);
        let id = event_id(&ev);
        seen.insert(id);
        client.ack(id).await;
    }
    wait_until("the outbox is empty", SOON, || async {
        tap.outbox_buffer(None).await == 0
    })
    .await;
}

on_both_backends!(
    queued_acks_flushed_after_a_restart,
    queued_acks_flushed_after_a_restart_strand_nothing
);
