use super::*;
use proptest::prelude::*;

const H: Barrier = Barrier::Free;
const L: Barrier = Barrier::Live;

fn ids(v: &[u64]) -> Vec<EventId> {
    v.iter().copied().map(EventId).collect()
}

#[test]
fn readme_example_releases_in_the_documented_waves() {
    // H1,H2,L1,H3,H4,L2,H5 → {H1,H2} → L1 → {H3,H4} → L2 → H5
    let mut s = OrderingScheduler::new();
    let mut released = Vec::new();
    for (id, b) in [(1, H), (2, H), (3, L), (4, H), (5, H), (6, L), (7, H)] {
        released.extend(s.push(&"did:plc:a".into(), EventId(id), b));
    }
    assert_eq!(released, ids(&[1, 2]));
    assert_eq!(s.ack(EventId(1)), ids(&[]));
    assert_eq!(s.ack(EventId(2)), ids(&[3]));
    assert_eq!(s.ack(EventId(3)), ids(&[4, 5]));
    assert_eq!(s.ack(EventId(5)), ids(&[]));
    assert_eq!(s.ack(EventId(4)), ids(&[6]));
    assert_eq!(s.ack(EventId(6)), ids(&[7]));
    assert_eq!(s.ack(EventId(7)), ids(&[]));
    assert_eq!(s.did_count(), 0, "an idle DID costs no memory");
}

#[test]
fn historical_events_fly_together() {
    let mut s = OrderingScheduler::new();
    assert_eq!(s.push(&"d".into(), EventId(1), H), ids(&[1]));
    assert_eq!(s.push(&"d".into(), EventId(2), H), ids(&[2]));
    assert_eq!(s.push(&"d".into(), EventId(3), H), ids(&[3]));
    assert_eq!(s.in_flight_len(), 3);
}

#[test]
fn live_event_waits_for_inflight_historical() {
    let mut s = OrderingScheduler::new();
    s.push(&"d".into(), EventId(1), H);
    s.push(&"d".into(), EventId(2), H);
    assert_eq!(s.push(&"d".into(), EventId(3), L), ids(&[]));
    assert_eq!(
        s.push(&"d".into(), EventId(4), H),
        ids(&[]),
        "H3 waits behind L1"
    );
    assert_eq!(s.ack(EventId(1)), ids(&[]));
    assert_eq!(s.ack(EventId(2)), ids(&[3]));
    assert_eq!(s.ack(EventId(3)), ids(&[4]));
}

#[test]
fn consecutive_live_events_go_one_at_a_time() {
    let mut s = OrderingScheduler::new();
    assert_eq!(s.push(&"d".into(), EventId(1), L), ids(&[1]));
    assert_eq!(s.push(&"d".into(), EventId(2), L), ids(&[]));
    assert_eq!(s.push(&"d".into(), EventId(3), L), ids(&[]));
    assert_eq!(s.ack(EventId(1)), ids(&[2]));
    assert_eq!(s.ack(EventId(2)), ids(&[3]));
}

#[test]
fn a_first_live_event_blocks_a_later_historical_one() {
    let mut s = OrderingScheduler::new();
    assert_eq!(s.push(&"d".into(), EventId(1), L), ids(&[1]));
    assert_eq!(s.push(&"d".into(), EventId(2), H), ids(&[]));
    assert_eq!(s.ack(EventId(1)), ids(&[2]));
}

#[test]
fn dids_are_independent() {
    let mut s = OrderingScheduler::new();
    assert_eq!(s.push(&"a".into(), EventId(1), L), ids(&[1]));
    assert_eq!(s.push(&"b".into(), EventId(2), L), ids(&[2]));
    assert_eq!(s.push(&"a".into(), EventId(3), H), ids(&[]));
    assert_eq!(s.push(&"b".into(), EventId(4), H), ids(&[]));
    assert_eq!(s.ack(EventId(2)), ids(&[4]));
    assert_eq!(s.ack(EventId(1)), ids(&[3]));
}

#[test]
fn unknown_and_duplicate_acks_are_ignored() {
    let mut s = OrderingScheduler::new();
    s.push(&"d".into(), EventId(1), L);
    s.push(&"d".into(), EventId(2), L);
    assert_eq!(s.ack(EventId(99)), ids(&[]));
    assert_eq!(s.ack(EventId(1)), ids(&[2]));
    assert_eq!(
        s.ack(EventId(1)),
        ids(&[]),
        "a repeated ack releases nothing"
    );
    assert_eq!(s.in_flight_len(), 1);
}

#[test]
fn an_event_acked_while_waiting_is_withdrawn_and_its_did_moves_on() {
    let mut s = OrderingScheduler::new();
    let d: Arc<str> = "d".into();
    assert_eq!(s.push(&d, EventId(1), L), ids(&[1]));
    assert_eq!(s.push(&d, EventId(2), L), ids(&[]));
    assert_eq!(s.push(&d, EventId(3), H), ids(&[]));
    assert!(!s.is_in_flight(EventId(2)));
    assert_eq!(s.withdraw(&d, EventId(2)), ids(&[]), "1 still flies");
    assert_eq!(s.withdraw(&d, EventId(2)), ids(&[]), "twice is harmless");
    assert_eq!(s.ack(EventId(1)), ids(&[3]), "2 is gone; 3 goes");
    assert_eq!(s.ack(EventId(3)), ids(&[]));
    assert_eq!(s.did_count(), 0);
}

#[test]
fn withdrawing_the_head_barrier_releases_what_waited_behind_it() {
    let mut s = OrderingScheduler::new();
    let d: Arc<str> = "d".into();
    assert_eq!(s.push(&d, EventId(1), H), ids(&[1]));
    assert_eq!(s.push(&d, EventId(2), L), ids(&[]));
    assert_eq!(s.push(&d, EventId(3), H), ids(&[]));
    // 2 was acked (by a consumer that saw it before a restart) before it was released:
    // 3 may now fly beside 1, as two historical events may.
    assert_eq!(s.withdraw(&d, EventId(2)), ids(&[3]));
    assert_eq!(
        s.withdraw("other", EventId(1)),
        ids(&[]),
        "in flight: not withdrawn"
    );
    assert_eq!(s.ack(EventId(1)), ids(&[]));
    assert_eq!(s.ack(EventId(3)), ids(&[]));
    assert_eq!(s.did_count(), 0);
}

#[test]
fn resend_happens_once_per_timeout_from_the_last_send() {
    let mut s = OrderingScheduler::new();
    let t0 = Instant::now();
    let timeout = Duration::from_secs(60);
    s.push(&"d".into(), EventId(1), H);
    s.mark_sent(EventId(1), t0);
    assert_eq!(
        s.due_for_resend(t0 + Duration::from_secs(59), timeout),
        ids(&[])
    );
    assert_eq!(s.due_for_resend(t0 + timeout, timeout), ids(&[1]));
    // Not due again on the next tick: only after it is sent again and times out again.
    assert_eq!(
        s.due_for_resend(t0 + Duration::from_secs(61), timeout),
        ids(&[])
    );
    s.mark_sent(EventId(1), t0 + Duration::from_secs(61));
    assert_eq!(
        s.due_for_resend(t0 + Duration::from_secs(120), timeout),
        ids(&[])
    );
    assert_eq!(
        s.due_for_resend(t0 + Duration::from_secs(121), timeout),
        ids(&[1])
    );
}

#[test]
fn acked_events_are_never_due_for_resend() {
    let mut s = OrderingScheduler::new();
    let t0 = Instant::now();
    s.push(&"d".into(), EventId(1), H);
    s.mark_sent(EventId(1), t0);
    s.ack(EventId(1));
    assert_eq!(
        s.due_for_resend(t0 + Duration::from_secs(600), Duration::from_secs(1)),
        ids(&[])
    );
}

#[test]
fn a_failed_write_hands_the_event_back_without_breaking_order() {
    let mut s = OrderingScheduler::new();
    s.push(&"d".into(), EventId(1), L);
    s.push(&"d".into(), EventId(2), H);
    let t0 = Instant::now();
    s.mark_sent(EventId(1), t0);
    s.mark_unsent(EventId(1));
    assert_eq!(
        s.due_for_resend(t0 + Duration::from_secs(600), Duration::from_secs(1)),
        ids(&[]),
        "the caller resends it; the timer must not add a second copy"
    );
    assert_eq!(s.in_flight_len(), 1);
    assert_eq!(
        s.ack(EventId(1)),
        ids(&[2]),
        "still in flight; its ack still releases"
    );
}

#[test]
fn the_send_log_stays_proportional_to_what_is_in_flight() {
    let mut s = OrderingScheduler::new();
    let t0 = Instant::now();
    // A fast consumer: 100 k events sent and acked well within one retry timeout, in
    // order for the first half and in reverse order per 10 k window for the second.
    for n in 0..100_000u64 {
        s.push(&"d".into(), EventId(n), H);
        s.mark_sent(EventId(n), t0);
    }
    for n in 0..50_000u64 {
        s.ack(EventId(n));
    }
    assert!(s.sends.len() <= 50_000, "in-order acks drop stale entries");
    for window in (50_000..100_000u64).step_by(10_000) {
        for n in (window..window + 10_000).rev() {
            s.ack(EventId(n));
        }
        assert!(
            s.sends.len() <= 2 * s.in_flight_len() + SEND_LOG_SLACK,
            "{} entries for {} in flight",
            s.sends.len(),
            s.in_flight_len()
        );
    }
    assert_eq!(s.in_flight_len(), 0);
    assert!(s.sends.is_empty());
}

#[test]
fn compacting_the_send_log_keeps_every_unacked_event_due() {
    let mut s = OrderingScheduler::new();
    let t0 = Instant::now();
    for n in 0..10_000u64 {
        s.push(&"d".into(), EventId(n), H);
        s.mark_sent(EventId(n), t0);
    }
    // Everything but every 100th event is acked, out of order, forcing compactions.
    for n in (0..10_000u64).rev().filter(|n| n % 100 != 0) {
        s.ack(EventId(n));
    }
    let due = s.due_for_resend(t0 + Duration::from_secs(61), Duration::from_secs(60));
    let want: Vec<EventId> = (0..10_000u64).step_by(100).map(EventId).collect();
    assert_eq!(due, want);
}

#[derive(Debug, Clone)]
enum Op {
    Push { did: u8, live: bool },
    Ack { pick: usize },
    Withdraw { pick: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, any::<bool>()).prop_map(|(did, live)| Op::Push { did, live }),
        any::<usize>().prop_map(|pick| Op::Ack { pick }),
        any::<usize>().prop_map(|pick| Op::Withdraw { pick }),
    ]
}

proptest! {
    /// Invariants over random interleavings of pushes and acks:
    /// a live event never flies alongside another event of its DID; events of a DID are
    /// released in id order; everything pushed is eventually released once all is acked.
    #[test]
    fn ordering_invariants_hold_for_random_sequences(ops in proptest::collection::vec(op(), 1..200)) {
        let mut s = OrderingScheduler::new();
        let mut next = 1u64;
        let mut flying: Vec<(EventId, u8, bool)> = Vec::new();
        let mut released_per_did: HashMap<u8, Vec<u64>> = HashMap::new();
        let mut pushed = 0usize;
        let check = |rel: Vec<EventId>, flying: &mut Vec<(EventId, u8, bool)>, meta: &HashMap<u64, (u8, bool)>, released_per_did: &mut HashMap<u8, Vec<u64>>| {
            for id in rel {
                let (did, live) = meta[&id.0];
                released_per_did.entry(did).or_default().push(id.0);
                flying.push((id, did, live));
            }
            for did in 0u8..4 {
                let mine: Vec<_> = flying.iter().filter(|f| f.1 == did).collect();
                if mine.iter().any(|f| f.2) {
                    prop_assert_eq!(mine.len(), 1, "a live event flew with another event of its DID");
                }
            }
            Ok(())
        };
        let mut meta: HashMap<u64, (u8, bool)> = HashMap::new();
        let mut withdrawn: std::collections::HashSet<u64> = std::collections::HashSet::new();
        for op in ops {
            match op {
                Op::Push { did, live } => {
                    meta.insert(next, (did, live));
                    let rel = s.push(&did.to_string().into(), EventId(next), Barrier::from_live(live));
                    next += 1;
                    pushed += 1;
                    check(rel, &mut flying, &meta, &mut released_per_did)?;
                }
                Op::Ack { pick } => {
                    if flying.is_empty() { continue; }
                    let (id, _, _) = flying.remove(pick % flying.len());
                    let rel = s.ack(id);
                    check(rel, &mut flying, &meta, &mut released_per_did)?;
                }
                Op::Withdraw { pick } => {
                    // An ack for an event still waiting: it is never released afterwards.
                    let waiting: Vec<u64> = meta
                        .keys()
                        .copied()
                        .filter(|id| !withdrawn.contains(id) && !released_per_did.values().any(|r| r.contains(id)))
                        .collect();
                    if waiting.is_empty() { continue; }
                    let id = waiting[pick % waiting.len()];
                    withdrawn.insert(id);
                    let did = meta[&id].0;
                    let rel = s.withdraw(&did.to_string(), EventId(id));
                    check(rel, &mut flying, &meta, &mut released_per_did)?;
                }
            }
        }
        while let Some((id, _, _)) = flying.pop() {
            let rel = s.ack(id);
            check(rel, &mut flying, &meta, &mut released_per_did)?;
        }
        for ids in released_per_did.values() {
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            prop_assert_eq!(ids, &sorted, "released out of id order");
        }
        for id in &withdrawn {
            prop_assert!(!released_per_did.values().any(|r| r.contains(id)), "a withdrawn event was released");
        }
        prop_assert_eq!(released_per_did.values().map(Vec::len).sum::<usize>() + withdrawn.len(), pushed);
        prop_assert_eq!(s.did_count(), 0);
    }
}
