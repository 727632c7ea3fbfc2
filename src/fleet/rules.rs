//! The contract's handling order for a signed update, as pure functions of
//! (payload, identity, DB state, clock): which rule decides the ack, and
//! the update's ops checked against the running model. No I/O, no locks:
//! the receiver runs [`screen`] on arrival and [`state_rules`] again under
//! the DB's writer lock (check-and-set), and embeds images itself.

use crate::protocol::{self, RefUpdate, SignedUpdate, UpdateOp, UpdateStatus};
use crate::refdb::{LedgerView, MAX_ID_BYTES};

use super::keys::TrustedKeys;

/// Who this agent is, as far as updates are concerned.
#[derive(Debug, Clone)]
pub struct Identity {
    pub fleet: String,
    pub device_id: String,
}

/// The running model, as embedding upserts must match it.
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    pub fingerprint: String,
    pub dim: usize,
    pub max_image_bytes: usize,
}

/// A rule failed: acknowledge with `status` and store nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub update_id: Option<String>,
    pub status: UpdateStatus,
    pub reason: String,
}

/// What rules 1 to 6 say about a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Screened {
    /// Addressed to another device: no ack.
    Ignore,
    Refuse(Refusal),
    /// Passed rules 1 to 6; its ops are checked next (rule 7).
    Accept(RefUpdate),
}

/// Longest excerpt of untrusted input quoted in a reason.
const QUOTE_BYTES: usize = 64;

fn quote(s: &str) -> String {
    let cut = crate::protocol::excerpt(s, QUOTE_BYTES);
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{s:?}")
    }
}

/// Only `update_id`, read from a body that is not trusted (rule 1's
/// correlation id). Bounded so an ack never echoes a huge string.
fn peek_update_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Peek {
        update_id: String,
    }
    rmp_serde::from_slice::<Peek>(body)
        .ok()
        .map(|p| p.update_id)
        .filter(|id| id.len() <= MAX_ID_BYTES)
}

/// Rules 1 to 6, in the contract's order.
pub fn screen(
    payload: &[u8],
    keys: &TrustedKeys,
    me: &Identity,
    db: &dyn LedgerView,
    now_ms: u64,
) -> Screened {
    let refuse = |update_id: Option<String>, status, reason: String| {
        Screened::Refuse(Refusal {
            update_id,
            status,
            reason,
        })
    };
    // 1. The envelope decodes and its signature verifies.
    let envelope: SignedUpdate =
        match protocol::detect_encoding(payload).and_then(|enc| protocol::decode(payload, enc)) {
            Ok(e) => e,
            Err(e) => {
                return refuse(
                    None,
                    UpdateStatus::Rejected,
                    protocol::bounded_text(format!("not a SignedUpdate: {e}")),
                )
            }
        };
    let body = &envelope.body.0;
    if let Err(e) = keys.verify(&envelope.key_id, body, &envelope.sig.0) {
        return refuse(peek_update_id(body), UpdateStatus::Rejected, e.to_string());
    }
    // 2. The body is a RefUpdate of our fleet; another device's is ignored.
    let update: RefUpdate = match rmp_serde::from_slice(body) {
        Ok(u) => u,
        Err(e) => {
            // The decoder's message may quote the body (an unknown op's
            // name, in full): bounded, so the ack fits a packet.
            return refuse(
                peek_update_id(body),
                UpdateStatus::Rejected,
                protocol::bounded_text(format!("body is not a MessagePack RefUpdate: {e}")),
            );
        }
    };
    if update.update_id.is_empty() || update.update_id.len() > MAX_ID_BYTES {
        return refuse(
            None,
            UpdateStatus::Rejected,
            format!("update_id must be 1 to {MAX_ID_BYTES} bytes"),
        );
    }
    if update.fleet != me.fleet {
        return refuse(
            Some(update.update_id),
            UpdateStatus::Rejected,
            format!(
                "update is for fleet {}; this agent is in fleet {}",
                quote(&update.fleet),
                quote(&me.fleet)
            ),
        );
    }
    if update.target.as_ref().is_some_and(|t| *t != me.device_id) {
        return Screened::Ignore;
    }
    // 3 to 6.
    match state_rules(&update, db, Some(now_ms)) {
        Err(r) => Screened::Refuse(r),
        Ok(()) => Screened::Accept(update),
    }
}

/// Rules 3 (duplicate), 4 (expired; only on arrival, when `now_ms` is
/// given), 5 (stale) and 6 (gap) against the DB's state.
pub fn state_rules(u: &RefUpdate, db: &dyn LedgerView, now_ms: Option<u64>) -> Result<(), Refusal> {
    let refuse = |status, reason: String| {
        Err(Refusal {
            update_id: Some(u.update_id.clone()),
            status,
            reason,
        })
    };
    if db.was_applied(&u.update_id) {
        return refuse(
            UpdateStatus::Duplicate,
            format!("update {} was applied before", quote(&u.update_id)),
        );
    }
    if let (Some(expires), Some(now)) = (u.expires_ms, now_ms) {
        if expires < now {
            return refuse(
                UpdateStatus::Expired,
                format!("expired at {expires} ms; received at {now} ms"),
            );
        }
    }
    let current = db.version();
    if u.version <= current {
        return refuse(
            UpdateStatus::Stale,
            format!(
                "version {} is not above the DB's version {current}",
                u.version
            ),
        );
    }
    if let Some(base) = u.base_version {
        if base != current {
            return refuse(
                UpdateStatus::Gap,
                format!("base_version {base} is not the DB's version {current}; send a snapshot"),
            );
        }
    }
    Ok(())
}

/// An op that passed the shape checks; images are still encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum PlannedOp {
    UpsertImage {
        ref_id: String,
        label: String,
        image: Vec<u8>,
    },
    UpsertEmbedding {
        ref_id: String,
        label: String,
        embedding: Vec<f32>,
    },
    Delete(String),
    DeleteLabel(String),
    Clear,
}

/// Rule 7 without the images: every op is well formed and embeddings are
/// of the running model (fingerprint and dimension). The first bad op
/// decides the reason.
pub fn plan_ops(ops: Vec<UpdateOp>, model: &ModelIdentity) -> Result<Vec<PlannedOp>, String> {
    let check_id = |i: usize, what: &str, v: &str| {
        if v.is_empty() || v.len() > MAX_ID_BYTES {
            Err(format!("op {i}: {what} must be 1 to {MAX_ID_BYTES} bytes"))
        } else {
            Ok(())
        }
    };
    let mut out = Vec::with_capacity(ops.len());
    for (i, op) in ops.into_iter().enumerate() {
        out.push(match op {
            UpdateOp::Upsert {
                ref_id,
                label,
                image,
                embedding,
                model_fingerprint,
            } => {
                check_id(i, "ref_id", &ref_id)?;
                check_id(i, "label", &label)?;
                let at = || format!("op {i} (ref_id {})", quote(&ref_id));
                match (image, embedding) {
                    (Some(image), None) => {
                        if image.0.is_empty() || image.0.len() > model.max_image_bytes {
                            return Err(format!(
                                "{}: image must be 1 to {} bytes, got {}",
                                at(),
                                model.max_image_bytes,
                                image.0.len()
                            ));
                        }
                        PlannedOp::UpsertImage {
                            ref_id,
                            label,
                            image: image.0,
                        }
                    }
                    (None, Some(embedding)) => {
                        let fp = model_fingerprint.unwrap_or_default();
                        if fp != model.fingerprint {
                            return Err(format!(
                                "{}: embedding of model {}; the running model is {}",
                                at(),
                                quote(&fp),
                                model.fingerprint
                            ));
                        }
                        if embedding.len() != model.dim {
                            return Err(format!(
                                "{}: embedding has {} dimensions; the model produces {}",
                                at(),
                                embedding.len(),
                                model.dim
                            ));
                        }
                        if embedding.iter().any(|v| !v.is_finite()) {
                            return Err(format!("{}: embedding has non-finite values", at()));
                        }
                        PlannedOp::UpsertEmbedding {
                            ref_id,
                            label,
                            embedding,
                        }
                    }
                    _ => {
                        return Err(format!(
                            "{}: an upsert has exactly one of image or embedding",
                            at()
                        ))
                    }
                }
            }
            UpdateOp::Delete { ref_id } => {
                check_id(i, "ref_id", &ref_id)?;
                PlannedOp::Delete(ref_id)
            }
            UpdateOp::DeleteLabel { label } => {
                check_id(i, "label", &label)?;
                PlannedOp::DeleteLabel(label)
            }
            UpdateOp::Clear => PlannedOp::Clear,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Encoding;
    use crate::fleet::keys::SigningKey;
    use crate::protocol::Bytes;
    use std::collections::{BTreeMap, BTreeSet};

    struct Db {
        version: u64,
        applied: BTreeSet<String>,
    }

    impl LedgerView for Db {
        fn version(&self) -> u64 {
            self.version
        }
        fn was_applied(&self, update_id: &str) -> bool {
            self.applied.contains(update_id)
        }
    }

    struct World {
        key: SigningKey,
        keys: TrustedKeys,
        me: Identity,
        db: Db,
    }

    fn world() -> World {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let mut cfg = BTreeMap::new();
        cfg.insert("k1".to_string(), key.public_key_hex());
        World {
            keys: TrustedKeys::parse(&cfg).unwrap(),
            key,
            me: Identity {
                fleet: "north".into(),
                device_id: "cam1".into(),
            },
            db: Db {
                version: 5,
                applied: ["u-old".to_string()].into(),
            },
        }
    }

    fn update(id: &str) -> RefUpdate {
        RefUpdate {
            update_id: id.into(),
            fleet: "north".into(),
            target: None,
            base_version: Some(5),
            version: 6,
            issued_ms: 1_000,
            expires_ms: None,
            ops: vec![UpdateOp::Clear],
        }
    }

    fn signed(w: &World, key_id: &str, body: Vec<u8>) -> Vec<u8> {
        let env = SignedUpdate {
            key_id: key_id.into(),
            sig: Bytes(w.key.sign(&body)),
            body: Bytes(body),
        };
        protocol::encode(&env, Encoding::Msgpack)
    }

    fn run(w: &World, u: &RefUpdate) -> Screened {
        let body = rmp_serde::to_vec_named(u).unwrap();
        screen(&signed(w, "k1", body), &w.keys, &w.me, &w.db, 2_000)
    }

    fn status(s: &Screened) -> (Option<String>, UpdateStatus) {
        match s {
            Screened::Refuse(r) => (r.update_id.clone(), r.status),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_update_is_accepted() {
        let w = world();
        assert!(matches!(run(&w, &update("u1")), Screened::Accept(_)));
    }

    #[test]
    fn rule_1_undecodable_envelope_is_rejected_without_an_id() {
        let w = world();
        for payload in [&b"\x00\x01garbage"[..], b"{\"key_id\":1}", b""] {
            assert_eq!(
                status(&screen(payload, &w.keys, &w.me, &w.db, 0)),
                (None, UpdateStatus::Rejected)
            );
        }
    }

    #[test]
    fn rule_1_bad_signature_or_unknown_key_is_rejected_with_the_unverified_id() {
        let w = world();
        let body = rmp_serde::to_vec_named(&update("u1")).unwrap();
        let mut tampered = signed(&w, "k1", body.clone());
        let last = tampered.len() - 1;
        tampered[last] ^= 1; // inside the body
        assert_eq!(
            status(&screen(&tampered, &w.keys, &w.me, &w.db, 0)),
            (Some("u1".into()), UpdateStatus::Rejected)
        );
        let unknown = signed(&w, "k9", body);
        assert_eq!(
            status(&screen(&unknown, &w.keys, &w.me, &w.db, 0)),
            (Some("u1".into()), UpdateStatus::Rejected)
        );
    }

    #[test]
    fn rule_2_a_signed_body_that_is_no_refupdate_is_rejected() {
        let w = world();
        let payload = signed(&w, "k1", b"\x81\xa9update_id\xa2u7".to_vec());
        assert_eq!(
            status(&screen(&payload, &w.keys, &w.me, &w.db, 0)),
            (Some("u7".into()), UpdateStatus::Rejected)
        );
    }

    #[test]
    fn rule_2_another_fleet_is_rejected_and_another_target_ignored() {
        let w = world();
        let mut u = update("u1");
        u.fleet = "south".into();
        assert_eq!(
            status(&run(&w, &u)),
            (Some("u1".into()), UpdateStatus::Rejected)
        );
        let mut u = update("u1");
        u.target = Some("cam2".into());
        assert_eq!(run(&w, &u), Screened::Ignore);
        u.target = Some("cam1".into());
        assert!(matches!(run(&w, &u), Screened::Accept(_)));
    }

    #[test]
    fn rule_3_an_applied_id_is_a_duplicate_before_any_other_state_rule() {
        let w = world();
        let mut u = update("u-old");
        u.version = 1; // also stale, and expired: duplicate wins
        u.expires_ms = Some(1);
        assert_eq!(status(&run(&w, &u)).1, UpdateStatus::Duplicate);
    }

    #[test]
    fn rule_4_expired_before_stale() {
        let w = world();
        let mut u = update("u1");
        u.expires_ms = Some(1_999);
        u.version = 3;
        assert_eq!(status(&run(&w, &u)).1, UpdateStatus::Expired);
        u.expires_ms = Some(2_000);
        assert_eq!(status(&run(&w, &u)).1, UpdateStatus::Stale);
    }

    #[test]
    fn rule_5_version_not_above_current_is_stale_before_gap() {
        let w = world();
        let mut u = update("u1");
        u.version = 5;
        u.base_version = Some(2);
        assert_eq!(status(&run(&w, &u)).1, UpdateStatus::Stale);
    }

    #[test]
    fn rule_6_base_other_than_current_is_a_gap_and_null_base_applies() {
        let w = world();
        let mut u = update("u1");
        u.base_version = Some(4);
        assert_eq!(status(&run(&w, &u)).1, UpdateStatus::Gap);
        u.base_version = None;
        u.version = 60;
        assert!(matches!(run(&w, &u), Screened::Accept(_)));
    }

    #[test]
    fn rule_7_ops_are_checked_against_the_running_model() {
        let model = ModelIdentity {
            fingerprint: "abcd".into(),
            dim: 3,
            max_image_bytes: 10,
        };
        let emb = |fp: &str, v: Vec<f32>| UpdateOp::Upsert {
            ref_id: "r".into(),
            label: "l".into(),
            image: None,
            embedding: Some(v),
            model_fingerprint: Some(fp.into()),
        };
        assert!(plan_ops(vec![emb("abcd", vec![1.0, 0.0, 0.0])], &model).is_ok());
        let e = plan_ops(vec![emb("ffff", vec![1.0, 0.0, 0.0])], &model).unwrap_err();
        assert!(e.contains("ffff"), "{e}");
        let e = plan_ops(vec![emb("abcd", vec![1.0, 0.0])], &model).unwrap_err();
        assert!(e.contains("2 dimensions"), "{e}");
        assert!(plan_ops(vec![emb("abcd", vec![f32::NAN, 0.0, 0.0])], &model).is_err());
        let both = UpdateOp::Upsert {
            ref_id: "r".into(),
            label: "l".into(),
            image: Some(Bytes(vec![1])),
            embedding: Some(vec![0.0; 3]),
            model_fingerprint: Some("abcd".into()),
        };
        assert!(plan_ops(vec![both], &model).is_err());
        let big = UpdateOp::Upsert {
            ref_id: "r".into(),
            label: "l".into(),
            image: Some(Bytes(vec![0; 11])),
            embedding: None,
            model_fingerprint: None,
        };
        assert!(plan_ops(vec![big], &model).is_err());
        assert!(plan_ops(
            vec![UpdateOp::Delete {
                ref_id: String::new()
            }],
            &model
        )
        .is_err());
        assert_eq!(
            plan_ops(
                vec![UpdateOp::Clear, UpdateOp::DeleteLabel { label: "x".into() }],
                &model
            )
            .unwrap(),
            vec![PlannedOp::Clear, PlannedOp::DeleteLabel("x".into())]
        );
    }
}
