//! Behaviour tests of the store. `test_each_store!` runs each one on SQLite (a temp file) and on
//! Postgres (a fresh database per test, from `TAP_TEST_POSTGRES_URL`; skipped with a notice when
//! unset, a failure when `CI=true`).

use std::future::Future;
use std::time::Duration;

use tap_atproto::syntax::Tid;
use tap_testkit::postgres::TestPostgres;

use super::*;

/// Runs `$body` (an async block using `$store: Store` and `$url: DatabaseUrl`) once per
/// backend, as `<name>::sqlite` and `<name>::postgres`.
macro_rules! test_each_store {
    ($name:ident, |$store:ident, $url:ident| $body:block) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                run_on_sqlite(|$store, $url| async move { $body }).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                run_on_postgres(|$store, $url| async move { $body }).await;
            }
        }
    };
}

/// Runs `test` in its own task so a panic still lets the harness clean up, then re-raises it.
async fn run_guarded<F, Fut>(store: Store, url: DatabaseUrl, test: F)
where
    F: FnOnce(Store, DatabaseUrl) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(test(store.clone(), url)).await;
    store.close().await;
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
}

async fn run_on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Store, DatabaseUrl) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let url = DatabaseUrl::Sqlite(dir.path().join("tap.db").display().to_string());
    let store = Store::open(&url, StoreOptions::default()).await.unwrap();
    run_guarded(store, url, test).await;
    drop(dir);
}

async fn run_on_postgres<F, Fut>(test: F)
where
    F: FnOnce(Store, DatabaseUrl) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(db) = TestPostgres::create().await else {
        return;
    };
    let url = DatabaseUrl::Postgres(db.url().to_owned());
    let store = Store::open(
        &url,
        StoreOptions {
            max_pg_conns: 8,
            ..StoreOptions::default()
        },
    )
    .await
    .unwrap();
    run_guarded(store, url, test).await;
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn dids(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| format!("did:plc:{n}")).collect()
}

pub(super) fn put(collection: &str, rkey: &str, cid: &str) -> RecordChange {
    RecordChange::Put {
        collection: collection.into(),
        rkey: rkey.into(),
        cid: cid.into(),
    }
}

pub(super) fn delete(collection: &str, rkey: &str) -> RecordChange {
    RecordChange::Delete {
        collection: collection.into(),
        rkey: rkey.into(),
    }
}

fn event(live: bool, n: usize) -> NewEvent {
    NewEvent {
        live,
        payload: format!(r#"{{"type":"record","n":{n}}}"#),
    }
}

async fn records_of(store: &Store, did: &str) -> Vec<(String, String, String)> {
    store
        .records_page(did, None, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.collection, r.rkey, r.cid))
        .collect()
}

fn triple(c: &str, r: &str, cid: &str) -> (String, String, String) {
    (c.into(), r.into(), cid.into())
}

const NOW: i64 = 1_700_000_000;

/// Claims the repo `did` (the only one due) for resync.
async fn claim(store: &Store, now: i64) -> RepoRow {
    store
        .claim_resync_job(now)
        .await
        .unwrap()
        .expect("a repo is due")
}

// ---------------------------------------------------------------------------------------------
// Repos

test_each_store!(add_repos_inserts_new_and_ignores_existing, |store, _url| {
    let first = dids(&["a", "b"]);
    assert_eq!(store.add_repos(&first).await.unwrap(), 2);
    // "a" exists already, "c" twice in one call counts once.
    let second = dids(&["a", "c", "c"]);
    assert_eq!(store.add_repos(&second).await.unwrap(), 1);
    assert_eq!(store.repo_count().await.unwrap(), 3);
    assert_eq!(store.add_repos(&[]).await.unwrap(), 0);

    let repo = store.get_repo("did:plc:c").await.unwrap().unwrap();
    assert_eq!(
        repo,
        RepoRow {
            did: "did:plc:c".parse().unwrap(),
            state: RepoState::Pending,
            status: AccountStatus::Active,
            handle: None,
            rev: None,
            prev_data: None,
            error: String::new(),
            retry_count: 0,
            retry_after: 0,
            last_fetch: None,
        }
    );
    assert_eq!(store.get_repo("did:plc:nope").await.unwrap(), None);
});

test_each_store!(
    add_repos_leaves_an_existing_repo_untouched,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        store
            .mark_desynchronized("did:plc:a", "prev mismatch")
            .await
            .unwrap();
        assert_eq!(store.add_repos(&dids(&["a"])).await.unwrap(), 0);
        let repo = store.get_repo("did:plc:a").await.unwrap().unwrap();
        assert_eq!(repo.state, RepoState::Desynchronized);
        assert_eq!(repo.error, "prev mismatch");
    }
);

test_each_store!(ensure_repo_inserts_pending_only_once, |store, _url| {
    assert!(store.ensure_repo("did:plc:a").await.unwrap());
    store
        .set_repo_state("did:plc:a", RepoState::Active)
        .await
        .unwrap();
    assert!(!store.ensure_repo("did:plc:a").await.unwrap());
    let repo = store.get_repo("did:plc:a").await.unwrap().unwrap();
    assert_eq!(repo.state, RepoState::Active);
});

test_each_store!(
    remove_repos_deletes_records_and_buffer_but_keeps_outbox,
    |store, _url| {
        store.add_repos(&dids(&["a", "b"])).await.unwrap();
        for did in ["did:plc:a", "did:plc:b"] {
            let mut write = RepoWrite::new(did.parse().unwrap());
            write.records = vec![put("app.bsky.feed.post", "1", "c1")];
            write.events = vec![event(true, 1)];
            store.apply(write).await.unwrap();
            store
                .buffer_commit(did, "3kaaaaaaaaa22", "{}", 100)
                .await
                .unwrap();
        }

        assert_eq!(
            store.remove_repos(&dids(&["a", "missing"])).await.unwrap(),
            1
        );
        assert_eq!(store.get_repo("did:plc:a").await.unwrap(), None);
        assert_eq!(store.count_records_for("did:plc:a").await.unwrap(), 0);
        assert!(
            store
                .buffered_commits("did:plc:a", 0, 100)
                .await
                .unwrap()
                .is_empty()
        );
        // Other repos untouched; emitted events still await delivery.
        assert_eq!(store.count_records_for("did:plc:b").await.unwrap(), 1);
        assert_eq!(
            store
                .buffered_commits("did:plc:b", 0, 100)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(store.outbox_count().await.unwrap(), 2);
        assert_eq!(store.record_count().await.unwrap(), 1);
        assert_eq!(store.resync_buffer_count().await.unwrap(), 1);
    }
);

test_each_store!(
    set_state_and_mark_desynchronized_update_the_row,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        store
            .set_repo_state("did:plc:a", RepoState::Active)
            .await
            .unwrap();
        assert_eq!(
            store.get_repo("did:plc:a").await.unwrap().unwrap().state,
            RepoState::Active
        );
        store
            .mark_desynchronized("did:plc:a", "prevData mismatch")
            .await
            .unwrap();
        let repo = store.get_repo("did:plc:a").await.unwrap().unwrap();
        assert_eq!(repo.state, RepoState::Desynchronized);
        assert_eq!(repo.error, "prevData mismatch");
        // Absent repos: no-op, no error.
        store.mark_desynchronized("did:plc:zz", "x").await.unwrap();
        store
            .set_repo_state("did:plc:zz", RepoState::Active)
            .await
            .unwrap();
        assert_eq!(store.repo_count().await.unwrap(), 1);
    }
);

// ---------------------------------------------------------------------------------------------
// apply

test_each_store!(
    apply_commit_writes_repo_meta_records_and_events_together,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
        write.condition = WriteCondition::RepoExists;
        write.repo = RepoChange::Commit {
            rev: Tid::new("3kaaaaaaaaa22").unwrap(),
            prev_data: "data1".into(),
        };
        write.records = vec![
            put("app.bsky.feed.post", "1", "c1"),
            put("app.bsky.feed.like", "2", "c2"),
        ];
        write.events = vec![event(true, 1), event(true, 2)];
        let ids = store.apply(write).await.unwrap();
        assert_eq!(ids.len(), 2);
        assert!(ids[0] < ids[1]);

        let repo = store.get_repo("did:plc:a").await.unwrap().unwrap();
        assert_eq!(repo.rev.as_ref().map(Tid::as_str), Some("3kaaaaaaaaa22"));
        assert_eq!(repo.prev_data.as_deref(), Some("data1"));
        assert_eq!(
            records_of(&store, "did:plc:a").await,
            [
                triple("app.bsky.feed.like", "2", "c2"),
                triple("app.bsky.feed.post", "1", "c1")
            ]
        );
        let outbox = store.load_outbox(None, 10).await.unwrap();
        assert_eq!(
            outbox,
            [
                OutboxRow {
                    id: ids[0],
                    did: "did:plc:a".parse().unwrap(),
                    live: true,
                    payload: event(true, 1).payload,
                },
                OutboxRow {
                    id: ids[1],
                    did: "did:plc:a".parse().unwrap(),
                    live: true,
                    payload: event(true, 2).payload,
                },
            ]
        );
    }
);

test_each_store!(apply_upserts_and_deletes_records_in_order, |store, _url| {
    store.add_repos(&dids(&["a"])).await.unwrap();
    let mut first = RepoWrite::new("did:plc:a".parse().unwrap());
    first.records = vec![
        put("col.a", "1", "c1"),
        put("col.a", "2", "c2"),
        put("col.a", "3", "c3"),
    ];
    store.apply(first).await.unwrap();

    let mut second = RepoWrite::new("did:plc:a".parse().unwrap());
    second.records = vec![
        put("col.a", "1", "c1b"),  // update
        delete("col.a", "2"),      // delete
        put("col.a", "3", "gone"), // put then delete: deleted
        delete("col.a", "3"),
        delete("col.a", "4"), // delete then put: present
        put("col.a", "4", "c4"),
        delete("col.b", "never"), // absent: no-op
    ];
    let ids = store.apply(second).await.unwrap();
    assert!(ids.is_empty());
    assert_eq!(
        records_of(&store, "did:plc:a").await,
        [triple("col.a", "1", "c1b"), triple("col.a", "4", "c4")]
    );
});

test_each_store!(failing_apply_leaves_nothing_behind, |store, _url| {
    store.add_repos(&dids(&["a"])).await.unwrap();
    let mut good = RepoWrite::new("did:plc:a".parse().unwrap());
    good.repo = RepoChange::Commit {
        rev: Tid::new("3kaaaaaaaaa22").unwrap(),
        prev_data: "d1".into(),
    };
    good.records = vec![put("col", "1", "c1")];
    good.events = vec![event(true, 1)];
    store.apply(good).await.unwrap();

    // The empty rkey violates a constraint after the repo update and the first record change
    // already ran inside the transaction.
    let mut bad = RepoWrite::new("did:plc:a".parse().unwrap());
    bad.repo = RepoChange::Commit {
        rev: Tid::new("3kaaaaaaaaa23").unwrap(),
        prev_data: "d2".into(),
    };
    bad.records = vec![put("col", "2", "c2"), put("col", "", "c3")];
    bad.events = vec![event(true, 2)];
    let err = store.apply(bad).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(!err.is_condition_not_met(), "{err}");

    let repo = store.get_repo("did:plc:a").await.unwrap().unwrap();
    assert_eq!(repo.rev.as_ref().map(Tid::as_str), Some("3kaaaaaaaaa22"));
    assert_eq!(repo.prev_data.as_deref(), Some("d1"));
    assert_eq!(
        records_of(&store, "did:plc:a").await,
        [triple("col", "1", "c1")]
    );
    assert_eq!(store.outbox_count().await.unwrap(), 1);

    // The store keeps working after the failure.
    let mut next = RepoWrite::new("did:plc:a".parse().unwrap());
    next.events = vec![event(true, 3)];
    assert_eq!(store.apply(next).await.unwrap().len(), 1);
});

test_each_store!(apply_refuses_writes_whose_condition_fails, |store, _url| {
    // Repo absent: nothing at all is written.
    let mut orphan = RepoWrite::new("did:plc:gone".parse().unwrap());
    orphan.condition = WriteCondition::RepoExists;
    orphan.records = vec![put("col", "1", "c1")];
    orphan.events = vec![event(false, 1)];
    let err = store.apply(orphan).await.unwrap_err();
    assert!(err.is_condition_not_met(), "{err}");
    assert_eq!(store.record_count().await.unwrap(), 0);
    assert_eq!(store.outbox_count().await.unwrap(), 0);

    // Removed and re-added mid-resync: the stale worker's batch is refused.
    store.add_repos(&dids(&["a"])).await.unwrap();
    claim(&store, NOW).await;
    store.remove_repos(&dids(&["a"])).await.unwrap();
    store.add_repos(&dids(&["a"])).await.unwrap();
    let mut stale = RepoWrite::new("did:plc:a".parse().unwrap());
    stale.condition = WriteCondition::RepoInState(RepoState::Resyncing);
    stale.records = vec![put("col", "1", "c1")];
    stale.events = vec![event(false, 1)];
    let err = store.apply(stale.clone()).await.unwrap_err();
    assert!(err.is_condition_not_met(), "{err}");
    assert_eq!(store.record_count().await.unwrap(), 0);
    assert_eq!(store.outbox_count().await.unwrap(), 0);

    // Once it is claimed again the same write goes through.
    claim(&store, NOW).await;
    assert_eq!(store.apply(stale).await.unwrap().len(), 1);
});

test_each_store!(
    apply_repo_changes_update_handle_status_and_resync_state,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        let row = claim(&store, NOW).await;
        assert_eq!(row.state, RepoState::Resyncing);

        let mut handle = RepoWrite::new("did:plc:a".parse().unwrap());
        handle.repo = RepoChange::Handle("alice.test".into());
        handle.events = vec![event(false, 1)];
        store.apply(handle).await.unwrap();

        let mut status = RepoWrite::new("did:plc:a".parse().unwrap());
        status.repo = RepoChange::Status(AccountStatus::Takendown);
        store.apply(status).await.unwrap();

        store
            .mark_resync_failed("did:plc:a", ResyncFailure::Failed("boom".into()), NOW, 0)
            .await
            .unwrap();
        claim(&store, NOW + 10_000).await;
        let mut done = RepoWrite::new("did:plc:a".parse().unwrap());
        done.condition = WriteCondition::RepoInState(RepoState::Resyncing);
        done.repo = RepoChange::ResyncDone {
            rev: Tid::new("3kaaaaaaaaa2z").unwrap(),
            prev_data: "data9".into(),
        };
        store.apply(done).await.unwrap();

        assert_eq!(
            store.get_repo("did:plc:a").await.unwrap().unwrap(),
            RepoRow {
                did: "did:plc:a".parse().unwrap(),
                state: RepoState::Active,
                status: AccountStatus::Takendown,
                handle: Some("alice.test".into()),
                rev: Some(Tid::new("3kaaaaaaaaa2z").unwrap()),
                prev_data: Some("data9".into()),
                error: String::new(),
                retry_count: 0,
                retry_after: 0,
                last_fetch: None,
            }
        );
    }
);

test_each_store!(
    apply_delete_removes_repo_records_and_buffer_and_keeps_its_event,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
        write.records = vec![put("col", "1", "c1")];
        store.apply(write).await.unwrap();
        store
            .buffer_commit("did:plc:a", "r", "{}", 100)
            .await
            .unwrap();

        let mut gone = RepoWrite::new("did:plc:a".parse().unwrap());
        gone.repo = RepoChange::Delete;
        gone.events = vec![event(true, 1)];
        assert_eq!(store.apply(gone).await.unwrap().len(), 1);
        assert_eq!(store.get_repo("did:plc:a").await.unwrap(), None);
        assert_eq!(store.record_count().await.unwrap(), 0);
        assert_eq!(store.resync_buffer_count().await.unwrap(), 0);
        assert_eq!(store.outbox_count().await.unwrap(), 1);
    }
);

// ---------------------------------------------------------------------------------------------
// Outbox and event ids

test_each_store!(outbox_pages_in_id_order_and_deletes_acked, |store, _url| {
    let mut all = Vec::new();
    for did in ["did:plc:b", "did:plc:a", "did:plc:c"] {
        let mut write = RepoWrite::new(did.parse().unwrap());
        write.events = (0..4).map(|n| event(n % 2 == 0, n)).collect();
        all.extend(store.apply(write).await.unwrap());
    }
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");

    let mut loaded = Vec::new();
    let mut after = None;
    loop {
        let page = store.load_outbox(after, 5).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 5);
        after = page.last().map(|row| row.id);
        loaded.extend(page.into_iter().map(|row| row.id));
    }
    assert_eq!(loaded, all);

    let acked: Vec<EventId> = all.iter().step_by(2).copied().collect();
    let mut with_unknown = acked.clone();
    with_unknown.push(EventId(u64::MAX));
    with_unknown.push(EventId(999_999));
    assert_eq!(
        store.delete_acked(&with_unknown).await.unwrap(),
        acked.len() as u64
    );
    let left: Vec<EventId> = store
        .load_outbox(None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.id)
        .collect();
    let expected: Vec<EventId> = all.iter().skip(1).step_by(2).copied().collect();
    assert_eq!(left, expected);
    assert_eq!(store.delete_acked(&[]).await.unwrap(), 0);
});

test_each_store!(
    event_ids_keep_increasing_after_ack_delete_and_restart,
    |store, url| {
        assert_eq!(store.max_event_id().await.unwrap(), None);
        let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
        write.events = (0..3).map(|n| event(true, n)).collect();
        let first = store.apply(write.clone()).await.unwrap();
        assert_eq!(store.max_event_id().await.unwrap(), first.last().copied());

        // Everything is acked and deleted, then the process restarts.
        store.delete_acked(&first).await.unwrap();
        assert_eq!(store.outbox_count().await.unwrap(), 0);
        store.close().await;
        assert!(matches!(
            store.apply(write.clone()).await,
            Err(StoreError::Closed)
        ));
        let reopened = Store::open(&url, StoreOptions::default()).await.unwrap();
        assert_eq!(
            reopened.max_event_id().await.unwrap(),
            first.last().copied()
        );
        let second = reopened.apply(write).await.unwrap();
        assert!(
            second[0] > first[2],
            "ids restarted: {first:?} then {second:?}"
        );
        reopened.close().await;
    }
);

test_each_store!(
    restart_keeps_rows_and_applies_migrations_once,
    |store, url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
        write.records = vec![put("col", "1", "c1")];
        write.events = vec![event(false, 1)];
        let ids = store.apply(write).await.unwrap();
        store.save_firehose_cursor("wss://relay", 42).await.unwrap();
        store.close().await;

        for _ in 0..2 {
            let reopened = Store::open(&url, StoreOptions::default()).await.unwrap();
            assert_eq!(reopened.repo_count().await.unwrap(), 1);
            assert_eq!(reopened.count_records_for("did:plc:a").await.unwrap(), 1);
            assert_eq!(
                reopened
                    .load_outbox(None, 10)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|row| row.id)
                    .collect::<Vec<_>>(),
                ids
            );
            assert_eq!(
                reopened.firehose_cursor("wss://relay").await.unwrap(),
                Some(42)
            );
            reopened.close().await;
        }
    }
);

test_each_store!(
    concurrent_applies_all_succeed_with_unique_ids,
    |store, _url| {
        let mut tasks = Vec::new();
        for task in 0..64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let did = format!("did:plc:t{task}");
                store.add_repos(std::slice::from_ref(&did)).await.unwrap();
                let mut ids = Vec::new();
                for round in 0..5 {
                    let mut write = RepoWrite::new(did.parse().unwrap());
                    write.condition = WriteCondition::RepoExists;
                    write.records = vec![put("col", &format!("{round}"), "cid")];
                    write.events = (0..3).map(|n| event(true, n)).collect();
                    let got = store.apply(write).await.unwrap();
                    assert_eq!(got.len(), 3);
                    assert!(got.windows(2).all(|w| w[0] < w[1]));
                    // Per repo, later writes get larger ids.
                    if let Some(prev) = ids.last() {
                        assert!(got[0] > *prev);
                    }
                    ids.extend(got);
                }
                ids
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count, "duplicate ids");
        assert_eq!(count, 64 * 5 * 3);
        assert_eq!(store.outbox_count().await.unwrap(), count as u64);
        assert_eq!(store.record_count().await.unwrap(), 64 * 5);
    }
);

// ---------------------------------------------------------------------------------------------
// Resync queue

test_each_store!(
    claim_prefers_pending_then_desynchronized_then_error,
    |store, _url| {
        store
            .add_repos(&dids(&["err", "desync", "pending", "active"]))
            .await
            .unwrap();
        store
            .set_repo_state("did:plc:err", RepoState::Error)
            .await
            .unwrap();
        store
            .set_repo_state("did:plc:desync", RepoState::Desynchronized)
            .await
            .unwrap();
        store
            .set_repo_state("did:plc:active", RepoState::Active)
            .await
            .unwrap();

        let order: Vec<String> = [
            claim(&store, NOW).await,
            claim(&store, NOW).await,
            claim(&store, NOW).await,
        ]
        .into_iter()
        .map(|row| {
            assert_eq!(row.state, RepoState::Resyncing);
            row.did.into_string()
        })
        .collect();
        assert_eq!(order, dids(&["pending", "desync", "err"]));
        // Active and resyncing repos are never claimed.
        assert_eq!(store.claim_resync_job(NOW).await.unwrap(), None);
        assert_eq!(
            store
                .get_repo("did:plc:pending")
                .await
                .unwrap()
                .unwrap()
                .state,
            RepoState::Resyncing
        );
    }
);

test_each_store!(claim_waits_for_retry_after, |store, _url| {
    store.add_repos(&dids(&["a"])).await.unwrap();
    claim(&store, NOW).await;
    store
        .mark_resync_failed("did:plc:a", ResyncFailure::Failed("x".into()), NOW, 0)
        .await
        .unwrap();
    let repo = store.get_repo("did:plc:a").await.unwrap().unwrap();
    assert_eq!(repo.retry_after, NOW + 60);
    assert_eq!(store.claim_resync_job(NOW + 59).await.unwrap(), None);
    // Due strictly after retry_after.
    assert_eq!(store.claim_resync_job(NOW + 60).await.unwrap(), None);
    assert_eq!(claim(&store, NOW + 61).await.did, "did:plc:a");
});

test_each_store!(
    concurrent_claims_never_hand_out_a_repo_twice,
    |store, _url| {
        let all = dids(&["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"]);
        store.add_repos(&all).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(row) = store.claim_resync_job(NOW).await.unwrap() {
                    got.push(row.did.into_string());
                }
                got
            }));
        }
        let mut claimed = Vec::new();
        for task in tasks {
            claimed.extend(task.await.unwrap());
        }
        claimed.sort();
        let mut expected = all.clone();
        expected.sort();
        assert_eq!(claimed, expected);
    }
);

test_each_store!(
    reset_resyncing_returns_repos_to_desynchronized,
    |store, _url| {
        store.add_repos(&dids(&["a", "b"])).await.unwrap();
        claim(&store, NOW).await;
        assert_eq!(store.reset_resyncing().await.unwrap(), 1);
        assert_eq!(store.reset_resyncing().await.unwrap(), 0);
        let mut states = Vec::new();
        for did in dids(&["a", "b"]) {
            states.push(store.get_repo(&did).await.unwrap().unwrap().state);
        }
        states.sort_by_key(|s| s.as_str());
        assert_eq!(states, [RepoState::Desynchronized, RepoState::Pending]);
    }
);

test_each_store!(
    resync_failures_back_off_exponentially_and_cap_without_overflow,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        let mut now = NOW;
        let mut delays = Vec::new();
        for round in 0..100u32 {
            claim(&store, now).await;
            let failure = if round % 2 == 0 {
                ResyncFailure::RateLimited
            } else {
                ResyncFailure::Failed(format!("fail {round}"))
            };
            store
                .mark_resync_failed("did:plc:a", failure, now, 1_500)
                .await
                .unwrap();
            let repo = store.get_repo("did:plc:a").await.unwrap().unwrap();
            assert_eq!(repo.retry_count, round + 1);
            if round % 2 == 0 {
                assert_eq!(repo.state, RepoState::Desynchronized);
                assert_eq!(repo.error, "");
            } else {
                assert_eq!(repo.state, RepoState::Error);
                assert_eq!(repo.error, format!("fail {round}"));
            }
            delays.push(repo.retry_after - now);
            now = repo.retry_after + 1;
        }
        // 1, 2, 4, … minutes (+2 s of rounded-up jitter), capped at an hour, for good.
        assert_eq!(&delays[..7], &[62, 122, 242, 482, 962, 1922, 3602]);
        assert!(delays[7..].iter().all(|d| *d == 3602), "{delays:?}");

        // Success resets the counters.
        claim(&store, now).await;
        let mut done = RepoWrite::new("did:plc:a".parse().unwrap());
        done.repo = RepoChange::ResyncDone {
            rev: Tid::new("3kaaaaaaaaa24").unwrap(),
            prev_data: "d".into(),
        };
        store.apply(done).await.unwrap();
        let repo = store.get_repo("did:plc:a").await.unwrap().unwrap();
        assert_eq!((repo.retry_count, repo.retry_after), (0, 0));
    }
);

test_each_store!(
    a_repo_put_off_for_a_busy_host_keeps_its_failures_and_reason,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        claim(&store, NOW).await;
        store
            .mark_resync_failed(
                "did:plc:a",
                ResyncFailure::Transient("timeout".into()),
                NOW,
                0,
            )
            .await
            .unwrap();
        let failed = store.get_repo("did:plc:a").await.unwrap().unwrap();
        let later = failed.retry_after + 1;
        claim(&store, later).await;
        store
            .mark_resync_failed("did:plc:a", ResyncFailure::HostBusy, later, 0)
            .await
            .unwrap();
        let waiting = store.get_repo("did:plc:a").await.unwrap().unwrap();
        assert_eq!(
            (waiting.state, waiting.error.as_str(), waiting.retry_count),
            (RepoState::Desynchronized, "timeout", 1)
        );
        assert_eq!(waiting.retry_after, later + 2);
    }
);

test_each_store!(
    mark_resync_failed_on_a_removed_repo_is_a_noop,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        claim(&store, NOW).await;
        store.remove_repos(&dids(&["a"])).await.unwrap();
        store
            .mark_resync_failed("did:plc:a", ResyncFailure::Failed("x".into()), NOW, 0)
            .await
            .unwrap();
        assert_eq!(store.get_repo("did:plc:a").await.unwrap(), None);

        // Re-added meanwhile: the new pending row is not clobbered.
        store.add_repos(&dids(&["a"])).await.unwrap();
        store
            .mark_resync_failed("did:plc:a", ResyncFailure::RateLimited, NOW, 0)
            .await
            .unwrap();
        let repo = store.get_repo("did:plc:a").await.unwrap().unwrap();
        assert_eq!(
            (repo.state, repo.retry_count, repo.retry_after),
            (RepoState::Pending, 0, 0)
        );
    }
);

// ---------------------------------------------------------------------------------------------
// Cursors, record pages, resync buffer

test_each_store!(
    cursors_round_trip_per_relay_and_collection,
    |store, _url| {
        let relay = "wss://relay.example";
        assert_eq!(store.firehose_cursor(relay).await.unwrap(), None);
        store.save_firehose_cursor(relay, 7).await.unwrap();
        store
            .save_firehose_cursor(relay, 9_000_000_000)
            .await
            .unwrap();
        store.save_firehose_cursor("wss://other", 1).await.unwrap();
        assert_eq!(
            store.firehose_cursor(relay).await.unwrap(),
            Some(9_000_000_000)
        );

        assert_eq!(store.list_repos_cursor(relay).await.unwrap(), None);
        store.save_list_repos_cursor(relay, "c1").await.unwrap();
        store.save_list_repos_cursor(relay, "c2").await.unwrap();
        assert_eq!(
            store.list_repos_cursor(relay).await.unwrap().as_deref(),
            Some("c2")
        );

        assert_eq!(store.collection_cursor(relay, "a.b.c").await.unwrap(), None);
        store
            .save_collection_cursor(relay, "a.b.c", "x")
            .await
            .unwrap();
        store
            .save_collection_cursor(relay, "a.b.d", "y")
            .await
            .unwrap();
        store
            .save_collection_cursor(relay, "a.b.c", "z")
            .await
            .unwrap();
        assert_eq!(
            store
                .collection_cursor(relay, "a.b.c")
                .await
                .unwrap()
                .as_deref(),
            Some("z")
        );
        assert_eq!(
            store
                .collection_cursor(relay, "a.b.d")
                .await
                .unwrap()
                .as_deref(),
            Some("y")
        );
        assert_eq!(
            store
                .collection_cursor("wss://other", "a.b.c")
                .await
                .unwrap(),
            None
        );
    }
);

test_each_store!(
    record_collections_lists_each_collection_once_in_byte_order,
    |store, _url| {
        store.add_repos(&dids(&["a", "b"])).await.unwrap();
        let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
        write.records = vec![
            put("app.bsky.feed.post", "2", "cid"),
            put("app.bsky.feed.like", "1", "cid"),
            put("app.bsky.feed.post", "1", "cid"),
            put("Com.example.x", "1", "cid"),
        ];
        store.apply(write).await.unwrap();
        let mut other = RepoWrite::new("did:plc:b".parse().unwrap());
        other.records = vec![put("com.other.thing", "1", "cid")];
        store.apply(other).await.unwrap();
        assert_eq!(
            store.record_collections("did:plc:a").await.unwrap(),
            ["Com.example.x", "app.bsky.feed.like", "app.bsky.feed.post"]
        );
        assert!(
            store
                .record_collections("did:plc:none")
                .await
                .unwrap()
                .is_empty()
        );
    }
);

test_each_store!(records_page_walks_keys_in_byte_order, |store, _url| {
    store.add_repos(&dids(&["a", "b"])).await.unwrap();
    // Byte order puts upper case before lower case, unlike most locales.
    let keys = [
        ("app.bsky.feed.like", "3k2"),
        ("app.bsky.feed.post", "Zed"),
        ("app.bsky.feed.post", "abc"),
        ("app.bsky.feed.post", "abd"),
        ("app.bsky.feed.postgate", "1"),
        ("app.bsky.graph.follow", "A"),
        ("com.example.Thing", "x"),
    ];
    let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
    // Inserted in reverse to show the order comes from the query.
    write.records = keys.iter().rev().map(|(c, r)| put(c, r, "cid")).collect();
    store.apply(write).await.unwrap();
    let mut other = RepoWrite::new("did:plc:b".parse().unwrap());
    other.records = vec![put("app.bsky.feed.post", "abc", "cid")];
    store.apply(other).await.unwrap();

    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .records_page("did:plc:a", after.clone(), 3)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        let last = page.last().unwrap();
        after = Some((last.collection.clone(), last.rkey.clone()));
        seen.extend(page.into_iter().map(|r| (r.collection, r.rkey)));
    }
    let mut expected: Vec<(String, String)> = keys
        .iter()
        .map(|(c, r)| (c.to_string(), r.to_string()))
        .collect();
    expected
        .sort_by(|x, y| (x.0.as_bytes(), x.1.as_bytes()).cmp(&(y.0.as_bytes(), y.1.as_bytes())));
    assert_eq!(seen, expected);
    assert!(
        store
            .records_page("did:plc:nobody", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
});

test_each_store!(
    a_large_index_spread_over_many_chunks_matches_every_write_and_pages_exactly,
    |store, _url| {
        store.add_repos(&dids(&["a", "b"])).await.unwrap();
        let cid = |n: usize| format!("bafyreicid{n:06}");
        let mut model = std::collections::BTreeMap::new();
        let mut apply = |records: Vec<RecordChange>| {
            for r in &records {
                match r {
                    RecordChange::Put {
                        collection,
                        rkey,
                        cid,
                    } => {
                        model.insert((collection.clone(), rkey.clone()), cid.clone());
                    }
                    RecordChange::Delete { collection, rkey } => {
                        model.remove(&(collection.clone(), rkey.clone()));
                    }
                }
            }
            let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
            write.records = records;
            write
        };
        // A backfill in key order, 100 at a time: many chunks per collection.
        for collection in ["app.bsky.feed.like", "app.bsky.feed.post"] {
            for batch in 0..12 {
                let records = (0..100)
                    .map(|i| {
                        let n = batch * 100 + i;
                        put(collection, &format!("3k{:010}", n * 10), &cid(n))
                    })
                    .collect();
                store.apply(apply(records)).await.unwrap();
            }
        }
        // Live writes anywhere: before the first key, between keys, updates, deletes of
        // present and absent keys, a whole chunk's worth deleted, a new collection.
        let mut mixed = vec![
            put("app.bsky.feed.post", "0000", &cid(1)),
            put("app.bsky.feed.post", &format!("3k{:010}", 55), &cid(2)),
            put("app.bsky.feed.post", &format!("3k{:010}", 60), &cid(3)),
            delete("app.bsky.feed.post", &format!("3k{:010}", 70)),
            delete("app.bsky.feed.post", "absent"),
            put("app.bsky.graph.follow", "f1", &cid(4)),
            put("zzz.last", "z", &cid(5)),
        ];
        mixed
            .extend((200..320).map(|n| delete("app.bsky.feed.like", &format!("3k{:010}", n * 10))));
        store.apply(apply(mixed)).await.unwrap();
        // Another repo's records must never show up in this one's pages.
        let mut other = RepoWrite::new("did:plc:b".parse().unwrap());
        other.records = vec![put("app.bsky.feed.post", "3k", &cid(9))];
        store.apply(other).await.unwrap();

        let expected: Vec<(String, String, String)> = model
            .iter()
            .map(|((c, r), cid)| (c.clone(), r.clone(), cid.clone()))
            .collect();
        assert_eq!(records_of(&store, "did:plc:a").await, expected);
        assert_eq!(
            store.count_records_for("did:plc:a").await.unwrap(),
            expected.len() as u64
        );
        assert_eq!(
            store.record_count().await.unwrap(),
            expected.len() as u64 + 1
        );
        assert_eq!(
            store.record_collections("did:plc:a").await.unwrap(),
            [
                "app.bsky.feed.like",
                "app.bsky.feed.post",
                "app.bsky.graph.follow",
                "zzz.last"
            ]
        );
        // Small pages resume exactly where the last one ended, inside or across chunks.
        for size in [1, 7, 100] {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let page = store
                    .records_page("did:plc:a", after.clone(), size)
                    .await
                    .unwrap();
                assert!(page.len() <= size);
                let Some(last) = page.last() else { break };
                after = Some((last.collection.clone(), last.rkey.clone()));
                seen.extend(page.into_iter().map(|r| (r.collection, r.rkey, r.cid)));
            }
            assert_eq!(seen, expected, "page size {size}");
        }
        // A page may start from a key that is not stored.
        let page = store
            .records_page(
                "did:plc:a",
                Some(("app.bsky.feed.post".into(), format!("3k{:010}", 56))),
                2,
            )
            .await
            .unwrap();
        assert_eq!(page[0].rkey, format!("3k{:010}", 60));
        assert_eq!(page[1].rkey, format!("3k{:010}", 80));
    }
);

test_each_store!(
    concurrent_writes_to_one_repos_index_lose_nothing,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        // Interleaved keys, so every write merges into the chunks the others rewrite.
        let writers: Vec<_> = (0..16)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for round in 0..5 {
                        let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
                        write.condition = if w % 2 == 0 {
                            WriteCondition::RepoExists
                        } else {
                            WriteCondition::Always
                        };
                        write.records = (0..20)
                            .map(|i| {
                                let n = (round * 20 + i) * 16 + w;
                                put("app.test", &format!("k{n:05}"), &format!("c{n}"))
                            })
                            .collect();
                        store.apply(write).await.unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        let all = records_of(&store, "did:plc:a").await;
        assert_eq!(all.len(), 16 * 5 * 20);
        assert_eq!(store.count_records_for("did:plc:a").await.unwrap(), 1600);
        for (n, (_, rkey, cid)) in all.iter().enumerate() {
            assert_eq!(rkey, &format!("k{n:05}"));
            assert_eq!(cid, &format!("c{n}"));
        }
    }
);

test_each_store!(
    an_index_change_the_index_cannot_hold_is_refused_and_writes_nothing,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
        write.records = vec![put("col", "ok", "c1"), put("col", "has space", "c2")];
        write.events = vec![event(true, 1)];
        let err = store.apply(write).await.unwrap_err();
        assert!(matches!(err, StoreError::Unindexable(_)), "{err}");
        assert!(!err.is_transient());
        assert_eq!(store.record_count().await.unwrap(), 0);
        assert_eq!(store.outbox_count().await.unwrap(), 0);
    }
);

test_each_store!(
    resync_buffer_round_trips_and_is_consumed_by_apply,
    |store, _url| {
        store.add_repos(&dids(&["a", "b"])).await.unwrap();
        store
            .buffer_commit("did:plc:a", "r1", r#"{"n":1}"#, 100)
            .await
            .unwrap();
        store
            .buffer_commit("did:plc:b", "r1", r#"{"n":9}"#, 100)
            .await
            .unwrap();
        store
            .buffer_commit("did:plc:a", "r2", r#"{"n":2}"#, 100)
            .await
            .unwrap();
        store
            .buffer_commit("did:plc:a", "r3", r#"{"n":3}"#, 100)
            .await
            .unwrap();

        let buffered = store.buffered_commits("did:plc:a", 0, 100).await.unwrap();
        assert_eq!(
            buffered
                .iter()
                .map(|c| (c.rev.as_str(), c.data.as_str()))
                .collect::<Vec<_>>(),
            [
                ("r1", r#"{"n":1}"#),
                ("r2", r#"{"n":2}"#),
                ("r3", r#"{"n":3}"#)
            ]
        );
        assert!(buffered.windows(2).all(|w| w[0].id < w[1].id));
        let other = store.buffered_commits("did:plc:b", 0, 100).await.unwrap();

        // Drain r1 (already in the snapshot: discarded) and r2 (applied) in one write; a foreign
        // id in the list is ignored.
        let mut drain = RepoWrite::new("did:plc:a".parse().unwrap());
        drain.repo = RepoChange::Commit {
            rev: Tid::new("3kaaaaaaaaa25").unwrap(),
            prev_data: "d2".into(),
        };
        drain.events = vec![event(true, 2)];
        drain.resync_buffer_delete = vec![buffered[0].id, buffered[1].id, other[0].id];
        store.apply(drain).await.unwrap();
        let left = store.buffered_commits("did:plc:a", 0, 100).await.unwrap();
        assert_eq!(left, [buffered[2].clone()]);
        assert_eq!(
            store.buffered_commits("did:plc:b", 0, 100).await.unwrap(),
            other
        );

        // A failed write consumes nothing.
        let mut bad = RepoWrite::new("did:plc:a".parse().unwrap());
        bad.records = vec![put("", "1", "c")];
        bad.resync_buffer_delete = vec![buffered[2].id];
        assert!(store.apply(bad).await.is_err());
        assert_eq!(
            store
                .buffered_commits("did:plc:a", 0, 100)
                .await
                .unwrap()
                .len(),
            1
        );
    }
);

test_each_store!(
    a_stale_resync_applies_its_snapshot_and_goes_back_to_desynchronized_at_once,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        claim(&store, NOW).await;
        let mut done = RepoWrite::new("did:plc:a".parse().unwrap());
        done.condition = WriteCondition::RepoInState(RepoState::Resyncing);
        done.repo = RepoChange::ResyncStale {
            rev: Tid::new("3kaaaaaaaaa2z").unwrap(),
            prev_data: "data9".into(),
            reason: "buffer overflowed".into(),
        };
        store.apply(done).await.unwrap();
        let repo = store.get_repo("did:plc:a").await.unwrap().unwrap();
        assert_eq!(repo.state, RepoState::Desynchronized);
        assert_eq!(repo.rev.as_ref().map(Tid::as_str), Some("3kaaaaaaaaa2z"));
        assert_eq!(repo.prev_data.as_deref(), Some("data9"));
        assert_eq!(repo.error, "buffer overflowed");
        assert_eq!(repo.retry_after, 0, "claimable at once");
    }
);

test_each_store!(
    a_repos_resync_buffer_is_capped_and_read_a_page_at_a_time,
    |store, _url| {
        store.add_repos(&dids(&["a", "b"])).await.unwrap();
        for n in 0..3 {
            let data = format!(r#"{{"n":{n}}}"#);
            assert!(
                store
                    .buffer_commit("did:plc:a", "r", &data, 3)
                    .await
                    .unwrap()
            );
        }
        assert!(
            !store
                .buffer_commit("did:plc:a", "r", "{}", 3)
                .await
                .unwrap(),
            "the fourth entry is refused"
        );
        assert!(
            store
                .buffer_commit("did:plc:b", "r", "{}", 3)
                .await
                .unwrap(),
            "the cap is per repo"
        );
        assert!(
            store
                .buffer_commit("did:plc:a", "r", "marker", 4)
                .await
                .unwrap()
        );
        assert!(
            !store
                .buffer_commit("did:plc:a", "r", "marker", 4)
                .await
                .unwrap()
        );

        let first = store.buffered_commits("did:plc:a", 0, 3).await.unwrap();
        let rest = store
            .buffered_commits("did:plc:a", first[2].id, 3)
            .await
            .unwrap();
        let data: Vec<&str> = first.iter().chain(&rest).map(|c| c.data.as_str()).collect();
        assert_eq!(data, [r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#, "marker"]);
    }
);

// ---------------------------------------------------------------------------------------------
// Backend-specific behaviour

/// Blocks the SQLite writer inside a job until `queued` more writes wait behind it, so the
/// next group is known to hold them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_group_commit_isolates_a_failing_write() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = sqlite::SqliteStore::open(dir.path().join("g.db").display().to_string())
        .await
        .unwrap();
    let sqlite = std::sync::Arc::new(sqlite);
    sqlite.add_repos(vec!["did:plc:a".into()]).await.unwrap();

    let (entered_tx, entered) = tokio::sync::oneshot::channel::<()>();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let entered_tx = std::sync::Mutex::new(Some(entered_tx));
    let release_rx = std::sync::Mutex::new(release_rx);
    let blocker = {
        let sqlite = std::sync::Arc::clone(&sqlite);
        tokio::spawn(async move {
            sqlite
                .write(move |_conn| {
                    if let Some(tx) = entered_tx.lock().unwrap().take() {
                        let _ = tx.send(());
                        let _ = release_rx
                            .lock()
                            .unwrap()
                            .recv_timeout(Duration::from_secs(30));
                    }
                    Ok(())
                })
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(30), entered)
        .await
        .unwrap()
        .unwrap();

    // Queue 9 good writes and 1 bad one while the writer is blocked.
    let mut tasks = Vec::new();
    for n in 0..10 {
        let sqlite = std::sync::Arc::clone(&sqlite);
        tasks.push(tokio::spawn(async move {
            let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
            let rkey = if n == 4 { String::new() } else { n.to_string() };
            write.records = vec![put("col", &rkey, "cid")];
            write.events = vec![event(true, n)];
            sqlite.apply(write).await
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sqlite_queue_len(&sqlite) < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "writes never queued"
        );
        tokio::task::yield_now().await;
    }
    release.send(()).unwrap();
    blocker.await.unwrap().unwrap();

    let mut ok = 0;
    for (n, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(ids) => {
                assert_eq!(ids.len(), 1);
                ok += 1;
            }
            Err(err) => assert_eq!(n, 4, "unexpected failure {err}"),
        }
    }
    assert_eq!(ok, 9);
    assert_eq!(sqlite.count_table(Table::Outbox).await.unwrap(), 9);
    assert_eq!(sqlite.count_table(Table::Records).await.unwrap(), 9);
    use std::sync::atomic::Ordering;
    assert!(sqlite.stats.groups.load(Ordering::Relaxed) >= 1);
    assert!(sqlite.stats.grouped_jobs.load(Ordering::Relaxed) >= 10);
    assert_eq!(sqlite.stats.fallbacks.load(Ordering::Relaxed), 0);
    sqlite.close().await;
}

fn sqlite_queue_len(store: &sqlite::SqliteStore) -> usize {
    store.queued()
}

#[tokio::test]
async fn sqlite_memory_uri_works_without_a_reader_pool() {
    for path in [":memory:", "file::memory:?cache=shared"] {
        let url = DatabaseUrl::Sqlite(path.into());
        let store = Store::open(&url, StoreOptions::default()).await.unwrap();
        store.add_repos(&dids(&["a"])).await.unwrap();
        let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
        write.events = vec![event(true, 1)];
        store.apply(write).await.unwrap();
        assert_eq!(store.repo_count().await.unwrap(), 1);
        assert_eq!(store.load_outbox(None, 10).await.unwrap().len(), 1);
        store.close().await;
    }
}

#[tokio::test]
async fn sqlite_file_uses_wal_and_the_configured_pragmas() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let store = Store::open(
        &DatabaseUrl::Sqlite(path.display().to_string()),
        StoreOptions::default(),
    )
    .await
    .unwrap();
    store.close().await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let versions: Vec<i64> = conn
        .prepare("SELECT version FROM schema_migrations ORDER BY version")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let all: Vec<i64> = schema::MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(versions, all, "every migration applied once");
}

#[tokio::test]
async fn sqlite_open_in_a_missing_directory_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/tap.db").display().to_string();
    let err = Store::open(&DatabaseUrl::Sqlite(path.clone()), StoreOptions::default())
        .await
        .err()
        .expect("open must fail");
    assert!(matches!(err, StoreError::SqliteOpen { .. }), "{err}");
    assert!(err.to_string().contains(&path), "{err}");
}

#[tokio::test]
async fn sqlite_refuses_a_database_made_by_another_program() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("go.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE repos (did TEXT PRIMARY KEY, state TEXT)")
        .unwrap();
    let err = Store::open(
        &DatabaseUrl::Sqlite(path.display().to_string()),
        StoreOptions::default(),
    )
    .await
    .err()
    .expect("open must fail");
    assert!(matches!(err, StoreError::ForeignSchema { .. }), "{err}");
}

#[tokio::test]
async fn sqlite_index_rows_from_before_chunking_are_migrated_and_stay_writable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    // A database as schema version 2 left it, with one row per record.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE schema_migrations (version INTEGER NOT NULL PRIMARY KEY, \
         name TEXT NOT NULL, applied_at INTEGER NOT NULL DEFAULT (unixepoch()));",
    )
    .unwrap();
    for m in schema::MIGRATIONS.iter().filter(|m| m.version <= 2) {
        conn.execute_batch(m.sqlite).unwrap();
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (?1, ?2)",
            rusqlite::params![m.version, m.name],
        )
        .unwrap();
    }
    conn.execute_batch(OLD_INDEX_ROWS).unwrap();
    drop(conn);
    check_index_migrated_from_rows(&DatabaseUrl::Sqlite(path.display().to_string())).await;
}

#[tokio::test]
async fn postgres_index_rows_from_before_chunking_are_migrated_and_stay_writable() {
    let Some(db) = TestPostgres::create().await else {
        return;
    };
    let mut sql = String::from(
        "CREATE TABLE schema_migrations (version BIGINT NOT NULL PRIMARY KEY, \
         name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());",
    );
    for m in schema::MIGRATIONS.iter().filter(|m| m.version <= 2) {
        sql.push_str(m.postgres);
        sql.push_str(&format!(
            ";INSERT INTO schema_migrations (version, name) VALUES ({}, '{}');",
            m.version, m.name
        ));
    }
    sql.push_str(OLD_INDEX_ROWS);
    db.execute(&sql).await;
    check_index_migrated_from_rows(&DatabaseUrl::Postgres(db.url().to_owned())).await;
}

/// Rows as schema version 2 stored them: one per record.
const OLD_INDEX_ROWS: &str = "INSERT INTO repos (did, state) VALUES ('did:plc:a', 'active'); \
     INSERT INTO repo_records (did, collection, rkey, cid) VALUES \
       ('did:plc:a', 'col', 'k1', 'c1'), ('did:plc:a', 'col', 'k3', 'c3'), \
       ('did:plc:a', 'other', 'k2', 'c2');";

/// Opens (and so migrates) a database holding [`OLD_INDEX_ROWS`]; the index must read back
/// the same and take writes around and over the migrated entries.
async fn check_index_migrated_from_rows(url: &DatabaseUrl) {
    let store = Store::open(url, StoreOptions::default()).await.unwrap();
    assert_eq!(
        records_of(&store, "did:plc:a").await,
        [
            triple("col", "k1", "c1"),
            triple("col", "k3", "c3"),
            triple("other", "k2", "c2")
        ]
    );
    let mut write = RepoWrite::new("did:plc:a".parse().unwrap());
    write.records = vec![
        put("col", "k2", "c2b"),
        delete("col", "k3"),
        put("col", "k0", "c0"),
    ];
    store.apply(write).await.unwrap();
    assert_eq!(
        records_of(&store, "did:plc:a").await,
        [
            triple("col", "k0", "c0"),
            triple("col", "k1", "c1"),
            triple("col", "k2", "c2b"),
            triple("other", "k2", "c2")
        ]
    );
    assert_eq!(store.count_records_for("did:plc:a").await.unwrap(), 4);
    store.close().await;
}

#[tokio::test]
async fn sqlite_refuses_a_schema_newer_than_this_build() {
    let dir = tempfile::tempdir().unwrap();
    let url = DatabaseUrl::Sqlite(dir.path().join("new.db").display().to_string());
    Store::open(&url, StoreOptions::default())
        .await
        .unwrap()
        .close()
        .await;
    rusqlite::Connection::open(dir.path().join("new.db"))
        .unwrap()
        .execute_batch("INSERT INTO schema_migrations (version, name) VALUES (999, 'future')")
        .unwrap();
    let err = Store::open(&url, StoreOptions::default())
        .await
        .err()
        .expect("open must fail");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn unreachable_postgres_is_a_clear_transient_error() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let url = DatabaseUrl::parse("postgres://tap:secret@127.0.0.1:1/tap").unwrap();
    let err = Store::open(&url, StoreOptions::default())
        .await
        .err()
        .expect("open must fail");
    assert!(matches!(err, StoreError::PostgresConnect { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("127.0.0.1:1/tap"), "{message}");
    assert!(!message.contains("secret"), "{message}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn postgres_refuses_a_database_made_by_another_program() {
    let Some(db) = TestPostgres::create().await else {
        return;
    };
    db.execute("CREATE TABLE repos (did TEXT PRIMARY KEY, state TEXT)")
        .await;
    let result = Store::open(
        &DatabaseUrl::Postgres(db.url().to_owned()),
        StoreOptions::default(),
    )
    .await;
    drop(db);
    let err = result.err().expect("open must fail");
    assert!(matches!(err, StoreError::ForeignSchema { .. }), "{err}");
}

/// A hung database (here: a lock another session holds) surfaces as transient errors
/// within the statement and pool-wait timeouts, not as a stall; the store works again once
/// the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_held_lock_surfaces_as_transient_errors_within_the_timeouts() {
    let Some(db) = TestPostgres::create().await else {
        return;
    };
    let store = Store::open(
        &DatabaseUrl::Postgres(db.url().to_owned()),
        StoreOptions {
            max_pg_conns: 1,
            pg_statement_timeout: Duration::from_millis(500),
            pg_pool_wait: Duration::from_millis(300),
        },
    )
    .await
    .unwrap();
    let (holder, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    holder
        .batch_execute("BEGIN; LOCK TABLE repos IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let blocked = tokio::spawn({
        let store = store.clone();
        async move { store.add_repos(&dids(&["held"])).await }
    });
    // While the one pooled connection waits on the lock, another operation waits for it.
    tap_testkit::wait::poll_until(
        "the insert waiting on the lock",
        Duration::from_secs(10),
        || async {
            let row = holder
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .ok()?;
            (row.get::<_, i64>(0) > 0).then_some(())
        },
    )
    .await;
    let waiting = store.repo_count().await.unwrap_err();
    assert!(
        matches!(waiting, StoreError::PostgresPool { .. }) && waiting.is_transient(),
        "{waiting}"
    );
    let cancelled = blocked.await.unwrap().unwrap_err();
    assert!(cancelled.is_transient(), "{cancelled}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "surfaced within the timeouts, not after a stall"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(store.add_repos(&dids(&["held"])).await.unwrap(), 1);
    store.close().await;
}

#[test]
fn migrations_are_numbered_in_order() {
    for list in [schema::MIGRATIONS] {
        assert!(!list.is_empty());
        assert!(list.windows(2).all(|w| w[0].version < w[1].version));
        for m in list {
            assert!(
                m.name.starts_with(&format!("{:04}_", m.version)),
                "{} does not match version {}",
                m.name,
                m.version
            );
        }
    }
}

test_each_store!(
    writes_that_make_a_repo_claimable_wake_idle_resync_workers,
    |store, _url| {
        let armed = |store: &Store| {
            let store = store.clone();
            async move {
                let wanted = store.resync_wanted().notified();
                tokio::pin!(wanted);
                wanted.as_mut().enable();
                wanted.await;
            }
        };
        let wait = tokio::spawn(armed(&store));
        tokio::task::yield_now().await;
        // A worker arms its wait before claiming; give the spawned one the same head start.
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                store.add_repos(&["did:plc:wake".into()]).await.unwrap();
                if wait.is_finished() {
                    break;
                }
                store.remove_repos(&["did:plc:wake".into()]).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("adding a repo never woke the waiting worker");

        let wait = tokio::spawn(armed(&store));
        tokio::time::timeout(Duration::from_secs(5), async {
            while !wait.is_finished() {
                store
                    .mark_desynchronized("did:plc:wake", "test")
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("desynchronizing a repo never woke the waiting worker");
    }
);

// ---------------------------------------------------------------------------------------------
// In-memory backfill events

fn in_memory_write(did: &str, keys: &[&str]) -> RepoWrite {
    let mut write = RepoWrite::new(did.parse().unwrap());
    write.storage = EventStorage::InMemoryBackfill;
    write.records = keys
        .iter()
        .map(|k| put("col", k, &format!("c{k}")))
        .collect();
    write.events = (0..keys.len()).map(|n| event(false, n)).collect();
    write
}

test_each_store!(
    in_memory_events_are_numbered_but_not_stored_and_stamp_the_repo,
    |store, url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        // On a fresh database, before any outbox row ever existed.
        let first = store
            .apply(in_memory_write("did:plc:a", &["1", "2", "3"]))
            .await
            .unwrap();
        assert_eq!(first.len(), 3);
        assert!(first.windows(2).all(|w| w[0] < w[1]), "{first:?}");
        assert_eq!(store.outbox_count().await.unwrap(), 0, "nothing stored");
        assert_eq!(store.count_records_for("did:plc:a").await.unwrap(), 3);
        assert_eq!(
            store.backfill_token("did:plc:a").await.unwrap(),
            Some(first[0])
        );
        assert_eq!(store.max_event_id().await.unwrap(), first.last().copied());

        // A stored event never reuses an in-memory id, also after a restart.
        let mut durable = RepoWrite::new("did:plc:a".parse().unwrap());
        durable.events = vec![event(true, 9)];
        let stored = store.apply(durable.clone()).await.unwrap();
        assert!(stored[0] > first[2], "{first:?} then {stored:?}");
        let second = store
            .apply(in_memory_write("did:plc:a", &["4"]))
            .await
            .unwrap();
        assert!(second[0] > stored[0]);
        assert_eq!(
            store.backfill_token("did:plc:a").await.unwrap(),
            Some(second[0]),
            "the latest write's first id"
        );
        store.close().await;
        let reopened = Store::open(&url, StoreOptions::default()).await.unwrap();
        let after_restart = reopened.apply(durable).await.unwrap();
        assert!(after_restart[0] > second[0]);
        reopened.close().await;
    }
);

test_each_store!(
    a_backfill_token_is_cleared_only_by_its_own_value,
    |store, _url| {
        store.add_repos(&dids(&["a"])).await.unwrap();
        let ids = store
            .apply(in_memory_write("did:plc:a", &["1", "2"]))
            .await
            .unwrap();
        let stale = EventId(ids[0].0 - 1);
        assert!(
            !store
                .clear_backfill_token("did:plc:a", stale)
                .await
                .unwrap()
        );
        assert_eq!(
            store.backfill_token("did:plc:a").await.unwrap(),
            Some(ids[0])
        );
        assert!(
            store
                .clear_backfill_token("did:plc:a", ids[0])
                .await
                .unwrap()
        );
        assert_eq!(store.backfill_token("did:plc:a").await.unwrap(), None);
        assert!(
            !store
                .clear_backfill_token("did:plc:gone", ids[0])
                .await
                .unwrap()
        );
    }
);

test_each_store!(
    undelivered_backfills_are_reset_to_pending_keeping_their_index,
    |store, _url| {
        store.add_repos(&dids(&["a", "b"])).await.unwrap();
        store
            .apply(in_memory_write("did:plc:a", &["1", "2"]))
            .await
            .unwrap();
        let mut done = RepoWrite::new("did:plc:a".parse().unwrap());
        done.repo = RepoChange::ResyncDone {
            rev: Tid::new("3kaaaaaaaaaa2").unwrap(),
            prev_data: "bafyroot".into(),
        };
        store.apply(done).await.unwrap();
        // "b" was backfilled with stored events: nothing to redo.
        let mut b = RepoWrite::new("did:plc:b".parse().unwrap());
        b.records = vec![put("col", "1", "c1")];
        b.events = vec![event(false, 1)];
        store.apply(b).await.unwrap();

        assert_eq!(store.reset_undelivered_backfills().await.unwrap(), 1);
        let a = store.get_repo("did:plc:a").await.unwrap().unwrap();
        assert_eq!(a.state, RepoState::Pending);
        assert_eq!(a.rev, None);
        assert_eq!(a.prev_data, None);
        assert_eq!(
            store.count_records_for("did:plc:a").await.unwrap(),
            2,
            "the replay deletes what vanished since"
        );
        assert_eq!(store.backfill_token("did:plc:a").await.unwrap(), None);
        assert_eq!(store.count_records_for("did:plc:b").await.unwrap(), 1);
        assert_eq!(store.reset_undelivered_backfills().await.unwrap(), 0);
    }
);

// ---------------------------------------------------------------------------------------------
// Listing and steering

test_each_store!(
    list_repos_pages_in_did_order_by_state_with_record_counts,
    |store, _url| {
        store
            .add_repos(&dids(&["d", "b", "a", "c", "e"]))
            .await
            .unwrap();
        let mut write = RepoWrite::new("did:plc:b".parse().unwrap());
        write.records = vec![put("col.a", "1", "c1"), put("col.b", "2", "c2")];
        store.apply(write).await.unwrap();
        store
            .set_repo_state("did:plc:c", RepoState::Active)
            .await
            .unwrap();
        store
            .set_repo_state("did:plc:e", RepoState::Active)
            .await
            .unwrap();

        let page = |state, after: &'static str, limit| {
            let store = store.clone();
            async move {
                store
                    .list_repos(state, after, limit)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|s| (s.repo.did.to_string(), s.repo.state, s.records))
                    .collect::<Vec<_>>()
            }
        };
        let first = page(None, "", 2).await;
        assert_eq!(
            first,
            [
                ("did:plc:a".into(), RepoState::Pending, 0),
                ("did:plc:b".into(), RepoState::Pending, 2)
            ]
        );
        let rest: Vec<String> = page(None, "did:plc:b", 10)
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(rest, dids(&["c", "d", "e"]));
        let active: Vec<String> = page(Some(RepoState::Active), "", 10)
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(active, dids(&["c", "e"]));
        assert!(
            page(Some(RepoState::Active), "did:plc:e", 10)
                .await
                .is_empty()
        );
        assert_eq!(
            store
                .repo_states()
                .await
                .unwrap()
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
            [(RepoState::Pending, 3), (RepoState::Active, 2)]
                .into_iter()
                .collect()
        );
    }
);

test_each_store!(
    a_forced_resync_queues_idle_repos_for_a_full_fetch_and_leaves_running_ones,
    |store, _url| {
        store
            .add_repos(&dids(&["idle", "busy", "new"]))
            .await
            .unwrap();
        let mut fetched = RepoWrite::new("did:plc:idle".parse().unwrap());
        fetched.repo = RepoChange::ResyncDone {
            rev: Tid::new("3kaaaaaaaaa2z").unwrap(),
            prev_data: "data1".into(),
        };
        fetched.fetch = Some(LastFetch {
            kind: FetchKind::Since,
            bytes: 10,
            at: NOW,
            filters: String::new(),
        });
        store.apply(fetched).await.unwrap();
        store
            .mark_resync_failed("did:plc:idle", ResyncFailure::Failed("x".into()), NOW, 0)
            .await
            .unwrap();
        store
            .set_repo_state("did:plc:busy", RepoState::Resyncing)
            .await
            .unwrap();

        let mut asked = dids(&["idle", "busy", "nobody", "new", "idle"]);
        asked.push("did:plc:idle".into());
        let request = store.request_resync(&asked).await.unwrap();
        assert_eq!(
            request,
            ResyncRequest {
                queued: dids(&["idle", "new"]),
                resyncing: dids(&["busy"]),
                untracked: dids(&["nobody"]),
            }
        );
        let idle = store.get_repo("did:plc:idle").await.unwrap().unwrap();
        assert_eq!(idle.state, RepoState::Desynchronized);
        assert_eq!(idle.error, RESYNC_REQUESTED);
        assert_eq!((idle.retry_count, idle.retry_after), (0, 0));
        assert_eq!(
            idle.last_fetch, None,
            "the next fetch must not trust the held copy"
        );
        assert_eq!(idle.rev, Some(Tid::new("3kaaaaaaaaa2z").unwrap()));
        let busy = store.get_repo("did:plc:busy").await.unwrap().unwrap();
        assert_eq!(busy.state, RepoState::Resyncing);
        let new = store.get_repo("did:plc:new").await.unwrap().unwrap();
        assert_eq!(
            new.state,
            RepoState::Pending,
            "its backfill is still to come"
        );
        assert_eq!(claim(&store, NOW).await.did, "did:plc:new", "pending first");
        assert_eq!(claim(&store, NOW).await.did, "did:plc:idle");
    }
);

test_each_store!(
    error_reasons_rank_failed_repos_by_frequency,
    |store, _url| {
        store
            .add_repos(&dids(&["a", "b", "c", "d", "e"]))
            .await
            .unwrap();
        for (did, reason) in [("a", "404"), ("b", "404"), ("c", "bad signature")] {
            let did = format!("did:plc:{did}");
            store
                .set_repo_state(&did, RepoState::Resyncing)
                .await
                .unwrap();
            store
                .mark_resync_failed(&did, ResyncFailure::Failed(reason.into()), NOW, 0)
                .await
                .unwrap();
        }
        // Waiting for a resync is not a failure verdict: not counted.
        store
            .mark_desynchronized("did:plc:d", "bad signature")
            .await
            .unwrap();
        store
            .mark_desynchronized("did:plc:e", RESYNC_REQUESTED)
            .await
            .unwrap();
        let reasons = store.error_reasons(5).await.unwrap();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].0.contains("404"), "{reasons:?}");
        assert_eq!(reasons[0].1, 2);
        assert!(reasons[1].0.contains("bad signature"), "{reasons:?}");
        assert_eq!(reasons[1].1, 1);
        assert_eq!(store.error_reasons(1).await.unwrap().len(), 1);
    }
);

test_each_store!(
    a_saved_setting_reads_back_and_a_widening_marks_every_active_repo_with_it,
    |store, _url| {
        assert_eq!(store.setting("filters").await.unwrap(), None);
        assert_eq!(store.save_setting("filters", "[1]", None).await.unwrap(), 0);
        store.add_repos(&dids(&["a", "b", "c"])).await.unwrap();
        for did in ["a", "b"] {
            store
                .set_repo_state(&format!("did:plc:{did}"), RepoState::Active)
                .await
                .unwrap();
        }
        let marked = store
            .save_setting("filters", "[2]", Some("widened"))
            .await
            .unwrap();
        assert_eq!(marked, 2);
        assert_eq!(
            store.setting("filters").await.unwrap().as_deref(),
            Some("[2]")
        );
        let a = store.get_repo("did:plc:a").await.unwrap().unwrap();
        assert_eq!(
            (a.state, a.error.as_str()),
            (RepoState::Desynchronized, "widened")
        );
        let c = store.get_repo("did:plc:c").await.unwrap().unwrap();
        assert_eq!(
            c.state,
            RepoState::Pending,
            "not yet synced: fetched with the new filters anyway"
        );
    }
);
