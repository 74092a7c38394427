//! The status page's charts: a compact per-minute history (stored, so a restart does not
//! blank it) and its aggregation into the hour, day and week views. Pure; the sampler
//! feeds [`MinuteClock`] and stores what it yields.

use serde::Serialize;

use super::Vitals;
use crate::store::MinuteRow;

/// Counters a minute row is the difference of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// When read (Unix ms).
    pub at_ms: i64,
    /// Firehose events received.
    pub events: u64,
    /// Events written to consumers.
    pub delivered: u64,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Records of finished resyncs.
    pub records: u64,
}

impl Counters {
    /// The counters of a reading and the ledger's total.
    #[must_use]
    pub fn of(v: &Vitals, bytes: u64) -> Self {
        Self {
            at_ms: v.at_ms,
            events: v.firehose_events,
            delivered: v.delivered,
            bytes,
            records: v.records_synced,
        }
    }
}

/// Cuts readings into minutes: each time a reading falls in a later minute than the one
/// being counted, that minute's row is done.
#[derive(Debug, Default)]
pub struct MinuteClock {
    start: Option<(i64, Counters)>,
}

impl MinuteClock {
    /// Takes a reading (with the firehose lag at that moment); the finished minute's row,
    /// if the reading starts a new one.
    pub fn tick(&mut self, now: Counters, lag_ms: i64) -> Option<MinuteRow> {
        let minute = now.at_ms.div_euclid(60_000);
        let Some((started_minute, start)) = self.start else {
            self.start = Some((minute, now));
            return None;
        };
        if minute <= started_minute {
            return None;
        }
        self.start = Some((minute, now));
        Some(MinuteRow {
            minute: started_minute,
            span_ms: now.at_ms - start.at_ms,
            events: now.events.saturating_sub(start.events),
            delivered: now.delivered.saturating_sub(start.delivered),
            bytes: now.bytes.saturating_sub(start.bytes),
            records: now.records.saturating_sub(start.records),
            lag_ms,
        })
    }
}

/// A chart's time span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Span {
    /// The last hour, minute by minute.
    Hour,
    /// The last day, by 15 minutes.
    Day,
    /// The last 7 days, by hour.
    Week,
}

impl Span {
    /// Parses `hour`, `day` or `week`.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            "week" => Some(Self::Week),
            _ => None,
        }
    }

    /// Minutes per point.
    #[must_use]
    pub fn step_minutes(self) -> i64 {
        match self {
            Self::Hour => 1,
            Self::Day => 15,
            Self::Week => 60,
        }
    }

    /// Minutes covered.
    #[must_use]
    pub fn minutes(self) -> i64 {
        match self {
            Self::Hour => 60,
            Self::Day => 24 * 60,
            Self::Week => 7 * 24 * 60,
        }
    }
}

/// One point of a chart: rates over its step, the worst lag in it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Point {
    /// The step's start (Unix seconds).
    pub t: i64,
    /// Firehose events per second.
    pub events_per_second: f64,
    /// Largest firehose lag seen, seconds.
    pub lag_seconds: f64,
    /// Bytes downloaded per second.
    pub bytes_per_second: f64,
    /// Events delivered per second.
    pub delivered_per_second: f64,
    /// Records of finished resyncs per second.
    pub records_per_second: f64,
}

/// The points of `span` ending at `now_minute`, one per step that has any minute stored
/// (steps when tap was not running are absent, and charts show a gap).
#[must_use]
pub fn aggregate(rows: &[MinuteRow], span: Span, now_minute: i64) -> Vec<Point> {
    let step = span.step_minutes();
    let first = (now_minute - span.minutes() + 1).div_euclid(step) * step;
    let mut points: Vec<(i64, MinuteRow)> = Vec::new();
    for row in rows
        .iter()
        .filter(|r| r.minute >= first && r.minute <= now_minute)
    {
        let bucket = row.minute.div_euclid(step) * step;
        match points.last_mut() {
            Some((b, acc)) if *b == bucket => {
                acc.span_ms += row.span_ms;
                acc.events += row.events;
                acc.delivered += row.delivered;
                acc.bytes += row.bytes;
                acc.records += row.records;
                acc.lag_ms = acc.lag_ms.max(row.lag_ms);
            }
            _ => points.push((bucket, *row)),
        }
    }
    points
        .into_iter()
        .map(|(bucket, acc)| {
            let per_second = |n: u64| {
                if acc.span_ms > 0 {
                    n as f64 * 1000.0 / acc.span_ms as f64
                } else {
                    0.0
                }
            };
            Point {
                t: bucket * 60,
                events_per_second: per_second(acc.events),
                lag_seconds: acc.lag_ms.max(0) as f64 / 1000.0,
                bytes_per_second: per_second(acc.bytes),
                delivered_per_second: per_second(acc.delivered),
                records_per_second: per_second(acc.records),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64, events: u64) -> Counters {
        Counters {
            at_ms: ms,
            events,
            bytes: events * 10,
            ..Counters::default()
        }
    }

    #[test]
    fn a_minute_row_is_the_difference_across_its_minute() {
        let mut clock = MinuteClock::default();
        assert_eq!(
            clock.tick(at(60_000 * 10 + 5_000, 100), 0),
            None,
            "first reading"
        );
        assert_eq!(
            clock.tick(at(60_000 * 10 + 55_000, 150), 0),
            None,
            "same minute"
        );
        let row = clock.tick(at(60_000 * 11 + 5_000, 400), 700).unwrap();
        assert_eq!(
            row,
            MinuteRow {
                minute: 10,
                span_ms: 60_000,
                events: 300,
                delivered: 0,
                bytes: 3000,
                records: 0,
                lag_ms: 700,
            }
        );
        // A pause (tap suspended) makes one longer row, never a negative one.
        let row = clock.tick(at(60_000 * 14, 400), 0).unwrap();
        assert_eq!((row.minute, row.span_ms, row.events), (11, 175_000, 0));
    }

    fn row(minute: i64, events: u64, lag_ms: i64) -> MinuteRow {
        MinuteRow {
            minute,
            span_ms: 60_000,
            events,
            bytes: events * 100,
            lag_ms,
            ..MinuteRow::default()
        }
    }

    #[test]
    fn the_hour_shows_each_minute_and_the_day_sums_quarters() {
        let now = 1_000_000; // a multiple of 15 minutes + 10
        let rows: Vec<MinuteRow> = (now - 100..=now).map(|m| row(m, 60, m - now)).collect();
        let hour = aggregate(&rows, Span::Hour, now);
        assert_eq!(hour.len(), 60);
        assert_eq!(hour[0].t, (now - 59) * 60);
        assert!(
            hour.iter()
                .all(|p| (p.events_per_second - 1.0).abs() < 1e-9)
        );
        assert!((hour[0].bytes_per_second - 100.0).abs() < 1e-9);
        let day = aggregate(&rows, Span::Day, now);
        assert_eq!(day.len(), 7, "101 minutes touch 7 quarters");
        assert!(day.iter().all(|p| p.t % (15 * 60) == 0));
        assert!(day.iter().all(|p| (p.events_per_second - 1.0).abs() < 1e-9));
        assert_eq!(
            day.last().unwrap().lag_seconds,
            0.0,
            "the worst lag of the quarter"
        );
    }

    #[test]
    fn minutes_tap_was_not_running_are_gaps_not_zeros() {
        let rows = [
            row(80, 60, 0),
            row(100, 60, 0),
            row(101, 60, 0),
            row(150, 120, 3000),
        ];
        let hour = aggregate(&rows, Span::Hour, 150);
        assert_eq!(
            hour.iter().map(|p| p.t / 60).collect::<Vec<_>>(),
            [100, 101, 150],
            "minute 80 is more than an hour ago; 102..149 are gaps"
        );
        assert_eq!(hour[2].lag_seconds, 3.0);
        assert!((hour[2].events_per_second - 2.0).abs() < 1e-9);
        assert!(aggregate(&[], Span::Week, 150).is_empty());
        assert_eq!(Span::from_name("week"), Some(Span::Week));
        assert_eq!(Span::from_name("month"), None);
    }
}
