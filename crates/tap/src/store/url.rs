//! Where the state lives: the `--db-url` value, parsed, and printable without its password.

use std::fmt;

use super::StoreError;

/// Where the state lives, parsed from `--db-url` / `TAP_DATABASE_URL`.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// Everything after `sqlite://`: a file path (`./tap.db`, `/var/lib/tap.db`) or an SQLite
    /// URI (`file::memory:?cache=shared`, `file:tap.db?mode=rwc`), handed to SQLite as is.
    Sqlite(String),
    /// The full `postgres://…` or `postgresql://…` URL (credentials included; never printed:
    /// the `Debug`/`Display` forms redact the password).
    Postgres(String),
}

impl DatabaseUrl {
    /// Parses a database URL: `sqlite://<path or URI>`, `postgres://…` or `postgresql://…`.
    ///
    /// # Errors
    /// [`StoreError::UnsupportedUrl`] for any other scheme, or for `sqlite://` with an empty path.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::UnsupportedUrl {
                    url: url.to_owned(),
                    reason: "sqlite:// needs a path, e.g. sqlite://./tap.db",
                });
            }
            return Ok(Self::Sqlite(path.to_owned()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        Err(StoreError::UnsupportedUrl {
            url: redact_url(url),
            reason: "expected sqlite://<path>, postgres://… or postgresql://…",
        })
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite://{path}"),
            Self::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Replaces the password of a `scheme://user:password@host…` URL by `***` so it can be logged.
fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    // The userinfo ends at the last '@' before the first '/' of the path.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_parses_supported_schemes() {
        assert_eq!(
            DatabaseUrl::parse("sqlite://./tap.db").ok(),
            Some(DatabaseUrl::Sqlite("./tap.db".into()))
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite://file::memory:?cache=shared").ok(),
            Some(DatabaseUrl::Sqlite("file::memory:?cache=shared".into()))
        );
        assert_eq!(
            DatabaseUrl::parse("postgresql://u:p@h/db").ok(),
            Some(DatabaseUrl::Postgres("postgresql://u:p@h/db".into()))
        );
        assert!(matches!(
            DatabaseUrl::parse("postgres://h/db"),
            Ok(DatabaseUrl::Postgres(_))
        ));
    }

    #[test]
    fn database_url_rejects_other_schemes_naming_the_value() {
        let err = DatabaseUrl::parse("mysql://root@localhost/tap").unwrap_err();
        assert!(matches!(err, StoreError::UnsupportedUrl { .. }));
        assert!(
            err.to_string().contains("mysql://root@localhost/tap"),
            "{err}"
        );
        assert!(DatabaseUrl::parse("sqlite://").is_err());
        assert!(DatabaseUrl::parse("./tap.db").is_err());
    }

    #[test]
    fn database_url_display_redacts_the_password() {
        let url = DatabaseUrl::parse("postgres://tap:s3cret@db:5432/tap").unwrap();
        assert_eq!(url.to_string(), "postgres://tap:***@db:5432/tap");
        assert_eq!(format!("{url:?}"), "postgres://tap:***@db:5432/tap");
        let err = DatabaseUrl::parse("mysql://root:hunter2@localhost/tap").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }
}
