//! Accuracy evaluation: the model card's "embedding-head accuracy vs
//! references per class" table, the classifier-head accuracy, and the most
//! confused label pairs, as text, JSON or a self-contained HTML report.
//!
//! With images of products that are not enrolled, it also reports the
//! open-set operating points (see [`crate::open_set`]).
//!
//! Works on embeddings already computed (see [`crate::recognizer`]); builds
//! throw-away in-memory indexes, never touches the agent's reference DB.

use std::collections::{BTreeMap, HashMap};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::open_set::{KnownScore, OpenSetError, OpenSetReport, Scores};
use crate::recognizer::ClassifierGuess;
use crate::refdb::Index;

/// One embedded image of the evaluation set.
#[derive(Debug, Clone)]
pub struct Sample {
    pub label: String,
    pub ref_id: String,
    pub embedding: Vec<f32>,
    pub classifier: Option<ClassifierGuess>,
}

/// References per class to evaluate with; `None` is "all".
pub fn parse_refs_per_class(s: &str) -> Result<Vec<Option<usize>>, String> {
    s.split(',')
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.eq_ignore_ascii_case("all") {
                Ok(None)
            } else {
                match p.parse::<usize>() {
                    Ok(0) | Err(_) => Err(format!("`{p}` is not a positive number or `all`")),
                    Ok(n) => Ok(Some(n)),
                }
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// "1", "5", … or "all".
    pub refs_per_class: String,
    /// References actually in the index (a class may have fewer than asked).
    pub refs: usize,
    pub top1: f64,
    pub top5: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfusedPair {
    pub truth: String,
    pub predicted: String,
    pub count: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model_id: String,
    pub fingerprint: String,
    pub execution_provider: String,
    pub seed: u64,
    pub labels: usize,
    pub references: usize,
    /// Queries whose label has references (the ones scored).
    pub queries: usize,
    /// Queries whose label has no references (not scored).
    pub queries_without_refs: usize,
    pub rows: Vec<Row>,
    /// Classifier-head top-1 accuracy over queries whose label the classifier knows.
    pub classifier_accuracy: Option<f64>,
    pub classifier_queries: usize,
    /// Mistakes at the largest reference count, most frequent first.
    pub confused: Vec<ConfusedPair>,
    /// Enrolled vs unenrolled products, with every reference enrolled
    /// (only when unenrolled images were given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_set: Option<OpenSetReport>,
    /// Images that could not be used, with the reason.
    pub failed: Vec<(String, String)>,
}

pub struct Options {
    pub refs_per_class: Vec<Option<usize>>,
    pub seed: u64,
    pub classifier_labels: Vec<String>,
    /// `recognition.unknown_threshold`, for the open-set report.
    pub unknown_threshold: f32,
}

/// An index of every reference, as the daemon holds them.
fn full_index(refs: &[Sample]) -> Index {
    let dim = refs.first().map_or(0, |r| r.embedding.len());
    Index::build(
        dim,
        refs.iter()
            .map(|s| (s.ref_id.as_str(), s.label.as_str(), s.embedding.as_slice())),
        0,
    )
}

/// Best-similarity scores with every reference enrolled: for the queries
/// whose label has references (the enrolled ones; the others are ignored)
/// and for `unknown`, images of products that are not enrolled.
pub fn open_set_scores(
    refs: &[Sample],
    queries: &[Sample],
    unknown: &[Sample],
) -> Result<Scores, OpenSetError> {
    let index = full_index(refs);
    let enrolled: std::collections::HashSet<&str> = refs.iter().map(|r| r.label.as_str()).collect();
    let known = queries
        .iter()
        .filter(|q| enrolled.contains(q.label.as_str()))
        .map(|q| {
            let r = index.search(&q.embedding, 1, -1.0);
            KnownScore {
                similarity: r.similarity,
                correct: r.candidates.first().map(|c| &*c.label) == Some(q.label.as_str()),
            }
        })
        .collect();
    let unknown = unknown
        .iter()
        .map(|u| index.search(&u.embedding, 1, -1.0).similarity)
        .collect();
    Scores::new(known, unknown)
}

/// Scores `queries` against indexes built from `refs`; with `unknown`
/// (images of products that are not enrolled), the open-set report too.
pub fn evaluate(
    refs: &[Sample],
    queries: &[Sample],
    unknown: Option<&[Sample]>,
    opts: &Options,
) -> Report {
    let dim = refs.first().map_or(0, |r| r.embedding.len());
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in refs.iter().enumerate() {
        by_label.entry(&r.label).or_default().push(i);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    for members in by_label.values_mut() {
        members.shuffle(&mut rng);
    }
    let scored: Vec<&Sample> = queries
        .iter()
        .filter(|q| by_label.contains_key(q.label.as_str()))
        .collect();
    let mut rows = Vec::new();
    let mut confused: HashMap<(String, String), usize> = HashMap::new();
    for (step, n) in opts.refs_per_class.iter().enumerate() {
        let chosen: Vec<&Sample> = by_label
            .values()
            .flat_map(|m| m.iter().take(n.unwrap_or(usize::MAX)).map(|&i| &refs[i]))
            .collect();
        let index = Index::build(
            dim,
            chosen
                .iter()
                .map(|s| (s.ref_id.as_str(), s.label.as_str(), s.embedding.as_slice())),
            0,
        );
        let last = step + 1 == opts.refs_per_class.len();
        let (mut top1, mut top5) = (0usize, 0usize);
        for q in &scored {
            let r = index.search(&q.embedding, 5, -1.0);
            let first = r.candidates.first().map(|c| &*c.label);
            if first == Some(q.label.as_str()) {
                top1 += 1;
            } else if last {
                if let Some(p) = first {
                    *confused
                        .entry((q.label.clone(), p.to_string()))
                        .or_default() += 1;
                }
            }
            if r.candidates.iter().any(|c| *c.label == *q.label) {
                top5 += 1;
            }
        }
        let total = scored.len().max(1) as f64;
        rows.push(Row {
            refs_per_class: n.map_or("all".into(), |n| n.to_string()),
            refs: chosen.len(),
            top1: top1 as f64 / total,
            top5: top5 as f64 / total,
        });
    }
    let known: Vec<&Sample> = queries
        .iter()
        .filter(|q| q.classifier.is_some() && opts.classifier_labels.contains(&q.label))
        .collect();
    let classifier_accuracy = (!known.is_empty()).then(|| {
        let right = known
            .iter()
            .filter(|q| q.classifier.as_ref().is_some_and(|c| c.label == q.label))
            .count();
        right as f64 / known.len() as f64
    });
    let mut confused: Vec<ConfusedPair> = confused
        .into_iter()
        .map(|((truth, predicted), count)| ConfusedPair {
            truth,
            predicted,
            count,
        })
        .collect();
    confused.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.truth.cmp(&b.truth))
            .then_with(|| a.predicted.cmp(&b.predicted))
    });
    confused.truncate(15);
    let open_set = unknown.and_then(|u| {
        open_set_scores(refs, queries, u)
            .ok()
            .map(|s| s.report(opts.unknown_threshold))
    });
    Report {
        model_id: String::new(),
        fingerprint: String::new(),
        execution_provider: String::new(),
        seed: opts.seed,
        labels: by_label.len(),
        references: refs.len(),
        queries: scored.len(),
        queries_without_refs: queries.len() - scored.len(),
        rows,
        classifier_accuracy,
        classifier_queries: known.len(),
        confused,
        open_set,
        failed: Vec::new(),
    }
}

/// The report as a plain-text table.
pub fn render_text(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {} ({}) on {}; {} labels, {} references, {} queries scored (seed {})",
        r.model_id, r.fingerprint, r.execution_provider, r.labels, r.references, r.queries, r.seed
    );
    let _ = writeln!(s, "\nembedding head: accuracy vs references per class");
    let _ = writeln!(
        s,
        "{:>15} {:>8} {:>8} {:>8}",
        "refs/class", "refs", "top-1", "top-5"
    );
    for row in &r.rows {
        let _ = writeln!(
            s,
            "{:>15} {:>8} {:>8.4} {:>8.4}",
            row.refs_per_class, row.refs, row.top1, row.top5
        );
    }
    match r.classifier_accuracy {
        Some(a) => {
            let _ = writeln!(
                s,
                "\nclassifier head: top-1 {a:.4} over {} queries",
                r.classifier_queries
            );
        }
        None => {
            let _ = writeln!(
                s,
                "\nclassifier head: none (or no query label among its classes)"
            );
        }
    }
    if !r.confused.is_empty() {
        let _ = writeln!(
            s,
            "\nmost confused (truth -> predicted, at the largest reference count):"
        );
        for c in &r.confused {
            let _ = writeln!(s, "  {:>4}  {} -> {}", c.count, c.truth, c.predicted);
        }
    }
    if let Some(o) = &r.open_set {
        s.push_str(&render_open_set_text(o));
    }
    if r.queries_without_refs > 0 {
        let _ = writeln!(
            s,
            "\n{} queries have no references for their label and were not scored",
            r.queries_without_refs
        );
    }
    if !r.failed.is_empty() {
        let _ = writeln!(s, "\n{} images could not be used:", r.failed.len());
        for (path, why) in &r.failed {
            let _ = writeln!(s, "  {path}: {why}");
        }
    }
    s
}

fn percent(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x))
}

/// The open-set table as text (also used by `calibrate`).
pub fn render_open_set_text(o: &OpenSetReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nopen set: {} enrolled queries vs {} images of products not enrolled (every reference enrolled)",
        o.known_queries, o.unknown_queries
    );
    if let Some(a) = o.auroc {
        let _ = writeln!(s, "AUROC {a:.4}");
    }
    let _ = writeln!(
        s,
        "{:>14} {:>11} {:>16} {:>16} {:>20}",
        "false-unknown", "threshold", "measured f-u", "unknown caught", "accuracy (enrolled)"
    );
    let row = |s: &mut String, name: String, p: &crate::open_set::OperatingPoint| {
        let _ = writeln!(
            s,
            "{:>14} {:>11.4} {:>16} {:>16} {:>20.4}",
            name,
            p.threshold,
            percent(Some(p.false_unknown_measured)),
            percent(p.unknown_detection),
            p.accuracy_known
        );
    };
    for p in &o.operating_points {
        row(&mut s, percent(Some(p.false_unknown)), p);
    }
    row(&mut s, "configured".into(), &o.at_configured_threshold);
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The report as one self-contained HTML page (inline SVG, no scripts).
pub fn render_html(r: &Report) -> String {
    use std::fmt::Write;
    let (w, h, pad) = (560.0, 300.0, 48.0);
    let n = r.rows.len().max(1);
    let x = |i: usize| {
        pad + (w - 2.0 * pad)
            * if n == 1 {
                0.5
            } else {
                i as f64 / (n - 1) as f64
            }
    };
    let y = |a: f64| h - pad - (h - 2.0 * pad) * a;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="accuracy curve">"#
    );
    for t in 0..=5 {
        let a = t as f64 / 5.0;
        let _ = write!(
            svg,
            r##"<line x1="{pad}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" font-size="11" text-anchor="end">{a:.1}</text>"##,
            w - pad,
            pad - 6.0,
            y(a) + 4.0,
            y = y(a)
        );
    }
    let points: Vec<String> = r
        .rows
        .iter()
        .enumerate()
        .map(|(i, row)| format!("{:.1},{:.1}", x(i), y(row.top1)))
        .collect();
    let _ = write!(
        svg,
        r##"<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{}"/>"##,
        points.join(" ")
    );
    for (i, row) in r.rows.iter().enumerate() {
        let _ = write!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#1f6feb"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{:.3}</text><text x="{:.1}" y="{}" font-size="12" text-anchor="middle">{}</text>"##,
            x(i),
            y(row.top1),
            x(i),
            y(row.top1) - 9.0,
            row.top1,
            x(i),
            h - pad + 18.0,
            escape(&row.refs_per_class)
        );
    }
    if let Some(a) = r.classifier_accuracy {
        let _ = write!(
            svg,
            r##"<line x1="{pad}" x2="{}" y1="{y}" y2="{y}" stroke="#d1242f" stroke-dasharray="6 4"/><text x="{}" y="{}" font-size="11" fill="#d1242f" text-anchor="start">classifier head {a:.3}</text>"##,
            w - pad,
            pad + 6.0,
            y(a) + 14.0,
            y = y(a)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">references per class</text></svg>"#,
        w / 2.0,
        h - 8.0
    );

    let mut rows = String::new();
    for row in &r.rows {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td></tr>",
            escape(&row.refs_per_class),
            row.refs,
            row.top1,
            row.top5
        );
    }
    let mut confused = String::new();
    for c in &r.confused {
        let _ = write!(
            confused,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&c.truth),
            escape(&c.predicted),
            c.count
        );
    }
    if confused.is_empty() {
        confused.push_str("<tr><td colspan=\"3\">no mistakes</td></tr>");
    }
    let open_set = r
        .open_set
        .as_ref()
        .map_or(String::new(), render_open_set_html);
    let classifier = r.classifier_accuracy.map_or("none".to_string(), |a| {
        format!("{a:.4} over {} queries", r.classifier_queries)
    });
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>retail-agent evaluation: {model}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .8em;text-align:right}}th{{background:#f4f4f4}}</style></head>
<body><h1>Recognition accuracy</h1>
<p>Model <b>{model}</b> (fingerprint <code>{fp}</code>) on <b>{ep}</b>. {labels} labels, {refs} references, {queries} queries scored, seed {seed}.</p>
<h2>Embedding head: accuracy vs references per class</h2>
{svg}
<table><tr><th>refs/class</th><th>refs</th><th>top-1</th><th>top-5</th></tr>{rows}</table>
<h2>Classifier head</h2><p>top-1 accuracy: {classifier}</p>
<h2>Most confused label pairs</h2>
<table><tr><th>truth</th><th>predicted</th><th>count</th></tr>{confused}</table>
{open_set}</body></html>
"#,
        model = escape(&r.model_id),
        fp = escape(&r.fingerprint),
        ep = escape(&r.execution_provider),
        labels = r.labels,
        refs = r.references,
        queries = r.queries,
        seed = r.seed,
    )
}

/// The open-set section of the HTML report: detection against
/// false-unknown, the configured threshold marked, and the table.
fn render_open_set_html(o: &OpenSetReport) -> String {
    use std::fmt::Write;
    let (w, h, pad) = (420.0, 420.0, 48.0);
    let x = |f: f64| pad + (w - 2.0 * pad) * f;
    let y = |d: f64| h - pad - (h - 2.0 * pad) * d;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="unknown detection against false-unknown rate">"#
    );
    for t in 0..=5 {
        let v = t as f64 / 5.0;
        let _ = write!(
            svg,
            r##"<line x1="{pad}" x2="{}" y1="{yv}" y2="{yv}" stroke="#ddd"/><text x="{}" y="{}" font-size="11" text-anchor="end">{v:.1}</text><line x1="{xv}" x2="{xv}" y1="{pad}" y2="{}" stroke="#eee"/><text x="{xv}" y="{}" font-size="11" text-anchor="middle">{v:.1}</text>"##,
            w - pad,
            pad - 6.0,
            y(v) + 4.0,
            h - pad,
            h - pad + 16.0,
            yv = y(v),
            xv = x(v),
        );
    }
    let points: Vec<String> = o
        .curve
        .iter()
        .map(|&(f, d)| format!("{:.1},{:.1}", x(f), y(d)))
        .collect();
    let _ = write!(
        svg,
        r##"<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{}"/>"##,
        points.join(" ")
    );
    for p in &o.operating_points {
        let _ = write!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#1f6feb"><title>false-unknown {:.3}, threshold {:.4}</title></circle>"##,
            x(p.false_unknown_measured),
            y(p.unknown_detection.unwrap_or(0.0)),
            p.false_unknown_measured,
            p.threshold
        );
    }
    let c = &o.at_configured_threshold;
    let (cx, cy) = (
        x(c.false_unknown_measured),
        y(c.unknown_detection.unwrap_or(0.0)),
    );
    let _ = write!(
        svg,
        r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="6" fill="none" stroke="#d1242f" stroke-width="2"/><text x="{:.1}" y="{:.1}" font-size="11" fill="#d1242f">configured threshold {:.3}</text>"##,
        cx + 9.0,
        cy + 14.0,
        c.threshold
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">false-unknown rate (enrolled products called unknown)</text><text x="14" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {})">unknown detection</text></svg>"#,
        w / 2.0,
        h - 8.0,
        h / 2.0,
        h / 2.0
    );
    let mut rows = String::new();
    let row = |rows: &mut String, name: String, p: &crate::open_set::OperatingPoint| {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{:.4}</td><td>{}</td><td>{}</td><td>{:.4}</td></tr>",
            escape(&name),
            p.threshold,
            percent(Some(p.false_unknown_measured)),
            percent(p.unknown_detection),
            p.accuracy_known
        );
    };
    for p in &o.operating_points {
        row(&mut rows, percent(Some(p.false_unknown)), p);
    }
    row(&mut rows, "configured".into(), c);
    format!(
        r#"<h2>Open set: enrolled vs not enrolled</h2>
<p>{known} enrolled queries, {unknown} images of products not in the DB, every reference enrolled. AUROC <b>{auroc}</b>. A crop is unknown when its best similarity is strictly below the threshold; the threshold for a false-unknown target q is the q-quantile of the enrolled queries' best similarities.</p>
{svg}
<table><tr><th>false-unknown target</th><th>threshold</th><th>measured false-unknown</th><th>unknown detected</th><th>accuracy (enrolled)</th></tr>{rows}</table>
"#,
        known = o.known_queries,
        unknown = o.unknown_queries,
        auroc = o.auroc.map_or("-".into(), |a| format!("{a:.4}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(label: &str, id: &str, v: [f32; 2]) -> Sample {
        Sample {
            label: label.into(),
            ref_id: id.into(),
            embedding: v.to_vec(),
            classifier: Some(ClassifierGuess {
                label: label.into(),
                probability: 0.9,
            }),
        }
    }

    #[test]
    fn parses_reference_counts() {
        assert_eq!(
            parse_refs_per_class("1,5,all").unwrap(),
            vec![Some(1), Some(5), None]
        );
        assert!(parse_refs_per_class("0").is_err());
        assert!(parse_refs_per_class("x").is_err());
    }

    #[test]
    fn scores_queries_and_reports_confusions() {
        let refs = vec![
            sample("a", "a/1", [1.0, 0.0]),
            sample("b", "b/1", [0.0, 1.0]),
        ];
        let queries = vec![
            sample("a", "qa", [0.9, 0.1]),
            sample("b", "qb", [0.8, 0.2]), // wrongly closer to a
            sample("c", "qc", [0.5, 0.5]), // no references
        ];
        let report = evaluate(
            &refs,
            &queries,
            None,
            &Options {
                refs_per_class: vec![Some(1), None],
                seed: 1,
                classifier_labels: vec!["a".into(), "b".into()],
                unknown_threshold: 0.5,
            },
        );
        assert!(report.open_set.is_none());
        assert_eq!(report.queries, 2);
        assert_eq!(report.queries_without_refs, 1);
        assert_eq!(report.rows[1].top1, 0.5);
        assert_eq!(report.rows[1].top5, 1.0);
        assert_eq!(report.classifier_accuracy, Some(1.0));
        assert_eq!(report.confused[0].truth, "b");
        assert_eq!(report.confused[0].predicted, "a");
        let html = render_html(&report);
        assert!(html.contains("<svg") && html.contains("</html>"));
        assert!(render_text(&report).contains("top-1"));
    }

    #[test]
    fn unenrolled_images_add_the_open_set_report_to_every_rendering() {
        let refs = vec![
            sample("a", "a/1", [1.0, 0.0]),
            sample("b", "b/1", [0.0, 1.0]),
        ];
        let norm = |x: f32, y: f32| {
            let n = (x * x + y * y).sqrt();
            [x / n, y / n]
        };
        let queries = vec![
            sample("a", "qa", norm(0.9, 0.1)),
            sample("b", "qb", norm(0.1, 0.9)),
            sample("c", "qc", norm(0.5, 0.5)), // not enrolled: ignored here
        ];
        let unknown = vec![sample("x", "x/1", norm(0.6, 0.6))];
        let report = evaluate(
            &refs,
            &queries,
            Some(&unknown),
            &Options {
                refs_per_class: vec![None],
                seed: 1,
                classifier_labels: vec![],
                unknown_threshold: 0.8,
            },
        );
        let o = report.open_set.as_ref().expect("open set report");
        assert_eq!((o.known_queries, o.unknown_queries), (2, 1));
        assert_eq!(o.auroc, Some(1.0));
        assert_eq!(o.operating_points.len(), 5);
        let c = &o.at_configured_threshold;
        assert_eq!((c.threshold, c.unknown_detection), (0.8, Some(1.0)));
        assert_eq!((c.accuracy_known, c.false_unknown_measured), (1.0, 0.0));
        let json = serde_json::to_value(&report).unwrap();
        assert!(json["open_set"]["operating_points"][2]["false_unknown"] == 0.05);
        assert!(render_text(&report).contains("AUROC"));
        assert!(render_html(&report).contains("configured threshold"));
    }
}
