//! `retail-agent enroll`: embeds a folder of labelled reference images and
//! adds them to the reference DB in one atomic change.

use std::path::Path;

use anyhow::Context;

use crate::config::LoadedConfig;
use crate::recognizer::{open_refdb, Recognizer};
use crate::refdb::{NewRef, RefOp};

pub fn run(cfg: &LoadedConfig, refs: &Path, replace: bool) -> anyhow::Result<()> {
    let items = crate::dataset::scan(refs)?;
    let mut recognizer = Recognizer::from_config(cfg)?;
    let db = open_refdb(cfg, recognizer.engine()).context("opening the reference DB")?;
    let fingerprint = recognizer.engine().manifest().fingerprint().to_string();
    let total = items.len();
    let embedded = super::embed_files(&mut recognizer, items, "enrolling");
    let mut ops = Vec::with_capacity(total + 1);
    if replace {
        ops.push(RefOp::Clear);
    }
    let mut failed = 0;
    for f in embedded {
        match f.result {
            Ok((bytes, e)) => ops.push(RefOp::Upsert(NewRef::from_image(
                f.item.ref_id,
                f.item.label,
                bytes,
                e.embedding,
                &fingerprint,
            ))),
            Err(why) => {
                failed += 1;
                eprintln!("skipped {}: {why}", f.item.path.display());
            }
        }
    }
    let added = ops.len() - usize::from(replace);
    if added == 0 {
        anyhow::bail!(
            "none of the {total} images under {} could be enrolled",
            refs.display()
        );
    }
    let version = db.meta().version + 1;
    let meta = db.apply(ops, version, None)?;
    println!(
        "enrolled {added} references ({failed} skipped); DB version {} holds {} references of {} labels, digest {}",
        meta.version, meta.refs, meta.labels, meta.digest
    );
    Ok(())
}
