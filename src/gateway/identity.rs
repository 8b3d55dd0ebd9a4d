//! Identity from the client certificate (gateway.md §1). Pure functions on DER
//! bytes: nothing a client sends in a request body decides who it is.
//!
//! This module only reads the names; which tenant they mean (slug lookup,
//! reserved slugs, per-tenant CA binding) is [`super::tenancy`]'s job.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Partition of a SPIFFE identity whose path carries none (`<type>/<id>`).
pub const DEFAULT_PARTITION: &str = "default";
/// The component type allowed to call the agent RPCs.
pub const AGENT_COMPONENT: &str = "agent";

const MAX_PARTITION_BYTES: usize = 128;
const MAX_COMPONENT_ID_BYTES: usize = 255;
const CN_MARKER: &str = "serviceradar";

/// Which certificate naming form the identity came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    /// URI SAN `spiffe://<trust_domain>/<type>/...`.
    Platform { trust_domain: String },
    /// CN `<id>.<partition>.<tenant_slug>.serviceradar`.
    TenantEdge,
    /// CN `<id>.<partition>.serviceradar[.suffix]`.
    SingleTenant,
}

/// Who the peer is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub kind: IdentityKind,
    /// `agent`, `gateway`, … (CN identities carry no type: they are agents).
    pub component_type: String,
    pub component_id: String,
    pub partition: String,
    /// The tenant slug a tenant-edge CN names (SPIFFE paths may carry one
    /// too; platform identities belong to the platform tenant regardless).
    pub tenant_slug: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no client certificate")]
    NoCertificate,
    #[error("client certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("client certificate carries no usable identity: {0}")]
    NoIdentity(String),
}

/// Derives the identity from a leaf certificate. A SPIFFE URI SAN wins over the
/// CN; a malformed SPIFFE SAN is an error (no fallback to a weaker name).
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    if let Some(uri) = spiffe_uri(&cert)? {
        return parse_spiffe(uri);
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| IdentityError::NoIdentity("no SPIFFE URI SAN and no CN".into()))?
        .as_str()
        .map_err(|e| IdentityError::NoIdentity(format!("CN is not a string: {e}")))?;
    parse_common_name(cn)
}

fn spiffe_uri<'a>(cert: &'a X509Certificate<'_>) -> Result<Option<&'a str>, IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(format!("subjectAltName: {e}")))?;
    Ok(san.and_then(|san| {
        san.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        })
    }))
}

/// `spiffe://<td>/<type>/<id>`, `…/<type>/<partition>/<id>` or
/// `…/<type>/<tenant_slug>/<partition>/<id>`.
pub fn parse_spiffe(uri: &str) -> Result<PeerIdentity, IdentityError> {
    let bad = |why: &str| IdentityError::NoIdentity(format!("SPIFFE ID {uri:?}: {why}"));
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| bad("not a spiffe:// URI"))?;
    let (trust_domain, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
    if trust_domain.is_empty() {
        return Err(bad("empty trust domain"));
    }
    let segments: Vec<&str> = path.split('/').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(bad("empty path segment"));
    }
    let (component_type, tenant_slug, partition, id) = match segments.as_slice() {
        [ty, id] => (*ty, None, DEFAULT_PARTITION, *id),
        [ty, partition, id] => (*ty, None, *partition, *id),
        [ty, slug, partition, id] => (*ty, Some(*slug), *partition, *id),
        _ => return Err(bad("expected <type>/[<tenant>/][<partition>/]<id>")),
    };
    check_names(id, partition).map_err(|why| bad(&why))?;
    Ok(PeerIdentity {
        kind: IdentityKind::Platform {
            trust_domain: trust_domain.to_owned(),
        },
        component_type: component_type.to_owned(),
        component_id: id.to_owned(),
        partition: partition.to_owned(),
        tenant_slug: tenant_slug.map(str::to_owned),
    })
}

/// `<id>.<partition>.serviceradar[.suffix]` (single tenant) or
/// `<id>.<partition>.<tenant_slug>.serviceradar[.suffix]` (tenant edge).
pub fn parse_common_name(cn: &str) -> Result<PeerIdentity, IdentityError> {
    let bad = |why: &str| IdentityError::NoIdentity(format!("CN {cn:?}: {why}"));
    let labels: Vec<&str> = cn.split('.').collect();
    let (kind, tenant_slug) = match labels.as_slice() {
        [_, _, marker, ..] if marker.eq_ignore_ascii_case(CN_MARKER) => {
            (IdentityKind::SingleTenant, None)
        }
        [_, _, slug, marker, ..] if marker.eq_ignore_ascii_case(CN_MARKER) && !slug.is_empty() => {
            (IdentityKind::TenantEdge, Some((*slug).to_owned()))
        }
        _ => return Err(bad("expected <id>.<partition>.[<tenant>.]serviceradar")),
    };
    let (id, partition) = (labels[0], labels[1]);
    check_names(id, partition).map_err(|why| bad(&why))?;
    Ok(PeerIdentity {
        kind,
        component_type: AGENT_COMPONENT.to_owned(),
        component_id: id.to_owned(),
        partition: partition.to_owned(),
        tenant_slug,
    })
}

/// Component ids: non-empty, ≤ 255 bytes, no dots, no control characters.
pub fn valid_component_id(id: &str) -> bool {
    !id.trim().is_empty()
        && id.len() <= MAX_COMPONENT_ID_BYTES
        && !id.contains('.')
        && !has_control(id)
}

/// Partitions: 1–128 bytes, no dots, no control characters.
pub fn valid_partition(partition: &str) -> bool {
    !partition.trim().is_empty()
        && partition.len() <= MAX_PARTITION_BYTES
        && !partition.contains('.')
        && !has_control(partition)
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

fn check_names(id: &str, partition: &str) -> Result<(), String> {
    if !valid_component_id(id) {
        return Err(format!("invalid component id {id:?}"));
    }
    if !valid_partition(partition) {
        return Err(format!("invalid partition {partition:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::DevCa;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_spiffe_agent_cert_is_a_platform_agent_identity() {
        let ca = DevCa::generate("test ca").unwrap();
        let (pem, _) = ca
            .issue_client(
                "agent-edge-01.site-a.serviceradar",
                Some("spiffe://serviceradar.local/agent/site-a/agent-edge-01"),
            )
            .unwrap();
        let id = identity_from_der(&der(&pem)).unwrap();
        assert_eq!(
            id.kind,
            IdentityKind::Platform {
                trust_domain: crate::pki::TRUST_DOMAIN.into()
            }
        );
        assert_eq!(id.component_type, "agent");
        assert_eq!(id.component_id, "agent-edge-01");
        assert_eq!(id.partition, "site-a");
    }

    #[test]
    fn cn_only_certs() {
        let ca = DevCa::generate("test ca").unwrap();
        let (pem, _) = ca
            .issue_client("agent-1.dc1.serviceradar.example.com", None)
            .unwrap();
        let id = identity_from_der(&der(&pem)).unwrap();
        assert_eq!(id.kind, IdentityKind::SingleTenant);
        assert_eq!(
            (id.component_id.as_str(), id.partition.as_str()),
            ("agent-1", "dc1")
        );
        assert_eq!(id.tenant_slug, None);

        let (pem, _) = ca
            .issue_client("agent-2.dc2.acme.serviceradar", None)
            .unwrap();
        let id = identity_from_der(&der(&pem)).unwrap();
        assert_eq!(id.kind, IdentityKind::TenantEdge);
        assert_eq!(id.tenant_slug.as_deref(), Some("acme"));
        assert_eq!(id.partition, "dc2");
    }

    #[test]
    fn spiffe_wins_over_cn_and_carries_the_type() {
        let ca = DevCa::generate("test ca").unwrap();
        let (pem, _) = ca
            .issue_client(
                "agent-1.p.serviceradar",
                Some("spiffe://td.example/gateway/gw-7"),
            )
            .unwrap();
        let id = identity_from_der(&der(&pem)).unwrap();
        assert_eq!(id.component_type, "gateway");
        assert_eq!(id.component_id, "gw-7");
        assert_eq!(id.partition, DEFAULT_PARTITION);
    }

    #[test]
    fn malformed_spiffe_is_rejected_not_ignored() {
        let ca = DevCa::generate("test ca").unwrap();
        let (pem, _) = ca
            .issue_client("agent-1.p.serviceradar", Some("spiffe://td/agent/p/a.b"))
            .unwrap();
        assert!(matches!(
            identity_from_der(&der(&pem)),
            Err(IdentityError::NoIdentity(_))
        ));
    }

    #[test]
    fn unparseable_names_are_no_identity() {
        let ca = DevCa::generate("test ca").unwrap();
        for cn in [
            "agent-1",
            "agent-1.p.other",
            "a..serviceradar",
            ".p.serviceradar",
        ] {
            let (pem, _) = ca.issue_client(cn, None).unwrap();
            assert!(
                matches!(
                    identity_from_der(&der(&pem)),
                    Err(IdentityError::NoIdentity(_))
                ),
                "{cn}"
            );
        }
        assert!(matches!(
            identity_from_der(b"not der"),
            Err(IdentityError::BadCertificate(_))
        ));
    }

    #[test]
    fn spiffe_paths() {
        let id = parse_spiffe("spiffe://sr.local/agent/acme/edge/a1").unwrap();
        assert_eq!(
            (
                id.tenant_slug.as_deref(),
                id.partition.as_str(),
                id.component_id.as_str()
            ),
            (Some("acme"), "edge", "a1")
        );
        for bad in [
            "spiffe:///agent/a",
            "spiffe://td/agent",
            "spiffe://td/agent//a",
            "spiffe://td/a/b/c/d/e",
            "spiffe://td/agent/p/",
        ] {
            assert!(parse_spiffe(bad).is_err(), "{bad}");
        }
        let long = "p".repeat(129);
        assert!(parse_spiffe(&format!("spiffe://td/agent/{long}/a")).is_err());
        let max = "p".repeat(128);
        assert!(parse_spiffe(&format!("spiffe://td/agent/{max}/a")).is_ok());
    }

    #[test]
    fn names_reject_control_characters() {
        assert!(!valid_partition("a\tb"));
        assert!(!valid_component_id("a\u{7f}"));
        assert!(valid_component_id("agent-edge-01"));
    }
}
