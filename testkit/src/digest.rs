//! An oracle of the reference DB's content digest (PROTOCOL.md,
//! "UpdateAck"), written out from the document alone: the lower-case hex
//! SHA-256, over all references in ascending byte order of `ref_id`, of
//! `u32le(len(ref_id)) ref_id u32le(len(label)) label kind sha256(source)`,
//! `kind` 1 for an image and 2 for an embedding, `source` the image bytes
//! as received or the embedding as little-endian f32.
//!
//! The tests compare the digest the agent reports with this one, so it
//! shares no code with the agent or with `retail-contract` (this crate
//! depends on neither). Which references a DB should hold after a series of
//! updates, and reading the digest out of an ack or a Status, are each
//! test's business.

use std::collections::BTreeMap;

/// The `kind` byte of a reference upserted from an image.
pub const KIND_IMAGE: u8 = 1;
/// The `kind` byte of a reference upserted as an embedding.
pub const KIND_EMBEDDING: u8 = 2;

/// The source bytes of an embedding reference: its values as
/// little-endian f32.
pub fn embedding_bytes(embedding: &[f32]) -> Vec<u8> {
    embedding.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The digest of references given as (ref_id, label, kind, source bytes),
/// in any order.
pub fn contract_digest<'a, S: AsRef<[u8]>>(
    refs: impl IntoIterator<Item = (&'a str, &'a str, u8, S)>,
) -> String {
    digest_of_hashed(
        refs.into_iter()
            .map(|(id, label, kind, source)| (id, label, kind, sha256(source.as_ref()))),
    )
}

/// The content of a reference DB as the digest sees it: ref_id → (label,
/// kind, sha256(source)). A test records in it what its updates do.
#[derive(Clone, Default, Debug, PartialEq)]
pub struct Content(pub BTreeMap<String, (String, u8, [u8; 32])>);

impl Content {
    /// Records an upsert of `ref_id` from an image.
    pub fn image(&mut self, ref_id: &str, label: &str, image: &[u8]) {
        self.0
            .insert(ref_id.into(), (label.into(), KIND_IMAGE, sha256(image)));
    }

    /// Records an upsert of `ref_id` as an embedding.
    pub fn embedding(&mut self, ref_id: &str, label: &str, e: &[f32]) {
        let source = sha256(&embedding_bytes(e));
        self.0
            .insert(ref_id.into(), (label.into(), KIND_EMBEDDING, source));
    }

    /// The contract's digest of this content.
    pub fn digest(&self) -> String {
        digest_of_hashed(
            self.0
                .iter()
                .map(|(id, (label, kind, src))| (id.as_str(), label.as_str(), *kind, *src)),
        )
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().try_into().unwrap()
}

/// The digest of references whose sources are already hashed.
fn digest_of_hashed<'a>(
    refs: impl IntoIterator<Item = (&'a str, &'a str, u8, [u8; 32])>,
) -> String {
    let mut sorted: Vec<_> = refs.into_iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut all = Vec::new();
    for (id, label, kind, source_sha256) in sorted {
        all.extend_from_slice(&(id.len() as u32).to_le_bytes());
        all.extend_from_slice(id.as_bytes());
        all.extend_from_slice(&(label.len() as u32).to_le_bytes());
        all.extend_from_slice(label.as_bytes());
        all.push(kind);
        all.extend_from_slice(&source_sha256);
    }
    sha256(&all).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SHA-256 of nothing.
    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn an_empty_db_has_the_sha256_of_nothing() {
        let none: Vec<(&str, &str, u8, Vec<u8>)> = Vec::new();
        assert_eq!(contract_digest(none), EMPTY);
        assert_eq!(Content::default().digest(), EMPTY);
    }

    #[test]
    fn the_digest_matches_a_known_answer_in_any_order() {
        // Computed with Python's hashlib and struct from PROTOCOL.md's text.
        let want = "fdba3df762175147a1fde9a615f75721331aeb14feda6f7f58c005ca67ad56a2";
        let apple = ("a", "apple", KIND_IMAGE, b"apple-jpeg".to_vec());
        let e = embedding_bytes(&[0.0, 1.0, 0.0]);
        let banana = ("b", "banana", KIND_EMBEDDING, e);
        assert_eq!(contract_digest([apple.clone(), banana.clone()]), want);
        assert_eq!(contract_digest([banana, apple]), want);
        let mut content = Content::default();
        content.embedding("b", "banana", &[0.0, 1.0, 0.0]);
        content.image("a", "apple", b"apple-jpeg");
        assert_eq!(content.digest(), want);
    }
}
