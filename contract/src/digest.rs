//! The contract's content digest of a reference DB.
//!
//! SHA-256 over all references in ascending byte order of `ref_id` of
//! `u32le(len(ref_id)) ref_id u32le(len(label)) label kind sha256(source)`.
//! It depends only on what was sent, never on the embeddings a device
//! computed, so every device with the same content reports the same digest.

use ring::digest::{Context, SHA256};

/// How a reference was given: its `kind` byte in the digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Embedded from an image by this agent's model.
    Image,
    /// Given as an embedding computed elsewhere.
    Embedding,
}

impl SourceKind {
    pub fn byte(self) -> u8 {
        match self {
            Self::Image => 1,
            Self::Embedding => 2,
        }
    }
}

/// SHA-256 of the bytes of a source (image as received, or the embedding as
/// little-endian f32).
pub fn source_sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Little-endian bytes of an embedding, as the digest hashes them.
pub fn embedding_bytes(embedding: &[f32]) -> Vec<u8> {
    embedding.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Incremental digest: feed references in ascending byte order of `ref_id`.
pub struct DigestBuilder(Context);

impl Default for DigestBuilder {
    fn default() -> Self {
        Self(Context::new(&SHA256))
    }
}

impl DigestBuilder {
    pub fn add(&mut self, ref_id: &str, label: &str, kind: SourceKind, source_sha256: &[u8; 32]) {
        self.0.update(&(ref_id.len() as u32).to_le_bytes());
        self.0.update(ref_id.as_bytes());
        self.0.update(&(label.len() as u32).to_le_bytes());
        self.0.update(label.as_bytes());
        self.0.update(&[kind.byte()]);
        self.0.update(source_sha256);
    }

    pub fn finish(self) -> String {
        crate::text::hex(self.0.finish().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_db_digest_is_sha256_of_nothing() {
        assert_eq!(
            DigestBuilder::default().finish(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn digest_follows_the_contract_layout() {
        let src = source_sha256(b"img");
        let mut b = DigestBuilder::default();
        b.add("r1", "cola", SourceKind::Image, &src);
        let mut expected = Vec::new();
        expected.extend_from_slice(&2u32.to_le_bytes());
        expected.extend_from_slice(b"r1");
        expected.extend_from_slice(&4u32.to_le_bytes());
        expected.extend_from_slice(b"cola");
        expected.push(1);
        expected.extend_from_slice(&src);
        assert_eq!(
            b.finish(),
            crate::text::hex(ring::digest::digest(&SHA256, &expected).as_ref())
        );
    }
}
