//! Credentials at rest (gateway.md §3): AES-256-GCM from `ring` (the crypto
//! provider the whole build already uses), with a 256-bit key the operator
//! provides in a file or an environment variable.
//!
//! A sealed value is `1 ‖ nonce (12 bytes) ‖ ciphertext ‖ tag`. The caller
//! passes a context (for a source's credentials, its id) as associated data,
//! so a sealed blob copied onto another row does not open. The key never
//! appears in `Debug` output, logs or errors.

use std::fmt;
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// Environment variable holding the key (64 hex characters). Wins over the
/// config file's `credentials_key_file`.
pub const KEY_ENV: &str = "SERVICERADAR_GATEWAY_CREDENTIALS_KEY";
const KEY_BYTES: usize = 32;
const FORMAT_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(
        "the gateway stores integration credentials encrypted and needs a key: set \
         `credentials_key_file` in the gateway config or the {KEY_ENV} environment variable \
         (64 hex characters, e.g. from `openssl rand -hex 32`); for development only, \
         `dev_insecure_credentials_key: true` keeps a generated key next to the database"
    )]
    NoKey,
    #[error("credentials key from {origin}: {reason}")]
    BadKey { origin: String, reason: String },
    #[error("cannot read credentials key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write credentials key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sealed value is damaged or was sealed with another key ({0})")]
    Open(&'static str),
    #[error("encryption failed")]
    Seal,
}

/// Where the key came from (for the startup log line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyOrigin {
    Env,
    File(PathBuf),
    /// Generated for development next to the database.
    DevFile(PathBuf),
}

/// The AEAD key. Cheap to share behind an `Arc`.
pub struct CredentialKey {
    key: LessSafeKey,
    origin: KeyOrigin,
}

impl fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialKey")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// How the gateway config asks for the key.
#[derive(Clone, Debug, Default)]
pub struct KeySettings {
    pub key_file: Option<PathBuf>,
    /// Development only: without a configured key, use (creating it once)
    /// this file.
    pub dev_key_file: Option<PathBuf>,
}

impl CredentialKey {
    /// The environment variable, else the configured file, else (dev only)
    /// the generated file; no key at all is [`SecretsError::NoKey`].
    pub fn load(settings: &KeySettings) -> Result<Self, SecretsError> {
        if let Ok(text) = std::env::var(KEY_ENV) {
            if !text.trim().is_empty() {
                return Self::from_hex(&text, KeyOrigin::Env);
            }
        }
        if let Some(path) = &settings.key_file {
            return Self::from_file(path, KeyOrigin::File(path.clone()));
        }
        if let Some(path) = &settings.dev_key_file {
            if !path.exists() {
                write_new_key(path)?;
            }
            tracing::warn!(path = %path.display(),
                "DEVELOPMENT MODE: integration credentials are sealed with a generated key kept next to the database; configure credentials_key_file for production");
            return Self::from_file(path, KeyOrigin::DevFile(path.clone()));
        }
        Err(SecretsError::NoKey)
    }

    fn from_file(path: &Path, origin: KeyOrigin) -> Result<Self, SecretsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
            path: path.to_owned(),
            source,
        })?;
        warn_if_readable_by_others(path);
        Self::from_hex(&text, origin)
    }

    /// A key from 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str, origin: KeyOrigin) -> Result<Self, SecretsError> {
        let bad = |reason: &str| SecretsError::BadKey {
            origin: origin.to_string(),
            reason: reason.to_owned(),
        };
        let bytes = hex::decode(text.trim())
            .map_err(|_| bad("expected 64 hex characters (a 256-bit key)"))?;
        if bytes.len() != KEY_BYTES {
            return Err(bad(&format!(
                "expected 64 hex characters (a 256-bit key), got {}",
                text.trim().len()
            )));
        }
        let key =
            UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| bad("not a valid AES-256 key"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            origin,
        })
    }

    /// A random key (tests, and the generated dev key).
    pub fn generate() -> Result<Self, SecretsError> {
        Self::from_hex(&random_key_hex()?, KeyOrigin::Env)
    }

    pub fn origin(&self) -> &KeyOrigin {
        &self.origin
    }

    /// Encrypts `plaintext`, bound to `context`.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SecretsError::Seal)?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + 16);
        sealed.push(FORMAT_V1);
        sealed.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut body,
            )
            .map_err(|_| SecretsError::Seal)?;
        sealed.extend_from_slice(&body);
        Ok(sealed)
    }

    /// Decrypts what [`seal`](Self::seal) produced with the same context.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, SecretsError> {
        let (&format, rest) = sealed.split_first().ok_or(SecretsError::Open("empty"))?;
        if format != FORMAT_V1 {
            return Err(SecretsError::Open("unknown format"));
        }
        if rest.len() < NONCE_LEN {
            return Err(SecretsError::Open("truncated"));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretsError::Open("bad nonce"))?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context), &mut body)
            .map_err(|_| SecretsError::Open("authentication failed"))?;
        Ok(plain.to_vec())
    }
}

impl fmt::Display for KeyOrigin {
    /// The variable or file the key came from (never the key).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyOrigin::Env => f.write_str(KEY_ENV),
            KeyOrigin::File(path) | KeyOrigin::DevFile(path) => write!(f, "{}", path.display()),
        }
    }
}

fn random_key_hex() -> Result<String, SecretsError> {
    let mut key = [0u8; KEY_BYTES];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| SecretsError::Seal)?;
    Ok(hex::encode(key))
}

/// Writes a new random key, readable by the owner only.
pub fn write_new_key(path: &Path) -> Result<(), SecretsError> {
    let text = random_key_hex()?;
    crate::pki::write_file(path, &format!("{text}\n"), true).map_err(|e| SecretsError::Write {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(),
                "credentials key file is readable by group or others; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_context() {
        let key = CredentialKey::generate().unwrap();
        let sealed = key
            .seal(br#"{"secret_key":"hunter2"}"#, b"source-1")
            .unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            key.open(&sealed, b"source-1").unwrap(),
            br#"{"secret_key":"hunter2"}"#
        );
        assert!(key.open(&sealed, b"source-2").is_err(), "bound to its row");
        let other = CredentialKey::generate().unwrap();
        assert!(other.open(&sealed, b"source-1").is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(key.open(&tampered, b"source-1").is_err());
        assert!(key.open(&[], b"x").is_err());
        // Same plaintext, different nonce.
        assert_ne!(key.seal(b"a", b"c").unwrap(), key.seal(b"a", b"c").unwrap());
    }

    #[test]
    fn keys_load_from_file_and_bad_keys_name_their_origin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.key");
        write_new_key(&path).unwrap();
        let settings = KeySettings {
            key_file: Some(path.clone()),
            dev_key_file: None,
        };
        let key = CredentialKey::load(&settings).unwrap();
        assert_eq!(key.origin(), &KeyOrigin::File(path.clone()));
        assert!(!format!("{key:?}").contains(std::fs::read_to_string(&path).unwrap().trim()));

        std::fs::write(&path, "abcd").unwrap();
        let err = CredentialKey::load(&settings).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(matches!(
            CredentialKey::load(&KeySettings::default()),
            Err(SecretsError::NoKey) | Ok(_) // Ok only if the environment sets a key
        ));

        let dev = dir.path().join("dev.key");
        let dev_settings = KeySettings {
            key_file: None,
            dev_key_file: Some(dev.clone()),
        };
        if std::env::var(KEY_ENV).is_err() {
            let first = CredentialKey::load(&dev_settings).unwrap();
            let sealed = first.seal(b"x", b"c").unwrap();
            let again = CredentialKey::load(&dev_settings).unwrap();
            assert_eq!(
                again.open(&sealed, b"c").unwrap(),
                b"x",
                "the dev key persists"
            );
        }
    }
}
