//! The fleet operator's side: splitting a change into chained, signed,
//! size-bounded updates, and talking to the fleet over MQTT (devices'
//! retained Status and Metrics, publishing updates, collecting acks).
//! Formatting for people is the CLI's business.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde::{Deserialize, Serialize};

use crate::config::{Encoding, LoadedConfig};
use crate::protocol::{self, Bytes, RefUpdate, SignedUpdate, UpdateAck, UpdateOp};

use super::keys::SigningKey;
use retail_contract::topics::{device_and_kind, Kind};

/// Bytes of a RefUpdate besides its ops (ids, versions, times), generously.
const UPDATE_OVERHEAD: usize = 1024;
/// Bytes of the envelope besides the body (key id, signature, field names).
const ENVELOPE_OVERHEAD: usize = 512;

/// How to cut a list of ops into chained updates.
#[derive(Debug, Clone)]
pub struct ChainPlan {
    pub fleet: String,
    pub target: Option<String>,
    /// Base of the first update (`None`: unconditional, for snapshots).
    pub base_version: Option<u64>,
    /// Version after the first update; each next one adds 1.
    pub first_version: u64,
    /// Largest signed message (envelope included), in bytes.
    pub max_message_bytes: usize,
    /// Most ops per update (0: no limit but size).
    pub max_ops: usize,
    pub expires_ms: Option<u64>,
    /// Prefix of the generated update ids.
    pub id_prefix: String,
}

/// Encoded size of one op in a MessagePack body.
fn op_size(op: &UpdateOp) -> anyhow::Result<usize> {
    Ok(rmp_serde::to_vec_named(op).context("encoding an op")?.len())
}

/// Cuts `ops` into updates of at most `max_ops` ops whose signed message
/// fits `max_message_bytes`; update k has base `version k-1` (the first has
/// the plan's base) and version `first_version + k`. All ops stay in
/// order; an op too large for any message is an error naming it.
pub fn plan_chain(ops: Vec<UpdateOp>, plan: &ChainPlan) -> anyhow::Result<Vec<RefUpdate>> {
    let budget = plan
        .max_message_bytes
        .checked_sub(UPDATE_OVERHEAD + ENVELOPE_OVERHEAD)
        .filter(|b| *b > 0)
        .with_context(|| {
            format!(
                "--max-bytes {} leaves no room for ops (at least {} bytes go to the envelope)",
                plan.max_message_bytes,
                UPDATE_OVERHEAD + ENVELOPE_OVERHEAD
            )
        })?;
    let issued_ms = crate::clock::now_ms();
    let mut chunks: Vec<Vec<UpdateOp>> = vec![Vec::new()];
    let mut used = 0usize;
    for op in ops {
        let size = op_size(&op)?;
        if size > budget {
            let what = match &op {
                UpdateOp::Upsert { ref_id, .. } => format!("reference {ref_id:?}"),
                _ => "an op".into(),
            };
            anyhow::bail!(
                "{what} takes {size} bytes; one message may carry {budget} (raise --max-bytes up to the broker's and agents' packet limit, or shrink the image)"
            );
        }
        let full = used + size > budget
            || (plan.max_ops > 0 && chunks.last().is_some_and(|c| c.len() >= plan.max_ops));
        if full && chunks.last().is_some_and(|c| !c.is_empty()) {
            chunks.push(Vec::new());
            used = 0;
        }
        used += size;
        if let Some(last) = chunks.last_mut() {
            last.push(op);
        }
    }
    Ok(chunks
        .into_iter()
        .enumerate()
        .map(|(k, ops)| {
            let version = plan.first_version + k as u64;
            RefUpdate {
                update_id: format!("{}-v{version}", plan.id_prefix),
                fleet: plan.fleet.clone(),
                target: plan.target.clone(),
                base_version: if k == 0 {
                    plan.base_version
                } else {
                    Some(version - 1)
                },
                version,
                issued_ms,
                expires_ms: plan.expires_ms,
                ops,
            }
        })
        .collect())
}

/// A fresh prefix for update ids: time and randomness, so two pushes never
/// share an id.
pub fn new_id_prefix() -> String {
    use rand::RngCore;
    let mut b = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut b);
    format!("u{}-{}", crate::clock::now_ms(), crate::manifest::hex(&b))
}

/// The MessagePack SignedUpdate of `update`, signed by `key`.
pub fn sign_update(update: &RefUpdate, key: &SigningKey, key_id: &str) -> anyhow::Result<Vec<u8>> {
    let body = rmp_serde::to_vec_named(update).context("encoding the update")?;
    let envelope = SignedUpdate {
        key_id: key_id.to_string(),
        sig: Bytes(key.sign(&body)),
        body: Bytes(body),
    };
    Ok(protocol::encode(&envelope, Encoding::Msgpack))
}

/// The expected content digest of a DB holding exactly the upserts of
/// `ops` (what a snapshot should converge to).
pub fn expected_digest(ops: &[UpdateOp]) -> String {
    use crate::refdb::digest::{embedding_bytes, source_sha256, DigestBuilder, SourceKind};
    let mut refs: BTreeMap<&str, (&str, SourceKind, [u8; 32])> = BTreeMap::new();
    for op in ops {
        match op {
            UpdateOp::Upsert {
                ref_id,
                label,
                image,
                embedding,
                ..
            } => {
                let (kind, src) = match (image, embedding) {
                    (Some(i), _) => (SourceKind::Image, source_sha256(&i.0)),
                    (None, Some(e)) => (SourceKind::Embedding, source_sha256(&embedding_bytes(e))),
                    (None, None) => continue,
                };
                refs.insert(ref_id, (label, kind, src));
            }
            UpdateOp::Delete { ref_id } => {
                refs.remove(ref_id.as_str());
            }
            UpdateOp::DeleteLabel { label } => refs.retain(|_, v| v.0 != label),
            UpdateOp::Clear => refs.clear(),
        }
    }
    let mut d = DigestBuilder::default();
    for (id, (label, kind, src)) in refs {
        d.add(id, label, kind, &src);
    }
    d.finish()
}

/// A device's retained Status as read by the operator; lenient, so a Last
/// Will (`{state, device_id, boot_id}`) reads too.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub device_id: String,
    #[serde(default)]
    pub fleet: Option<String>,
    #[serde(default)]
    pub boot_id: Option<String>,
    #[serde(default)]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub model: Option<protocol::ModelRef>,
    #[serde(default)]
    pub execution_provider: Option<String>,
    #[serde(default)]
    pub refdb: Option<protocol::RefDbState>,
    #[serde(default)]
    pub started_ms: Option<u64>,
    #[serde(default)]
    pub ts_ms: Option<u64>,
    #[serde(default)]
    pub refdb_reset: Option<protocol::RefDbReset>,
}

/// What the operator knows of one device.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceView {
    pub device_id: String,
    pub status: Option<StatusView>,
    pub metrics: Option<protocol::Metrics>,
}

impl DeviceView {
    pub fn online(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.state == "online")
    }
    pub fn fleet(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| s.fleet.as_deref())
    }
    pub fn refdb(&self) -> Option<&protocol::RefDbState> {
        self.status.as_ref().and_then(|s| s.refdb.as_ref())
    }
}

/// An MQTT connection of the operator (clean session, its own client id).
pub struct FleetConnection {
    pub client: AsyncClient,
    eventloop: EventLoop,
    pub root: String,
    pub fleet: String,
    pub devices: BTreeMap<String, DeviceView>,
    /// Acks by device, in arrival order.
    pub acks: HashMap<String, Vec<UpdateAck>>,
}

impl FleetConnection {
    /// Connects with the bus settings of `cfg` (host, port, TLS, user) and
    /// subscribes to every device's Status, Metrics and update acks.
    pub async fn connect(cfg: &LoadedConfig) -> anyhow::Result<Self> {
        let id = format!("retail-fleet-{}", new_id_prefix());
        let mut options = crate::bus::connection_options(cfg, id)?;
        options.set_clean_session(true);
        options.set_manual_acks(false);
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let c = &cfg.config;
        let root = c.bus.root.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(anyhow::anyhow!(e)).with_context(|| {
                        format!("connecting to the broker at {}:{}", c.bus.host, c.bus.port)
                    })
                }
                Err(_) => anyhow::bail!(
                    "no answer from the broker at {}:{} within 10 s",
                    c.bus.host,
                    c.bus.port
                ),
            }
        }
        client
            .subscribe_many([
                rumqttc::SubscribeFilter::new(Kind::Status.every_device(&root), QoS::AtLeastOnce),
                rumqttc::SubscribeFilter::new(Kind::Metrics.every_device(&root), QoS::AtMostOnce),
                rumqttc::SubscribeFilter::new(Kind::RefdbAck.every_device(&root), QoS::AtLeastOnce),
            ])
            .await?;
        Ok(Self {
            client,
            eventloop,
            root,
            fleet: c.fleet.clone(),
            devices: BTreeMap::new(),
            acks: HashMap::new(),
        })
    }

    /// Polls for up to `wait`, recording what arrives; returns early once
    /// `done` says so.
    pub async fn pump(
        &mut self,
        wait: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + wait;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, self.eventloop.poll()).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(anyhow::anyhow!(e)).context("broker connection lost"),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => self.record(&p.topic, &p.payload),
                Ok(Ok(_)) => {}
            }
        }
        Ok(())
    }

    /// Reads retained Statuses until none arrives for `quiet` (at most
    /// `max`).
    pub async fn discover(&mut self, quiet: Duration, max: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + max;
        loop {
            let before = self.devices.len();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            self.pump(quiet.min(left), |_| false).await?;
            if self.devices.len() == before {
                return Ok(());
            }
        }
    }

    fn record(&mut self, topic: &str, payload: &[u8]) {
        let Some((device, kind)) = device_and_kind(&self.root, topic) else {
            return;
        };
        let Ok(enc) = protocol::detect_encoding(payload) else {
            return;
        };
        match kind {
            Kind::Status => {
                if let Ok(s) = protocol::decode::<StatusView>(payload, enc) {
                    let d = self.device(device);
                    // A Will carries no fleet: keep what the last Status said.
                    let keep = d.status.take();
                    let mut s = s;
                    if s.fleet.is_none() {
                        if let Some(k) = keep {
                            s.fleet = k.fleet;
                            s.model = s.model.or(k.model);
                            s.refdb = s.refdb.or(k.refdb);
                            s.execution_provider = s.execution_provider.or(k.execution_provider);
                        }
                    }
                    d.status = Some(s);
                }
            }
            Kind::Metrics => {
                if let Ok(m) = protocol::decode::<protocol::Metrics>(payload, enc) {
                    self.device(device).metrics = Some(m);
                }
            }
            Kind::RefdbAck => {
                if let Ok(a) = protocol::decode::<UpdateAck>(payload, enc) {
                    self.acks.entry(device.to_string()).or_default().push(a);
                }
            }
            _ => {}
        }
    }

    fn device(&mut self, id: &str) -> &mut DeviceView {
        self.devices
            .entry(id.to_string())
            .or_insert_with(|| DeviceView {
                device_id: id.to_string(),
                ..DeviceView::default()
            })
    }

    /// Devices of this connection's fleet that are online.
    pub fn online_fleet_devices(&self) -> Vec<String> {
        self.devices
            .values()
            .filter(|d| d.online() && d.fleet() == Some(self.fleet.as_str()))
            .map(|d| d.device_id.clone())
            .collect()
    }

    /// Publishes signed updates (QoS 1) to `topic`, in order.
    pub async fn publish_all(&mut self, topic: &str, messages: Vec<Vec<u8>>) -> anyhow::Result<()> {
        for m in messages {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, m)
                .await
                .context("queueing an update")?;
            // Let the event loop write it out while we queue the next one.
            self.pump(Duration::from_millis(1), |_| false).await?;
        }
        Ok(())
    }

    /// Waits until every device in `targets` has answered every update in
    /// `update_ids`, or `timeout` passes.
    pub async fn wait_acks(
        &mut self,
        targets: &[String],
        update_ids: &[String],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let wanted: BTreeSet<&str> = update_ids.iter().map(String::as_str).collect();
        self.pump(timeout, |me| {
            targets.iter().all(|t| {
                let got: BTreeSet<&str> = me
                    .acks
                    .get(t)
                    .map(|a| a.iter().filter_map(|a| a.update_id.as_deref()).collect())
                    .unwrap_or_default();
                wanted.iter().all(|w| got.contains(w))
            })
        })
        .await
    }

    /// The last answer of `device` to `update_id`.
    pub fn ack(&self, device: &str, update_id: &str) -> Option<&UpdateAck> {
        self.acks
            .get(device)?
            .iter()
            .rev()
            .find(|a| a.update_id.as_deref() == Some(update_id))
    }

    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while self.eventloop.poll().await.is_ok() {}
        })
        .await;
    }
}

/// The digest most online devices of the fleet report, with its count.
pub fn majority_digest<'a>(
    devices: impl Iterator<Item = &'a DeviceView>,
) -> Option<(String, usize)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for d in devices.filter(|d| d.online()) {
        if let Some(r) = d.refdb() {
            *counts.entry(r.digest.clone()).or_default() += 1;
        }
    }
    counts.into_iter().max_by_key(|(_, n)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert(id: &str, bytes: usize) -> UpdateOp {
        UpdateOp::Upsert {
            ref_id: id.into(),
            label: "l".into(),
            image: Some(Bytes(vec![7; bytes])),
            embedding: None,
            model_fingerprint: None,
        }
    }

    fn plan(max: usize, ops: usize) -> ChainPlan {
        ChainPlan {
            fleet: "f".into(),
            target: None,
            base_version: Some(4),
            first_version: 5,
            max_message_bytes: max,
            max_ops: ops,
            expires_ms: None,
            id_prefix: "p".into(),
        }
    }

    #[test]
    fn updates_are_chained_and_every_signed_message_fits_the_limit() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let ops: Vec<UpdateOp> = (0..40).map(|i| upsert(&format!("r{i}"), 1000)).collect();
        let max = 8 * 1024;
        let chain = plan_chain(ops.clone(), &plan(max, 0)).unwrap();
        assert!(chain.len() >= 5, "{} updates", chain.len());
        assert_eq!(chain[0].base_version, Some(4));
        for (k, u) in chain.iter().enumerate() {
            assert_eq!(u.version, 5 + k as u64);
            if k > 0 {
                assert_eq!(u.base_version, Some(u.version - 1));
            }
            let msg = sign_update(u, &key, "k").unwrap();
            assert!(msg.len() <= max, "update {k} is {} bytes", msg.len());
        }
        let all: Vec<UpdateOp> = chain.into_iter().flat_map(|u| u.ops).collect();
        assert_eq!(all, ops, "every op, in order");
        let by_count = plan_chain(ops, &plan(1 << 20, 7)).unwrap();
        assert_eq!(by_count.len(), 6);
        assert!(by_count.iter().all(|u| u.ops.len() <= 7));
    }

    #[test]
    fn an_op_larger_than_a_message_is_named() {
        let err = plan_chain(vec![upsert("huge", 10_000)], &plan(4096, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("huge"), "{err}");
    }

    #[test]
    fn expected_digest_follows_clear_and_deletes() {
        let ops = vec![
            upsert("a", 3),
            UpdateOp::Clear,
            upsert("b", 3),
            upsert("c", 3),
            UpdateOp::Delete { ref_id: "c".into() },
        ];
        assert_eq!(expected_digest(&ops), expected_digest(&[upsert("b", 3)]));
        assert_ne!(expected_digest(&ops), expected_digest(&[]));
    }
}
