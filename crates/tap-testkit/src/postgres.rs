//! A throwaway PostgreSQL database per test, on the server named by `TAP_TEST_POSTGRES_URL`
//! (a URL whose user may create databases).

use std::sync::atomic::{AtomicU32, Ordering};

/// A database that exists for one test; dropped (forcibly) when this value is.
pub struct TestPostgres {
    admin_url: String,
    name: String,
    url: String,
}

impl TestPostgres {
    /// Creates `tap_test_<pid>_<n>_<nanos>`. `None` (after a notice) when
    /// `TAP_TEST_POSTGRES_URL` is unset.
    ///
    /// # Panics
    /// When `CI=true` and the variable is unset (PostgreSQL tests must run in CI), or the
    /// server cannot be reached or refuses the database.
    pub async fn create() -> Option<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let Ok(admin_url) = std::env::var("TAP_TEST_POSTGRES_URL") else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but TAP_TEST_POSTGRES_URL is not set: PostgreSQL tests must run"
            );
            eprintln!("skipping the PostgreSQL variant: TAP_TEST_POSTGRES_URL is not set");
            return None;
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "tap_test_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        admin_execute(&admin_url, &format!("CREATE DATABASE {name}")).await;
        let url = with_database(&admin_url, &name);
        Some(Self {
            admin_url,
            name,
            url,
        })
    }

    /// The connection URL of the database itself.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `sql` (one or several statements) in this database, e.g. to lay out a schema
    /// from an older version.
    ///
    /// # Panics
    /// When a statement fails.
    pub async fn execute(&self, sql: &str) {
        admin_execute(&self.url, sql).await;
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop may run inside or outside a runtime: use a private one on a plain thread.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    let driver = tokio::spawn(conn);
                    let _ = client.batch_execute(&sql).await;
                    drop(client);
                    let _ = driver.await;
                }
            });
        })
        .join();
    }
}

/// `admin_url` with its path replaced by `/name`.
fn with_database(admin_url: &str, name: &str) -> String {
    let (before_query, query) = match admin_url.split_once('?') {
        Some((base, q)) => (base, Some(q)),
        None => (admin_url, None),
    };
    // The path starts at the first '/' after "scheme://authority".
    let authority_start = before_query.find("://").map_or(0, |i| i + 3);
    let path_start = before_query[authority_start..]
        .find('/')
        .map_or(before_query.len(), |i| authority_start + i);
    let mut url = format!("{}/{name}", &before_query[..path_start]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

async fn admin_execute(admin_url: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at TAP_TEST_POSTGRES_URL is reachable: {e}"));
    let driver = tokio::spawn(connection);
    if let Err(e) = client.batch_execute(sql).await {
        panic!("{sql}: {e}");
    }
    drop(client);
    let _ = driver.await;
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_replaces_the_path_and_keeps_the_query() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1?sslmode=disable", "t2"),
            "postgres://u:p@h:1/t2?sslmode=disable"
        );
    }
}
