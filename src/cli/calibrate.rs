//! `retail-agent calibrate`: picks `recognition.unknown_threshold` for a
//! false-unknown target from the operator's own images (see
//! [`crate::open_set`] for the exact rule) and, with `--write`, puts it in
//! the config file without disturbing the rest of it.

use std::path::Path;

use anyhow::Context;

use crate::config::LoadedConfig;
use crate::open_set::OperatingPoint;
use crate::recognizer::Recognizer;

pub struct CalibrateArgs<'a> {
    pub config_path: &'a Path,
    pub refs: &'a Path,
    pub queries: &'a Path,
    pub unknown: Option<&'a Path>,
    pub false_unknown: f64,
    pub write: bool,
    pub as_json: bool,
}

#[derive(serde::Serialize)]
struct Calibration<'a> {
    /// The chosen threshold and what it does on these images.
    chosen: &'a OperatingPoint,
    /// What the threshold in the config does on the same images.
    configured: &'a OperatingPoint,
    known_queries: usize,
    unknown_queries: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    auroc: Option<f64>,
    written_to: Option<String>,
    failed: &'a [(String, String)],
}

pub fn run(cfg: &LoadedConfig, args: CalibrateArgs<'_>) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&args.false_unknown) {
        anyhow::bail!(
            "--false-unknown {} is not a rate in [0, 1) (0.05 means 5% of enrolled products may be called unknown)",
            args.false_unknown
        );
    }
    let mut recognizer = Recognizer::from_config(cfg)?;
    let sets = super::evaluate::embed_sets(&mut recognizer, args.refs, args.queries, args.unknown)?;
    let scores = crate::eval::open_set_scores(
        &sets.refs,
        &sets.queries,
        sets.unknown.as_deref().unwrap_or_default(),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}: the folders of {} must be named like those of {}",
            args.queries.display(),
            args.refs.display()
        )
    })?;
    let chosen = scores.at_target(args.false_unknown)?;
    let configured = scores.at_threshold(cfg.config.recognition.unknown_threshold);
    let known_queries = scores.known_queries();
    let written_to = if args.write {
        write_threshold(args.config_path, chosen.threshold)?;
        Some(args.config_path.display().to_string())
    } else {
        None
    };
    let calibration = Calibration {
        chosen: &chosen,
        configured: &configured,
        known_queries,
        unknown_queries: sets.unknown.as_ref().map_or(0, Vec::len),
        auroc: scores.auroc(),
        written_to,
        failed: &sets.failed,
    };
    if args.as_json {
        println!("{}", serde_json::to_string_pretty(&calibration)?);
    } else {
        print!("{}", render_text(&calibration));
    }
    if std::env::var_os("RETAIL_AGENT__RECOGNITION__UNKNOWN_THRESHOLD").is_some() {
        eprintln!(
            "warning: RETAIL_AGENT__RECOGNITION__UNKNOWN_THRESHOLD is set and overrides the config file's value"
        );
    }
    Ok(())
}

fn render_text(c: &Calibration<'_>) -> String {
    use std::fmt::Write;
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let mut s = String::new();
    let _ = writeln!(s, "[recognition]");
    let _ = writeln!(s, "unknown_threshold = {}", c.chosen.threshold);
    let describe = |s: &mut String, name: &str, p: &OperatingPoint| {
        let _ = write!(
            s,
            "# {name} {}: {} of {} enrolled queries called unknown, accuracy on them {:.4}",
            p.threshold,
            pct(p.false_unknown_measured),
            c.known_queries,
            p.accuracy_known
        );
        if let Some(d) = p.unknown_detection {
            let _ = write!(
                s,
                ", {} of {} unenrolled products caught",
                pct(d),
                c.unknown_queries
            );
        }
        s.push('\n');
    };
    let _ = writeln!(
        s,
        "# target: at most {} of enrolled products called unknown",
        pct(c.chosen.false_unknown)
    );
    describe(&mut s, "chosen", c.chosen);
    describe(&mut s, "configured", c.configured);
    if let Some(a) = c.auroc {
        let _ = writeln!(s, "# AUROC enrolled vs unenrolled: {a:.4}");
    }
    if c.unknown_queries == 0 {
        let _ = writeln!(
            s,
            "# no --unknown images: the threshold only bounds false-unknowns; how many unenrolled products it catches is not measured"
        );
    }
    if let Some(path) = &c.written_to {
        let _ = writeln!(s, "# written to {path}");
    }
    if !c.failed.is_empty() {
        let _ = writeln!(s, "# {} images could not be used:", c.failed.len());
        for (path, why) in c.failed {
            let _ = writeln!(s, "#   {path}: {why}");
        }
    }
    s
}

/// The config text with `recognition.unknown_threshold` set to `t`; every
/// comment, key order and format of the rest stays as it was. Works on
/// `[recognition]` tables, dotted keys and inline tables alike.
pub fn with_threshold(text: &str, t: f32) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse().context("the config is not valid TOML")?;
    if !doc.contains_key("recognition") {
        // Comments after the last key belong to the document's tail, which
        // prints after every table: move them above the new table instead.
        let tail = doc.trailing().as_str().unwrap_or_default().to_string();
        doc.set_trailing("");
        let mut table = toml_edit::Table::new();
        table.decor_mut().set_prefix(tail);
        doc.insert("recognition", toml_edit::Item::Table(table));
    }
    let recognition = doc
        .get_mut("recognition")
        .and_then(toml_edit::Item::as_table_like_mut)
        .context("`recognition` in the config is not a table")?;
    // The f32's shortest decimal form, which reads back as the same f32.
    let shortest: f64 = t.to_string().parse().context("formatting the threshold")?;
    let mut value = toml_edit::Value::from(shortest);
    match recognition.get_mut("unknown_threshold") {
        Some(toml_edit::Item::Value(old)) => {
            *value.decor_mut() = old.decor().clone();
            *old = value;
        }
        Some(other) => *other = toml_edit::Item::Value(value),
        None => {
            recognition.insert("unknown_threshold", toml_edit::Item::Value(value));
        }
    }
    Ok(doc.to_string())
}

/// Sets the threshold in the config file at `path`: the new text must load
/// as a valid config before it replaces the old one (atomically, keeping
/// the file's permissions).
fn write_threshold(path: &Path, t: f32) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let updated = with_threshold(&text, t)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    LoadedConfig::from_toml(&updated, path, base, std::env::vars())
        .context("the config with the new threshold does not validate; nothing written")?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, updated.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(tmp.path(), meta.permissions());
    }
    tmp.persist(path)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_the_threshold_keeps_comments_and_layout() {
        let text = "# my store\ndevice_id = \"till-3\" # the till\n\n[recognition]\n# tuned on 2026-11-30\nunknown_threshold = 0.5 # old value\ntop_k = 3\n\n[bus]\nhost = \"b\"\n";
        let t = 2.0f32.sqrt() / 3.0; // no short decimal form
        let out = with_threshold(text, t).unwrap();
        let shortest = format!("unknown_threshold = {t} #");
        assert_eq!(out, text.replace("unknown_threshold = 0.5 #", &shortest));
        let back: toml::Table = toml::from_str(&out).unwrap();
        let v = back["recognition"]["unknown_threshold"].as_float().unwrap() as f32;
        assert_eq!(v, t, "reads back as the same f32");
    }

    #[test]
    fn a_missing_key_or_table_is_added() {
        let out = with_threshold("# only a comment\n", 0.25).unwrap();
        assert!(out.starts_with("# only a comment\n"), "{out}");
        let t: toml::Table = toml::from_str(&out).unwrap();
        assert_eq!(t["recognition"]["unknown_threshold"].as_float(), Some(0.25));
        let out = with_threshold("recognition.top_k = 2\n", 0.25).unwrap();
        let t: toml::Table = toml::from_str(&out).unwrap();
        assert_eq!(t["recognition"]["unknown_threshold"].as_float(), Some(0.25));
        assert_eq!(t["recognition"]["top_k"].as_integer(), Some(2));
    }

    #[test]
    fn a_config_that_is_not_toml_or_has_no_recognition_table_is_refused() {
        assert!(with_threshold("[recognition\n", 0.3).is_err());
        assert!(with_threshold("recognition = 3\n", 0.3).is_err());
    }
}
