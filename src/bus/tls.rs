//! TLS for the broker connection: rustls with ring as its crypto provider,
//! a CA file, and optionally a client certificate for mutual TLS. The
//! client's private key must be readable by its owner only (`chmod 600`);
//! a key file that its group or other users can access is refused.

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

/// Reads the client's private key; refused when other users can read the
/// file (see [`crate::secrets::read_private_file`]).
fn read_key(path: &std::path::Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = crate::secrets::read_private_file(path)?;
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    use super::*;

    /// A self-signed certificate (used as its own CA) and its key, written
    /// to `dir` with the key at `key_mode`.
    fn tls_files(dir: &Path, key_mode: u32) -> TlsConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["device-a".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let write = |name: &str, text: String| -> PathBuf {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca_file = write("ca.pem", cert.pem());
        let cert_file = write("client.pem", cert.pem());
        let key_file = write("client.key", key.serialize_pem());
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(key_mode)).unwrap();
        TlsConfig {
            ca_file,
            cert_file: Some(cert_file),
            key_file: Some(key_file),
        }
    }

    #[test]
    fn a_client_key_readable_by_its_owner_only_is_used() {
        let dir = tempfile::tempdir().unwrap();
        client_config(&tls_files(dir.path(), 0o600)).expect("a 0600 key is accepted");
    }

    #[test]
    fn a_client_key_readable_by_others_is_refused_naming_the_file_and_the_fix() {
        for mode in [0o644, 0o640] {
            let dir = tempfile::tempdir().unwrap();
            let tls = tls_files(dir.path(), mode);
            let key = tls.key_file.clone().unwrap();
            let err = format!("{:#}", client_config(&tls).unwrap_err());
            assert!(
                err.contains(&format!("chmod 600 {}", key.display())),
                "{mode:03o}: {err}"
            );
        }
    }
}
