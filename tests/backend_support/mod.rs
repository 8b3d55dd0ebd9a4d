//! Storage tests run on both store backends (issue 5): SQLite in a temp dir
//! and PostgreSQL in a fresh database of the server `.ci/run` starts
//! (`SERVICERADAR_TEST_PG_URL`), or of a throwaway local cluster when that is
//! unset (Debian's `postgresql` package must be installed).
//!
//! A storage test is an `async fn name(backend: Backend)`;
//! `on_both_backends!(name)` turns it into `name::sqlite` and
//! `name::postgres`.
#![allow(dead_code)]

use std::path::Path;

use serviceradar_agent::gateway::store::throwaway;
use serviceradar_agent::gateway::{open_store, DatabaseLocation, PostgresUrl, Store};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// A fresh, empty database: `<dir>/<name>.db`, or a new PostgreSQL
    /// database.
    pub async fn fresh_database(self, dir: &Path, name: &str) -> DatabaseLocation {
        match self {
            Self::Sqlite => DatabaseLocation::Sqlite(dir.join(format!("{name}.db"))),
            Self::Postgres => {
                let prefix = name.to_owned();
                let url = tokio::task::spawn_blocking(move || throwaway::fresh_database(&prefix))
                    .await
                    .expect("database task")
                    .unwrap_or_else(|e| panic!("PostgreSQL for the test: {e}"));
                DatabaseLocation::Postgres(PostgresUrl::parse(&url).expect("test database URL"))
            }
        }
    }

    /// A fresh database, opened.
    pub async fn fresh_store(self, dir: &Path, name: &str) -> Store {
        let location = self.fresh_database(dir, name).await;
        open_store(&location).await.expect("open the test store")
    }
}

/// The gateway config file's key and value naming `location`:
/// `"database"` (a file) or `"database_url"` (PostgreSQL).
pub fn config_entry(location: &DatabaseLocation) -> (&'static str, serde_json::Value) {
    match location {
        DatabaseLocation::Sqlite(path) => ("database", serde_json::json!(path)),
        DatabaseLocation::Postgres(url) => ("database_url", serde_json::json!(url.expose_secret())),
    }
}

/// `on_both_backends!(a, b)` defines `mod a { sqlite(), postgres() }` and so
/// on, each calling `a(Backend::…)`. With `on_both_backends!(attr; a)` the
/// tests get `#[attr]` instead of `#[tokio::test]`.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        $crate::on_both_backends!(tokio::test; $($test),*);
    };
    ($attr:meta; $($test:ident),* $(,)?) => {
        $(
            mod $test {
                #[$attr]
                async fn sqlite() {
                    super::$test($crate::backend_support::Backend::Sqlite).await
                }
                #[$attr]
                async fn postgres() {
                    super::$test($crate::backend_support::Backend::Postgres).await
                }
            }
        )*
    };
}
