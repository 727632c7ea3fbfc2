//! Signed reference-DB updates as the receiver handles them, without a DB
//! or a model: rules 1 to 6 ([`rules::screen`] against a fixed ledger),
//! the state rules again as under the writer lock, rule 7
//! ([`rules::plan_ops`]), the ops turned into references and the digest
//! they lead to, and the ack in both encodings.
//!
//! The first input byte picks the mode:
//! - [`MODE_ENVELOPE`]: the rest is the payload as it arrives on the topic;
//! - [`MODE_BODY`]: the rest is a body, signed here with the fixed key so
//!   the signature verifies and the RefUpdate decoder is reached (the
//!   second byte picks the envelope's encoding and key id);
//! - [`MODE_STRUCTURED`]: an update built with `arbitrary`, signed, and
//!   checked against the contract's handling order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use retail_agent::config::Encoding;
use retail_agent::fleet::keys::{SigningKey, TrustedKeys};
use retail_agent::fleet::rules::{self, Identity, ModelIdentity, PlannedOp, Refusal, Screened};
use retail_agent::protocol::{
    self, Bytes, RefUpdate, SignedUpdate, UpdateAck, UpdateOp, UpdateStatus, MAX_ERROR_TEXT,
};
use retail_agent::refdb::{LedgerView, NewRef, MAX_ID_BYTES};

pub const MODE_ENVELOPE: u8 = 0;
pub const MODE_BODY: u8 = 1;
pub const MODE_STRUCTURED: u8 = 2;

/// The id the agent trusts the fixed key under.
pub const KEY_ID: &str = "fuzz";
/// A second trusted key, so a signature by the wrong trusted key is tried.
pub const OTHER_KEY_ID: &str = "other";
/// A key id the agent does not trust.
pub const UNKNOWN_KEY_ID: &str = "nobody";

pub const FLEET: &str = "north";
pub const DEVICE: &str = "cam1";
/// The ledger's version, its one remembered update, and the clock.
pub const DB_VERSION: u64 = 5;
pub const APPLIED_ID: &str = "u-old";
pub const NOW_MS: u64 = 2_000;

pub const FINGERPRINT: &str = "0123456789abcdef";
pub const DIM: usize = 4;
pub const MAX_IMAGE_BYTES: usize = 4096;

/// A PKCS#8 v1 Ed25519 private key from a fixed seed.
fn fixed_key(seed: u8) -> SigningKey {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&[seed; 32]);
    SigningKey::from_pkcs8(&der).expect("a fixed Ed25519 seed is a valid key")
}

/// The operator's key that the agent trusts as [`KEY_ID`].
pub fn signing_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| fixed_key(7))
}

fn other_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| fixed_key(9))
}

fn trusted() -> &'static TrustedKeys {
    static KEYS: OnceLock<TrustedKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut cfg = BTreeMap::new();
        cfg.insert(KEY_ID.to_string(), signing_key().public_key_hex());
        cfg.insert(OTHER_KEY_ID.to_string(), other_key().public_key_hex());
        TrustedKeys::parse(&cfg).expect("fixed keys parse")
    })
}

/// The DB state the rules see.
struct Ledger {
    version: u64,
    applied: BTreeSet<String>,
}

impl LedgerView for Ledger {
    fn version(&self) -> u64 {
        self.version
    }
    fn was_applied(&self, update_id: &str) -> bool {
        self.applied.contains(update_id)
    }
}

fn ledger() -> Ledger {
    Ledger {
        version: DB_VERSION,
        applied: [APPLIED_ID.to_string()].into(),
    }
}

fn me() -> Identity {
    Identity {
        fleet: FLEET.into(),
        device_id: DEVICE.into(),
    }
}

fn model() -> ModelIdentity {
    ModelIdentity {
        fingerprint: FINGERPRINT.into(),
        dim: DIM,
        max_image_bytes: MAX_IMAGE_BYTES,
    }
}

/// `body` in an envelope signed by the fixed key under `key_id`.
pub fn envelope(body: Vec<u8>, key_id: &str, encoding: Encoding) -> Vec<u8> {
    let env = SignedUpdate {
        key_id: key_id.into(),
        sig: Bytes(signing_key().sign(&body)),
        body: Bytes(body),
    };
    protocol::encode(&env, encoding)
}

/// The options byte of [`MODE_BODY`]: envelope encoding and key id.
pub fn body_options(encoding: Encoding, key_id: &str) -> u8 {
    let enc = u8::from(encoding == Encoding::Json);
    let key = match key_id {
        KEY_ID => 0,
        OTHER_KEY_ID => 2,
        _ => 4,
    };
    enc | key
}

fn options_of(byte: u8) -> (Encoding, &'static str) {
    let encoding = if byte & 1 == 1 {
        Encoding::Json
    } else {
        Encoding::Msgpack
    };
    let key_id = match (byte >> 1) % 3 {
        0 => KEY_ID,
        1 => OTHER_KEY_ID,
        _ => UNKNOWN_KEY_ID,
    };
    (encoding, key_id)
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        MODE_ENVELOPE => {
            handle(rest);
        }
        MODE_BODY => {
            let Some((&options, body)) = rest.split_first() else {
                return;
            };
            let (encoding, key_id) = options_of(options);
            handle(&envelope(body.to_vec(), key_id, encoding));
        }
        _ => structured(rest),
    }
}

/// What the receiver does with one payload, up to the DB write.
fn handle(payload: &[u8]) -> Screened {
    let db = ledger();
    let screened = rules::screen(payload, trusted(), &me(), &db, NOW_MS);
    match &screened {
        Screened::Ignore => {}
        Screened::Refuse(r) => check_refusal(r),
        Screened::Accept(u) => {
            // Under the writer lock the state rules pass again, unchanged.
            assert_eq!(rules::state_rules(u, &db, None), Ok(()));
            match rules::plan_ops(u.ops.clone(), &model()) {
                Ok(planned) => check_planned(u, planned),
                Err(reason) => check_refusal(&Refusal {
                    update_id: Some(u.update_id.clone()),
                    status: UpdateStatus::Rejected,
                    reason,
                }),
            }
        }
    }
    screened
}

/// A refusal is acknowledged with a bounded reason and a bounded id, in
/// either encoding, and reads back as sent.
fn check_refusal(r: &Refusal) {
    assert!(
        r.reason.len() <= MAX_ERROR_TEXT,
        "reason of {} bytes: {}…",
        r.reason.len(),
        protocol::excerpt(&r.reason, 200)
    );
    if let Some(id) = &r.update_id {
        assert!(!id.is_empty() || r.status == UpdateStatus::Rejected);
        assert!(id.len() <= MAX_ID_BYTES, "update_id of {} bytes", id.len());
    }
    let ack = UpdateAck {
        update_id: r.update_id.clone(),
        status: r.status,
        reason: Some(r.reason.clone()),
        version: DB_VERSION,
        digest: FINGERPRINT.into(),
        refs: 0,
        labels: 0,
    };
    for encoding in [Encoding::Json, Encoding::Msgpack] {
        let bytes = protocol::encode(&ack, encoding);
        let back: UpdateAck = protocol::decode(&bytes, encoding).expect("an ack reads back");
        assert_eq!(back, ack);
    }
}

/// Accepted ops become references as the receiver builds them (images get
/// a stand-in embedding), and the DB they describe has a digest.
fn check_planned(u: &RefUpdate, planned: Vec<PlannedOp>) {
    assert_eq!(planned.len(), u.ops.len());
    for op in planned {
        match op {
            PlannedOp::UpsertImage {
                ref_id,
                label,
                image,
            } => {
                assert!(!image.is_empty() && image.len() <= MAX_IMAGE_BYTES);
                let r = NewRef::from_image(ref_id, label, image, vec![0.5; DIM], FINGERPRINT);
                check_ids(&r.ref_id, &r.label);
            }
            PlannedOp::UpsertEmbedding {
                ref_id,
                label,
                embedding,
            } => {
                assert!(embedding.len() == DIM && embedding.iter().all(|v| v.is_finite()));
                let r = NewRef::from_embedding(ref_id, label, embedding, FINGERPRINT.into());
                check_ids(&r.ref_id, &r.label);
            }
            PlannedOp::Delete(id) | PlannedOp::DeleteLabel(id) => check_ids(&id, &id),
            PlannedOp::Clear => {}
        }
    }
    let digest = retail_agent::fleet::operator::expected_digest(&u.ops);
    assert_eq!(digest.len(), 64);
}

fn check_ids(ref_id: &str, label: &str) {
    for s in [ref_id, label] {
        assert!(!s.is_empty() && s.len() <= MAX_ID_BYTES);
    }
}

/// An update id: the one the ledger remembers, or any.
#[derive(Arbitrary, Debug)]
enum Id {
    Applied,
    Any(String),
}

/// Ops of every kind, well formed or not.
#[derive(Arbitrary, Debug)]
enum Op {
    Image {
        ref_id: String,
        label: String,
        image: Vec<u8>,
    },
    Embedding {
        ref_id: String,
        label: String,
        embedding: Vec<f32>,
        /// The running model's fingerprint, or another.
        fingerprint: Option<String>,
    },
    Both {
        ref_id: String,
        label: String,
    },
    Neither {
        ref_id: String,
    },
    Delete {
        ref_id: String,
    },
    DeleteLabel {
        label: String,
    },
    Clear,
}

/// A RefUpdate near the ledger's state: small versions around
/// [`DB_VERSION`], expiry around [`NOW_MS`].
#[derive(Arbitrary, Debug)]
struct Update {
    update_id: Id,
    /// Another fleet than ours, when set.
    other_fleet: Option<String>,
    /// `Some(true)`: this device; `Some(false)`: another.
    target: Option<bool>,
    base_version: Option<u8>,
    version: u8,
    issued_ms: u64,
    expires_ms: Option<u16>,
    ops: Vec<Op>,
    json_envelope: bool,
}

impl Op {
    fn into_op(self) -> UpdateOp {
        let upsert = |ref_id, label, image, embedding, fp: Option<String>| UpdateOp::Upsert {
            ref_id,
            label,
            image,
            embedding,
            model_fingerprint: fp,
        };
        match self {
            Op::Image {
                ref_id,
                label,
                image,
            } => upsert(ref_id, label, Some(Bytes(image)), None, None),
            Op::Embedding {
                ref_id,
                label,
                embedding,
                fingerprint,
            } => {
                let fp = Some(fingerprint.unwrap_or_else(|| FINGERPRINT.into()));
                upsert(ref_id, label, None, Some(embedding), fp)
            }
            Op::Both { ref_id, label } => upsert(
                ref_id,
                label,
                Some(Bytes(vec![1])),
                Some(vec![0.0; DIM]),
                Some(FINGERPRINT.into()),
            ),
            Op::Neither { ref_id } => upsert(ref_id, "l".into(), None, None, None),
            Op::Delete { ref_id } => UpdateOp::Delete { ref_id },
            Op::DeleteLabel { label } => UpdateOp::DeleteLabel { label },
            Op::Clear => UpdateOp::Clear,
        }
    }
}

impl Update {
    fn into_update(self) -> (RefUpdate, Encoding) {
        let update = RefUpdate {
            update_id: match self.update_id {
                Id::Applied => APPLIED_ID.into(),
                Id::Any(s) => s,
            },
            fleet: self
                .other_fleet
                .filter(|f| f != FLEET)
                .unwrap_or_else(|| FLEET.into()),
            target: self.target.map(|mine| {
                if mine {
                    DEVICE.to_string()
                } else {
                    "cam2".to_string()
                }
            }),
            base_version: self.base_version.map(u64::from),
            version: u64::from(self.version % 12),
            issued_ms: self.issued_ms,
            expires_ms: self.expires_ms.map(u64::from),
            ops: self.ops.into_iter().map(Op::into_op).collect(),
        };
        let encoding = if self.json_envelope {
            Encoding::Json
        } else {
            Encoding::Msgpack
        };
        (update, encoding)
    }
}

/// A validly signed update meets the contract's handling order: the first
/// rule that fails decides, and an accepted update is the one sent.
fn structured(data: &[u8]) {
    let Ok(arb) = Update::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let (update, encoding) = arb.into_update();
    let body = rmp_serde::to_vec_named(&update).expect("a RefUpdate encodes");
    let got = handle(&envelope(body.clone(), KEY_ID, encoding));
    let db = ledger();
    let id_ok = !update.update_id.is_empty() && update.update_id.len() <= MAX_ID_BYTES;
    match got {
        Screened::Refuse(r) if !id_ok => {
            assert_eq!((r.update_id, r.status), (None, UpdateStatus::Rejected));
        }
        Screened::Refuse(r) if update.fleet != FLEET => {
            assert_eq!(r.status, UpdateStatus::Rejected);
            assert_eq!(r.update_id.as_ref(), Some(&update.update_id));
        }
        Screened::Ignore => {
            assert!(id_ok && update.fleet == FLEET);
            assert!(update.target.as_deref().is_some_and(|t| t != DEVICE));
        }
        Screened::Refuse(r) => {
            assert!(id_ok && update.fleet == FLEET);
            assert!(update.target.as_deref().is_none_or(|t| t == DEVICE));
            let expected = rules::state_rules(&update, &db, Some(NOW_MS))
                .expect_err("refused by the state rules");
            assert_eq!(r, expected);
        }
        Screened::Accept(u) => {
            assert!(id_ok && update.fleet == FLEET);
            assert_eq!(rules::state_rules(&update, &db, Some(NOW_MS)), Ok(()));
            // Compared as bytes: a NaN in an embedding is not equal to itself.
            let again = rmp_serde::to_vec_named(&u).expect("a RefUpdate encodes");
            assert_eq!(again, body, "the accepted update is not the one signed");
        }
    }
}
