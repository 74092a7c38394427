//! Generate a signed test repo CAR, or walk one with bounded memory.
//!
//! ```text
//! cargo run --release -p tap-atproto --example repo_car -- generate OUT.car N [tree|shuffled|reversed] [SEED]
//! cargo run --release -p tap-atproto --example repo_car -- walk IN.car [MEMORY_BUDGET_BYTES]
//! cargo run --release -p tap-atproto --example repo_car -- frame OUT.bin N [SEED]
//! ```
//! `generate` prints the DID and the did:key of the signing key (seed-derived K-256), so
//! other implementations (e.g. @atproto/repo) can verify the file. `walk` streams the file in
//! 64 KiB chunks through `RepoWalker` (every block hashed, MST validated, every record
//! transcoded to JSON) and prints counts and timings; run it under `/usr/bin/time -v` to
//! see its peak RSS.
use std::io::Read;
use std::time::Instant;

use tap_atproto::record_to_json;
use tap_atproto::stream::{RepoWalker, WalkLimits};
use tap_atproto::syntax::Did;
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("generate") => {
            let out = args.get(1).ok_or("missing OUT")?;
            let n: usize = args.get(2).ok_or("missing N")?.parse()?;
            let order = args.get(3).map_or("tree", String::as_str);
            let seed: u64 = args.get(4).map_or(Ok(1), |s| s.parse())?;
            let key = TestKey::k256(seed);
            let did = Did::new(format!("did:plc:testkit{seed}"))?;
            let t = Instant::now();
            let b = RepoBuilder::with_records(did.clone(), key.clone(), seed, n);
            let car = match order {
                "tree" => b.car_tree_order(),
                "shuffled" => b.car_shuffled(seed),
                "reversed" => b.car_reversed(),
                other => return Err(format!("unknown order {other}").into()),
            };
            std::fs::write(out, &car)?;
            println!(
                "wrote {out}: {} records, {} bytes, order={order}, did={did}, key={} ({:.1}s)",
                b.records().len(),
                car.len(),
                key.did_key(),
                t.elapsed().as_secs_f64()
            );
        }
        Some("frame") => {
            // A #commit frame (random ops on a generated repo), e.g. as a fuzzing seed.
            let out = args.get(1).ok_or("missing OUT")?;
            let n: usize = args.get(2).ok_or("missing N")?.parse()?;
            let seed: u64 = args.get(3).map_or(Ok(1), |s| s.parse())?;
            let mut b =
                RepoBuilder::with_records(Did::new("did:plc:frame")?, TestKey::k256(seed), seed, n);
            let ops = b.random_ops(4);
            std::fs::write(out, b.commit_frame(&ops)?)?;
            println!("wrote {out}");
        }
        Some("walk") => {
            let path = args.get(1).ok_or("missing IN")?;
            let mut limits = WalkLimits::default();
            if let Some(b) = args.get(2) {
                limits.memory_budget = b.parse()?;
            }
            let t = Instant::now();
            let mut f = std::fs::File::open(path)?;
            let mut w = RepoWalker::new(None, None, limits);
            let mut buf = vec![0u8; 64 << 10];
            let mut json = Vec::with_capacity(8192);
            let (mut records, mut json_bytes) = (0u64, 0u64);
            let mut drain = |w: &mut RepoWalker| -> Result<(), Box<dyn std::error::Error>> {
                while let Some(r) = w.next_record()? {
                    json.clear();
                    record_to_json(&r.bytes, &mut json)?;
                    records += 1;
                    json_bytes += json.len() as u64;
                }
                Ok(())
            };
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                w.push(&buf[..n])?;
                drain(&mut w)?;
            }
            w.finish()?;
            drain(&mut w)?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "walked {path}: {records} records ({json_bytes} JSON bytes), spilled {} bytes, {secs:.2}s, {:.0} records/s",
                w.spilled_bytes(),
                records as f64 / secs
            );
        }
        _ => {
            return Err(
                "usage: repo_car generate OUT N [tree|shuffled|reversed] [SEED] | walk IN [BUDGET]"
                    .into(),
            );
        }
    }
    Ok(())
}
