//! Ed25519 keys of the fleet: the public keys an agent trusts (several at
//! once, so keys can be rotated), the operator's private key (PKCS#8), and
//! signing and verifying with ring.

use std::collections::BTreeMap;
use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("trusted key {key_id:?}: {message}")]
    BadPublicKey { key_id: String, message: String },
    #[error("key id {0:?} is not trusted by this agent (fleet_updates.trusted_keys)")]
    UnknownKey(String),
    #[error("signature does not verify with key {0:?}")]
    BadSignature(String),
    #[error("cannot read private key {path}: {message}")]
    PrivateKey { path: String, message: String },
    /// The private key file is missing, unreadable, or readable by others.
    #[error(transparent)]
    PrivateFile(#[from] crate::secrets::PrivateFileError),
    #[error("cannot generate a key pair")]
    Generate,
}

/// Public keys by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, [u8; 32]>,
}

impl TrustedKeys {
    /// Parses `key id -> hex or base64 of the 32-byte public key`.
    pub fn parse(config: &BTreeMap<String, String>) -> Result<Self, KeyError> {
        let mut keys = BTreeMap::new();
        for (id, text) in config {
            let bytes = decode_public_key(text).map_err(|message| KeyError::BadPublicKey {
                key_id: id.clone(),
                message,
            })?;
            keys.insert(id.clone(), bytes);
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Checks that `sig` is the Ed25519 signature of `message` by `key_id`.
    pub fn verify(&self, key_id: &str, message: &[u8], sig: &[u8]) -> Result<(), KeyError> {
        let key = self.keys.get(key_id).ok_or_else(|| {
            KeyError::UnknownKey(crate::protocol::excerpt(key_id, 64).to_string())
        })?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(message, sig)
            .map_err(|_| KeyError::BadSignature(key_id.to_string()))
    }
}

fn decode_public_key(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| e.to_string())?
    } else {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| "neither 64 hex digits nor base64".to_string())?
    };
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| format!("an Ed25519 public key is 32 bytes, got {}", bytes.len()))
}

/// The operator's private key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// Reads a PKCS#8 (DER) Ed25519 private key, as `fleet keygen` writes
    /// (mode 0600). A key file that its group or other users can access is
    /// refused (see [`crate::secrets::read_private_file`]).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let der = crate::secrets::read_private_file(path)?;
        Self::from_pkcs8(&der).map_err(|message| KeyError::PrivateKey {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(|pair| Self { pair })
            .map_err(|e| format!("not a PKCS#8 Ed25519 private key ({e})"))
    }

    /// A new key pair as PKCS#8 (DER) bytes.
    pub fn generate_pkcs8() -> Result<Vec<u8>, KeyError> {
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| KeyError::Generate)
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    pub fn public_key_hex(&self) -> String {
        crate::text::hex(&self.public_key())
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap()
    }

    #[test]
    fn a_signature_verifies_only_with_its_own_key_and_message() {
        let (a, b) = (key(), key());
        let mut cfg = BTreeMap::new();
        cfg.insert("a".to_string(), a.public_key_hex());
        use base64::Engine;
        cfg.insert(
            "b".to_string(),
            base64::engine::general_purpose::STANDARD.encode(b.public_key()),
        );
        let trusted = TrustedKeys::parse(&cfg).unwrap();
        let sig = a.sign(b"body");
        trusted.verify("a", b"body", &sig).unwrap();
        assert!(matches!(
            trusted.verify("a", b"bodY", &sig),
            Err(KeyError::BadSignature(_))
        ));
        assert!(matches!(
            trusted.verify("b", b"body", &sig),
            Err(KeyError::BadSignature(_))
        ));
        assert!(matches!(
            trusted.verify("c", b"body", &sig),
            Err(KeyError::UnknownKey(_))
        ));
        trusted.verify("b", b"x", &b.sign(b"x")).unwrap();
    }

    #[test]
    fn a_signing_key_file_readable_by_others_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.pk8");
        std::fs::write(&path, SigningKey::generate_pkcs8().unwrap()).unwrap();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = SigningKey::load(&path)
                .err()
                .expect("an open key is refused");
            assert!(
                matches!(
                    err,
                    KeyError::PrivateFile(crate::secrets::PrivateFileError::TooOpen { .. })
                ),
                "{mode:03o}: {err:?}"
            );
            assert!(
                err.to_string()
                    .contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        SigningKey::load(&path).expect("a 0600 key loads");
    }

    #[test]
    fn malformed_public_keys_are_refused_with_the_key_id() {
        let mut cfg = BTreeMap::new();
        cfg.insert("short".to_string(), "abcd".to_string());
        let err = TrustedKeys::parse(&cfg).unwrap_err().to_string();
        assert!(err.contains("short"), "{err}");
    }
}
