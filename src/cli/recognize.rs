//! `retail-agent recognize`: recognises image files against the reference DB.

use std::path::PathBuf;

use serde_json::json;

use crate::config::LoadedConfig;
use crate::recognizer::{open_refdb, Recognizer};
use crate::refdb::Decision;

pub fn run(
    cfg: &LoadedConfig,
    images: &[PathBuf],
    top_k: Option<usize>,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut recognizer = Recognizer::from_config(cfg)?;
    let db = open_refdb(cfg, recognizer.engine())?;
    let snapshot = db.snapshot();
    let stale = snapshot.stale().count();
    if stale > 0 {
        eprintln!("warning: {stale} references were embedded by another model and are not searched (run `retail-agent db reembed`)");
    }
    if snapshot.index.is_empty() && stale == 0 {
        eprintln!("warning: the reference DB is empty; every image will be \"unknown\" (run `retail-agent enroll` first)");
    }
    let top_k = top_k.unwrap_or(cfg.config.recognition.top_k).clamp(1, 20);
    let threshold = cfg.config.recognition.unknown_threshold;
    let mut failures = 0;
    for path in images {
        let result = std::fs::read(path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|bytes| recognizer.embed_single(&bytes).map_err(|e| e.to_string()));
        let embedded = match result {
            Ok(e) => e,
            Err(why) => {
                failures += 1;
                if as_json {
                    println!(
                        "{}",
                        json!({"image": path, "decision": "error", "error": why})
                    );
                } else {
                    println!("{}: error: {why}", path.display());
                }
                continue;
            }
        };
        let r = snapshot.index.search(&embedded.embedding, top_k, threshold);
        if as_json {
            let candidates: Vec<_> = r
                .candidates
                .iter()
                .map(|c| json!({"label": c.label, "similarity": c.similarity, "ref_id": c.ref_id}))
                .collect();
            println!(
                "{}",
                json!({
                    "image": path,
                    "decision": if r.decision == Decision::Match { "match" } else { "unknown" },
                    "label": r.label,
                    "similarity": r.similarity,
                    "distance": r.distance,
                    "candidates": candidates,
                    "classifier": embedded.classifier,
                })
            );
        } else {
            let head = match &r.label {
                Some(l) => format!("{l} (similarity {:.3})", r.similarity),
                None => format!("unknown (best similarity {:.3})", r.similarity),
            };
            println!("{}: {head}", path.display());
            for (i, c) in r.candidates.iter().enumerate() {
                println!(
                    "  {}. {:<30} {:.3}  {}",
                    i + 1,
                    c.label,
                    c.similarity,
                    c.ref_id
                );
            }
            if let Some(c) = &embedded.classifier {
                println!("  classifier: {} ({:.3})", c.label, c.probability);
            }
        }
    }
    if failures > 0 {
        anyhow::bail!(
            "{failures} of {} images could not be recognised",
            images.len()
        );
    }
    Ok(())
}
