//! `retail-agent eval`: embeds a reference set and a query set and prints
//! the accuracy table (and optionally writes the HTML report); with
//! `--unknown`, also the open-set operating points.

use std::path::Path;

use anyhow::Context;

use crate::config::LoadedConfig;
use crate::dataset::LabeledImage;
use crate::eval::{self, Sample};
use crate::recognizer::Recognizer;

/// Embeds `items`, keeping the ones that fail (path, reason) in `failed`.
pub(super) fn embed_samples(
    recognizer: &mut Recognizer,
    items: Vec<LabeledImage>,
    what: &str,
    failed: &mut Vec<(String, String)>,
) -> Vec<Sample> {
    super::embed_files(recognizer, items, what)
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
}

/// The three image sets of an evaluation, embedded.
pub(super) struct EmbeddedSets {
    pub refs: Vec<Sample>,
    pub queries: Vec<Sample>,
    pub unknown: Option<Vec<Sample>>,
    pub failed: Vec<(String, String)>,
}

/// Lists and embeds the reference, query and (optional) unenrolled sets;
/// a folder that is missing or holds no usable image is an error naming it.
pub(super) fn embed_sets(
    recognizer: &mut Recognizer,
    refs: &Path,
    queries: &Path,
    unknown: Option<&Path>,
) -> anyhow::Result<EmbeddedSets> {
    let ref_items = crate::dataset::scan(refs).context("--refs")?;
    let query_items = crate::dataset::scan(queries).context("--queries")?;
    let unknown_items = unknown
        .map(|u| crate::dataset::scan_any(u).context("--unknown"))
        .transpose()?;
    let mut failed = Vec::new();
    let refs_s = embed_samples(recognizer, ref_items, "references", &mut failed);
    let queries_s = embed_samples(recognizer, query_items, "queries", &mut failed);
    let unknown_s =
        unknown_items.map(|items| embed_samples(recognizer, items, "unknown", &mut failed));
    let none_usable = |set: &str, dir: &Path| {
        anyhow::anyhow!(
            "{set}: no usable image in {} ({} could not be read or decoded)",
            dir.display(),
            failed.len()
        )
    };
    if refs_s.is_empty() {
        return Err(none_usable("--refs", refs));
    }
    if queries_s.is_empty() {
        return Err(none_usable("--queries", queries));
    }
    if let (Some(u), Some(dir)) = (&unknown_s, unknown) {
        if u.is_empty() {
            return Err(none_usable("--unknown", dir));
        }
    }
    Ok(EmbeddedSets {
        refs: refs_s,
        queries: queries_s,
        unknown: unknown_s,
        failed,
    })
}

pub struct EvalArgs<'a> {
    pub refs: &'a Path,
    pub queries: &'a Path,
    pub unknown: Option<&'a Path>,
    pub refs_per_class: Vec<Option<usize>>,
    pub seed: u64,
    pub as_json: bool,
    pub html: Option<&'a Path>,
}

pub fn run(cfg: &LoadedConfig, args: EvalArgs<'_>) -> anyhow::Result<()> {
    let mut recognizer = Recognizer::from_config(cfg)?;
    let sets = embed_sets(&mut recognizer, args.refs, args.queries, args.unknown)?;
    let engine = recognizer.engine();
    let mut report = eval::evaluate(
        &sets.refs,
        &sets.queries,
        sets.unknown.as_deref(),
        &eval::Options {
            refs_per_class: args.refs_per_class,
            seed: args.seed,
            classifier_labels: engine.manifest().classifier_labels.clone(),
            unknown_threshold: cfg.config.recognition.unknown_threshold,
        },
    );
    if args.unknown.is_some() && report.open_set.is_none() {
        anyhow::bail!(
            "--unknown: no query label of {} has references in {}, so there is nothing to compare the unenrolled products with",
            args.queries.display(),
            args.refs.display()
        );
    }
    report.model_id = engine.manifest().id().to_string();
    report.fingerprint = engine.manifest().fingerprint().to_string();
    report.execution_provider = engine.provider().name().to_string();
    report.failed = sets.failed;
    if args.as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", eval::render_text(&report));
    }
    if let Some(path) = args.html {
        std::fs::write(path, eval::render_html(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("HTML report written to {}", path.display());
    }
    Ok(())
}
