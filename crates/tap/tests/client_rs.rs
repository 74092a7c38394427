//! The Rust client (`tap-client`) against the real `tap` binary: every stored event is
//! handled and acked, across a SIGKILL of tap while a handler is still awaiting and a
//! restart on the same port.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod delivery_support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestDb;
use delivery_support::{TapProcess, did, record, store_events};
use tap::store::{Store, StoreOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_handles_every_event_across_a_sigkill_while_a_handler_awaits() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let store = Store::open(&db.url, StoreOptions::default()).await.unwrap();
    let mut stored = HashSet::new();
    for d in 0..5 {
        let owner = did(200 + d);
        let events = (0..40)
            .map(|i| record(&owner, &format!("r{i}"), false))
            .collect();
        stored.extend(
            store_events(&store, &owner, events)
                .await
                .into_iter()
                .map(|id| id.0),
        );
    }
    store.close().await;
    // A fixed port, so the restarted tap is where the client looks.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bind = format!("127.0.0.1:{port}");
    let flags = ["--outbox-only", "--admin-password=s3cret"];
    let mut tap = TapProcess::spawn(&db.url, &bind, &flags).await;

    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (hold_tx, hold_rx) = tokio::sync::watch::channel(true);
    let channel = tap_client::Channel::new(
        format!("http://{bind}").parse().unwrap(),
        Some("s3cret".into()),
    );
    let consumer = tokio::spawn({
        let seen = Arc::clone(&seen);
        async move {
            channel
                .consume(
                    |event: tap_client::Event| {
                        let seen = Arc::clone(&seen);
                        let mut hold = hold_rx.clone();
                        async move {
                            let first_time = {
                                let mut seen = seen.lock().unwrap();
                                seen.push(event.id);
                                seen.len() == 50
                            };
                            if first_time {
                                // The 50th handler awaits until the test has killed tap.
                                let _ = hold.wait_for(|h| !*h).await;
                            }
                            Ok::<(), std::convert::Infallible>(())
                        }
                    },
                    std::future::pending(),
                )
                .await
        }
    });
    tap_testkit::wait::poll_until("50 events handled", Duration::from_secs(30), || async {
        (seen.lock().unwrap().len() >= 50).then_some(())
    })
    .await;
    tap.kill9();
    hold_tx.send(false).unwrap();
    let tap = TapProcess::spawn(&db.url, &bind, &flags).await;
    let store = Store::open(&db.url, StoreOptions::default()).await.unwrap();
    tap_testkit::wait::poll_until("every event acked", Duration::from_secs(60), || async {
        (store.outbox_count().await.ok()? == 0).then_some(())
    })
    .await;
    let handled: HashSet<u64> = seen.lock().unwrap().iter().copied().collect();
    assert_eq!(handled, stored, "every stored event reached the handler");
    assert!(!consumer.is_finished(), "the consumer keeps going");
    consumer.abort();
    drop(tap);
}
