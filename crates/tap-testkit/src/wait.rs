//! Waiting on a condition, the one way tests wait: poll it until it holds, with a deadline
//! that names what was awaited. Never a fixed sleep.

use std::future::Future;
use std::time::Duration;

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(10);

/// Polls `check` until it yields a value; `None` once `timeout` has passed.
pub async fn try_poll_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it yields a value.
///
/// # Panics
/// After `timeout`, naming `what`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match try_poll_until(timeout, check).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Polls `cond` until it holds.
///
/// # Panics
/// After `timeout`, naming `what`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(what, timeout, || {
        let holds = cond();
        async move { holds.await.then_some(()) }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn gives_the_first_value_or_none_at_the_deadline() {
        let mut calls = 0;
        let v = poll_until("the third call", Duration::from_secs(1), || {
            calls += 1;
            let n = calls;
            async move { (n == 3).then_some(n) }
        })
        .await;
        assert_eq!(v, 3);
        let start = tokio::time::Instant::now();
        let never: Option<()> = try_poll_until(Duration::from_secs(2), || async { None }).await;
        assert_eq!(never, None);
        assert!(start.elapsed() >= Duration::from_secs(2));
    }
}
