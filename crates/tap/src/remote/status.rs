//! `tap status`: the status document as one screen for people (or as JSON for scripts),
//! once or refreshed in place. Exit status 0 when healthy, 1 when a diagnosis warns, 2
//! when tap cannot be asked.

use std::fmt::Write as _;
use std::process::ExitCode;

use serde_json::Value;

use super::{Client, RemoteError};
use crate::config::StatusCommand;
use crate::status::diagnose::{count, duration};

/// Runs `tap status`.
pub async fn run(cmd: &StatusCommand) -> ExitCode {
    let client = match Client::new(&cmd.remote) {
        Ok(c) => c,
        Err(e) => return unreachable(&e),
    };
    let Some(every) = cmd.watch else {
        return match client.get("/status.json").await {
            Ok(doc) => {
                print(&doc, cmd.json);
                exit_for(&doc)
            }
            Err(e) => unreachable(&e),
        };
    };
    loop {
        // Clear the screen and home the cursor, then draw: a refresh in place.
        print!("\x1b[H\x1b[2J");
        match client.get("/status.json").await {
            Ok(doc) => print(&doc, cmd.json),
            Err(e) => println!("tap status: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

fn print(doc: &Value, json: bool) {
    if json {
        println!("{doc:#}");
    } else {
        print!("{}", summary(doc));
    }
}

fn unreachable(e: &RemoteError) -> ExitCode {
    eprintln!("tap status: {e}");
    ExitCode::from(if e.is_unreachable() { 2 } else { 1 })
}

fn exit_for(doc: &Value) -> ExitCode {
    if doc["healthy"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// `12.5/s`, or `-` while not yet measured.
fn per_second(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |r| format!("{r:.1}/s"))
}

fn seconds(v: &Value) -> Option<String> {
    v.as_f64().map(|s| duration((s * 1000.0) as i64))
}

/// `1.2 GB`, `340 kB`, `12 B` (decimal units, as network meters show them).
#[must_use]
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The one-screen summary of a status document.
#[must_use]
pub fn summary(doc: &Value) -> String {
    let mut out = String::new();
    let health = if doc["healthy"] == true {
        "healthy"
    } else {
        "UNHEALTHY"
    };
    let _ = writeln!(
        out,
        "tap {}: {health}, up {}",
        doc["version"].as_str().unwrap_or("?"),
        duration(i64::try_from(num(&doc["uptime_seconds"]) * 1000).unwrap_or(i64::MAX))
    );
    for d in doc["diagnoses"].as_array().into_iter().flatten() {
        let mark = if d["level"] == "warn" { "!" } else { "·" };
        let _ = writeln!(out, "  {mark} {}", d["message"].as_str().unwrap_or(""));
    }

    let f = &doc["firehose"];
    if f["enabled"] == true {
        let state = if f["connected"] == true {
            "connected"
        } else {
            "DISCONNECTED"
        };
        let lag = seconds(&f["lag_seconds"]).map_or_else(String::new, |l| format!(", lag {l}"));
        let _ = writeln!(
            out,
            "firehose   {state} to {}, seq {}{lag}, {} events",
            f["upstream"].as_str().unwrap_or("?"),
            f["last_seq"],
            per_second(&f["events_per_second"]),
        );
    } else {
        let _ = writeln!(out, "firehose   off (outbox-only)");
    }

    let r = &doc["repos"];
    let states: Vec<String> = r["by_state"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| num(n) > 0)
        .map(|(state, n)| format!("{} {state}", count(num(n))))
        .collect();
    let _ = writeln!(
        out,
        "repos      {} tracked ({}), {} records",
        count(num(&r["total"])),
        if states.is_empty() {
            "none".into()
        } else {
            states.join(", ")
        },
        count(num(&r["records"]))
    );

    let b = &doc["backfill"];
    let eta = match b["eta_seconds"].as_u64() {
        Some(0) => String::new(),
        Some(s) => format!(
            ", about {} left",
            duration(i64::try_from(s * 1000).unwrap_or(i64::MAX))
        ),
        None if num(&b["repos_remaining"]) > 0 => ", time left unknown".into(),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "backfill   {} % ({} repos to go), {} repos, {} records{eta}",
        b["percent"],
        count(num(&b["repos_remaining"])),
        per_second(&b["repos_per_second"]),
        per_second(&b["records_per_second"]),
    );

    let s = &doc["resync"];
    let hosts: Vec<String> = s["hosts"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(host, n)| format!("{host} ({n})"))
        .collect();
    let _ = writeln!(
        out,
        "resync     {} of {} workers busy{}",
        s["busy"],
        s["workers"],
        if hosts.is_empty() {
            String::new()
        } else {
            format!(": {}", hosts.join(", "))
        }
    );

    let e = &doc["enumeration"];
    if e.is_object() {
        let percent = e["percent"]
            .as_f64()
            .map_or_else(String::new, |p| format!(", about {p:.0} % through"));
        let _ = writeln!(
            out,
            "enumerate  {}: {} repos found{percent}",
            e["listing"].as_str().unwrap_or("?"),
            count(num(&e["found"]))
        );
    }

    let o = &doc["outbox"];
    let oldest = seconds(&o["oldest_unacked_seconds"])
        .map_or_else(String::new, |a| format!(" (oldest {a})"));
    let consumers = num(&o["consumers"]);
    let _ = writeln!(
        out,
        "delivery   {}, {consumers} consumer{}, {} unacked{oldest}, {} delivered, {} redeliveries",
        o["mode"].as_str().unwrap_or("?"),
        if consumers == 1 { "" } else { "s" },
        count(num(&o["unacked"])),
        per_second(&o["delivered_per_second"]),
        count(num(&o["redeliveries"])),
    );

    let w = &doc["bandwidth"];
    let rate = w["bytes_per_second"]
        .as_f64()
        .map_or_else(|| "-".into(), |r| format!("{}/s", bytes(r)));
    let _ = writeln!(
        out,
        "bandwidth  {} downloaded, {rate}",
        bytes(num(&w["ledger"]["total"]) as f64)
    );

    for e in doc["errors"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "error      {} × {}",
            count(num(&e["repos"])),
            e["reason"].as_str().unwrap_or("")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_shows_every_part_of_the_document() {
        let doc = serde_json::json!({
            "version": "0.1.0", "uptime_seconds": 3900, "healthy": false,
            "diagnoses": [
                {"level": "warn", "code": "repos_failing", "message": "37 repos in error; most common: PDS answered 404"},
                {"level": "info", "code": "backfilling", "message": "backfill 41 % done: 1,100 of 2,700 repos"}
            ],
            "firehose": {"enabled": true, "upstream": "wss://relay.example", "connected": true,
                         "last_seq": 123456, "lag_seconds": 0.8, "events_per_second": 120.46},
            "repos": {"total": 2700, "by_state": {"active": 1063, "error": 37, "pending": 1600,
                      "resyncing": 0, "desynchronized": 0}, "records": 1234567},
            "backfill": {"percent": 41, "repos_remaining": 1600, "repos_per_second": 2.0,
                         "records_per_second": 400.0, "eta_seconds": 800},
            "resync": {"workers": 8, "busy": 3, "hosts": {"pds1.example": 2, "pds2.example": 1}},
            "outbox": {"mode": "websocket-ack", "consumers": 1, "unacked": 48120,
                       "oldest_unacked_seconds": 720.0, "delivered_per_second": null, "redeliveries": 5},
            "bandwidth": {"bytes_per_second": 100000.0, "ledger": {"total": 1234000000u64}},
            "errors": [{"reason": "PDS answered 404", "repos": 37}],
            "enumeration": {"listing": "app.bsky.graph.starterpack", "found": 12000, "percent": 41.2}
        });
        let text = summary(&doc);
        for want in [
            "tap 0.1.0: UNHEALTHY, up 1 h 5 min",
            "  ! 37 repos in error; most common: PDS answered 404",
            "  · backfill 41 % done",
            "firehose   connected to wss://relay.example, seq 123456, lag 0 s, 120.5/s events",
            "repos      2,700 tracked (1,063 active, 37 error, 1,600 pending), 1,234,567 records",
            "backfill   41 % (1,600 repos to go), 2.0/s repos, 400.0/s records, about 13 min left",
            "resync     3 of 8 workers busy: pds1.example (2), pds2.example (1)",
            "delivery   websocket-ack, 1 consumer, 48,120 unacked (oldest 12 min), - delivered, 5 redeliveries",
            "bandwidth  1.2 GB downloaded, 100.0 kB/s",
            "error      37 × PDS answered 404",
            "enumerate  app.bsky.graph.starterpack: 12,000 repos found, about 41 % through",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn byte_counts_read_in_decimal_units() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(999.0), "999 B");
        assert_eq!(bytes(1000.0), "1.0 kB");
        assert_eq!(bytes(250e9), "250.0 GB");
        assert_eq!(bytes(3e15), "3000.0 TB");
    }
}
