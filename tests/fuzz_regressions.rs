//! Inputs that broke an invariant of a fuzz target (fuzz/, see
//! scripts/fuzz.sh), replayed through the library as the daemon calls it,
//! so each stays fixed in the normal suite.

use std::collections::BTreeMap;
use std::sync::Arc;

use retail_agent::config::Encoding;
use retail_agent::fleet::keys::{SigningKey, TrustedKeys};
use retail_agent::fleet::rules::{self, Identity, ModelIdentity, Screened};
use retail_agent::fleet::{ImageEmbedder, Outcome, UpdateReceiver};
use retail_agent::protocol::{self, Bytes, SignedUpdate, UpdateStatus, MAX_ERROR_TEXT};
use retail_agent::refdb::{LedgerView, RefDb, RefDbSettings};

const FP: &str = "0123456789abcdef";

struct Ledger;

impl LedgerView for Ledger {
    fn version(&self) -> u64 {
        0
    }
    fn was_applied(&self, _: &str) -> bool {
        false
    }
}

struct NoImages;

impl ImageEmbedder for NoImages {
    fn embed(&self, images: &[&[u8]]) -> Vec<Result<Vec<f32>, Option<String>>> {
        images
            .iter()
            .map(|_| Err(Some("no model".into())))
            .collect()
    }
}

fn me() -> Identity {
    Identity {
        fleet: "north".into(),
        device_id: "cam1".into(),
    }
}

/// A MessagePack str (fixstr, str 8 or str 16).
fn mp_str(out: &mut Vec<u8>, s: &str) {
    match s.len() {
        n @ 0..=31 => out.push(0xa0 | n as u8),
        n @ 32..=255 => out.extend_from_slice(&[0xd9, n as u8]),
        n => {
            out.push(0xda);
            out.extend_from_slice(&u16::try_from(n).expect("under 64 KiB").to_be_bytes());
        }
    }
    out.extend_from_slice(s.as_bytes());
}

/// signed_update, MODE_BODY: a validly signed body whose one op is named
/// by 2,000 bytes. The decoder's "unknown variant" message quotes the name
/// in full, and the ack's reason was 2,116 bytes; an op name as long as a
/// packet gave an ack too large to publish, so the update was never
/// acknowledged to the broker and came back on every reconnection.
#[test]
fn a_signed_body_with_a_huge_unknown_op_is_rejected_with_a_bounded_reason() {
    let mut body = vec![0x83];
    for (k, v) in [("update_id", "u1"), ("fleet", "north")] {
        mp_str(&mut body, k);
        mp_str(&mut body, v);
    }
    mp_str(&mut body, "ops");
    body.extend_from_slice(&[0x91, 0x81]);
    mp_str(&mut body, "op");
    mp_str(&mut body, &"a".repeat(2000));

    let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
    let mut cfg = BTreeMap::new();
    cfg.insert("k1".to_string(), key.public_key_hex());
    let keys = TrustedKeys::parse(&cfg).unwrap();
    let payload = protocol::encode(
        &SignedUpdate {
            key_id: "k1".into(),
            sig: Bytes(key.sign(&body)),
            body: Bytes(body),
        },
        Encoding::Msgpack,
    );

    let Screened::Refuse(r) = rules::screen(&payload, &keys, &me(), &Ledger, 0) else {
        panic!("the update is refused");
    };
    assert_eq!(
        (r.update_id.as_deref(), r.status),
        (Some("u1"), UpdateStatus::Rejected)
    );
    assert!(r.reason.contains("unknown variant"), "{}", r.reason);
    assert!(r.reason.len() <= MAX_ERROR_TEXT, "{} bytes", r.reason.len());

    // And the ack the receiver sends for it.
    let dir = tempfile::tempdir().unwrap();
    let settings = RefDbSettings {
        dim: 4,
        model_fingerprint: FP.into(),
        prototypes_per_class: 0,
        precision: retail_agent::refdb::index::Precision::F32,
        store_images: false,
        cache_mb: 1,
        remember_updates: 16,
    };
    let db = Arc::new(RefDb::open(dir.path(), settings).unwrap());
    let model = ModelIdentity {
        fingerprint: FP.into(),
        dim: 4,
        max_image_bytes: 1 << 20,
    };
    let receiver = UpdateReceiver::new(keys, me(), model, db, Arc::new(NoImages));
    match receiver.handle(&payload, 0) {
        Outcome::Ack { ack, changed } => {
            assert!(!changed);
            assert_eq!(ack.status, UpdateStatus::Rejected);
            let reason = ack.reason.unwrap_or_default();
            assert!(reason.len() <= MAX_ERROR_TEXT, "{} bytes", reason.len());
        }
        other => panic!("expected an ack, got {other:?}"),
    }
}
