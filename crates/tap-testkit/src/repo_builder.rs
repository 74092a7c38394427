//! Deterministic signed atproto repos for tests and benchmarks: seeded K-256/P-256 keys, a
//! realistic record mix (likes, reposts, follows, posts with facets and embeds, a profile,
//! …), CAR exports in tree order or shuffled, `#commit` frames with correct Sync 1.1
//! proofs, and deliberately broken variants (forged signature, lying block, missing MST
//! node, wrong `prevData`).
//!
//! Everything is a pure function of the seeds, so a failing test reproduces exactly.

use std::collections::BTreeMap;

use bytes::Bytes;
use tap_atproto::Cid;
use tap_atproto::atjson::json_to_cbor;
use tap_atproto::car;
use tap_atproto::crypto::{KeyType, PublicKey};
use tap_atproto::hash::{self, DAG_CBOR, RAW};
use tap_atproto::mst::{self, OpAction};
use tap_atproto::syntax::{Did, Tid};
use tap_atproto::writer::{self, CommitOutput, RepoWriter, WriteOp};

/// A small deterministic PRNG (splitmix64): stable across platforms and crate versions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// 32 random bytes.
    pub fn bytes32(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        out
    }
}

/// A seeded signing key of either curve.
#[derive(Clone)]
pub enum TestKey {
    /// secp256k1.
    K256(k256::ecdsa::SigningKey),
    /// NIST P-256.
    P256(p256::ecdsa::SigningKey),
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestKey({})", self.public_key().to_did_key())
    }
}

fn secret_from_seed(seed: u64, curve: &[u8]) -> [u8; 32] {
    let mut material = seed.to_le_bytes().to_vec();
    material.extend_from_slice(curve);
    hash::sha256(&material)
}

impl TestKey {
    /// A K-256 key derived from `seed`.
    ///
    /// # Panics
    /// Never in practice: a SHA-256 output is a valid scalar with overwhelming probability.
    #[must_use]
    #[expect(
        clippy::expect_used,
        reason = "test fixture construction; a failure is a broken seed"
    )]
    pub fn k256(seed: u64) -> Self {
        Self::K256(
            k256::ecdsa::SigningKey::from_slice(&secret_from_seed(seed, b"k256"))
                .expect("valid scalar"),
        )
    }

    /// A P-256 key derived from `seed`.
    ///
    /// # Panics
    /// As [`TestKey::k256`].
    #[must_use]
    #[expect(
        clippy::expect_used,
        reason = "test fixture construction; a failure is a broken seed"
    )]
    pub fn p256(seed: u64) -> Self {
        Self::P256(
            p256::ecdsa::SigningKey::from_slice(&secret_from_seed(seed, b"p256"))
                .expect("valid scalar"),
        )
    }

    /// The verifying key as tap-atproto parses it.
    ///
    /// # Panics
    /// Never: the point comes from a valid signing key.
    #[must_use]
    #[expect(
        clippy::expect_used,
        reason = "a valid signing key always has a valid public point"
    )]
    pub fn public_key(&self) -> PublicKey {
        match self {
            Self::K256(k) => PublicKey::from_sec1(
                KeyType::K256,
                k.verifying_key().to_sec1_point(true).as_bytes(),
            ),
            Self::P256(k) => PublicKey::from_sec1(
                KeyType::P256,
                k.verifying_key().to_sec1_point(true).as_bytes(),
            ),
        }
        .expect("valid point")
    }

    /// `did:key:z…` of the public key.
    #[must_use]
    pub fn did_key(&self) -> String {
        self.public_key().to_did_key()
    }

    /// A low-S 64-byte compact signature over SHA-256(`msg`).
    #[must_use]
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use k256::ecdsa::signature::Signer as _;
        match self {
            Self::K256(k) => {
                let s: k256::ecdsa::Signature = k.sign(msg);
                s.to_bytes().to_vec()
            }
            Self::P256(k) => {
                let s: p256::ecdsa::Signature = k.sign(msg);
                s.normalize_s().to_bytes().to_vec()
            }
        }
    }
}

/// Record kinds of the generated mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// `app.bsky.feed.like` (50 %).
    Like,
    /// `app.bsky.feed.repost` (12 %).
    Repost,
    /// `app.bsky.graph.follow` (18 %).
    Follow,
    /// `app.bsky.graph.block` (2 %).
    Block,
    /// Simple `app.bsky.feed.post` (5 %).
    Post,
    /// Reply post (6 %).
    Reply,
    /// Post with 2 facets and an image or external embed (5 %).
    RichPost,
    /// `app.bsky.graph.listitem` (2 %).
    ListItem,
}

impl RecordKind {
    /// The collection NSID.
    #[must_use]
    pub fn collection(self) -> &'static str {
        match self {
            Self::Like => "app.bsky.feed.like",
            Self::Repost => "app.bsky.feed.repost",
            Self::Follow => "app.bsky.graph.follow",
            Self::Block => "app.bsky.graph.block",
            Self::Post | Self::Reply | Self::RichPost => "app.bsky.feed.post",
            Self::ListItem => "app.bsky.graph.listitem",
        }
    }

    fn pick(r: u64) -> Self {
        match r % 100 {
            0..50 => Self::Like,
            50..62 => Self::Repost,
            62..80 => Self::Follow,
            80..82 => Self::Block,
            82..87 => Self::Post,
            87..93 => Self::Reply,
            93..98 => Self::RichPost,
            _ => Self::ListItem,
        }
    }
}

const WORDS: &[&str] = &[
    "the", "sky", "is", "blue", "today", "and", "protocol", "repo", "merkle", "tree", "firehose",
    "relay", "post", "like", "hello", "world", "atproto", "bluesky", "rust", "tap", "sync",
    "commit", "signed", "block", "car", "cid", "🦋", "café",
];

/// Generates realistic records deterministically (performance-limits §1 mix; mean ≈ 250 B).
#[derive(Debug, Clone)]
pub struct RecordGen {
    rng: Rng,
    /// Microseconds of the next TID.
    clock: u64,
}

impl RecordGen {
    /// A generator from `seed`, with TIDs starting in late 2023.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            clock: 1_700_000_000_000_000,
        }
    }

    fn cid(&mut self, codec: u64) -> String {
        hash::cid_from_digest(codec, &self.rng.bytes32()).to_string()
    }

    fn did(&mut self) -> String {
        const B32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
        let s: String = (0..24)
            .map(|_| B32[self.rng.below(32) as usize] as char)
            .collect();
        format!("did:plc:{s}")
    }

    fn text(&mut self, words: u64) -> String {
        let n = 3 + self.rng.below(words);
        (0..n)
            .map(|_| WORDS[self.rng.below(WORDS.len() as u64) as usize])
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn created_at(&mut self) -> String {
        let secs = self.clock / 1_000_000;
        let (d, rem) = (secs / 86_400, secs % 86_400);
        format!(
            "2024-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            1 + (d / 28) % 12,
            1 + d % 28,
            rem / 3600,
            (rem / 60) % 60,
            rem % 60,
            (self.clock / 1000) % 1000
        )
    }

    fn strong_ref(&mut self, coll: &str) -> serde_json::Value {
        let did = self.did();
        let rkey = Tid::from_parts(1_600_000_000_000_000 + self.rng.below(1 << 40), 0);
        serde_json::json!({"cid": self.cid(DAG_CBOR), "uri": format!("at://{did}/{coll}/{rkey}")})
    }

    /// The next TID (strictly increasing).
    pub fn next_tid(&mut self) -> Tid {
        self.clock += 1 + self.rng.below(5_000_000);
        Tid::from_parts(self.clock, (self.rng.below(1024)) as u16)
    }

    /// A record of `kind` as atproto JSON.
    pub fn record_json(&mut self, kind: RecordKind) -> serde_json::Value {
        let created_at = self.created_at();
        match kind {
            RecordKind::Like | RecordKind::Repost => {
                let mut v = serde_json::json!({
                    "$type": kind.collection(),
                    "createdAt": created_at,
                    "subject": self.strong_ref("app.bsky.feed.post"),
                });
                if self.rng.below(10) == 0 {
                    v["via"] = self.strong_ref("app.bsky.feed.repost");
                }
                v
            }
            RecordKind::Follow | RecordKind::Block => {
                serde_json::json!({"$type": kind.collection(), "createdAt": created_at, "subject": self.did()})
            }
            RecordKind::ListItem => serde_json::json!({
                "$type": kind.collection(), "createdAt": created_at, "subject": self.did(),
                "list": format!("at://{}/app.bsky.graph.list/{}", self.did(), self.next_tid()),
            }),
            RecordKind::Post => serde_json::json!({
                "$type": kind.collection(), "createdAt": created_at, "text": self.text(20), "langs": ["en"],
            }),
            RecordKind::Reply => {
                let root = self.strong_ref("app.bsky.feed.post");
                let parent = self.strong_ref("app.bsky.feed.post");
                serde_json::json!({
                    "$type": kind.collection(), "createdAt": created_at, "text": self.text(30), "langs": ["en"],
                    "reply": {"root": root, "parent": parent},
                })
            }
            RecordKind::RichPost => {
                let text = self.text(40);
                let did = self.did();
                let facets = serde_json::json!([
                    {"index": {"byteStart": 0, "byteEnd": 3},
                     "features": [{"$type": "app.bsky.richtext.facet#mention", "did": did}]},
                    {"index": {"byteStart": 4, "byteEnd": 8},
                     "features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://example.com/a/b?c=d"}]},
                ]);
                let embed = if self.rng.below(2) == 0 {
                    serde_json::json!({"$type": "app.bsky.embed.images", "images": [{
                        "alt": self.text(8),
                        "image": {"$type": "blob", "ref": {"$link": self.cid(RAW)}, "mimeType": "image/jpeg", "size": 100_000 + self.rng.below(800_000)},
                        "aspectRatio": {"width": 1200, "height": 800},
                    }]})
                } else {
                    serde_json::json!({"$type": "app.bsky.embed.external", "external": {
                        "uri": "https://example.com/article", "title": self.text(6), "description": self.text(20),
                        "thumb": {"$type": "blob", "ref": {"$link": self.cid(RAW)}, "mimeType": "image/png", "size": 20_000 + self.rng.below(90_000)},
                    }})
                };
                serde_json::json!({
                    "$type": kind.collection(), "createdAt": created_at, "text": text, "langs": ["en"],
                    "facets": facets, "embed": embed,
                })
            }
        }
    }

    /// The profile record (`app.bsky.actor.profile/self`) with avatar and banner blobs.
    pub fn profile_json(&mut self) -> serde_json::Value {
        serde_json::json!({
            "$type": "app.bsky.actor.profile",
            "displayName": "Test User",
            "description": self.text(30),
            "avatar": {"$type": "blob", "ref": {"$link": self.cid(RAW)}, "mimeType": "image/jpeg", "size": 52_000},
            "banner": {"$type": "blob", "ref": {"$link": self.cid(RAW)}, "mimeType": "image/jpeg", "size": 310_000},
            "createdAt": self.created_at(),
        })
    }

    /// The next record of the mix: its path (`collection/TID`) and DAG-CBOR bytes.
    ///
    /// # Panics
    /// Never: generated JSON is always valid atproto data.
    #[expect(
        clippy::expect_used,
        reason = "generated records are valid by construction"
    )]
    pub fn next_record(&mut self) -> (String, Vec<u8>) {
        let kind = RecordKind::pick(self.rng.next_u64());
        let tid = self.next_tid();
        let json = self.record_json(kind);
        (
            format!("{}/{tid}", kind.collection()),
            json_to_cbor(&json).expect("valid record"),
        )
    }

    /// `n` records (plus the profile) sorted by path, ready for [`RepoBuilder::with_records`].
    ///
    /// # Panics
    /// Never (see [`RecordGen::next_record`]).
    #[must_use]
    #[expect(
        clippy::expect_used,
        reason = "generated records are valid by construction"
    )]
    pub fn records(&mut self, n: usize) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = (0..n).map(|_| self.next_record()).collect();
        let profile = self.profile_json();
        out.push((
            "app.bsky.actor.profile/self".to_owned(),
            json_to_cbor(&profile).expect("valid record"),
        ));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }
}

/// A signed repo under construction, with its record index, key, and firehose sequence.
#[derive(Debug, Clone)]
pub struct RepoBuilder {
    writer: RepoWriter,
    key: TestKey,
    records_gen: RecordGen,
    records: BTreeMap<String, Cid>,
    seq: i64,
}

impl RepoBuilder {
    /// An empty repo (call [`RepoBuilder::commit`] to write).
    #[must_use]
    pub fn new(did: Did, key: TestKey, seed: u64) -> Self {
        Self {
            writer: RepoWriter::new(did),
            key,
            records_gen: RecordGen::new(seed),
            records: BTreeMap::new(),
            seq: 0,
        }
    }

    /// A repo whose first commit holds `n` generated records plus the profile (built
    /// bottom-up; fast enough for ~1 M records).
    ///
    /// # Panics
    /// Never: generated paths are sorted, unique and valid.
    #[must_use]
    #[expect(
        clippy::expect_used,
        reason = "generated paths are valid by construction"
    )]
    pub fn with_records(did: Did, key: TestKey, seed: u64, n: usize) -> Self {
        let mut records_gen = RecordGen::new(seed);
        let recs = records_gen.records(n);
        let records = recs
            .iter()
            .map(|(p, b)| (p.clone(), hash::cid_for_cbor(b)))
            .collect();
        let rev = records_gen.next_tid();
        let k = key.clone();
        let writer = RepoWriter::with_records(did, recs, rev, &|m| k.sign(m))
            .expect("valid generated records");
        Self {
            writer,
            key,
            records_gen,
            records,
            seq: 0,
        }
    }

    /// The repo's DID.
    #[must_use]
    pub fn did(&self) -> &Did {
        self.writer.did()
    }

    /// The signing key.
    #[must_use]
    pub fn key(&self) -> &TestKey {
        &self.key
    }

    /// Current `(path, record CID)` pairs in key order.
    #[must_use]
    pub fn records(&self) -> &BTreeMap<String, Cid> {
        &self.records
    }

    /// The underlying writer (blocks, head commit).
    #[must_use]
    pub fn writer(&self) -> &RepoWriter {
        &self.writer
    }

    /// The record generator (to make records for custom ops).
    pub fn generator(&mut self) -> &mut RecordGen {
        &mut self.records_gen
    }

    /// CAR export in tree preorder.
    ///
    /// # Panics
    /// If the repo has no commit yet.
    #[must_use]
    #[expect(
        clippy::expect_used,
        reason = "test helper: exporting before the first commit is a test bug"
    )]
    pub fn car_tree_order(&self) -> Vec<u8> {
        self.writer.export_preorder().expect("repo has a commit")
    }

    /// CAR export with blocks in a seeded random order.
    ///
    /// # Panics
    /// If the repo has no commit yet.
    #[must_use]
    #[expect(
        clippy::expect_used,
        reason = "test helper: exporting before the first commit is a test bug"
    )]
    pub fn car_shuffled(&self, seed: u64) -> Vec<u8> {
        let mut order = self.preorder();
        let mut rng = Rng::new(seed);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        self.writer
            .export_in_order(&order)
            .expect("repo has a commit")
    }

    /// CAR export in the order the reference PDS tends to use: newest blocks first
    /// (approximated as reversed preorder, commit first).
    ///
    /// # Panics
    /// If the repo has no commit yet.
    #[must_use]
    #[expect(
        clippy::expect_used,
        reason = "test helper: exporting before the first commit is a test bug"
    )]
    pub fn car_reversed(&self) -> Vec<u8> {
        let mut order = self.preorder();
        order[1..].reverse();
        self.writer
            .export_in_order(&order)
            .expect("repo has a commit")
    }

    #[expect(
        clippy::expect_used,
        reason = "test helper: exporting before the first commit is a test bug"
    )]
    fn preorder(&self) -> Vec<Cid> {
        let mut order = Vec::new();
        self.writer
            .preorder_cids(&mut order)
            .expect("repo has a commit");
        order
    }

    /// A tree-order CAR with one MST node (not the root) left out.
    ///
    /// # Panics
    /// If the repo has fewer than two MST nodes.
    #[must_use]
    #[expect(clippy::expect_used, reason = "test helper")]
    pub fn car_missing_node(&self) -> Vec<u8> {
        let order = self.preorder();
        let victim = *order[2..]
            .iter()
            .find(|c| {
                self.writer
                    .blocks()
                    .get(*c)
                    .is_some_and(|b| mst::decode_node(b).is_ok())
            })
            .expect("repo with at least two nodes");
        let kept: Vec<Cid> = order.into_iter().filter(|c| *c != victim).collect();
        self.writer
            .export_in_order(&kept)
            .expect("repo has a commit")
    }

    /// A tree-order CAR in which one record block's bytes do not hash to its CID.
    ///
    /// # Panics
    /// If the repo has no records.
    #[must_use]
    #[expect(clippy::expect_used, reason = "test helper")]
    pub fn car_lying_block(&self) -> Vec<u8> {
        let order = self.preorder();
        let (_, victim) = self.records.iter().next().expect("repo with records");
        let (root, _) = self.writer.head().expect("repo has a commit");
        let mut out = Vec::new();
        car::write_car_header(&mut out, &[*root]);
        for c in &order {
            let data = &self.writer.blocks()[c];
            if c == victim {
                let mut bad = data.to_vec();
                bad.push(0xf6);
                car::write_car_block(&mut out, c, &bad);
            } else {
                car::write_car_block(&mut out, c, data);
            }
        }
        out
    }

    /// A tree-order CAR preceded by `junk` bytes of well-formed blocks nothing references
    /// (64 KiB each): a walker must hold them until the end shows they are unused.
    ///
    /// # Panics
    /// If the repo has no commit yet.
    #[must_use]
    #[expect(clippy::expect_used, reason = "test helper")]
    pub fn car_with_junk_ahead(&self, junk: usize) -> Vec<u8> {
        let (root, _) = self.writer.head().expect("repo has a commit");
        let mut out = Vec::new();
        car::write_car_header(&mut out, &[*root]);
        for i in 0..junk.div_ceil(JUNK_BLOCK) {
            out.extend_from_slice(&junk_block(i as u64));
        }
        for c in &self.preorder() {
            car::write_car_block(&mut out, c, &self.writer.blocks()[c]);
        }
        out
    }

    /// The next revision.
    pub fn next_rev(&mut self) -> Tid {
        self.records_gen.next_tid()
    }

    /// `n` ops: creates of fresh records, and updates/deletes of existing ones, mixed.
    pub fn random_ops(&mut self, n: usize) -> Vec<WriteOp> {
        let mut ops: Vec<WriteOp> = Vec::with_capacity(n);
        let mut touched = std::collections::BTreeSet::new();
        for _ in 0..n {
            let roll = self.records_gen.rng.below(10);
            let existing = if self.records.is_empty() || roll < 5 {
                None
            } else {
                let idx = self.records_gen.rng.below(self.records.len() as u64) as usize;
                self.records
                    .keys()
                    .nth(idx)
                    .cloned()
                    .filter(|p| !touched.contains(p))
            };
            match existing {
                Some(path) if roll < 8 => {
                    let kind = if path.starts_with("app.bsky.feed.like") {
                        RecordKind::Like
                    } else {
                        RecordKind::Post
                    };
                    let json = self.records_gen.record_json(kind);
                    if let Ok(record) = json_to_cbor(&json) {
                        touched.insert(path.clone());
                        ops.push(WriteOp::Update { path, record });
                    }
                }
                Some(path) => {
                    touched.insert(path.clone());
                    ops.push(WriteOp::Delete { path });
                }
                None => {
                    let (path, record) = self.records_gen.next_record();
                    touched.insert(path.clone());
                    ops.push(WriteOp::Create { path, record });
                }
            }
        }
        ops
    }

    /// Applies `ops` as one signed commit.
    ///
    /// # Errors
    /// [`mst::MstError`] when an op does not fit (e.g. creating an existing path).
    pub fn commit(&mut self, ops: &[WriteOp]) -> Result<CommitOutput, mst::MstError> {
        let rev = self.next_rev();
        let k = self.key.clone();
        let out = self.writer.apply(ops, rev, &|m| k.sign(m))?;
        self.track(&out);
        Ok(out)
    }

    fn track(&mut self, out: &CommitOutput) {
        for (path, action) in &out.ops {
            match action {
                OpAction::Create { cid } | OpAction::Update { cid, .. } => {
                    self.records.insert(path.clone(), *cid);
                }
                OpAction::Delete { .. } => {
                    self.records.remove(path);
                }
            }
        }
    }

    fn frame(&mut self, out: &CommitOutput) -> Vec<u8> {
        self.seq += 1;
        writer::encode_commit_frame(self.writer.did(), self.seq, out, "2024-06-01T00:00:00.000Z")
    }

    /// Numbers the next frame `seq` (and later ones after it): for a relay log shared by
    /// several repos, whose seqs must grow across all of them.
    pub fn set_next_seq(&mut self, seq: i64) {
        self.seq = seq - 1;
    }

    /// Applies `ops` and returns the `#commit` frame bytes (header + body), with a correct
    /// Sync 1.1 proof.
    ///
    /// # Errors
    /// As [`RepoBuilder::commit`].
    pub fn commit_frame(&mut self, ops: &[WriteOp]) -> Result<Vec<u8>, mst::MstError> {
        let out = self.commit(ops)?;
        Ok(self.frame(&out))
    }

    /// Like [`RepoBuilder::commit_frame`] but signed by `forger` instead of the repo key.
    ///
    /// # Errors
    /// As [`RepoBuilder::commit`].
    pub fn forged_signature_frame(
        &mut self,
        ops: &[WriteOp],
        forger: &TestKey,
    ) -> Result<Vec<u8>, mst::MstError> {
        let rev = self.next_rev();
        let out = self.writer.apply(ops, rev, &|m| forger.sign(m))?;
        self.track(&out);
        Ok(self.frame(&out))
    }

    /// A frame whose proof CAR carries a record block whose bytes do not match its CID.
    ///
    /// # Errors
    /// As [`RepoBuilder::commit`].
    pub fn lying_block_frame(&mut self, ops: &[WriteOp]) -> Result<Vec<u8>, mst::MstError> {
        let mut out = self.commit(ops)?;
        out.car = rewrite_car(&out.car, |cid, data| {
            if mst::decode_node(data).is_err() && *cid != out.commit_cid {
                let mut bad = data.to_vec();
                bad.push(0xf6);
                Some(bad)
            } else {
                Some(data.to_vec())
            }
        });
        Ok(self.frame(&out))
    }

    /// A frame whose proof CAR lacks one MST node.
    ///
    /// # Errors
    /// As [`RepoBuilder::commit`].
    pub fn missing_node_frame(&mut self, ops: &[WriteOp]) -> Result<Vec<u8>, mst::MstError> {
        let mut out = self.commit(ops)?;
        let mut dropped = false;
        let commit_cid = out.commit_cid;
        out.car = rewrite_car(&out.car, |cid, data| {
            if !dropped && *cid != commit_cid && mst::decode_node(data).is_ok() {
                dropped = true;
                None
            } else {
                Some(data.to_vec())
            }
        });
        Ok(self.frame(&out))
    }

    /// A frame whose `prevData` is not the previous root.
    ///
    /// # Errors
    /// As [`RepoBuilder::commit`].
    pub fn wrong_prev_data_frame(&mut self, ops: &[WriteOp]) -> Result<Vec<u8>, mst::MstError> {
        let mut out = self.commit(ops)?;
        out.prev_data = hash::cid_for_cbor(b"\xa1anot the previous root");
        Ok(self.frame(&out))
    }
}

/// Re-writes a CAR's blocks through `f` (return `None` to drop a block), keeping the roots.
fn rewrite_car(car_bytes: &[u8], mut f: impl FnMut(&Cid, &[u8]) -> Option<Vec<u8>>) -> Vec<u8> {
    let Ok(slice) =
        car::CarSlice::new(Bytes::copy_from_slice(car_bytes), car::CarLimits::default())
    else {
        return car_bytes.to_vec();
    };
    let mut out = Vec::new();
    car::write_car_header(&mut out, &slice.header().roots);
    for (cid, data) in slice.flatten() {
        if let Some(d) = f(&cid, &data) {
            car::write_car_block(&mut out, &cid, &d);
        }
    }
    out
}

/// Writes a tree-order CAR of a generated repo (`n` records, seeded) to `path`, returning
/// the DID key string of its signing key (for verifying it with other implementations).
///
/// # Errors
/// I/O errors writing the file.
pub fn write_repo_car(path: &std::path::Path, n: usize, seed: u64) -> std::io::Result<String> {
    let key = TestKey::k256(seed);
    let did = Did::new(format!("did:plc:testkit{seed}")).map_err(std::io::Error::other)?;
    let b = RepoBuilder::with_records(did, key.clone(), seed, n);
    std::fs::write(path, b.car_tree_order())?;
    Ok(key.did_key())
}

/// Payload bytes of one [`junk_block`].
pub const JUNK_BLOCK: usize = 64 << 10;

/// The `i`th of a sequence of distinct raw blocks nothing references, CAR-encoded (64 KiB
/// each): what a hostile PDS may put ahead of a repo's tree.
#[must_use]
pub fn junk_block(i: u64) -> Vec<u8> {
    let mut filler = vec![0u8; JUNK_BLOCK];
    filler[..8].copy_from_slice(&i.to_le_bytes());
    let cid = tap_atproto::hash::cid_for(0x55, &filler);
    let mut out = Vec::with_capacity(JUNK_BLOCK + 64);
    car::write_car_block(&mut out, &cid, &filler);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tap_atproto::Frame;
    use tap_atproto::firehose::{FrameLimits, VerifyError, decode_frame, verify_commit_frame};
    use tap_atproto::stream::{WalkLimits, walk_car_bytes};

    fn did() -> Did {
        Did::new("did:plc:builder").expect("valid")
    }

    fn verify(frame: &[u8], key: &PublicKey) -> Result<tap_atproto::VerifiedCommit, VerifyError> {
        match decode_frame(&Bytes::copy_from_slice(frame), &FrameLimits::default())
            .expect("decodes")
        {
            Frame::Commit(c) => verify_commit_frame(&c, key),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn generated_repos_walk_with_both_key_types_in_any_order() {
        for key in [TestKey::k256(1), TestKey::p256(2)] {
            let b = RepoBuilder::with_records(did(), key.clone(), 7, 500);
            let expected: Vec<(String, Cid)> =
                b.records().iter().map(|(p, c)| (p.clone(), *c)).collect();
            for car_bytes in [b.car_tree_order(), b.car_shuffled(3), b.car_reversed()] {
                let (_, recs) = walk_car_bytes(
                    &car_bytes,
                    Some(did()),
                    Some(key.public_key()),
                    WalkLimits::default(),
                )
                .expect("walks");
                let got: Vec<(String, Cid)> =
                    recs.iter().map(|r| (r.path.clone(), r.cid)).collect();
                assert_eq!(got, expected);
            }
        }
    }

    #[test]
    fn record_mix_averages_about_250_bytes() {
        let recs = RecordGen::new(1).records(5000);
        let mean = recs.iter().map(|(_, b)| b.len()).sum::<usize>() / recs.len();
        assert!((180..=330).contains(&mean), "mean record size {mean}");
    }

    #[test]
    fn commit_frames_verify_and_broken_variants_fail() {
        let key = TestKey::k256(9);
        let mut b = RepoBuilder::with_records(did(), key.clone(), 5, 300);
        let pk = key.public_key();
        for _ in 0..10 {
            let ops = b.random_ops(5);
            let f = b.commit_frame(&ops).expect("applies");
            verify(&f, &pk).expect("verifies");
        }
        let ops = b.random_ops(3);
        let f = b
            .forged_signature_frame(&ops, &TestKey::k256(10))
            .expect("applies");
        assert!(matches!(verify(&f, &pk), Err(VerifyError::Commit(_))));
        let (path, record) = b.generator().next_record();
        let f = b
            .lying_block_frame(&[WriteOp::Create { path, record }])
            .expect("applies");
        assert!(verify(&f, &pk).is_err());
        let ops = b.random_ops(3);
        let f = b.missing_node_frame(&ops).expect("applies");
        assert!(verify(&f, &pk).is_err());
        let ops = b.random_ops(3);
        let f = b.wrong_prev_data_frame(&ops).expect("applies");
        assert!(matches!(
            verify(&f, &pk),
            Err(VerifyError::PrevDataMismatch { .. })
        ));
        assert!(walk_car_bytes(&b.car_missing_node(), None, None, WalkLimits::default()).is_err());
        assert!(walk_car_bytes(&b.car_lying_block(), None, None, WalkLimits::default()).is_err());
    }
}
