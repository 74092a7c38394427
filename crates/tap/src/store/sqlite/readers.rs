//! The read pool: read-only connections handed to blocking tasks (WAL lets them read while
//! the writer commits).

use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use super::super::StoreError;
use super::connection::{Role, configure};
use super::{join_err, lock};

/// Read-only connections. Reads are short point/range queries; a 2-core box gains nothing from
/// more, and each connection holds its own page cache.
pub(super) const READERS: usize = 4;

/// Read-only connections handed out to blocking tasks; the semaphore guarantees a free
/// connection for every permit holder.
pub(super) struct ReaderPool {
    path: String,
    conns: Arc<Mutex<Vec<Connection>>>,
    permits: Arc<Semaphore>,
}

impl ReaderPool {
    pub(super) fn open(path: &str, size: usize) -> Result<Self, StoreError> {
        let conns = (0..size)
            .map(|_| open_reader(path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            path: path.to_owned(),
            conns: Arc::new(Mutex::new(conns)),
            permits: Arc::new(Semaphore::new(size)),
        })
    }

    pub(super) async fn run<T, F>(&self, op: &'static str, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let conns = Arc::clone(&self.conns);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let taken = lock(&conns).pop();
            // A connection is missing only if a query panicked while holding it; replace it.
            let conn = match taken {
                Some(conn) => conn,
                None => open_reader(&path)?,
            };
            let result = query(&conn);
            lock(&conns).push(conn);
            result
        })
        .await
        .map_err(join_err(op))?
    }

    pub(super) fn close(&self) {
        self.permits.close();
        lock(&self.conns).clear();
    }
}

fn open_reader(path: &str) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::SqliteOpen {
        path: path.to_owned(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    configure(&conn, Role::Reader).map_err(open_err)?;
    Ok(conn)
}
