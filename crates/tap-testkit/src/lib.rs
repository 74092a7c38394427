//! tap-testkit: loopback fakes, and a headless-browser driver for the status page.
pub mod chromium;
pub mod fake_jetstream;
pub mod fake_pds;
pub mod fake_plc;
pub mod fake_relay;
pub mod nats;
pub mod postgres;
pub mod repo_builder;
pub mod wait;
pub mod webhook_sink;

/// Serves `app` on 127.0.0.1 on a free port; returns the address and the server task
/// (abort it to stop).
///
/// # Panics
/// If binding loopback fails (a test fixture cannot run without it).
#[expect(clippy::expect_used, reason = "test fixture")]
pub async fn serve_loopback(
    app: axum::Router,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

/// Locks a fake's shared state; a test that panicked while holding it does not poison the
/// fake for the tests after it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
