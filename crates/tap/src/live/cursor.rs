//! The live cursor (firehose seq, Jetstream `time_us`) as a low-water mark (decisions.md
//! row 3): the persisted position never passes an event whose effects are not committed.
//! Events are processed in parallel and finish out of order; [`SeqTracker`] reports the
//! highest position below which everything has finished.

use std::collections::BTreeSet;

/// Tracks started and finished seqs. Pure: the saver task reads
/// [`SeqTracker::low_water_mark`] and persists it.
#[derive(Debug, Default)]
pub struct SeqTracker {
    /// Started, not finished.
    in_progress: BTreeSet<i64>,
    /// Highest seq ever started.
    highest_started: Option<i64>,
    /// Last value returned as safe, so the mark never moves backwards.
    last_mark: Option<i64>,
}

impl SeqTracker {
    /// A tracker that resumes after `cursor` (the persisted mark, if any).
    #[must_use]
    pub fn resume(cursor: Option<i64>) -> Self {
        Self {
            in_progress: BTreeSet::new(),
            highest_started: cursor,
            last_mark: cursor,
        }
    }

    /// An event with this seq was read from the stream (seqs arrive increasing).
    pub fn start(&mut self, seq: i64) {
        self.in_progress.insert(seq);
        self.highest_started = Some(self.highest_started.map_or(seq, |h| h.max(seq)));
    }

    /// The event with this seq is fully handled (committed, buffered or skipped).
    pub fn finish(&mut self, seq: i64) {
        self.in_progress.remove(&seq);
    }

    /// The highest seq `s` such that every event with seq ≤ `s` has finished; `None` before
    /// anything was started or resumed. Never decreases.
    pub fn low_water_mark(&mut self) -> Option<i64> {
        let candidate = match self.in_progress.first() {
            Some(&oldest) => Some(oldest - 1),
            None => self.highest_started,
        };
        let mark = match (candidate, self.last_mark) {
            (Some(c), Some(l)) => Some(c.max(l)),
            (c, l) => c.or(l),
        };
        self.last_mark = mark;
        mark
    }

    /// Events started and not finished.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_progress.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_stops_below_the_oldest_unfinished_event() {
        let mut t = SeqTracker::resume(None);
        assert_eq!(t.low_water_mark(), None);
        for s in [10, 11, 12] {
            t.start(s);
        }
        t.finish(12);
        t.finish(11);
        assert_eq!(t.low_water_mark(), Some(9), "10 is still running");
        t.finish(10);
        assert_eq!(t.low_water_mark(), Some(12));
    }

    #[test]
    fn mark_never_moves_backwards() {
        let mut t = SeqTracker::resume(Some(100));
        assert_eq!(t.low_water_mark(), Some(100));
        // A relay replaying older seqs (or a gap) must not pull the cursor back.
        t.start(50);
        assert_eq!(t.low_water_mark(), Some(100));
        t.finish(50);
        t.start(101);
        assert_eq!(t.low_water_mark(), Some(100));
        t.finish(101);
        assert_eq!(t.low_water_mark(), Some(101));
    }

    #[test]
    fn sparse_seqs_are_fine() {
        let mut t = SeqTracker::resume(Some(5));
        t.start(20);
        t.start(40);
        t.finish(40);
        assert_eq!(t.low_water_mark(), Some(19));
        t.finish(20);
        assert_eq!(t.low_water_mark(), Some(40));
        assert_eq!(t.in_flight(), 0);
    }
}
