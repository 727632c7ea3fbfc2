//! `retail-agent eval`: embeds a reference set and a query set and prints
//! the accuracy table (and optionally writes the HTML report).

use std::path::Path;

use anyhow::Context;

use crate::config::LoadedConfig;
use crate::eval::{self, Sample};
use crate::recognizer::Recognizer;

pub fn run(
    cfg: &LoadedConfig,
    refs: &Path,
    queries: &Path,
    refs_per_class: Vec<Option<usize>>,
    seed: u64,
    as_json: bool,
    html: Option<&Path>,
) -> anyhow::Result<()> {
    let ref_items = crate::dataset::scan(refs)?;
    let query_items = crate::dataset::scan(queries)?;
    let mut recognizer = Recognizer::from_config(cfg)?;
    let mut failed = Vec::new();
    let mut to_samples = |files: Vec<super::EmbeddedFile>| -> Vec<Sample> {
        files
            .into_iter()
            .filter_map(|f| match f.result {
                Ok((_, e)) => Some(Sample {
                    label: f.item.label,
                    ref_id: f.item.ref_id,
                    embedding: e.embedding,
                    classifier: e.classifier,
                }),
                Err(why) => {
                    failed.push((f.item.path.display().to_string(), why));
                    None
                }
            })
            .collect()
    };
    let ref_samples = to_samples(super::embed_files(&mut recognizer, ref_items, "references"));
    let query_samples = to_samples(super::embed_files(&mut recognizer, query_items, "queries"));
    if ref_samples.is_empty() || query_samples.is_empty() {
        anyhow::bail!("no usable reference or query images");
    }
    let engine = recognizer.engine();
    let mut report = eval::evaluate(
        &ref_samples,
        &query_samples,
        &eval::Options {
            refs_per_class,
            seed,
            classifier_labels: engine.manifest().classifier_labels.clone(),
        },
    );
    report.model_id = engine.manifest().id().to_string();
    report.fingerprint = engine.manifest().fingerprint().to_string();
    report.execution_provider = engine.provider().name().to_string();
    report.failed = failed;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", eval::render_text(&report));
    }
    if let Some(path) = html {
        std::fs::write(path, eval::render_html(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("HTML report written to {}", path.display());
    }
    Ok(())
}
