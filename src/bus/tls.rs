//! TLS for the broker connection: rustls with ring as its crypto provider,
//! a CA file, and optionally a client certificate for mutual TLS.

use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

fn read_certs(path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing PEM certificates in {}", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &std::path::Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parsing the PEM private key in {}", path.display()))?
        .ok_or_else(|| anyhow!("{} holds no PEM private key", path.display()))
}

/// A rustls client configuration for `tls` (paths already resolved).
pub fn client_config(tls: &TlsConfig) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(&tls.ca_file)? {
        roots
            .add(cert)
            .with_context(|| format!("adding a CA certificate from {}", tls.ca_file.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .context("client certificate and key do not match")?,
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(anyhow!(
                "bus.tls needs both cert_file and key_file for mutual TLS"
            ))
        }
    };
    Ok(Arc::new(config))
}
