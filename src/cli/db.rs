//! `retail-agent db stats|export|import`.

use std::collections::BTreeMap;

use anyhow::Context;
use serde_json::json;

use super::DbAction;
use crate::config::LoadedConfig;
use crate::manifest::ModelManifest;
use crate::recognizer::{open_refdb, refdb_settings, Recognizer};
use crate::refdb::{export, RefDb};

pub fn run(cfg: &LoadedConfig, action: DbAction) -> anyhow::Result<()> {
    match action {
        DbAction::Stats { json: as_json } => stats(cfg, as_json),
        DbAction::Export { file } => {
            let db = open_without_engine(cfg)?;
            let written = export::export_to(&db, &file)?;
            println!(
                "exported {} references (DB version {}, digest {}) to {}",
                written.refs.len(),
                written.db_version,
                written.digest,
                file.display()
            );
            Ok(())
        }
        DbAction::Reembed => {
            let mut recognizer = Recognizer::from_config(cfg)?;
            let db = open_refdb(cfg, recognizer.engine())?;
            let (done, left) = db.reembed_stale(|image| recognizer.embed_one(image))?;
            println!("re-embedded {done} references with the running model; {left} cannot be (no stored image)");
            Ok(())
        }
        DbAction::Import { file } => {
            let data = export::read(&file)?;
            let mut recognizer = Recognizer::from_config(cfg)?;
            let db = open_refdb(cfg, recognizer.engine())?;
            let fingerprint = recognizer.engine().manifest().fingerprint().to_string();
            let ops = data.into_ops(&fingerprint, |image| recognizer.embed_one(image))?;
            let version = db.meta().version + 1;
            let meta = db.apply(ops, version, None)?;
            println!(
                "imported {}: DB version {} holds {} references of {} labels, digest {}",
                file.display(),
                meta.version,
                meta.refs,
                meta.labels,
                meta.digest
            );
            Ok(())
        }
    }
}

/// Opens the DB with the manifest's declared dimension, without loading
/// ONNX Runtime (stats and export need no model).
fn open_without_engine(cfg: &LoadedConfig) -> anyhow::Result<RefDb> {
    let manifest = ModelManifest::load(&cfg.manifest_path())?;
    let settings = refdb_settings(cfg, &manifest, manifest.file.embedding.dim);
    RefDb::open(&cfg.refdb_dir(), settings).context("opening the reference DB")
}

fn stats(cfg: &LoadedConfig, as_json: bool) -> anyhow::Result<()> {
    let db = open_without_engine(cfg)?;
    let snap = db.snapshot();
    let mut per_label: BTreeMap<&str, usize> = BTreeMap::new();
    for e in snap.entries.values() {
        *per_label.entry(e.label.as_str()).or_default() += 1;
    }
    let stale = snap.stale().count();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "path": cfg.refdb_dir(),
                "version": snap.meta.version,
                "digest": snap.meta.digest,
                "refs": snap.meta.refs,
                "labels": snap.meta.labels,
                "stale_refs": stale,
                "size_on_disk": db.size_on_disk(),
                "per_label": per_label,
            }))?
        );
    } else {
        println!("reference DB {}", cfg.refdb_dir().display());
        println!("  version  {}", snap.meta.version);
        println!("  digest   {}", snap.meta.digest);
        println!(
            "  refs     {} ({} labels)",
            snap.meta.refs, snap.meta.labels
        );
        if stale > 0 {
            println!(
                "  stale    {stale} (embedded by another model; run `retail-agent db reembed`)"
            );
        }
        println!("  on disk  {} bytes", db.size_on_disk());
        for (label, n) in per_label {
            println!("    {n:>5}  {label}");
        }
    }
    Ok(())
}
