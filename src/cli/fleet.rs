//! `retail-agent fleet keygen|push|snapshot|delete|status`: the fleet
//! operator's commands. They sign updates, publish them, wait for every
//! device's ack and print what each device answered; exit codes tell a
//! script whether every targeted device applied everything.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::ConfigArg;
use crate::config::LoadedConfig;
use crate::fleet::keys::SigningKey;
use crate::fleet::operator::{self, ChainPlan, FleetConnection};
use crate::protocol::{Bytes, RefUpdate, UpdateOp, UpdateStatus};

/// Exit status when a device answered something other than applied.
pub const EXIT_NOT_APPLIED: u8 = 2;
/// Exit status when a device did not answer in time.
pub const EXIT_NO_ANSWER: u8 = 3;

#[derive(Debug, Args, Clone)]
pub struct KeyArgs {
    /// The fleet's private key (PKCS#8, as `fleet keygen` writes it).
    #[arg(long, env = "RETAIL_FLEET_KEY")]
    pub key: PathBuf,
    /// Key id the agents know the public key by (default: the key file's
    /// name without extension).
    #[arg(long)]
    pub key_id: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct SendArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Send to this device only (its own topic, `target` set); default:
    /// broadcast to the fleet and wait for every online device of it.
    #[arg(long)]
    pub device: Option<String>,
    /// Seconds to wait for every device's acks.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Devices ignore the update when it arrives later than this many
    /// seconds from now (e.g. an offline device coming back days later).
    #[arg(long)]
    pub expires_s: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct RefsArgs {
    /// Reference images: REFS/<label>/*.jpg (ref_id = "<label>/<file>").
    #[arg(long)]
    pub refs: PathBuf,
    /// Most references per update (0: as many as fit --max-bytes).
    #[arg(long, default_value_t = 0)]
    pub chunk: usize,
    /// Largest signed message in bytes (default: bus.max_packet_bytes less
    /// 64 KiB for the MQTT header).
    #[arg(long)]
    pub max_bytes: Option<usize>,
    /// Compute the embeddings here with the config's model and send those
    /// (about ten times smaller; the devices do no work). Devices accept
    /// them only when they run the same model file.
    #[arg(long)]
    pub embed: bool,
}

#[derive(Debug, Subcommand)]
pub enum FleetAction {
    /// Make an Ed25519 key pair: DIR/<key-id>.pk8 (private, mode 0600) and
    /// DIR/<key-id>.pub (hex); prints the line for the agents' config.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "fleet")]
        key_id: String,
    },
    /// Add or replace references on the devices (chained updates on the
    /// devices' current version).
    Push {
        #[command(flatten)]
        send: SendArgs,
        #[command(flatten)]
        refs: RefsArgs,
    },
    /// Replace the devices' whole reference DB (first update clears it;
    /// repairs devices that answered `gap`).
    Snapshot {
        #[command(flatten)]
        send: SendArgs,
        #[command(flatten)]
        refs: RefsArgs,
    },
    /// Delete every reference of a label, or one reference.
    Delete {
        #[command(flatten)]
        send: SendArgs,
        #[arg(long, conflicts_with = "ref_id", required_unless_present = "ref_id")]
        label: Option<String>,
        #[arg(long = "ref")]
        ref_id: Option<String>,
    },
    /// Every device's state under the topic root: online/offline, DB
    /// version and digest, model, provider, throughput, p95 latency, drops,
    /// and which devices diverge from the majority digest.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
        /// Refresh every metrics interval until interrupted.
        #[arg(long)]
        watch: bool,
        /// Seconds to listen for Metrics (default: metrics.interval_s + 1).
        #[arg(long)]
        wait_s: Option<u64>,
    },
}

pub fn run(action: FleetAction) -> anyhow::Result<ExitCode> {
    match action {
        FleetAction::Keygen { out, key_id } => keygen(&out, &key_id).map(|()| ExitCode::SUCCESS),
        FleetAction::Push { send, refs } => send_refs(send, refs, false),
        FleetAction::Snapshot { send, refs } => send_refs(send, refs, true),
        FleetAction::Delete {
            send,
            label,
            ref_id,
        } => {
            let op = match (label, ref_id) {
                (Some(label), _) => UpdateOp::DeleteLabel { label },
                (None, Some(ref_id)) => UpdateOp::Delete { ref_id },
                (None, None) => anyhow::bail!("give --label or --ref"),
            };
            let cfg = super::load_config(&send.config)?;
            send_ops(&cfg, &send, vec![op], false, 0, None)
        }
        FleetAction::Status {
            config,
            json,
            watch,
            wait_s,
        } => {
            let cfg = super::load_config(&config)?;
            let wait = Duration::from_secs(
                wait_s.unwrap_or(cfg.config.metrics.interval_s.saturating_add(1)),
            );
            super::tokio_runtime()?.block_on(status(&cfg, json, watch, wait))
        }
    }
}

fn keygen(out: &Path, key_id: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if key_id.is_empty() || key_id.contains(['/', '\0']) {
        anyhow::bail!("--key-id must be a non-empty name without '/'");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let pkcs8 = SigningKey::generate_pkcs8()?;
    let key = SigningKey::from_pkcs8(&pkcs8).map_err(anyhow::Error::msg)?;
    let private = out.join(format!("{key_id}.pk8"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .with_context(|| {
            format!(
                "creating {} (an existing key is never overwritten)",
                private.display()
            )
        })?;
    f.write_all(&pkcs8)?;
    f.sync_all()?;
    let public = out.join(format!("{key_id}.pub"));
    std::fs::write(&public, format!("{}\n", key.public_key_hex()))
        .with_context(|| format!("writing {}", public.display()))?;
    println!(
        "private key: {} (mode 0600; keep it off the devices)",
        private.display()
    );
    println!("public key:  {}", public.display());
    println!();
    println!("Add to every agent's config:");
    println!("[fleet_updates.trusted_keys]");
    println!("{key_id} = \"{}\"", key.public_key_hex());
    Ok(())
}

/// Upserts of every image under `refs`: the image bytes, or (`embed`) the
/// embedding computed here with the config's model.
fn upserts(cfg: &LoadedConfig, refs: &Path, embed: bool) -> anyhow::Result<Vec<UpdateOp>> {
    let items = crate::dataset::scan(refs)?;
    let mut ops = Vec::with_capacity(items.len());
    if embed {
        let mut recognizer = crate::recognizer::Recognizer::from_config(cfg)?;
        let fingerprint = recognizer.engine().manifest().fingerprint().to_string();
        for f in super::embed_files(&mut recognizer, items, "embedding") {
            let (_, e) = f
                .result
                .map_err(|why| anyhow::anyhow!("{}: {why}", f.item.path.display()))?;
            ops.push(UpdateOp::Upsert {
                ref_id: f.item.ref_id,
                label: f.item.label,
                image: None,
                embedding: Some(e.embedding),
                model_fingerprint: Some(fingerprint.clone()),
            });
        }
    } else {
        for item in items {
            let bytes = std::fs::read(&item.path)
                .with_context(|| format!("reading {}", item.path.display()))?;
            ops.push(UpdateOp::Upsert {
                ref_id: item.ref_id,
                label: item.label,
                image: Some(Bytes(bytes)),
                embedding: None,
                model_fingerprint: None,
            });
        }
    }
    Ok(ops)
}

fn send_refs(send: SendArgs, refs: RefsArgs, snapshot: bool) -> anyhow::Result<ExitCode> {
    let cfg = super::load_config(&send.config)?;
    let mut ops = upserts(&cfg, &refs.refs, refs.embed)?;
    if snapshot {
        ops.insert(0, UpdateOp::Clear);
    }
    send_ops(&cfg, &send, ops, snapshot, refs.chunk, refs.max_bytes)
}

/// One device's outcome of a push.
#[derive(Debug, serde::Serialize)]
struct DeviceReport {
    device_id: String,
    /// Status of each update, in order (`null`: no answer).
    statuses: Vec<Option<UpdateStatus>>,
    reason: Option<String>,
    version: Option<u64>,
    digest: Option<String>,
    refs: Option<u64>,
}

fn send_ops(
    cfg: &LoadedConfig,
    send: &SendArgs,
    ops: Vec<UpdateOp>,
    snapshot: bool,
    chunk: usize,
    max_bytes: Option<usize>,
) -> anyhow::Result<ExitCode> {
    let key = SigningKey::load(&send.key.key)?;
    let key_id = match &send.key.key_id {
        Some(id) => id.clone(),
        None => send
            .key
            .key
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .context("--key-id is needed when the key file has no name")?,
    };
    let c = &cfg.config;
    let max_message_bytes = max_bytes.unwrap_or(c.bus.max_packet_bytes.saturating_sub(64 * 1024));
    let expected = snapshot.then(|| operator::expected_digest(&ops));
    super::tokio_runtime()?.block_on(async {
        let mut conn = FleetConnection::connect(cfg).await?;
        conn.discover(Duration::from_millis(500), Duration::from_secs(5))
            .await?;
        let targets: Vec<String> = match &send.device {
            Some(d) => vec![d.clone()],
            None => conn.online_fleet_devices(),
        };
        if targets.is_empty() {
            anyhow::bail!(
                "no online device of fleet {:?} under {}/ (see `retail-agent fleet status`)",
                c.fleet,
                c.bus.root
            );
        }
        let versions: Vec<u64> = targets
            .iter()
            .filter_map(|t| conn.devices.get(t).and_then(|d| d.refdb()).map(|r| r.version))
            .collect();
        let (base_version, first_version) = if snapshot {
            let highest = conn
                .devices
                .values()
                .filter(|d| d.fleet() == Some(c.fleet.as_str()))
                .filter_map(|d| d.refdb().map(|r| r.version))
                .chain(versions.iter().copied())
                .max()
                .unwrap_or(0);
            (None, highest + 1)
        } else {
            let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
            for v in &versions {
                *counts.entry(*v).or_default() += 1;
            }
            let Some((&base, _)) = counts.iter().max_by_key(|(v, n)| (**n, **v)) else {
                anyhow::bail!(
                    "device {} has published no Status: its DB version is unknown",
                    targets.join(", ")
                );
            };
            if counts.len() > 1 {
                eprintln!(
                    "warning: the devices are at different versions {:?}; chaining on version {base} (the others will answer gap: send a snapshot to repair them)",
                    counts.keys().collect::<Vec<_>>()
                );
            }
            (Some(base), base + 1)
        };
        let plan = ChainPlan {
            fleet: c.fleet.clone(),
            target: send.device.clone(),
            base_version,
            first_version,
            max_message_bytes,
            max_ops: chunk,
            expires_ms: send
                .expires_s
                .map(|s| crate::clock::now_ms() + s * 1000),
            id_prefix: operator::new_id_prefix(),
        };
        let chain: Vec<RefUpdate> = operator::plan_chain(ops, &plan)?;
        let ids: Vec<String> = chain.iter().map(|u| u.update_id.clone()).collect();
        let messages = chain
            .iter()
            .map(|u| operator::sign_update(u, &key, &key_id))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let topic = match &send.device {
            Some(d) => retail_contract::topics::device_refdb(&c.bus.root, d),
            None => retail_contract::topics::fleet_refdb(&c.bus.root, &c.fleet),
        };
        eprintln!(
            "sending {} update(s) (versions {}..={}) to {} device(s) on {topic}",
            chain.len(),
            first_version,
            first_version + chain.len() as u64 - 1,
            targets.len()
        );
        let started = std::time::Instant::now();
        conn.publish_all(&topic, messages).await?;
        conn.wait_acks(&targets, &ids, Duration::from_secs(send.timeout_s))
            .await?;
        let elapsed = started.elapsed();
        let reports: Vec<DeviceReport> = targets
            .iter()
            .map(|t| {
                let acks: Vec<_> = ids.iter().map(|id| conn.ack(t, id)).collect();
                let last = acks.iter().rev().flatten().next();
                DeviceReport {
                    device_id: t.clone(),
                    statuses: acks.iter().map(|a| a.map(|a| a.status)).collect(),
                    reason: acks.iter().flatten().find_map(|a| a.reason.clone()),
                    version: last.map(|a| a.version),
                    digest: last.map(|a| a.digest.clone()),
                    refs: last.map(|a| a.refs),
                }
            })
            .collect();
        conn.disconnect().await;
        let ok = |s: &Option<UpdateStatus>| {
            matches!(s, Some(UpdateStatus::Applied | UpdateStatus::Duplicate))
        };
        let silent = reports.iter().any(|r| r.statuses.iter().any(Option::is_none));
        let all_ok = reports.iter().all(|r| r.statuses.iter().all(ok));
        let digests: std::collections::BTreeSet<&str> =
            reports.iter().filter_map(|r| r.digest.as_deref()).collect();
        if send.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "updates": ids,
                    "expected_digest": expected,
                    "elapsed_ms": elapsed.as_millis() as u64,
                    "devices": reports,
                }))?
            );
        } else {
            println!("{:<24} {:<10} {:>8} {:>7}  {:<16} REASON", "DEVICE", "RESULT", "VERSION", "REFS", "DIGEST");
            for r in &reports {
                let result = if r.statuses.iter().all(ok) {
                    "applied".to_string()
                } else if let Some(bad) = r.statuses.iter().flatten().find(|s| !ok(&Some(**s))) {
                    bad.as_str().to_string()
                } else {
                    "no answer".to_string()
                };
                println!(
                    "{:<24} {:<10} {:>8} {:>7}  {:<16} {}",
                    r.device_id,
                    result,
                    r.version.map_or("-".into(), |v| v.to_string()),
                    r.refs.map_or("-".into(), |v| v.to_string()),
                    r.digest.as_deref().map_or("-", |d| &d[..d.len().min(16)]),
                    r.reason.as_deref().unwrap_or("")
                );
            }
            println!(
                "{} of {} device(s) applied all {} update(s) in {:.1} s; {} distinct digest(s){}",
                reports.iter().filter(|r| r.statuses.iter().all(ok)).count(),
                reports.len(),
                ids.len(),
                elapsed.as_secs_f64(),
                digests.len(),
                match &expected {
                    Some(e) if digests.len() == 1 && digests.contains(e.as_str()) =>
                        ", matching the snapshot's expected digest".to_string(),
                    Some(e) => format!("; the snapshot's expected digest is {e}"),
                    None => String::new(),
                }
            );
        }
        Ok(if all_ok {
            ExitCode::SUCCESS
        } else if silent {
            ExitCode::from(EXIT_NO_ANSWER)
        } else {
            ExitCode::from(EXIT_NOT_APPLIED)
        })
    })
}

async fn status(
    cfg: &LoadedConfig,
    json: bool,
    watch: bool,
    wait: Duration,
) -> anyhow::Result<ExitCode> {
    let mut conn = FleetConnection::connect(cfg).await?;
    conn.discover(Duration::from_millis(500), Duration::from_secs(5))
        .await?;
    loop {
        conn.pump(wait, |_| false).await?;
        let fleet = cfg.config.fleet.as_str();
        let devices: Vec<&operator::DeviceView> = conn
            .devices
            .values()
            .filter(|d| d.fleet().is_none_or(|f| f == fleet))
            .collect();
        let majority = operator::majority_digest(devices.iter().copied());
        let diverging: Vec<&str> = devices
            .iter()
            .filter(|d| d.online())
            .filter(|d| {
                d.refdb().map(|r| Some(r.digest.as_str()))
                    != Some(majority.as_ref().map(|m| m.0.as_str()))
            })
            .map(|d| d.device_id.as_str())
            .collect();
        if json {
            let list: Vec<serde_json::Value> = devices
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "device_id": d.device_id,
                        "online": d.online(),
                        "diverges": diverging.contains(&d.device_id.as_str()),
                        "status": d.status,
                        "metrics": d.metrics,
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "fleet": fleet,
                    "majority_digest": majority.as_ref().map(|m| &m.0),
                    "online": devices.iter().filter(|d| d.online()).count(),
                    "offline": devices.iter().filter(|d| !d.online()).count(),
                    "diverging": diverging,
                    "devices": list,
                }))?
            );
        } else {
            print_status_table(&devices, &diverging);
            let online = devices.iter().filter(|d| d.online()).count();
            println!(
                "fleet {fleet}: {online} online, {} offline; {} agree on digest {}{}",
                devices.len() - online,
                majority.as_ref().map_or(0, |m| m.1),
                majority.as_ref().map_or("-", |m| &m.0[..m.0.len().min(16)]),
                if diverging.is_empty() {
                    String::new()
                } else {
                    format!("; diverging: {}", diverging.join(", "))
                }
            );
        }
        let agreed = diverging.is_empty();
        if !watch {
            conn.disconnect().await;
            return Ok(if agreed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOT_APPLIED)
            });
        }
        println!();
    }
}

fn print_status_table(devices: &[&operator::DeviceView], diverging: &[&str]) {
    println!(
        "{:<20} {:<7} {:>7} {:<16} {:>6} {:>6} {:<28} {:<8} {:>8} {:>8} {:>7}  AGREES",
        "DEVICE",
        "STATE",
        "VERSION",
        "DIGEST",
        "REFS",
        "LABELS",
        "MODEL",
        "PROVIDER",
        "CROPS/S",
        "P95_MS",
        "DROPPED"
    );
    for d in devices {
        let s = d.status.as_ref();
        let r = d.refdb();
        let m = d.metrics.as_ref();
        println!(
            "{:<20} {:<7} {:>7} {:<16} {:>6} {:>6} {:<28} {:<8} {:>8} {:>8} {:>7}  {}",
            d.device_id,
            s.map_or("?", |s| s.state.as_str()),
            r.map_or("-".into(), |r| r.version.to_string()),
            r.map_or("-", |r| &r.digest[..r.digest.len().min(16)]),
            r.map_or("-".into(), |r| r.refs.to_string()),
            r.map_or("-".into(), |r| r.labels.to_string()),
            s.and_then(|s| s.model.as_ref())
                .map_or("-".into(), |m| format!(
                    "{}@{}",
                    m.id,
                    &m.fingerprint[..m.fingerprint.len().min(8)]
                )),
            s.and_then(|s| s.execution_provider.as_deref())
                .unwrap_or("-"),
            m.map_or("-".into(), |m| format!("{:.1}", m.throughput_cps)),
            m.map_or("-".into(), |m| format!(
                "{:.1}",
                m.latency_us.total.p95 as f64 / 1000.0
            )),
            m.map_or("-".into(), |m| m.dropped.to_string()),
            if !d.online() {
                "-"
            } else if diverging.contains(&d.device_id.as_str()) {
                "DIVERGES"
            } else {
                "yes"
            }
        );
    }
}
