//! Throughput of `Store::apply` on SQLite: the write every historical (resync) batch makes.
//!
//! Parameters (fixed, so runs compare):
//! - one write = 100 record `Put`s into the record index + 100 outbox events of 540 B each
//!   (the measured mean size of a real record event, performance-limits.md §2), `live: false`,
//!   `RepoChange::None`, condition `RepoExists` (what a resync worker sends);
//! - rkeys increase like TIDs; 64 repos are written round-robin;
//! - `in_flight` = how many applies are outstanding at once (1 = one resync worker; 4 = several
//!   workers, where group commit folds their writes into shared transactions);
//! - a fresh temp-file database per benchmark, WAL, `synchronous=NORMAL`; it grows during the run
//!   (no acks), as during a backfill.
//!
//! - a second group, `store_apply_sqlite_live`, sends live-commit-sized writes (1 record +
//!   1 event, `RepoChange::Commit`) with 1 or 16 in flight: the case group commit exists for.
//!
//! Throughput is reported in events (= records) per second.

#![expect(
    clippy::expect_used,
    reason = "a benchmark has nobody to report setup errors to"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tap::store::{
    DatabaseUrl, NewEvent, RecordChange, RepoChange, RepoWrite, Store, StoreOptions, WriteCondition,
};

const EVENTS_PER_WRITE: usize = 100;
const PAYLOAD_BYTES: usize = 540;
const REPOS: u64 = 64;

fn payload() -> String {
    let head = r#"{"type":"record","record":{"live":false,"did":"did:plc:benchbenchbenchbench","rev":"3l3qo2vutsw2b","collection":"app.bsky.feed.like","rkey":"3l3qo2vuowo2b","action":"create","cid":"bafyreig2fjxi3rptqdgylg7e5hmjl6mcke7rn2b6cugzlqq3i4zu6rq52q","record":{"$type":"app.bsky.feed.like","subject":{"uri":"at://did:plc:z72i7hdynmk6r22z27h6tvur/app.bsky.feed.post/3l3qo2vuowo2b","cid":"bafyreig2fjxi3rptqdgylg7e5hmjl6mcke7rn2b6cugzlqq3i4zu6rq52q"},"createdAt":"2024-09-01T12:00:00.000Z","pad":""#;
    let tail = "\"}}}";
    let pad = PAYLOAD_BYTES.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad))
}

struct Fixture {
    store: Store,
    payload: String,
    next: AtomicU64,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = DatabaseUrl::Sqlite(dir.path().join("bench.db").display().to_string());
        let store = Store::open(&url, StoreOptions::default())
            .await
            .expect("open store");
        let dids: Vec<String> = (0..REPOS).map(did).collect();
        store.add_repos(&dids).await.expect("add repos");
        let payload = payload();
        assert_eq!(payload.len(), PAYLOAD_BYTES);
        Self {
            store,
            payload,
            next: AtomicU64::new(0),
            _dir: dir,
        }
    }

    fn batch(&self, events: usize) -> RepoWrite {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut write = RepoWrite::new(did(n % REPOS).parse().expect("a valid DID"));
        write.condition = WriteCondition::RepoExists;
        if events == 1 {
            write.repo = RepoChange::Commit {
                rev: tap_atproto::syntax::Tid::from_parts(1_700_000_000_000_000 + n, 0),
                prev_data: "bafyreig2fjxi3rptqdgylg7e5hmjl6mcke7rn2b6cugzlqq3i4zu6rq52q".into(),
            };
        }
        write.records = (0..events as u64)
            .map(|i| RecordChange::Put {
                collection: "app.bsky.feed.like".into(),
                rkey: format!("3l{:011}", n * events as u64 + i),
                cid: "bafyreig2fjxi3rptqdgylg7e5hmjl6mcke7rn2b6cugzlqq3i4zu6rq52q".into(),
            })
            .collect();
        write.events = (0..events)
            .map(|_| NewEvent {
                live: false,
                payload: self.payload.clone(),
            })
            .collect();
        write
    }
}

fn did(n: u64) -> String {
    format!("did:plc:bench{n:019}")
}

/// Runs `iters` applies of `events`-event writes with `in_flight` outstanding at once.
fn run_applies(
    runtime: &tokio::runtime::Runtime,
    fixture: &Arc<Fixture>,
    iters: u64,
    in_flight: u64,
    events: usize,
) -> Duration {
    let fixture = Arc::clone(fixture);
    runtime.block_on(async move {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for worker in 0..in_flight {
            let fixture = Arc::clone(&fixture);
            // Split `iters` applies over the workers.
            let share = iters / in_flight + u64::from(worker < iters % in_flight);
            tasks.push(tokio::spawn(async move {
                for _ in 0..share {
                    let write = fixture.batch(events);
                    fixture.store.apply(write).await.expect("apply");
                }
            }));
        }
        for task in tasks {
            task.await.expect("bench task");
        }
        start.elapsed()
    })
}

fn store_apply(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cases: [(&str, usize, [u64; 2]); 2] = [
        ("store_apply_sqlite", EVENTS_PER_WRITE, [1, 4]),
        ("store_apply_sqlite_live", 1, [1, 16]),
    ];
    for (name, events, in_flights) in cases {
        let mut group = c.benchmark_group(name);
        group
            .throughput(Throughput::Elements(events as u64))
            .sample_size(10)
            .warm_up_time(Duration::from_secs(2))
            .measurement_time(Duration::from_secs(10));
        for in_flight in in_flights {
            let fixture = Arc::new(runtime.block_on(Fixture::new()));
            group.bench_function(
                format!("{events}x{PAYLOAD_BYTES}B_in_flight_{in_flight}"),
                |b| {
                    b.iter_custom(|iters| run_applies(&runtime, &fixture, iters, in_flight, events))
                },
            );
            runtime.block_on(fixture.store.close());
        }
        group.finish();
    }
}

criterion_group!(benches, store_apply);
criterion_main!(benches);
