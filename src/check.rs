//! `serviceradar-agent check-config`: validates a bootstrap file and the
//! certificates it names, and says precisely what is wrong.

use std::path::Path;

use rustls::pki_types::UnixTime;
use rustls::server::WebPkiClientVerifier;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::bootstrap::{Bootstrap, Security};
use crate::tls;

/// One result line of the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Ok(String),
    Warning(String),
    Error(String),
}

impl Finding {
    pub fn is_error(&self) -> bool {
        matches!(self, Finding::Error(_))
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Ok(m) => write!(f, "ok       {m}"),
            Finding::Warning(m) => write!(f, "warning  {m}"),
            Finding::Error(m) => write!(f, "ERROR    {m}"),
        }
    }
}

/// Checks a bootstrap file; every problem found is reported, not just the first.
pub fn check_bootstrap(path: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    let bootstrap = match Bootstrap::load(path) {
        Ok(b) => b,
        Err(e) => return vec![Finding::Error(e.to_string())],
    };
    out.push(Finding::Ok(format!(
        "{}: agent_id {:?}, partition {:?}, gateway {}",
        path.display(),
        bootstrap.agent_id,
        bootstrap.partition,
        bootstrap.gateway_addr
    )));
    out.extend(bootstrap.warnings.iter().cloned().map(Finding::Warning));
    match &bootstrap.security {
        Security::Plaintext => out.push(Finding::Warning(
            "plaintext mode: no TLS to the gateway".into(),
        )),
        Security::Mtls { files, server_name } => {
            out.push(Finding::Ok(format!("TLS server name {server_name:?}")));
            check_tls(files, &bootstrap.agent_id, &mut out);
        }
    }
    out
}

fn check_tls(files: &tls::TlsFiles, agent_id: &str, out: &mut Vec<Finding>) {
    let certs = match tls::load_certs(&files.cert_file) {
        Ok(c) => c,
        Err(e) => return out.push(Finding::Error(e.to_string())),
    };
    let key = tls::load_key(&files.key_file);
    let roots = tls::load_roots(&files.ca_file);
    let Ok((_, leaf)) = X509Certificate::from_der(&certs[0]) else {
        return out.push(Finding::Error(format!(
            "{}: first certificate is not valid X.509",
            files.cert_file.display()
        )));
    };
    let cn = leaf
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    if cn.split('.').next() == Some(agent_id) {
        out.push(Finding::Ok(format!(
            "certificate CN {cn:?} matches agent_id"
        )));
    } else {
        out.push(Finding::Error(format!(
            "{}: certificate CN {cn:?} does not start with agent_id {agent_id:?} (expected {agent_id}.<partition>.serviceradar)",
            files.cert_file.display()
        )));
    }
    let validity = leaf.validity();
    if validity.is_valid() {
        out.push(Finding::Ok(format!(
            "certificate valid until {}",
            validity.not_after
        )));
    } else {
        out.push(Finding::Error(format!(
            "{}: certificate is not valid now (valid {} to {})",
            files.cert_file.display(),
            validity.not_before,
            validity.not_after
        )));
    }
    match &key {
        Ok(key) => match rcgen::KeyPair::try_from(key) {
            Ok(pair)
                if rcgen::PublicKeyData::subject_public_key_info(&pair)
                    == leaf.public_key().raw =>
            {
                out.push(Finding::Ok("private key matches the certificate".into()))
            }
            Ok(_) => out.push(Finding::Error(format!(
                "{} does not belong to {}",
                files.key_file.display(),
                files.cert_file.display()
            ))),
            Err(e) => out.push(Finding::Error(format!(
                "{}: unusable key: {e}",
                files.key_file.display()
            ))),
        },
        Err(e) => out.push(Finding::Error(e.to_string())),
    }
    match roots {
        Ok(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                std::sync::Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build();
            match verifier {
                Ok(v) => match v.verify_client_cert(&certs[0], &certs[1..], UnixTime::now()) {
                    Ok(_) => out.push(Finding::Ok(format!(
                        "certificate chains to {}",
                        files.ca_file.display()
                    ))),
                    Err(e) => out.push(Finding::Error(format!(
                        "{} does not chain to the CA in {}: {e}",
                        files.cert_file.display(),
                        files.ca_file.display()
                    ))),
                },
                Err(e) => out.push(Finding::Error(format!("{}: {e}", files.ca_file.display()))),
            }
        }
        Err(e) => out.push(Finding::Error(e.to_string())),
    }
}
