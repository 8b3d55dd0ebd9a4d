//! A PostgreSQL server for tests and benchmarks.
//!
//! [`server_url`] is `SERVICERADAR_TEST_PG_URL` when set (`.ci/run` starts one
//! cluster and exports it); otherwise the first call starts a throwaway
//! cluster from Debian's server binaries (`/usr/lib/postgresql/<newest>/bin`)
//! in `/tmp/sr-pg-<pid>-<random>`, on a free loopback port, with trust
//! authentication and durability switched off. It is shared by every test of
//! the process and stopped (its directory removed) at process exit by an
//! `atexit` handler. Clusters left behind by killed processes (whose pid is
//! gone) are stopped and removed by the next process that starts one.
//!
//! [`fresh_database`] creates an empty database per test on that server.
//!
//! `initdb`, `pg_ctl` and `postgres` refuse to run as root: as root, they run
//! as the `postgres` user (created by Debian's `postgresql` package), which
//! owns the cluster's directory.
//!
//! The blocking `postgres` client owns a tokio runtime and panics if created,
//! used or dropped inside another one, so every client here lives on its own
//! `std::thread`: both functions may be called from async tests.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The environment variable naming an existing server (used instead of a
/// throwaway cluster).
pub const URL_VAR: &str = "SERVICERADAR_TEST_PG_URL";

/// Where Debian installs the server binaries, one directory per major version.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";

/// Throwaway clusters live in `/tmp/<PREFIX><pid>-<random>`. Literally `/tmp`,
/// not `$TMPDIR`: the Unix socket path must stay short (107 bytes).
const DIR_PREFIX: &str = "sr-pg-";

/// How long the server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts at starting the server (another process may take the free port
/// between our probe and the server's bind).
const START_ATTEMPTS: usize = 3;

/// Why no test server is available.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ThrowawayError {
    #[error(
        "no PostgreSQL server binaries under {DEBIAN_PG_ROOT}/<version>/bin: install them \
         (`apt-get install postgresql`) or set {URL_VAR} to the URL of a running server \
         (e.g. postgres://postgres@127.0.0.1:5432/postgres)"
    )]
    NoServerBinaries,
    #[error(
        "running as root but there is no `postgres` user to run the PostgreSQL server as \
         (initdb refuses root): install Debian's `postgresql` package (`apt-get install \
         postgresql`), which creates it, or set {URL_VAR}"
    )]
    NoPostgresUser,
    #[error("{action}: {message}")]
    Io { action: String, message: String },
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error(
        "the throwaway PostgreSQL server on 127.0.0.1:{port} did not accept connections \
         within {waited:?} (last `pg_isready`: {last}); server log {log} ends with:\n{log_tail}"
    )]
    NotReady {
        port: u16,
        waited: Duration,
        last: String,
        log: String,
        log_tail: String,
    },
    #[error("{url:?} is not a postgres:// or postgresql:// URL (check {URL_VAR})")]
    BadUrl { url: String },
    #[error("{action} on {url} failed: {message}")]
    Sql {
        action: String,
        url: String,
        message: String,
    },
    #[error("the thread creating database {database} panicked")]
    ThreadPanicked { database: String },
}

/// URL of a PostgreSQL server for tests: `SERVICERADAR_TEST_PG_URL` if set
/// (e.g. the cluster `.ci/run` starts), else a throwaway cluster started on
/// first use from Debian's server binaries (`/usr/lib/postgresql/<newest>/bin`),
/// in a temp dir, on a free loopback port, trust auth, stopped (and its
/// directory removed) at process exit. Process-wide: started once, shared by
/// every test of the binary.
pub fn server_url() -> Result<String, ThrowawayError> {
    static URL: OnceLock<Result<String, ThrowawayError>> = OnceLock::new();
    URL.get_or_init(|| match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Ok(url.trim().to_owned()),
        _ => start_cluster(),
    })
    .clone()
}

/// A fresh empty database on [`server_url`]'s server, for one test: returns
/// its URL (`postgres://user@127.0.0.1:port/dbname`). Its name is
/// `<prefix>_<random>`, sanitised to `[a-z0-9_]`.
pub fn fresh_database(prefix: &str) -> Result<String, ThrowawayError> {
    let server = server_url()?;
    let name = database_name(prefix);
    let url = with_database(&server, &name)?;
    let statement = format!("CREATE DATABASE \"{name}\"");
    // The blocking client must not live on a tokio runtime's thread.
    let worker = {
        let server = server.clone();
        std::thread::spawn(move || -> Result<(), ThrowawayError> {
            let sql_error = |action: &str, e: postgres::Error| ThrowawayError::Sql {
                action: action.to_owned(),
                url: server.clone(),
                message: super::db::postgres_message(&e),
            };
            let mut client = postgres::Client::connect(&server, postgres::NoTls)
                .map_err(|e| sql_error("connecting", e))?;
            client
                .batch_execute(&statement)
                .map_err(|e| sql_error(&statement, e))?;
            client.close().map_err(|e| sql_error("closing", e))
        })
    };
    worker.join().map_err(|_| ThrowawayError::ThreadPanicked {
        database: name.clone(),
    })??;
    Ok(url)
}

/// `<prefix>_<16 hex digits>`, lowercased, other characters replaced by `_`,
/// short enough for PostgreSQL's 63-byte identifiers.
fn database_name(prefix: &str) -> String {
    let mut clean: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if clean.is_empty() {
        clean.push_str("test");
    }
    format!("{clean}_{:016x}", fastrand::u64(..))
}

/// `url` with its database (path) replaced by `database`, keeping user,
/// password, host, port and query parameters.
fn with_database(url: &str, database: &str) -> Result<String, ThrowawayError> {
    let bad = || ThrowawayError::BadUrl {
        url: url.to_owned(),
    };
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(bad)?;
    let scheme = &url[..url.len() - rest.len()];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    if authority.is_empty() {
        return Err(bad());
    }
    let query = tail.find('?').map_or("", |i| &tail[i..]);
    Ok(format!("{scheme}{authority}/{database}{query}"))
}

// ---------------------------------------------------------------------------
// The throwaway cluster

/// What the exit handler needs to stop and remove the cluster.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    owner: Option<Owner>,
}

/// The user the server runs as when we are root.
#[derive(Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

fn start_cluster() -> Result<String, ThrowawayError> {
    let bin = server_binaries()?;
    // SAFETY: geteuid has no preconditions.
    let owner = if unsafe { libc::geteuid() } == 0 {
        Some(postgres_user()?)
    } else {
        None
    };
    sweep_stale_clusters(&bin, owner);

    let dir = PathBuf::from(format!(
        "/tmp/{DIR_PREFIX}{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
    let cluster = Cluster { bin, dir, owner };
    match cluster.init_and_start() {
        Ok(port) => match CLUSTER.set(cluster) {
            Ok(()) => {
                // SAFETY: registering a handler that takes no arguments; it
                // never unwinds (see `stop_at_exit`).
                unsafe { libc::atexit(stop_at_exit) };
                Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
            }
            // Unreachable: `server_url` starts one cluster per process.
            Err(cluster) => {
                cluster.stop_and_remove();
                Err(ThrowawayError::Io {
                    action: "registering the throwaway cluster".to_owned(),
                    message: "a cluster was already started".to_owned(),
                })
            }
        },
        Err(e) => {
            cluster.stop_and_remove();
            Err(e)
        }
    }
}

extern "C" fn stop_at_exit() {
    // A panic must not unwind out of an `extern "C"` function.
    let _ = std::panic::catch_unwind(|| {
        if let Some(cluster) = CLUSTER.get() {
            cluster.stop_and_remove();
        }
    });
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.join("socket")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// `initdb`, then `pg_ctl start` until the server accepts connections;
    /// returns its port.
    fn init_and_start(&self) -> Result<u16, ThrowawayError> {
        let socket_dir = self.socket_dir();
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&socket_dir)
            .map_err(|e| io_error(format!("creating {}", socket_dir.display()), e))?;
        if let Some(owner) = self.owner {
            for path in [&self.dir, &socket_dir] {
                std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid)).map_err(|e| {
                    io_error(format!("giving {} to the postgres user", path.display()), e)
                })?;
            }
        }

        let data = self.data();
        run(self
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C"))?;

        let mut attempt = 1;
        loop {
            let port = free_port()?;
            match self.start(port) {
                Ok(()) => return self.wait_ready(port).map(|()| port),
                // Someone took the port between our probe and the server's bind.
                Err(_)
                    if attempt < START_ATTEMPTS && self.log_tail().contains("could not bind") =>
                {
                    attempt += 1
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start(&self, port: u16) -> Result<(), ThrowawayError> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
             -c shared_buffers=256MB",
            self.socket_dir().display()
        );
        let started = run(self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log())
            .args(["-w", "-t"])
            .arg(READY_TIMEOUT.as_secs().to_string())
            .arg("-o")
            .arg(options));
        started.map_err(|e| match e {
            ThrowawayError::Command {
                command,
                status,
                output,
            } => ThrowawayError::Command {
                command,
                status,
                output: format!(
                    "{output}\nserver log {} ends with:\n{}",
                    self.log().display(),
                    self.log_tail()
                ),
            },
            other => other,
        })
    }

    /// Polls `pg_isready` on the TCP port (what the tests use) until it
    /// answers or [`READY_TIMEOUT`] has passed.
    fn wait_ready(&self, port: u16) -> Result<(), ThrowawayError> {
        let started = Instant::now();
        loop {
            let output = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(["-U", "postgres", "-d", "postgres", "-t", "2"])
                .output();
            let last = match output {
                Ok(output) if output.status.success() => return Ok(()),
                Ok(output) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout).trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
                Err(e) => format!("could not run pg_isready: {e}"),
            };
            if started.elapsed() >= READY_TIMEOUT {
                return Err(ThrowawayError::NotReady {
                    port,
                    waited: started.elapsed(),
                    last,
                    log: self.log().display().to_string(),
                    log_tail: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Best effort: `pg_ctl stop -m immediate` if the server may be running,
    /// then remove the directory.
    fn stop_and_remove(&self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self
                .command("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "-t", "10"])
                .output();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// One of the server binaries, as the cluster's owner, from its directory
    /// (the caller's may not be readable by that user).
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(&self.dir);
        if let Some(owner) = self.owner {
            // std also drops the supplementary groups when setting the uid.
            command.uid(owner.uid).gid(owner.gid);
        }
        command
    }

    /// The last lines of the server log, for error messages.
    fn log_tail(&self) -> String {
        const TAIL: u64 = 4096;
        let read = || -> std::io::Result<String> {
            let mut file = fs::File::open(self.log())?;
            let len = file.metadata()?.len();
            file.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        match read() {
            Ok(tail) if tail.trim().is_empty() => "(empty)".to_owned(),
            Ok(tail) => tail,
            Err(e) => format!("(unreadable: {e})"),
        }
    }
}

/// The `bin` directory of the newest PostgreSQL under `/usr/lib/postgresql`.
fn server_binaries() -> Result<PathBuf, ThrowawayError> {
    let entries = fs::read_dir(DEBIAN_PG_ROOT).map_err(|_| ThrowawayError::NoServerBinaries)?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            // Version directories are "15", "16", … (older ones "9.6").
            let name = entry.file_name().to_str()?.to_owned();
            let version: Vec<u32> = name
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let bin = entry.path().join("bin");
            let complete = ["initdb", "pg_ctl", "postgres", "pg_isready"]
                .iter()
                .all(|program| bin.join(program).is_file());
            complete.then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
        .ok_or(ThrowawayError::NoServerBinaries)
}

/// The uid and gid of the `postgres` user.
fn postgres_user() -> Result<Owner, ThrowawayError> {
    let name = CString::new("postgres").map_err(|_| ThrowawayError::NoPostgresUser)?;
    // SAFETY: getpwnam_r writes into `pwd` and `buf`, whose sizes we pass;
    // `result` points into `pwd` only while they live, and we copy out.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return Err(ThrowawayError::NoPostgresUser);
        }
        Ok(Owner {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16, ThrowawayError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| io_error("binding 127.0.0.1:0 to find a free port".to_owned(), e))?;
    let port = listener
        .local_addr()
        .map_err(|e| io_error("reading the probe socket's port".to_owned(), e))?
        .port();
    Ok(port)
}

/// Stops and removes `/tmp/sr-pg-<pid>-*` clusters whose process is gone
/// (killed before its exit handler ran). Best effort.
fn sweep_stale_clusters(bin: &Path, owner: Option<Owner>) {
    let Ok(entries) = fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some((pid, random)) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split_once('-'))
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<libc::pid_t>() else {
            continue;
        };
        if random.is_empty() || !random.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        if alive || pid as u32 == std::process::id() {
            continue;
        }
        let dir = entry.path();
        // Only clusters we could have made: owned by us, or (as root) by the
        // postgres user.
        // SAFETY: geteuid has no preconditions.
        let ours =
            |uid: u32| uid == unsafe { libc::geteuid() } || owner.is_some_and(|o| o.uid == uid);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() && ours(meta.uid()) => {}
            _ => continue,
        }
        Cluster {
            bin: bin.to_owned(),
            dir,
            owner,
        }
        .stop_and_remove();
    }
}

/// Runs `command`, turning a failure into [`ThrowawayError::Command`] with its
/// output.
fn run(command: &mut Command) -> Result<(), ThrowawayError> {
    let shown = format!("{command:?}");
    let output = command.output().map_err(|e| ThrowawayError::Command {
        command: shown.clone(),
        status: "could not start".to_owned(),
        output: e.to_string(),
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(ThrowawayError::Command {
        command: shown,
        status: output.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

fn io_error(action: String, e: std::io::Error) -> ThrowawayError {
    ThrowawayError::Io {
        action,
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connects to `url` and creates a table, on a plain thread (the blocking
    /// client must not run inside the test's tokio runtime).
    fn create_table(url: String) -> String {
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            client
                .batch_execute("CREATE TABLE t (id BIGINT PRIMARY KEY); INSERT INTO t VALUES (1)")
                .unwrap();
            let row = client.query_one("SELECT current_database()", &[]).unwrap();
            row.get(0)
        })
        .join()
        .unwrap()
    }

    #[tokio::test]
    async fn fresh_databases_are_distinct_and_usable() {
        let first = fresh_database("throwaway-Test").unwrap();
        let second = fresh_database("throwaway-Test").unwrap();
        assert_ne!(first, second);
        let (first_db, second_db) = (create_table(first.clone()), create_table(second.clone()));
        assert_ne!(first_db, second_db);
        assert!(
            first.ends_with(&format!("/{first_db}")),
            "{first} vs {first_db}"
        );
        assert!(first_db.starts_with("throwaway_test_"), "{first_db}");
        assert!(first_db
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    }

    #[test]
    fn urls_keep_everything_but_the_database() {
        assert_eq!(
            with_database("postgres://u:p@h:5/postgres?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h:5/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgresql://u@h:5", "x").unwrap(),
            "postgresql://u@h:5/x"
        );
        assert!(with_database("host=h user=u", "x").is_err());
    }
}
