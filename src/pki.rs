//! A development PKI: one CA, a gateway server certificate and agent client
//! certificates in the naming scheme the gateway understands (CN
//! `<agent_id>.<partition>.serviceradar`, the single-tenant edge form; no
//! SPIFFE URI SAN, which would make the agent a platform identity).
//!
//! Used by `serviceradar-agent certs`, by the demo and by the tests. Keys are
//! written with mode 0600.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::tls::TlsFiles;

/// The SPIFFE trust domain of dev certificates.
pub const TRUST_DOMAIN: &str = "serviceradar.local";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read CA from {path}: {reason}")]
    ReadCa { path: PathBuf, reason: String },
    #[error("invalid name {0:?}: ids and partitions are non-empty and contain no dots")]
    Name(String),
}

/// A CA able to issue certificates.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// File layout of a dev PKI directory.
pub struct PkiLayout {
    pub dir: PathBuf,
}

impl PkiLayout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    pub fn gateway(&self) -> TlsFiles {
        TlsFiles {
            cert_file: self.dir.join("gateway.pem"),
            key_file: self.dir.join("gateway-key.pem"),
            ca_file: self.ca_cert(),
        }
    }
    pub fn agent(&self, agent_id: &str) -> TlsFiles {
        TlsFiles {
            cert_file: self.dir.join(format!("{agent_id}.pem")),
            key_file: self.dir.join(format!("{agent_id}-key.pem")),
            ca_file: self.ca_cert(),
        }
    }
}

impl DevCa {
    /// A fresh self-signed CA.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "ServiceRadar dev PKI");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// Loads a CA written by [`DevCa::write`].
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| PkiError::ReadCa {
                path: p.to_owned(),
                reason: e.to_string(),
            })
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        Self::from_pem(&cert_pem, &key_pem).map_err(|e| match e {
            PkiError::ReadCa { path, reason } if path == Path::new("(key)") => PkiError::ReadCa {
                path: key.to_owned(),
                reason,
            },
            PkiError::ReadCa { reason, .. } => PkiError::ReadCa {
                path: cert.to_owned(),
                reason,
            },
            other => other,
        })
    }

    /// A CA from its certificate and private key in PEM (errors name
    /// `(certificate)` or `(key)`; [`DevCa::load`] replaces them by paths).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::ReadCa {
            path: PathBuf::from("(key)"),
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| PkiError::ReadCa {
            path: PathBuf::from("(certificate)"),
            reason: e.to_string(),
        })?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The private key in PEM (to seal and store an intermediate's key).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// An intermediate CA signed by this one, allowed to issue end-entity
    /// certificates only (path length 0): a tenant's CA (gateway.md §1).
    pub fn issue_intermediate(&self, common_name: &str) -> Result<DevCa, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "ServiceRadar tenant CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert_pem = params.signed_by(&key, &self.issuer)?.pem();
        Ok(DevCa {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes `ca.pem` and `ca-key.pem` into the layout's directory.
    pub fn write(&self, layout: &PkiLayout) -> Result<(), PkiError> {
        write_file(&layout.ca_cert(), &self.cert_pem, false)?;
        write_file(&layout.ca_key(), &self.issuer.key().serialize_pem(), true)
    }

    /// A server certificate for the gateway, valid for the given DNS names and IPs.
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "agent-gateway");
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into()?),
            };
            params.subject_alt_names.push(san);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate for an agent: CN `<agent_id>.<partition>.serviceradar`,
    /// the single-tenant edge form (gateway.md §1), and no SPIFFE URI SAN: a
    /// SPIFFE identity is a *platform* identity, which never gets tenant sync
    /// configuration.
    pub fn issue_agent(
        &self,
        agent_id: &str,
        partition: &str,
    ) -> Result<(String, String), PkiError> {
        for part in [agent_id, partition] {
            if part.is_empty() || part.contains('.') || part.contains('/') {
                return Err(PkiError::Name(part.to_owned()));
            }
        }
        self.issue_client(&format!("{agent_id}.{partition}.serviceradar"), None)
    }

    /// A client certificate for an agent of a tenant: CN
    /// `<agent_id>.<partition>.<tenant_slug>.serviceradar`, the tenant edge
    /// form (gateway.md §1).
    pub fn issue_tenant_agent(
        &self,
        agent_id: &str,
        partition: &str,
        tenant_slug: &str,
    ) -> Result<(String, String), PkiError> {
        for part in [agent_id, partition, tenant_slug] {
            if part.is_empty() || part.contains('.') || part.contains('/') {
                return Err(PkiError::Name(part.to_owned()));
            }
        }
        self.issue_client(
            &format!("{agent_id}.{partition}.{tenant_slug}.serviceradar"),
            None,
        )
    }

    /// A client certificate with an arbitrary CN and optional URI SAN (tests use
    /// it to build certificates the gateway must reject).
    pub fn issue_client(
        &self,
        common_name: &str,
        uri_san: Option<&str>,
    ) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        if let Some(uri) = uri_san {
            params.subject_alt_names.push(SanType::URI(uri.try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<(String, String), PkiError> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes a certificate/key pair as `<stem>.pem` / `<stem>-key.pem`.
pub fn write_pair(files: &TlsFiles, pair: &(String, String)) -> Result<(), PkiError> {
    write_file(&files.cert_file, &pair.0, false)?;
    write_file(&files.key_file, &pair.1, true)
}

/// Writes a file; `secret` files get mode 0600 from creation.
pub fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = secret;
    use std::io::Write;
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)
}

/// Creates (or completes) a dev PKI in `dir`: reuses an existing CA, writes a
/// gateway certificate for `gateway_names` and one client certificate per
/// `(agent_id, partition)`.
pub fn create_dev_pki(
    dir: &Path,
    gateway_names: &[String],
    agents: &[(String, String)],
) -> Result<PkiLayout, PkiError> {
    let layout = PkiLayout::new(dir);
    let ca = if layout.ca_cert().exists() && layout.ca_key().exists() {
        DevCa::load(&layout.ca_cert(), &layout.ca_key())?
    } else {
        let ca = DevCa::generate("ServiceRadar Dev CA")?;
        ca.write(&layout)?;
        ca
    };
    write_pair(&layout.gateway(), &ca.issue_server(gateway_names)?)?;
    for (agent_id, partition) in agents {
        write_pair(
            &layout.agent(agent_id),
            &ca.issue_agent(agent_id, partition)?,
        )?;
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    use super::*;

    #[test]
    fn agent_certificates_carry_the_edge_cn_and_no_spiffe_san() {
        let ca = DevCa::generate("test CA").unwrap();
        let (pem, _key) = ca.issue_agent("edge-01", "site-a").unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "edge-01.site-a.serviceradar");
        let uris: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert!(uris.is_empty(), "{uris:?}");
        let identity = crate::gateway::identity::identity_from_der(&der).unwrap();
        assert_eq!(
            identity.kind,
            crate::gateway::identity::IdentityKind::SingleTenant
        );
    }

    #[test]
    fn names_with_dots_are_refused() {
        let ca = DevCa::generate("test CA").unwrap();
        assert!(matches!(
            ca.issue_agent("edge.01", "default"),
            Err(PkiError::Name(_))
        ));
        assert!(matches!(
            ca.issue_agent("edge-01", ""),
            Err(PkiError::Name(_))
        ));
    }

    #[test]
    fn an_existing_ca_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = create_dev_pki(
            dir.path(),
            &["localhost".into()],
            &[("a".into(), "default".into())],
        )
        .unwrap();
        let ca_pem = std::fs::read(first.ca_cert()).unwrap();
        let second = create_dev_pki(
            dir.path(),
            &["localhost".into()],
            &[("b".into(), "default".into())],
        )
        .unwrap();
        assert_eq!(std::fs::read(second.ca_cert()).unwrap(), ca_pem);
        assert!(second.agent("a").cert_file.exists() && second.agent("b").cert_file.exists());
    }
}
