//! The gateway's config file (JSON).
//!
//! ```json
//! {"listen":"127.0.0.1:50052","gateway_id":"gw-local",
//!  "tls":{"cert_dir":"/etc/sr","cert_file":"gateway.pem","key_file":"gateway-key.pem","ca_file":"ca.pem"},
//!  "allow_tls12":false,"database":"gateway.db","heartbeat_interval_sec":30,"config_poll_interval_sec":300,
//!  (or "database_url":"postgres://gateway@db:5432/serviceradar" for PostgreSQL)
//!  "credentials_key_file":"gateway.key","platform_tenant_slug":"platform","default_tenant":"default",
//!  "admin":{"listen":"127.0.0.1:50053","token_file":"admin.token"},
//!  "onboarding":{"ca_cert_file":"certs/ca.pem","ca_key_file":"certs/ca-key.pem","gateway_addr":"gw.example.com:50052"},
//!  "agents":{"agent-edge-01":{"sources":{"Demo Faker":{"type":"faker","credentials":{"total_devices":"10000"}}}}}}
//! ```
//!
//! `agents` pins sources to agents of the default tenant in the file itself;
//! database sources are managed with the admin CLI/API.
//!
//! Parsed field by field from a `serde_json::Value` (not derived) so that every
//! error names the file and the exact field. Relative paths resolve against the
//! config file's directory; TLS files against `tls.cert_dir` when given.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::secrets::KeySettings;
use super::store::{DatabaseLocation, PostgresUrl};
use super::tenancy::{self, TenancySettings};
use super::GatewayError;
use crate::tls::TlsFiles;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:50052";
pub const DEFAULT_GATEWAY_ID: &str = "agent-gateway";
pub const DEFAULT_HEARTBEAT_INTERVAL_SEC: i32 = 30;
pub const DEFAULT_CONFIG_POLL_INTERVAL_SEC: i32 = 300;

/// Default address of the HTTP admin API (loopback: put a TLS proxy in
/// front, or bind elsewhere deliberately).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:50053";
/// Environment variable with the admin API's bearer token (wins over
/// `admin.token_file`).
pub const ADMIN_TOKEN_ENV: &str = "SERVICERADAR_GATEWAY_ADMIN_TOKEN";

/// Environment variable with the PostgreSQL connection string; wins over
/// `database_url` and `database` (a password is better kept out of files).
pub const DATABASE_URL_ENV: &str = "SERVICERADAR_GATEWAY_DATABASE_URL";

const KNOWN_KEYS: &[&str] = &[
    "credentials_key_file",
    "dev_insecure_credentials_key",
    "platform_tenant_slug",
    "platform_tenant_id",
    "default_tenant",
    "admin",
    "onboarding",
    "listen",
    "gateway_id",
    "tls",
    "allow_tls12",
    "database",
    "database_url",
    "heartbeat_interval_sec",
    "config_poll_interval_sec",
    "agents",
];

/// Everything the gateway needs to run. Constructible in code; `database:
/// None` is validate-only mode (streams validated and acknowledged, devices
/// counted, nothing stored).
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub listen: String,
    pub gateway_id: String,
    pub tls: TlsFiles,
    pub allow_tls12: bool,
    /// SQLite file (`database`) or PostgreSQL (`database_url`, or the
    /// [`DATABASE_URL_ENV`] variable).
    pub database: Option<DatabaseLocation>,
    pub heartbeat_interval_sec: i32,
    pub config_poll_interval_sec: i32,
    pub agents: BTreeMap<String, AgentSources>,
    pub tenancy: TenancySettings,
    /// Where the credentials key comes from (needed with a database).
    pub credentials_key: KeySettings,
    /// The HTTP admin API; `None` leaves it off.
    pub admin: Option<AdminApiConfig>,
    pub onboarding: OnboardingConfig,
}

/// The HTTP admin API's listener and bearer token.
#[derive(Clone, Default)]
pub struct AdminApiConfig {
    pub listen: String,
    /// File holding the token; [`ADMIN_TOKEN_ENV`] wins when set.
    pub token_file: Option<PathBuf>,
    /// The token itself (set in code by tests and the demo).
    pub token: Option<String>,
}

impl fmt::Debug for AdminApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminApiConfig")
            .field("listen", &self.listen)
            .field("token_file", &self.token_file)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// What `onboard-agent` needs: the CA that signs tenant CAs (it must be the
/// one in `tls.ca_file`, or chain to it, so that agents' certificates are
/// accepted), and what to write into bundles.
#[derive(Clone, Debug, Default)]
pub struct OnboardingConfig {
    /// Defaults to `tls.ca_file`.
    pub ca_cert_file: Option<PathBuf>,
    pub ca_key_file: Option<PathBuf>,
    /// `gateway_addr` written into bundles; defaults to `listen`.
    pub gateway_addr: Option<String>,
    /// TLS server name written into bundles; defaults to the host of
    /// `gateway_addr`.
    pub server_name: Option<String>,
}

impl Default for GatewayConfig {
    /// Defaults for everything except the TLS files, which must be set.
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            gateway_id: DEFAULT_GATEWAY_ID.to_owned(),
            tls: TlsFiles {
                cert_file: PathBuf::new(),
                key_file: PathBuf::new(),
                ca_file: PathBuf::new(),
            },
            allow_tls12: false,
            database: None,
            heartbeat_interval_sec: DEFAULT_HEARTBEAT_INTERVAL_SEC,
            config_poll_interval_sec: DEFAULT_CONFIG_POLL_INTERVAL_SEC,
            agents: BTreeMap::new(),
            tenancy: TenancySettings::default(),
            credentials_key: KeySettings::default(),
            admin: None,
            onboarding: OnboardingConfig::default(),
        }
    }
}

/// The integration sources assigned to one agent, keyed by source name, in the
/// `config_json` format of wire.md §4.
#[derive(Clone, Default, PartialEq)]
pub struct AgentSources {
    pub sources: Map<String, Value>,
}

impl fmt::Debug for AgentSources {
    /// Source configs carry credentials: show only the names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentSources")
            .field("sources", &self.sources.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl GatewayConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, GatewayError> {
        let text = std::fs::read_to_string(path).map_err(|source| GatewayError::ConfigRead {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text as if read from `path` (relative paths resolve
    /// against its directory; errors name it).
    pub fn parse(text: &str, path: &Path) -> Result<Self, GatewayError> {
        let fields = Fields { path };
        let root: Value =
            serde_json::from_str(text).map_err(|e| fields.err("(document)", e.to_string()))?;
        let Value::Object(root) = root else {
            return Err(fields.err("(document)", "expected a JSON object"));
        };
        for key in root.keys().filter(|k| !KNOWN_KEYS.contains(&k.as_str())) {
            tracing::warn!(file = %path.display(), key = %key, "unknown gateway config key ignored");
        }
        let base = path.parent().unwrap_or(Path::new("")).to_owned();
        let defaults = Self::default();
        let database = fields.database(&root, &base)?;
        let credentials_key = KeySettings {
            key_file: fields
                .string(&root, "credentials_key_file")?
                .map(|f| base.join(f)),
            dev_key_file: match fields.boolean(&root, "dev_insecure_credentials_key")? {
                // Next to the SQLite file, or to the config file when the
                // database is a server.
                Some(true) => database.as_ref().map(|db| {
                    let mut name = match db {
                        DatabaseLocation::Sqlite(file) => file.as_os_str().to_owned(),
                        DatabaseLocation::Postgres(_) => path.as_os_str().to_owned(),
                    };
                    name.push(".dev-credentials.key");
                    PathBuf::from(name)
                }),
                _ => None,
            },
        };
        Ok(Self {
            tenancy: fields.tenancy(&root)?,
            credentials_key,
            admin: fields.admin(&root, &base)?,
            onboarding: fields.onboarding(&root, &base)?,
            listen: fields.string(&root, "listen")?.unwrap_or(defaults.listen),
            gateway_id: fields
                .string(&root, "gateway_id")?
                .unwrap_or(defaults.gateway_id),
            tls: fields.tls(&root, &base)?,
            allow_tls12: fields.boolean(&root, "allow_tls12")?.unwrap_or(false),
            database,
            heartbeat_interval_sec: fields
                .positive(&root, "heartbeat_interval_sec")?
                .unwrap_or(defaults.heartbeat_interval_sec),
            config_poll_interval_sec: fields
                .positive(&root, "config_poll_interval_sec")?
                .unwrap_or(defaults.config_poll_interval_sec),
            agents: fields.agents(&root)?,
        })
    }
}

/// Field readers that turn every problem into an error naming file and field.
struct Fields<'a> {
    path: &'a Path,
}

impl Fields<'_> {
    /// `database` (SQLite file) or `database_url` (PostgreSQL; the
    /// [`DATABASE_URL_ENV`] variable wins). Errors never repeat the URL: it
    /// may hold a password.
    fn database(
        &self,
        root: &Map<String, Value>,
        base: &Path,
    ) -> Result<Option<DatabaseLocation>, GatewayError> {
        let file = self.string(root, "database")?;
        let from_file = self.string(root, "database_url")?;
        let (url, field) = match std::env::var(DATABASE_URL_ENV) {
            // The environment wins over the file (a deployment's secret
            // overrides what an image ships).
            Ok(url) if !url.trim().is_empty() => (Some(url), DATABASE_URL_ENV),
            _ => (from_file, "database_url"),
        };
        let file = if field == DATABASE_URL_ENV {
            None
        } else {
            file
        };
        match (file, url) {
            (Some(_), Some(_)) => Err(self.err(
                field,
                "set either database (SQLite file) or database_url (PostgreSQL), not both",
            )),
            (Some(file), None) => Ok(Some(DatabaseLocation::Sqlite(base.join(file)))),
            (None, Some(url)) => {
                if !(url.starts_with("postgres://")
                    || url.starts_with("postgresql://")
                    || url.contains('='))
                {
                    return Err(self.err(
                        field,
                        "expected a PostgreSQL connection string (postgres://user@host:port/db); \
                         an SQLite file goes in database",
                    ));
                }
                PostgresUrl::parse(url.trim())
                    .map(|u| Some(DatabaseLocation::Postgres(u)))
                    .map_err(|reason| self.err(field, reason))
            }
            (None, None) => Ok(None),
        }
    }

    fn err(&self, field: &str, reason: impl Into<String>) -> GatewayError {
        GatewayError::Config {
            path: self.path.to_owned(),
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// A non-empty string; absent or `null` is `None`.
    fn string(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<String>, GatewayError> {
        self.string_at(obj, key, key)
    }

    fn string_at(
        &self,
        obj: &Map<String, Value>,
        key: &str,
        field: &str,
    ) -> Result<Option<String>, GatewayError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => {
                Err(self.err(field, "must not be empty"))
            }
            Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
            Some(_) => Err(self.err(field, "expected a string")),
        }
    }

    fn boolean(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, GatewayError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.err(key, "expected true or false")),
        }
    }

    fn positive(&self, obj: &Map<String, Value>, key: &str) -> Result<Option<i32>, GatewayError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .filter(|n| *n > 0)
                .map(Some)
                .ok_or_else(|| self.err(key, "expected a positive integer (seconds)")),
        }
    }

    fn tls(&self, root: &Map<String, Value>, base: &Path) -> Result<TlsFiles, GatewayError> {
        let tls = match root.get("tls") {
            Some(Value::Object(tls)) => tls,
            None | Some(Value::Null) => {
                return Err(self.err("tls", "required (cert_file, key_file, ca_file)"))
            }
            Some(_) => return Err(self.err("tls", "expected an object")),
        };
        let dir = match self.string_at(tls, "cert_dir", "tls.cert_dir")? {
            Some(dir) => base.join(dir),
            None => base.to_owned(),
        };
        let file = |key: &str| -> Result<PathBuf, GatewayError> {
            let field = format!("tls.{key}");
            self.string_at(tls, key, &field)?
                .map(|name| dir.join(name))
                .ok_or_else(|| self.err(&field, "required"))
        };
        Ok(TlsFiles {
            cert_file: file("cert_file")?,
            key_file: file("key_file")?,
            ca_file: file("ca_file")?,
        })
    }

    fn tenancy(&self, root: &Map<String, Value>) -> Result<TenancySettings, GatewayError> {
        let defaults = TenancySettings::default();
        let platform_slug = self
            .string(root, "platform_tenant_slug")?
            .unwrap_or(defaults.platform_slug);
        tenancy::validate_slug(&platform_slug)
            .map_err(|e| self.err("platform_tenant_slug", e.to_string()))?;
        let default_tenant = self
            .string(root, "default_tenant")?
            .unwrap_or(defaults.default_tenant);
        tenancy::validate_slug(&default_tenant)
            .map_err(|e| self.err("default_tenant", e.to_string()))?;
        let platform_tenant_id = self
            .string(root, "platform_tenant_id")?
            .map(|id| tenancy::parse_tenant_id(&id))
            .transpose()
            .map_err(|e| self.err("platform_tenant_id", e.to_string()))?;
        let settings = TenancySettings {
            platform_slug,
            platform_tenant_id,
            default_tenant,
        };
        if settings.is_reserved(&settings.default_tenant) {
            return Err(self.err("default_tenant", "reserved slug; choose another"));
        }
        Ok(settings)
    }

    fn object<'m>(
        &self,
        root: &'m Map<String, Value>,
        key: &str,
        known: &[&str],
    ) -> Result<Option<&'m Map<String, Value>>, GatewayError> {
        match root.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(obj)) => {
                for k in obj.keys().filter(|k| !known.contains(&k.as_str())) {
                    tracing::warn!(file = %self.path.display(), key = %format!("{key}.{k}"), "unknown gateway config key ignored");
                }
                Ok(Some(obj))
            }
            Some(_) => Err(self.err(key, "expected an object")),
        }
    }

    fn admin(
        &self,
        root: &Map<String, Value>,
        base: &Path,
    ) -> Result<Option<AdminApiConfig>, GatewayError> {
        let Some(admin) = self.object(root, "admin", &["listen", "token_file"])? else {
            return Ok(None);
        };
        Ok(Some(AdminApiConfig {
            listen: self
                .string_at(admin, "listen", "admin.listen")?
                .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_owned()),
            token_file: self
                .string_at(admin, "token_file", "admin.token_file")?
                .map(|f| base.join(f)),
            token: None,
        }))
    }

    fn onboarding(
        &self,
        root: &Map<String, Value>,
        base: &Path,
    ) -> Result<OnboardingConfig, GatewayError> {
        let known = ["ca_cert_file", "ca_key_file", "gateway_addr", "server_name"];
        let Some(obj) = self.object(root, "onboarding", &known)? else {
            return Ok(OnboardingConfig::default());
        };
        let file = |key: &str| -> Result<Option<PathBuf>, GatewayError> {
            Ok(self
                .string_at(obj, key, &format!("onboarding.{key}"))?
                .map(|f| base.join(f)))
        };
        Ok(OnboardingConfig {
            ca_cert_file: file("ca_cert_file")?,
            ca_key_file: file("ca_key_file")?,
            gateway_addr: self.string_at(obj, "gateway_addr", "onboarding.gateway_addr")?,
            server_name: self.string_at(obj, "server_name", "onboarding.server_name")?,
        })
    }

    fn agents(
        &self,
        root: &Map<String, Value>,
    ) -> Result<BTreeMap<String, AgentSources>, GatewayError> {
        let agents = match root.get("agents") {
            None | Some(Value::Null) => return Ok(BTreeMap::new()),
            Some(Value::Object(agents)) => agents,
            Some(_) => return Err(self.err("agents", "expected an object keyed by agent id")),
        };
        let mut out = BTreeMap::new();
        for (agent_id, entry) in agents {
            let field = format!("agents.{agent_id}");
            if !super::identity::valid_component_id(agent_id) {
                return Err(self.err(
                    &field,
                    "agent ids are non-empty and contain no dots or control characters",
                ));
            }
            let Value::Object(entry) = entry else {
                return Err(self.err(&field, "expected an object with `sources`"));
            };
            for key in entry.keys().filter(|k| k.as_str() != "sources") {
                tracing::warn!(file = %self.path.display(), field = %field, key = %key, "unknown agent key ignored");
            }
            let sources = match entry.get("sources") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(sources)) => sources.clone(),
                Some(_) => {
                    return Err(self.err(
                        &format!("{field}.sources"),
                        "expected an object keyed by source name",
                    ))
                }
            };
            for (name, source) in &sources {
                if !source.is_object() {
                    return Err(self.err(&format!("{field}.sources.{name}"), "expected an object"));
                }
            }
            out.insert(agent_id.clone(), AgentSources { sources });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GatewayConfig, GatewayError> {
        GatewayConfig::parse(text, Path::new("/etc/gw/gateway.json"))
    }

    const EXAMPLE: &str = r#"{"listen":"127.0.0.1:50052","gateway_id":"gw-local",
        "tls":{"cert_dir":"certs","cert_file":"gateway.pem","key_file":"/abs/gateway-key.pem","ca_file":"ca.pem"},
        "allow_tls12":false,"database":"gateway.db","heartbeat_interval_sec":30,"config_poll_interval_sec":300,
        "agents":{"agent-edge-01":{"sources":{"Demo Faker":{"type":"faker","credentials":{"total_devices":"10000","seed":"1"},"discovery_interval":"1h"}}}}}"#;

    #[test]
    fn parses_the_example_and_resolves_paths() {
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(config.listen, "127.0.0.1:50052");
        assert_eq!(config.gateway_id, "gw-local");
        assert_eq!(
            config.tls.cert_file,
            PathBuf::from("/etc/gw/certs/gateway.pem")
        );
        assert_eq!(config.tls.key_file, PathBuf::from("/abs/gateway-key.pem"));
        assert_eq!(config.tls.ca_file, PathBuf::from("/etc/gw/certs/ca.pem"));
        assert_eq!(
            config.database,
            Some(DatabaseLocation::Sqlite(PathBuf::from(
                "/etc/gw/gateway.db"
            )))
        );
        assert_eq!(config.heartbeat_interval_sec, 30);
        let sources = &config.agents["agent-edge-01"].sources;
        assert_eq!(sources["Demo Faker"]["type"], "faker");
    }

    #[test]
    fn database_url_selects_postgres_and_its_password_is_never_shown() {
        let tls = r#""tls":{"cert_file":"a","key_file":"b","ca_file":"c"}"#;
        let config = parse(&format!(
            r#"{{{tls},"database_url":"postgres://gw:pw-s3cret@db.internal:5433/sr"}}"#
        ))
        .unwrap();
        let Some(DatabaseLocation::Postgres(url)) = &config.database else {
            panic!("expected PostgreSQL, got {:?}", config.database)
        };
        assert_eq!(url.redacted(), "postgres://gw@db.internal:5433/sr");
        assert!(!format!("{config:?}").contains("pw-s3cret"));

        let both = parse(&format!(
            r#"{{{tls},"database":"g.db","database_url":"postgres://gw:pw-s3cret@db/sr"}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            both.contains("database_url") && !both.contains("pw-s3cret"),
            "{both}"
        );
        let sqlite_in_url = parse(&format!(r#"{{{tls},"database_url":"gateway.db"}}"#))
            .unwrap_err()
            .to_string();
        assert!(sqlite_in_url.contains("database_url"), "{sqlite_in_url}");
        let broken = parse(&format!(
            r#"{{{tls},"database_url":"postgres://gw:pw-s3cret@db:notaport/sr"}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            broken.contains("database_url") && !broken.contains("pw-s3cret"),
            "{broken}"
        );
    }

    #[test]
    fn database_null_is_validate_only_and_defaults_apply() {
        let config =
            parse(r#"{"tls":{"cert_file":"a","key_file":"b","ca_file":"c"},"database":null}"#)
                .unwrap();
        assert_eq!(config.database, None);
        assert_eq!(config.listen, DEFAULT_LISTEN);
        assert_eq!(
            config.config_poll_interval_sec,
            DEFAULT_CONFIG_POLL_INTERVAL_SEC
        );
        assert_eq!(config.tls.ca_file, PathBuf::from("/etc/gw/c"));
        assert!(config.agents.is_empty());
    }

    #[test]
    fn errors_name_file_and_field() {
        let cases = [
            (r#"{"tls":{"cert_file":"a","key_file":"b"}}"#, "tls.ca_file"),
            (
                r#"{"tls":{"cert_file":"a","key_file":"b","ca_file":"c"},"heartbeat_interval_sec":0}"#,
                "heartbeat_interval_sec",
            ),
            (
                r#"{"tls":{"cert_file":"a","key_file":"b","ca_file":"c"},"agents":{"a.b":{}}}"#,
                "agents.a.b",
            ),
            (
                r#"{"tls":{"cert_file":"a","key_file":"b","ca_file":"c"},"agents":{"x":{"sources":{"s":1}}}}"#,
                "agents.x.sources.s",
            ),
            (r#"{"listen":5}"#, "listen"),
            (
                r#"{"tls":{"cert_file":"a","key_file":"b","ca_file":"c"},"platform_tenant_id":"00000000-0000-0000-0000-000000000000"}"#,
                "platform_tenant_id",
            ),
            (
                r#"{"tls":{"cert_file":"a","key_file":"b","ca_file":"c"},"default_tenant":"serviceradar-operator"}"#,
                "default_tenant",
            ),
            (
                r#"{"tls":{"cert_file":"a","key_file":"b","ca_file":"c"},"platform_tenant_slug":"Not A Slug"}"#,
                "platform_tenant_slug",
            ),
            (
                r#"{"tls":{"cert_file":"a","key_file":"b","ca_file":"c"},"admin":5}"#,
                "admin",
            ),
            ("[1]", "(document)"),
        ];
        for (text, field) in cases {
            let err = parse(text).unwrap_err();
            let message = err.to_string();
            assert!(message.contains("/etc/gw/gateway.json"), "{message}");
            assert!(
                message.contains(&format!("`{field}`")),
                "{message} should name {field}"
            );
        }
    }

    #[test]
    fn debug_does_not_show_credentials() {
        let config = parse(EXAMPLE).unwrap();
        let debug = format!("{config:?}");
        assert!(debug.contains("Demo Faker"));
        assert!(!debug.contains("10000"), "{debug}");
    }
}
