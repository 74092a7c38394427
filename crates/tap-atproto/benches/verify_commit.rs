//! Protocol-core benchmarks (criterion, seeded, single thread):
//! - `verify_commit/{k256,p256}`: decode one `#commit` frame (1 create op, repo of 10 000
//!   records) and run the whole Sync 1.1 check (`verify_commit_frame`).
//! - `record_to_json/mixed`: transcode the realistic record mix (mean ~250 B), per record.
//! - `mst_node_decode`: decode one MST node of a 10 000-record repo, per node.
//! - `repo_walk/verified_100k`: the verified whole-repo walk of a 100 000-record tree-order
//!   CAR fed in 64 KiB chunks: hash every block, verify the commit signature (K-256), walk
//!   and validate the MST, transcode every record to JSON. Throughput is in records.
//!
//! Times are per-thread **CPU time** (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`), so other work on the machine does not inflate them; set
//! `TAP_BENCH_WALL_TIME=1` for wall-clock time.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly on broken fixtures"
)]
use std::hint::black_box;

use bytes::Bytes;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tap_atproto::firehose::{Frame, FrameLimits, decode_frame, verify_commit_frame};
use tap_atproto::stream::{RepoWalker, WalkLimits};
use tap_atproto::syntax::Did;
use tap_atproto::{mst, record_to_json};
use tap_testkit::repo_builder::{RecordGen, RepoBuilder, TestKey};

/// Per-thread CPU time in nanoseconds (falls back to wall time if unavailable).
struct ThreadCpu {
    wall: bool,
}

static WALL: WallTime = WallTime;

#[allow(
    unsafe_code,
    reason = "clock_gettime has no safe std wrapper; the timespec is a local"
)]
fn thread_cpu_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

impl ThreadCpu {
    fn new() -> Self {
        Self {
            wall: std::env::var_os("TAP_BENCH_WALL_TIME").is_some() || thread_cpu_ns().is_none(),
        }
    }
    fn now(&self) -> u64 {
        if self.wall {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64
        } else {
            thread_cpu_ns().unwrap_or(0)
        }
    }
}

impl Measurement for ThreadCpu {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        self.now()
    }
    fn end(&self, i: u64) -> u64 {
        self.now().saturating_sub(i)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        WALL.formatter()
    }
}

type C = Criterion<ThreadCpu>;

fn commit_frames(key: TestKey, n: usize) -> (tap_atproto::PublicKey, Vec<Bytes>) {
    let mut b =
        RepoBuilder::with_records(Did::new("did:plc:bench").unwrap(), key.clone(), 11, 10_000);
    let frames = (0..n)
        .map(|_| {
            let (path, record) = b.generator().next_record();
            Bytes::from(
                b.commit_frame(&[tap_atproto::writer::WriteOp::Create { path, record }])
                    .unwrap(),
            )
        })
        .collect();
    (key.public_key(), frames)
}

fn bench_verify(c: &mut C) {
    let mut g = c.benchmark_group("verify_commit");
    for (name, key) in [("k256", TestKey::k256(1)), ("p256", TestKey::p256(1))] {
        let (pk, frames) = commit_frames(key, 64);
        let mut i = 0;
        g.bench_function(name, |bch| {
            bch.iter(|| {
                let f = &frames[i % frames.len()];
                i += 1;
                let Ok(Frame::Commit(cf)) = decode_frame(f, &FrameLimits::default()) else {
                    panic!("frame")
                };
                black_box(verify_commit_frame(&cf, &pk).unwrap());
            });
        });
    }
    g.finish();
}

fn bench_signature_only(c: &mut C) {
    let mut g = c.benchmark_group("signature_verify");
    for (name, key) in [("k256", TestKey::k256(1)), ("p256", TestKey::p256(1))] {
        let msg = b"an unsigned commit of about one hundred and fifty bytes, the size a real commit has when encoded";
        let sig = key.sign(msg);
        let pk = key.public_key();
        g.bench_function(name, |b| {
            b.iter(|| pk.verify(black_box(msg), black_box(&sig)).unwrap())
        });
    }
    g.finish();
}

fn bench_transcode(c: &mut C) {
    let recs: Vec<Vec<u8>> = RecordGen::new(3)
        .records(4096)
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    let mut out = Vec::with_capacity(4096);
    let mut i = 0;
    c.bench_function("record_to_json/mixed", |b| {
        b.iter(|| {
            out.clear();
            record_to_json(&recs[i % recs.len()], &mut out).unwrap();
            i += 1;
            black_box(&out);
        });
    });
}

fn bench_node_decode(c: &mut C) {
    let b = RepoBuilder::with_records(
        Did::new("did:plc:bench").unwrap(),
        TestKey::k256(1),
        5,
        10_000,
    );
    let nodes: Vec<Bytes> = b
        .writer()
        .blocks()
        .values()
        .filter(|v| mst::decode_node(v).is_ok())
        .cloned()
        .collect();
    let mut i = 0;
    c.bench_function("mst_node_decode", |bch| {
        bch.iter(|| {
            black_box(mst::decode_node(&nodes[i % nodes.len()]).unwrap());
            i += 1;
        });
    });
}

fn bench_walk(c: &mut C) {
    const N: usize = 100_000;
    let key = TestKey::k256(2);
    let did = Did::new("did:plc:bench").unwrap();
    let b = RepoBuilder::with_records(did.clone(), key.clone(), 9, N);
    let car = b.car_tree_order();
    let records = b.records().len() as u64;
    // The walk runs in a daemon that never built the repo: free the builder (a whole
    // in-memory repo and its MST) so its heap does not shape the walk's allocations.
    drop(b);
    let pk = key.public_key();
    let mut g = c.benchmark_group("repo_walk");
    g.sample_size(10);
    g.throughput(Throughput::Elements(records));
    g.bench_function("verified_100k", |bch| {
        bch.iter(|| {
            let mut w = RepoWalker::new(Some(did.clone()), Some(pk.clone()), WalkLimits::default());
            let mut json = Vec::with_capacity(4096);
            let mut n = 0u64;
            let mut drain = |w: &mut RepoWalker| {
                while let Some(r) = w.next_record().unwrap() {
                    json.clear();
                    record_to_json(&r.bytes, &mut json).unwrap();
                    n += 1;
                }
            };
            for chunk in car.chunks(64 << 10) {
                w.push(chunk).unwrap();
                drain(&mut w);
            }
            w.finish().unwrap();
            drain(&mut w);
            black_box(n)
        });
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpu::new());
    targets = bench_signature_only, bench_verify, bench_transcode, bench_node_decode, bench_walk
}
criterion_main!(benches);
