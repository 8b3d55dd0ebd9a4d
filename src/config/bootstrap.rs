//! The bootstrap file (`agent.json`, wire.md §3): the minimal JSON an edge
//! onboarding bundle writes. The Go agent's file works unchanged; unknown keys
//! produce warnings, never a failure. Our own additions are optional.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::tls::TlsFiles;

/// Default gateway port (wire.md §1).
pub const DEFAULT_GATEWAY_PORT: u16 = 50052;

#[derive(Debug, thiserror::Error)]
#[error("bootstrap config {path}: {reason}")]
pub struct BootstrapError {
    pub path: PathBuf,
    pub reason: String,
}

/// How the agent reaches the gateway.
#[derive(Debug, Clone)]
pub enum Security {
    /// mTLS with the given files; `server_name` is checked against the
    /// gateway's certificate.
    Mtls {
        files: TlsFiles,
        server_name: String,
    },
    /// No TLS at all: only when the operator explicitly allowed it.
    Plaintext,
}

/// Supervision policy: exponential backoff with jitter between restarts of a
/// child; more than `max_restarts` within `window` stops the process.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartPolicy {
    #[serde(with = "duration_field")]
    pub backoff_base: Duration,
    #[serde(with = "duration_field")]
    pub backoff_cap: Duration,
    pub max_restarts: u32,
    #[serde(with = "duration_field")]
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(30),
            max_restarts: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// Reconnect backoff towards the gateway and upload retry policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayPolicy {
    #[serde(with = "duration_field")]
    pub reconnect_base: Duration,
    #[serde(with = "duration_field")]
    pub reconnect_cap: Duration,
    /// Deadline of one unary RPC.
    #[serde(with = "duration_field")]
    pub rpc_timeout: Duration,
    /// Deadline of the fetch phase of one source run (sources.md: 10 min).
    #[serde(with = "duration_field")]
    pub run_deadline: Duration,
    /// Attempts to deliver one staged run before it is reported failed.
    pub upload_attempts: u32,
    /// Updates per chunk, at most 1000 (wire.md §6); smaller chunks suit
    /// slow links.
    pub chunk_max_updates: usize,
    /// Chunks per StreamStatus call, at most 5000 (wire.md §6). A failed
    /// upload resumes at the first stream not acknowledged, so smaller
    /// streams lose less to a flaky link.
    pub stream_max_chunks: usize,
}

impl Default for GatewayPolicy {
    fn default() -> Self {
        Self {
            reconnect_base: Duration::from_millis(500),
            reconnect_cap: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(30),
            run_deadline: Duration::from_secs(600),
            upload_attempts: 5,
            chunk_max_updates: 1000,
            stream_max_chunks: 5000,
        }
    }
}

/// The durable spool of runs waiting for delivery, and how long a SIGTERM
/// waits for it to drain.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolPolicy {
    /// Beyond this many bytes of spooled runs, the oldest whole run is
    /// dropped (and reported failed).
    pub max_bytes: u64,
    /// On SIGTERM: how long uploads in flight may go on before the agent
    /// exits (what is not delivered by then stays spooled).
    #[serde(with = "duration_field")]
    pub shutdown_grace: Duration,
}

impl Default for SpoolPolicy {
    fn default() -> Self {
        Self {
            max_bytes: crate::upload::spool::DEFAULT_MAX_BYTES,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// How HTTP sources (Armis, NetBox) talk to their APIs (sources.md "Common
/// to all HTTP sources").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceHttpPolicy {
    /// Deadline of one HTTP request, body included.
    #[serde(with = "duration_field")]
    pub request_timeout: Duration,
    /// Retries of one request after its first attempt (connect errors,
    /// timeouts, 5xx, 429); then the run fails.
    pub max_retries: u32,
    /// First backoff delay; it doubles per retry, with jitter.
    #[serde(with = "duration_field")]
    pub retry_base: Duration,
    #[serde(with = "duration_field")]
    pub retry_cap: Duration,
    /// Longest `Retry-After` honoured; a longer one is waited this long.
    #[serde(with = "duration_field")]
    pub retry_after_cap: Duration,
    /// Largest response body accepted (a page, a token answer).
    pub max_body_bytes: usize,
}

/// Smallest `source_http.max_body_bytes` accepted: below it even a token
/// answer or a small page would be refused.
const MIN_BODY_BYTES: usize = 64 * 1024;

impl Default for SourceHttpPolicy {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            max_retries: 5,
            retry_base: Duration::from_millis(500),
            retry_cap: Duration::from_secs(30),
            retry_after_cap: Duration::from_secs(300),
            max_body_bytes: 256 * 1024 * 1024,
        }
    }
}

/// `serde(with)` for plain `Duration` fields in Go or humantime syntax.
mod duration_field {
    use std::time::Duration;

    use serde::Deserializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::super::duration::serde_opt::deserialize(d)?
            .ok_or_else(|| serde::de::Error::custom("duration must not be null"))
    }
}

/// The resolved bootstrap configuration.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub agent_id: String,
    pub partition: String,
    /// `host:port`.
    pub gateway_addr: String,
    pub security: Security,
    /// Reported as `source_ip`.
    pub host_ip: Option<IpAddr>,
    pub sync_runtime_enabled: bool,
    pub log_level: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Where the agent keeps run staging and its last good config.
    pub state_dir: PathBuf,
    /// False when `state_dir` is the default rather than configured.
    pub state_dir_configured: bool,
    pub restart: RestartPolicy,
    pub gateway: GatewayPolicy,
    pub source_http: SourceHttpPolicy,
    pub spool: SpoolPolicy,
    /// Non-fatal findings (unknown keys, ignored values), logged at start.
    pub warnings: Vec<String>,
}

#[derive(Deserialize)]
struct RawBootstrap {
    agent_id: Option<String>,
    partition: Option<String>,
    gateway_addr: Option<String>,
    gateway_security: Option<RawSecurity>,
    host_ip: Option<String>,
    sync_runtime_enabled: Option<bool>,
    logging: Option<RawLogging>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    // Project additions.
    state_dir: Option<PathBuf>,
    #[serde(default)]
    allow_plaintext_dev: bool,
    #[serde(default)]
    restart_policy: RestartPolicy,
    #[serde(default)]
    gateway_policy: GatewayPolicy,
    #[serde(default)]
    source_http: SourceHttpPolicy,
    #[serde(default)]
    spool: SpoolPolicy,
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
struct RawSecurity {
    mode: Option<String>,
    cert_dir: Option<PathBuf>,
    server_name: Option<String>,
    role: Option<String>,
    tls: Option<RawTls>,
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
struct RawLogging {
    level: Option<String>,
    #[serde(flatten)]
    _other: BTreeMap<String, Value>,
}

impl Bootstrap {
    /// Reads and validates a bootstrap file. Relative certificate paths resolve
    /// against `gateway_security.cert_dir`, else against the file's folder.
    pub fn load(path: &Path) -> Result<Self, BootstrapError> {
        let text = std::fs::read_to_string(path).map_err(|e| BootstrapError {
            path: path.to_owned(),
            reason: format!("cannot read: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_owned();
        Self::parse(&text, &base).map_err(|reason| BootstrapError {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses bootstrap JSON; `base` is the folder relative paths start from.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let raw: RawBootstrap =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let mut warnings: Vec<String> = raw
            .unknown
            .keys()
            .map(|k| format!("unknown key {k:?} ignored"))
            .collect();

        let agent_id = raw
            .agent_id
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or("agent_id is required")?;
        if agent_id.contains('.') || agent_id.chars().any(char::is_control) {
            return Err(format!(
                "agent_id {agent_id:?} must not contain dots or control characters"
            ));
        }
        let partition = raw
            .partition
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        if partition.contains('.')
            || partition.len() > 128
            || partition.chars().any(char::is_control)
        {
            return Err(format!(
                "partition {partition:?} must be 1-128 bytes without dots or control characters"
            ));
        }
        let gateway_addr = raw
            .gateway_addr
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or("gateway_addr is required (host:port)")?;
        let gateway_host = split_host_port(&gateway_addr)?;

        let sec = raw.gateway_security.unwrap_or_default();
        warnings.extend(
            sec.unknown
                .keys()
                .map(|k| format!("unknown key gateway_security.{k} ignored")),
        );
        if let Some(role) = sec.role.as_deref() {
            if !matches!(role, "agent" | "client" | "") {
                warnings.push(format!(
                    "gateway_security.role {role:?} is not \"agent\"; ignored"
                ));
            }
        }
        let mode = sec
            .mode
            .as_deref()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let security = if mode == "mtls" {
            let tls = sec.tls.unwrap_or_default();
            warnings.extend(
                tls.unknown
                    .keys()
                    .map(|k| format!("unknown key gateway_security.tls.{k} ignored")),
            );
            let dir = match sec.cert_dir {
                Some(d) if d.is_absolute() => d,
                Some(d) => base.join(d),
                None => base.to_owned(),
            };
            let file = |f: Option<PathBuf>, key: &str| -> Result<PathBuf, String> {
                let f = f.filter(|p| !p.as_os_str().is_empty()).ok_or_else(|| {
                    format!("gateway_security.tls.{key} is required in mtls mode")
                })?;
                Ok(if f.is_absolute() { f } else { dir.join(f) })
            };
            Security::Mtls {
                files: TlsFiles {
                    cert_file: file(tls.cert_file, "cert_file")?,
                    key_file: file(tls.key_file, "key_file")?,
                    ca_file: file(tls.ca_file, "ca_file")?,
                },
                server_name: sec
                    .server_name
                    .filter(|s| !s.trim().is_empty())
                    .unwrap_or_else(|| gateway_host.to_owned()),
            }
        } else if raw.allow_plaintext_dev {
            warnings.push(format!(
                "gateway_security.mode is {mode:?}: connecting WITHOUT TLS because allow_plaintext_dev is set"
            ));
            Security::Plaintext
        } else {
            return Err(format!(
                "gateway_security.mode is {:?}; only \"mtls\" is allowed (set allow_plaintext_dev: true for a development gateway without TLS)",
                sec.mode.unwrap_or_default()
            ));
        };

        let host_ip = match raw
            .host_ip
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            Some(s) => Some(
                s.parse()
                    .map_err(|_| format!("host_ip {s:?} is not an IP address"))?,
            ),
            None => None,
        };
        let restart = raw.restart_policy;
        if !(1..=1000).contains(&raw.gateway_policy.chunk_max_updates) {
            return Err("gateway_policy.chunk_max_updates must be between 1 and 1000".into());
        }
        if !(1..=5000).contains(&raw.gateway_policy.stream_max_chunks) {
            return Err("gateway_policy.stream_max_chunks must be between 1 and 5000".into());
        }
        if raw.source_http.request_timeout.is_zero() {
            return Err("source_http.request_timeout must be positive".into());
        }
        if raw.source_http.retry_cap < raw.source_http.retry_base {
            return Err("source_http.retry_cap must not be below retry_base".into());
        }
        if raw.source_http.max_body_bytes < MIN_BODY_BYTES {
            return Err(format!(
                "source_http.max_body_bytes must be at least {MIN_BODY_BYTES} (one API page)"
            ));
        }
        if raw.spool.max_bytes == 0 {
            return Err("spool.max_bytes must be positive".into());
        }
        if restart.max_restarts == 0 {
            return Err("restart_policy.max_restarts must be at least 1".into());
        }
        if restart.backoff_cap < restart.backoff_base {
            return Err("restart_policy.backoff_cap must not be below backoff_base".into());
        }
        Ok(Self {
            agent_id,
            partition,
            gateway_addr,
            security,
            host_ip,
            sync_runtime_enabled: raw.sync_runtime_enabled.unwrap_or(true),
            log_level: raw.logging.and_then(|l| l.level),
            labels: raw.labels,
            state_dir_configured: raw.state_dir.is_some(),
            state_dir: match raw.state_dir {
                Some(d) if d.is_absolute() => d,
                Some(d) => base.join(d),
                None => default_state_dir(),
            },
            restart,
            gateway: raw.gateway_policy,
            source_http: raw.source_http,
            spool: raw.spool,
            warnings,
        })
    }
}

/// systemd's `StateDirectory=` (it sets `STATE_DIRECTORY`), else
/// `/var/lib/serviceradar-agent`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/var/lib/serviceradar-agent"))
}

/// Returns the host part of `host:port` (IPv6 in brackets allowed).
fn split_host_port(addr: &str) -> Result<&str, String> {
    let bad = || format!("gateway_addr {addr:?} is not host:port");
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, rest) = rest.split_once(']').ok_or_else(bad)?;
        (host, rest.strip_prefix(':').ok_or_else(bad)?)
    } else {
        addr.rsplit_once(':').ok_or_else(bad)?
    };
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_EXAMPLE: &str = r#"{"agent_id":"agent-edge-01","partition":"default","gateway_addr":"gw.example.com:50052",
 "gateway_security":{"mode":"mtls","cert_dir":"/etc/serviceradar/certs","server_name":"gw.example.com",
  "role":"agent","tls":{"cert_file":"component.pem","key_file":"component-key.pem","ca_file":"ca-chain.pem"}}}"#;

    #[test]
    fn go_onboarding_bundle_parses_unchanged() {
        let b = Bootstrap::parse(GO_EXAMPLE, Path::new("/tmp")).unwrap();
        assert_eq!(b.agent_id, "agent-edge-01");
        assert_eq!(b.partition, "default");
        assert!(b.sync_runtime_enabled);
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
        match b.security {
            Security::Mtls { files, server_name } => {
                assert_eq!(server_name, "gw.example.com");
                assert_eq!(
                    files.cert_file,
                    Path::new("/etc/serviceradar/certs/component.pem")
                );
                assert_eq!(
                    files.ca_file,
                    Path::new("/etc/serviceradar/certs/ca-chain.pem")
                );
            }
            Security::Plaintext => panic!("expected mtls"),
        }
    }

    #[test]
    fn unknown_keys_warn_and_server_name_defaults_to_host() {
        let text = r#"{"agent_id":"a1","gateway_addr":"10.0.0.5:50052","checks_dir":"/x","listen_addr":":50051",
          "gateway_security":{"mode":"mtls","role":"client","tls":{"cert_file":"c.pem","key_file":"k.pem","ca_file":"ca.pem"}}}"#;
        let b = Bootstrap::parse(text, Path::new("/etc/sr")).unwrap();
        assert_eq!(b.warnings.len(), 2, "{:?}", b.warnings);
        assert_eq!(b.partition, "default");
        match b.security {
            Security::Mtls { files, server_name } => {
                assert_eq!(server_name, "10.0.0.5");
                assert_eq!(files.key_file, Path::new("/etc/sr/k.pem"));
            }
            Security::Plaintext => panic!("expected mtls"),
        }
    }

    #[test]
    fn plaintext_refused_unless_allowed() {
        let text =
            r#"{"agent_id":"a1","gateway_addr":"gw:50052","gateway_security":{"mode":"none"}}"#;
        let err = Bootstrap::parse(text, Path::new(".")).unwrap_err();
        assert!(err.contains("mtls"), "{err}");
        let text = r#"{"agent_id":"a1","gateway_addr":"gw:50052","allow_plaintext_dev":true}"#;
        assert!(matches!(
            Bootstrap::parse(text, Path::new(".")).unwrap().security,
            Security::Plaintext
        ));
    }

    #[test]
    fn errors_name_the_field() {
        for (text, needle) in [
            (r#"{"gateway_addr":"gw:1"}"#, "agent_id"),
            (r#"{"agent_id":"a"}"#, "gateway_addr"),
            (r#"{"agent_id":"a","gateway_addr":"gw"}"#, "gateway_addr"),
            (r#"{"agent_id":"a.b","gateway_addr":"gw:1"}"#, "agent_id"),
            (
                r#"{"agent_id":"a","gateway_addr":"gw:1","gateway_security":{"mode":"mtls","tls":{"cert_file":"c"}}}"#,
                "key_file",
            ),
            (
                r#"{"agent_id":"a","gateway_addr":"gw:1","host_ip":"nope","allow_plaintext_dev":true}"#,
                "host_ip",
            ),
            (
                r#"{"agent_id":"a","gateway_addr":"gw:1","allow_plaintext_dev":true,"restart_policy":{"window":"soon"}}"#,
                "soon",
            ),
            (
                r#"{"agent_id":"a","gateway_addr":"gw:1","allow_plaintext_dev":true,"source_http":{"request_timeout":"0s"}}"#,
                "source_http.request_timeout",
            ),
            (
                r#"{"agent_id":"a","gateway_addr":"gw:1","allow_plaintext_dev":true,"source_http":{"max_body_bytes":100}}"#,
                "source_http.max_body_bytes",
            ),
            (
                r#"{"agent_id":"a","gateway_addr":"gw:1","allow_plaintext_dev":true,"source_http":{"retry_base":"1m","retry_cap":"1s"}}"#,
                "source_http.retry_cap",
            ),
        ] {
            let err = Bootstrap::parse(text, Path::new(".")).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn source_http_policy_defaults_and_overrides() {
        let b = Bootstrap::parse(
            r#"{"agent_id":"a","gateway_addr":"gw:1","allow_plaintext_dev":true}"#,
            Path::new("."),
        )
        .unwrap();
        assert_eq!(b.source_http, SourceHttpPolicy::default());
        let text = r#"{"agent_id":"a","gateway_addr":"gw:1","allow_plaintext_dev":true,
            "source_http":{"request_timeout":"10s","max_retries":2,"retry_base":"100ms","retry_cap":"5s"}}"#;
        let b = Bootstrap::parse(text, Path::new(".")).unwrap();
        assert_eq!(b.source_http.request_timeout, Duration::from_secs(10));
        assert_eq!(
            (b.source_http.max_retries, b.source_http.retry_cap),
            (2, Duration::from_secs(5))
        );
        // Only the plaintext warning: the keys are known.
        assert_eq!(b.warnings.len(), 1, "{:?}", b.warnings);
    }

    #[test]
    fn restart_policy_accepts_go_durations() {
        let text = r#"{"agent_id":"a","gateway_addr":"[::1]:50052","allow_plaintext_dev":true,
            "restart_policy":{"backoff_base":"50ms","backoff_cap":"2s","max_restarts":3,"window":"1m"}}"#;
        let b = Bootstrap::parse(text, Path::new(".")).unwrap();
        assert_eq!(b.restart.backoff_base, Duration::from_millis(50));
        assert_eq!(b.restart.max_restarts, 3);
        assert_eq!(b.restart.window, Duration::from_secs(60));
    }
}
