//! The SQL the store speaks, on either backend.
//!
//! Store code is written once against [`Tx`]: a transaction on SQLite
//! (rusqlite) or PostgreSQL (the blocking `postgres` client), with `$1`-style
//! placeholders (rewritten to `?1` for SQLite), parameters that bind on both
//! ([`Param`]) and rows read the same way ([`Row`]). What differs between the
//! two dialects (schema, JSON functions, bulk DIRE) asks [`Tx::dialect`].
//!
//! Both clients are blocking: every call runs on a blocking thread
//! (`spawn_blocking`), never on an async worker.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where the gateway's database is: an SQLite file (the embedded default)
/// or a PostgreSQL server (`database_url`).
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseLocation {
    Sqlite(PathBuf),
    Postgres(PostgresUrl),
}

impl DatabaseLocation {
    /// The SQLite file, if that is the backend.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Self::Sqlite(path) => Some(path),
            Self::Postgres(_) => None,
        }
    }
}

/// Names the database without its password: safe in logs and errors.
impl fmt::Display for DatabaseLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => write!(f, "{url}"),
        }
    }
}

impl fmt::Debug for DatabaseLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseLocation({self})")
    }
}

/// A PostgreSQL connection string (URL or `key=value` form). It may hold a
/// password, so it is only ever shown through [`PostgresUrl::redacted`].
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    url: String,
    redacted: String,
}

impl PostgresUrl {
    /// Checks that `url` is a connection string the client understands; the
    /// error never repeats it.
    pub fn parse(url: &str) -> Result<Self, String> {
        let config: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| format!("not a PostgreSQL connection string ({e})"))?;
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
        let redacted = format!(
            "postgres://{}{}{}/{}",
            config
                .get_user()
                .map(|u| format!("{u}@"))
                .unwrap_or_default(),
            if hosts.is_empty() {
                "localhost".to_owned()
            } else {
                hosts.join(",")
            },
            if ports.is_empty() {
                String::new()
            } else {
                format!(":{}", ports.join(","))
            },
            config.get_dbname().unwrap_or("")
        );
        Ok(Self {
            url: url.to_owned(),
            redacted,
        })
    }

    /// User, hosts, ports and database name; never the password.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The connection string itself, password included: for connecting and
    /// for writing test configs, never for showing.
    pub fn expose_secret(&self) -> &str {
        &self.url
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgresUrl({})", self.redacted)
    }
}

/// Which SQL dialect a transaction speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// An error of either client.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", postgres_message(.0))]
    Postgres(#[from] postgres::Error),
    #[error("the connection to PostgreSQL was lost and could not be opened again")]
    Lost,
    /// A query expected to return one row returned none.
    #[error("the query returned no row")]
    NoRows,
}

/// postgres' own Display may say only "db error": the server's message, or
/// else the error with its causes (a connection that failed says why).
pub(crate) fn postgres_message(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !message.ends_with(&cause_text) {
            message.push_str(": ");
            message.push_str(&cause_text);
        }
        source = cause.source();
    }
    message
}

impl DbError {
    /// A UNIQUE or PRIMARY KEY rule refused the write.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Self::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::ConstraintViolation
            }
            Self::Sqlite(_) => false,
            Self::Postgres(e) => e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION),
            Self::Lost | Self::NoRows => false,
        }
    }
}

/// A value that binds as a parameter on both backends. Integers are `i64`
/// (PostgreSQL columns are `BIGINT`), flags `bool`, blobs `Vec<u8>`.
pub trait Param: rusqlite::ToSql + postgres::types::ToSql + Sync {}
impl<T: rusqlite::ToSql + postgres::types::ToSql + Sync> Param for T {}

/// A value a column reads into on both backends.
pub trait Column: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a> {}
impl<T: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>> Column for T {}

/// One result row.
pub enum Row<'a, 's> {
    Sqlite(&'a rusqlite::Row<'s>),
    Postgres(&'a postgres::Row),
}

impl Row<'_, '_> {
    pub fn get<T: Column>(&self, index: usize) -> Result<T, DbError> {
        match self {
            Self::Sqlite(row) => Ok(row.get(index)?),
            Self::Postgres(row) => Ok(row.try_get(index)?),
        }
    }
}

/// An open transaction; dropped without [`Tx::commit`], it rolls back.
pub enum Tx<'c> {
    Sqlite(rusqlite::Transaction<'c>),
    Postgres(postgres::Transaction<'c>),
}

impl<'c> Tx<'c> {
    pub fn dialect(&self) -> Dialect {
        match self {
            Self::Sqlite(_) => Dialect::Sqlite,
            Self::Postgres(_) => Dialect::Postgres,
        }
    }

    pub fn commit(self) -> Result<(), DbError> {
        match self {
            Self::Sqlite(tx) => Ok(tx.commit()?),
            Self::Postgres(tx) => Ok(tx.commit()?),
        }
    }

    /// Runs statements without parameters (schema changes).
    pub fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match self {
            Self::Sqlite(tx) => Ok(tx.execute_batch(sql)?),
            Self::Postgres(tx) => Ok(tx.batch_execute(sql)?),
        }
    }

    /// Runs one statement; returns the number of rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[&dyn Param]) -> Result<u64, DbError> {
        match self {
            Self::Sqlite(tx) => {
                let mut stmt = tx.prepare_cached(&sqlite_sql(sql))?;
                Ok(stmt.execute(rusqlite::params_from_iter(sqlite_params(params)))? as u64)
            }
            Self::Postgres(tx) => Ok(tx.execute(sql, &pg_params(params))?),
        }
    }

    /// Runs a query and maps every row.
    pub fn query<T>(
        &mut self,
        sql: &str,
        params: &[&dyn Param],
        mut map: impl FnMut(&Row<'_, '_>) -> Result<T, DbError>,
    ) -> Result<Vec<T>, DbError> {
        match self {
            Self::Sqlite(tx) => {
                let mut stmt = tx.prepare_cached(&sqlite_sql(sql))?;
                let mut rows = stmt.query(rusqlite::params_from_iter(sqlite_params(params)))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    out.push(map(&Row::Sqlite(row))?);
                }
                Ok(out)
            }
            Self::Postgres(tx) => tx
                .query(sql, &pg_params(params))?
                .iter()
                .map(|row| map(&Row::Postgres(row)))
                .collect(),
        }
    }

    /// The first row of a query, if any.
    pub fn query_opt<T>(
        &mut self,
        sql: &str,
        params: &[&dyn Param],
        map: impl FnMut(&Row<'_, '_>) -> Result<T, DbError>,
    ) -> Result<Option<T>, DbError> {
        Ok(self.query(sql, params, map)?.into_iter().next())
    }

    /// The value of a query that always returns one row (`COUNT(*)`, …).
    pub fn query_value<T: Column>(
        &mut self,
        sql: &str,
        params: &[&dyn Param],
    ) -> Result<T, DbError> {
        self.query_opt(sql, params, |r| r.get(0))?
            .ok_or_else(|| DbError::Sqlite(rusqlite::Error::QueryReturnedNoRows))
    }

    /// The SQLite transaction, for code that is SQLite's own.
    pub fn sqlite(&self) -> Option<&rusqlite::Transaction<'c>> {
        match self {
            Self::Sqlite(tx) => Some(tx),
            Self::Postgres(_) => None,
        }
    }

    /// The PostgreSQL transaction, for code that is PostgreSQL's own.
    pub fn postgres(&mut self) -> Option<&mut postgres::Transaction<'c>> {
        match self {
            Self::Sqlite(_) => None,
            Self::Postgres(tx) => Some(tx),
        }
    }
}

/// `$1` → `?1`: SQLite would read `$1` as a *named* parameter.
fn sqlite_sql(sql: &str) -> Cow<'_, str> {
    if !sql.contains('$') {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn sqlite_params<'p>(params: &'p [&'p dyn Param]) -> impl Iterator<Item = &'p dyn rusqlite::ToSql> {
    params.iter().map(|p| *p as &dyn rusqlite::ToSql)
}

fn pg_params<'p>(params: &'p [&'p dyn Param]) -> Vec<&'p (dyn postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| *p as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

/// A PostgreSQL client that is dropped on a thread of its own: the blocking
/// client owns a small runtime, which must not be dropped on an async worker
/// (the last handle to a store may well be released there).
pub(crate) struct PgClient {
    client: Option<postgres::Client>,
    url: PostgresUrl,
}

impl PgClient {
    /// Connects (blocking; call from a blocking thread).
    pub fn connect(url: &PostgresUrl) -> Result<Self, DbError> {
        let client = postgres::Client::connect(url.expose_secret(), postgres::NoTls)?;
        Ok(Self {
            client: Some(client),
            url: url.clone(),
        })
    }

    /// The client, reconnecting first if the server went away since the last
    /// call (a PostgreSQL restart must not take the gateway down with it).
    pub fn client(&mut self) -> Result<&mut postgres::Client, DbError> {
        let client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            lost => {
                if let Some(old) = lost {
                    drop_elsewhere(old);
                }
                tracing::warn!(database = %self.url, "reconnecting to PostgreSQL");
                postgres::Client::connect(self.url.expose_secret(), postgres::NoTls)?
            }
        };
        Ok(self.client.insert(client))
    }
}

impl PgClient {
    /// The server closed the connection (the next [`PgClient::client`]
    /// opens a new one).
    pub fn client_is_closed(&self) -> bool {
        self.client.as_ref().is_none_or(postgres::Client::is_closed)
    }
}

impl Drop for PgClient {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop_elsewhere(client);
        }
    }
}

fn drop_elsewhere(client: postgres::Client) {
    let dropper = std::thread::Builder::new()
        .name("pg-close".into())
        .spawn(move || drop(client));
    if let Err(e) = dropper {
        tracing::warn!(error = %e, "could not close a PostgreSQL connection cleanly");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_rewritten_for_sqlite_only_where_they_are_placeholders() {
        assert_eq!(
            sqlite_sql("SELECT a FROM t WHERE b = $1 AND c = $12"),
            "SELECT a FROM t WHERE b = ?1 AND c = ?12"
        );
        assert_eq!(sqlite_sql("SELECT '$x'"), "SELECT '$x'");
    }

    #[test]
    fn a_failed_connection_says_why() {
        let url = PostgresUrl::parse("postgres://gw:pw-s3cret@127.0.0.1:1/sr").unwrap();
        let Err(e) = PgClient::connect(&url) else {
            panic!("connected to port 1")
        };
        let shown = e.to_string();
        assert!(shown.to_lowercase().contains("refused"), "{shown}");
        assert!(!shown.contains("pw-s3cret"), "{shown}");
    }

    #[test]
    fn a_postgres_url_never_shows_its_password() {
        let url =
            PostgresUrl::parse("postgres://gw:s3cret-pw@db.example:5433/serviceradar").unwrap();
        let location = DatabaseLocation::Postgres(url.clone());
        for shown in [
            location.to_string(),
            format!("{location:?}"),
            format!("{url:?}"),
            url.redacted().to_owned(),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("gw@db.example:5433/serviceradar"), "{shown}");
        }
        let bad = PostgresUrl::parse("postgres://gw:s3cret@[::1").unwrap_err();
        assert!(!bad.contains("s3cret"), "{bad}");
    }
}
