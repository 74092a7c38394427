//! Named crash points for the crash-point suite (`tests/crash_points.rs`). They exist only
//! in builds with the `failpoints` feature, which the test command enables and the release
//! binary never has; without it [`hit`] is an empty inline function.
//!
//! `TAP_FAILPOINTS="name=action[@n],…"` arms them: `kill` sends SIGKILL to this process
//! (through `kill(1)`, so the death is as abrupt as the operator's `kill -9`), `panic`
//! panics the calling task; `@n` fires on the n-th hit instead of the first.

/// Marks a point where tap may be crashed by a test.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &'static str) {}

/// Marks a point where tap may be crashed by a test.
///
/// # Panics
/// When armed with `panic`.
#[cfg(feature = "failpoints")]
pub fn hit(name: &'static str) {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};

    struct Armed {
        action: String,
        at: u64,
        hits: AtomicU64,
    }
    static PLAN: OnceLock<HashMap<String, Armed>> = OnceLock::new();
    static FIRED: Mutex<()> = Mutex::new(());
    let plan = PLAN.get_or_init(|| {
        let spec = std::env::var("TAP_FAILPOINTS").unwrap_or_default();
        spec.split(',')
            .filter_map(|item| {
                let (point, action) = item.trim().split_once('=')?;
                let (action, at) = match action.split_once('@') {
                    Some((a, n)) => (a, n.parse().ok()?),
                    None => (action, 1),
                };
                Some((
                    point.to_owned(),
                    Armed {
                        action: action.to_owned(),
                        at,
                        hits: AtomicU64::new(0),
                    },
                ))
            })
            .collect()
    });
    let Some(armed) = plan.get(name) else { return };
    if armed.hits.fetch_add(1, Ordering::SeqCst) + 1 != armed.at {
        return;
    }
    match armed.action.as_str() {
        "kill" => {
            // Other threads stop here too, so nothing passes the point while kill runs.
            let _held = FIRED.lock();
            eprintln!("failpoint {name}: SIGKILL");
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &std::process::id().to_string()])
                .status();
            loop {
                std::thread::park();
            }
        }
        "panic" => panic!("failpoint {name}"),
        other => eprintln!("failpoint {name}: unknown action {other:?}, ignored"),
    }
}
