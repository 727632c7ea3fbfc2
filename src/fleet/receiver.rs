//! Handling one signed update on the agent: the handling order
//! ([`super::rules`]), embedding image upserts with the running model (on
//! the pipeline's inference thread, through [`ImageEmbedder`]), and the
//! all-or-nothing apply under the DB's writer lock. Blocking: run it on a
//! blocking thread. Which MQTT session it came on is not its business.

use std::sync::Arc;

use tracing::{info, warn};

use crate::protocol::{UpdateAck, UpdateStatus};
use crate::refdb::{DbMeta, NewRef, RefDb, RefDbError, RefOp};

use super::keys::TrustedKeys;
use super::rules::{self, Identity, ModelIdentity, PlannedOp, Refusal, Screened};

/// Embeds encoded images with the running model (the daemon's pipeline).
pub trait ImageEmbedder: Send + Sync {
    /// One result per image, in order. `Err(None)`: the embedder is
    /// stopping (the update should be retried, not refused);
    /// `Err(Some(reason))`: this image cannot be embedded.
    fn embed(&self, images: &[&[u8]]) -> Vec<Result<Vec<f32>, Option<String>>>;
}

/// What became of one update.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Addressed to another device: no ack.
    Ignored,
    /// The agent is stopping: no ack, so the broker delivers it again.
    Retry,
    /// Acknowledge with this; `changed` when the DB changed.
    Ack { ack: UpdateAck, changed: bool },
}

pub struct UpdateReceiver {
    keys: TrustedKeys,
    me: Identity,
    model: ModelIdentity,
    refdb: Arc<RefDb>,
    embedder: Arc<dyn ImageEmbedder>,
}

fn ack_of(
    meta: DbMeta,
    update_id: Option<String>,
    status: UpdateStatus,
    reason: Option<String>,
) -> UpdateAck {
    UpdateAck {
        update_id,
        status,
        reason,
        version: meta.version,
        digest: meta.digest,
        refs: meta.refs,
        labels: meta.labels,
    }
}

impl UpdateReceiver {
    pub fn new(
        keys: TrustedKeys,
        me: Identity,
        model: ModelIdentity,
        refdb: Arc<RefDb>,
        embedder: Arc<dyn ImageEmbedder>,
    ) -> Self {
        Self {
            keys,
            me,
            model,
            refdb,
            embedder,
        }
    }

    fn refused(&self, r: Refusal) -> Outcome {
        // Bounded whatever the reason quotes, so the ack fits a packet.
        let reason = crate::protocol::bounded_text(r.reason);
        warn!(
            update_id = r.update_id.as_deref().unwrap_or("-"),
            status = r.status.as_str(),
            "update not applied: {reason}"
        );
        Outcome::Ack {
            ack: ack_of(self.refdb.meta(), r.update_id, r.status, Some(reason)),
            changed: false,
        }
    }

    /// Handles one message from a refdb topic, received at `now_ms`.
    pub fn handle(&self, payload: &[u8], now_ms: u64) -> Outcome {
        let mut update =
            match rules::screen(payload, &self.keys, &self.me, self.refdb.as_ref(), now_ms) {
                Screened::Ignore => return Outcome::Ignored,
                Screened::Refuse(r) => return self.refused(r),
                Screened::Accept(u) => u,
            };
        let span =
            tracing::info_span!("update", update_id = %update.update_id, version = update.version);
        let _entered = span.enter();
        let reject = |reason: String| Refusal {
            update_id: Some(update.update_id.clone()),
            status: UpdateStatus::Rejected,
            reason,
        };
        let planned = match rules::plan_ops(std::mem::take(&mut update.ops), &self.model) {
            Ok(p) => p,
            Err(reason) => return self.refused(reject(reason)),
        };
        let ops = match self.embed_planned(planned) {
            Ok(ops) => ops,
            Err(None) => return Outcome::Retry,
            Err(Some(reason)) => return self.refused(reject(reason)),
        };
        let applied =
            self.refdb
                .apply_guarded(ops, update.version, Some(&update.update_id), |db| {
                    rules::state_rules(&update, db, None)
                });
        match applied {
            Ok(Ok(meta)) => {
                info!(
                    refs = meta.refs,
                    labels = meta.labels,
                    digest = %meta.digest,
                    "update applied"
                );
                Outcome::Ack {
                    ack: ack_of(
                        meta,
                        Some(update.update_id.clone()),
                        UpdateStatus::Applied,
                        None,
                    ),
                    changed: true,
                }
            }
            Ok(Err(refusal)) => self.refused(refusal),
            Err(
                e @ (RefDbError::Dimension { .. }
                | RefDbError::Fingerprint { .. }
                | RefDbError::InvalidRef { .. }),
            ) => self.refused(reject(e.to_string())),
            Err(e) => {
                tracing::error!("cannot store the update: {e}");
                self.refused(reject(format!("storage failed, nothing applied: {e}")))
            }
        }
    }

    /// Embeds the image upserts; the first image that fails decides the
    /// reason (`None`: the embedder is stopping).
    fn embed_planned(&self, planned: Vec<PlannedOp>) -> Result<Vec<RefOp>, Option<String>> {
        let images: Vec<&[u8]> = planned
            .iter()
            .filter_map(|op| match op {
                PlannedOp::UpsertImage { image, .. } => Some(image.as_slice()),
                _ => None,
            })
            .collect();
        let mut embedded = if images.is_empty() {
            Vec::new()
        } else {
            self.embedder.embed(&images)
        }
        .into_iter();
        let fingerprint = &self.model.fingerprint;
        let mut ops = Vec::with_capacity(planned.len());
        for op in planned {
            ops.push(match op {
                PlannedOp::UpsertImage {
                    ref_id,
                    label,
                    image,
                } => match embedded.next() {
                    Some(Ok(embedding)) => RefOp::Upsert(NewRef::from_image(
                        ref_id,
                        label,
                        image,
                        embedding,
                        fingerprint,
                    )),
                    Some(Err(Some(why))) => {
                        return Err(Some(format!("image of ref_id {ref_id:?}: {why}")))
                    }
                    Some(Err(None)) | None => return Err(None),
                },
                PlannedOp::UpsertEmbedding {
                    ref_id,
                    label,
                    embedding,
                } => RefOp::Upsert(NewRef::from_embedding(
                    ref_id,
                    label,
                    embedding,
                    fingerprint.clone(),
                )),
                PlannedOp::Delete(id) => RefOp::Delete(id),
                PlannedOp::DeleteLabel(label) => RefOp::DeleteLabel(label),
                PlannedOp::Clear => RefOp::Clear,
            });
        }
        Ok(ops)
    }
}
