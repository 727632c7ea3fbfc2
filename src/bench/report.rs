//! The figures of a run, the performance targets checked against them,
//! and the two renderings: a text table per section, or one JSON object.
//!
//! Each target states its measured quantity and its limit in the target's
//! own terms, their ratio (`measured / limit`), and PASS or MISS. Some
//! targets are for the bundled test model, others for a model of realistic
//! compute: both are checked, and `applies` says which one the model run is.

use std::fmt::Write;

use serde::Serialize;

use super::end_to_end::EndToEndFigures;
use super::inference::InferenceFigures;
use super::memory::MemoryFigures;
use super::pipeline::PipelineFigures;
use super::search::SearchFigures;
use super::stages::StageFigures;
use super::sweep::SweepFigures;
use super::{BenchOptions, BenchSetup};
use crate::pipeline::budget::available_cores;

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone, Serialize)]
pub struct MachineFigures {
    pub cores: usize,
    pub onnxruntime: String,
    pub provider: String,
    /// The daemon's thread budget here.
    pub intra_threads: usize,
    pub allow_spinning: bool,
    pub decode_workers: usize,
    pub io_threads: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelFigures {
    pub id: String,
    pub fingerprint: String,
    pub manifest: String,
    pub file_bytes: u64,
    pub input: String,
    pub dim: usize,
    pub classes: usize,
    pub bundled_test_model: bool,
    /// The configured `pipeline.max_batch` and `max_delay_ms`.
    pub max_batch: usize,
    pub max_delay_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    AtMost,
    AtLeast,
}

impl Relation {
    fn symbol(self) -> &'static str {
        match self {
            Relation::AtMost => "<=",
            Relation::AtLeast => ">=",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Miss,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub id: String,
    pub target: String,
    pub measured: f64,
    pub relation: Relation,
    pub limit: f64,
    /// `measured / limit`.
    pub ratio: f64,
    pub verdict: Verdict,
    /// Whether the target is meant for the model run (the others are
    /// checked too, for information).
    pub applies: bool,
    pub detail: String,
}

impl TargetCheck {
    fn new(
        id: impl Into<String>,
        target: impl Into<String>,
        measured: f64,
        relation: Relation,
        limit: f64,
        applies: bool,
        detail: String,
    ) -> Self {
        let met = match relation {
            Relation::AtMost => measured <= limit,
            Relation::AtLeast => measured >= limit,
        };
        Self {
            id: id.into(),
            target: target.into(),
            measured,
            relation,
            limit,
            ratio: measured / limit,
            verdict: if met { Verdict::Pass } else { Verdict::Miss },
            applies,
            detail,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: MachineFigures,
    pub model: ModelFigures,
    pub quick: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference: Option<InferenceFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<StageFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<SearchFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_to_end: Option<EndToEndFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep: Option<SweepFigures>,
    pub targets: Vec<TargetCheck>,
}

impl BenchReport {
    /// A report with the machine and the model, no figures yet.
    pub fn new(setup: &BenchSetup, options: &BenchOptions) -> Self {
        let budget = setup.budget();
        let m = &setup.manifest;
        let c = &setup.cfg.config;
        Self {
            machine: MachineFigures {
                cores: available_cores(),
                onnxruntime: crate::engine::loaded_library()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                provider: setup.provider.name().to_string(),
                intra_threads: budget.intra_threads,
                allow_spinning: budget.allow_spinning,
                decode_workers: budget.decode_workers,
                io_threads: budget.io_threads,
            },
            model: ModelFigures {
                id: m.id().to_string(),
                fingerprint: m.fingerprint().to_string(),
                manifest: m.manifest_path.display().to_string(),
                file_bytes: setup.model_file_bytes(),
                input: format!("{}x{}", m.file.input.width, m.file.input.height),
                dim: setup.dim,
                classes: setup.classes,
                bundled_test_model: setup.is_bundled_test_model(),
                max_batch: c.pipeline.max_batch,
                max_delay_ms: c.pipeline.max_delay_ms,
            },
            quick: options.quick,
            broker: None,
            inference: None,
            stages: None,
            pipeline: None,
            search: None,
            memory: None,
            end_to_end: None,
            sweep: None,
            targets: Vec::new(),
        }
    }

    /// Checks every target whose figures were measured.
    pub fn check_targets(&mut self, setup: &BenchSetup) {
        let test_model = setup.is_bundled_test_model();
        let mut t = Vec::new();
        if let (Some(e2e), Some(st), Some(b1)) = (
            &self.end_to_end,
            &self.stages,
            self.inference.as_ref().and_then(|i| i.at(1)),
        ) {
            let (decode, resize, search) = (
                st.crop_decode_us / 1e3,
                st.crop_resize_normalise_us / 1e3,
                st.search_us / 1e3,
            );
            let parts = decode + resize + b1.ms_per_batch + search;
            let rt = e2e.unloaded.p50_ms;
            t.push(TargetCheck::new(
                "round_trip",
                "unloaded single-crop round trip through the broker <= 1.3 x (decode + preprocess + batch-1 inference + search) + 0.5 ms",
                (rt - 0.5) / parts,
                Relation::AtMost,
                1.3,
                true,
                format!(
                    "round trip p50 {rt:.3} ms; decode {decode:.3} + resize+normalise {resize:.3} + inference {:.3} + search {search:.3} = {parts:.3} ms; limit {:.3} ms",
                    b1.ms_per_batch,
                    1.3 * parts + 0.5
                ),
            ));
        }
        if let (Some(e2e), Some(p)) = (&self.end_to_end, &self.pipeline) {
            let e = e2e.best_crops_per_s();
            t.push(TargetCheck::new(
                "end_to_end_vs_offline_pipeline",
                "saturated end-to-end crops/s >= 0.85 x the offline pipeline's best (bundled test model)",
                e / p.best.crops_per_s,
                Relation::AtLeast,
                0.85,
                test_model,
                format!(
                    "end to end {e:.1} crops/s; offline pipeline's best {:.1} crops/s ({} intra-op thread(s), {} decode worker(s), {} crop(s) per request)",
                    p.best.crops_per_s,
                    p.best.intra_threads,
                    p.best.decode_workers,
                    p.best.crops_per_request
                ),
            ));
        }
        if let (Some(e2e), Some(inf)) = (&self.end_to_end, &self.inference) {
            if let (Some(s8), Some(raw)) = (e2e.saturated_at(8), inf.at(e2e.max_batch)) {
                t.push(TargetCheck::new(
                    "end_to_end_vs_raw_inference",
                    "saturated end-to-end crops/s >= 0.90 x raw inference at the same batch size (realistic model)",
                    s8.crops_per_s / raw.images_per_s,
                    Relation::AtLeast,
                    0.90,
                    !test_model,
                    format!(
                        "end to end, 8 crops per request: {:.1} crops/s (mean batch {:.2}); raw inference at batch {} (max_batch): {:.1} images/s",
                        s8.crops_per_s, s8.mean_batch, e2e.max_batch, raw.images_per_s
                    ),
                ));
            }
        }
        if let Some(st) = &self.stages {
            t.push(TargetCheck::new(
                "resize_vs_decode",
                "resize+normalise of a 224x224 crop <= 25% of its JPEG decode",
                st.crop_resize_normalise_us / st.crop_decode_us,
                Relation::AtMost,
                0.25,
                true,
                format!(
                    "resize+normalise {:.1} us; decode {:.1} us",
                    st.crop_resize_normalise_us, st.crop_decode_us
                ),
            ));
        }
        if let Some(s) = &self.search {
            for c in s.cases.iter().filter(|c| c.batch == 16) {
                t.push(TargetCheck::new(
                    format!("search_vs_gemm_{}x{}x{}", c.labels, c.refs_per_label, c.dim),
                    format!(
                        "search at batch 16 within 1.5x of the GEMM of the same shape ({} labels x {} refs x {} dims)",
                        c.labels, c.refs_per_label, c.dim
                    ),
                    c.search_over_gemm,
                    Relation::AtMost,
                    1.5,
                    true,
                    format!(
                        "search {:.3} ms, sgemm {:.3} ms for 16 x {} x {} ({})",
                        c.search_ms, c.gemm_ms, c.dim, c.refs, s.method
                    ),
                ));
            }
            if let Some(worst) = s.f16.iter().max_by(|a, b| {
                let ra = a.f16_matrix_bytes as f64 / a.f32_matrix_bytes as f64;
                let rb = b.f16_matrix_bytes as f64 / b.f32_matrix_bytes as f64;
                ra.total_cmp(&rb)
            }) {
                t.push(TargetCheck::new(
                    "f16_memory",
                    "an f16 reference matrix halves its memory",
                    worst.f16_matrix_bytes as f64 / worst.f32_matrix_bytes as f64,
                    Relation::AtMost,
                    0.5,
                    true,
                    format!(
                        "{} refs x {}: f16 {} bytes, f32 {} bytes",
                        worst.refs, worst.dim, worst.f16_matrix_bytes, worst.f32_matrix_bytes
                    ),
                ));
            }
            if let Some(worst) = s
                .f16
                .iter()
                .min_by(|a, b| a.top1_agreement.total_cmp(&b.top1_agreement))
            {
                t.push(TargetCheck::new(
                    "f16_top1_agreement",
                    "f16 reference matrix's top-1 agreement with f32 >= 99.9%",
                    worst.top1_agreement,
                    Relation::AtLeast,
                    0.999,
                    true,
                    format!(
                        "lowest of {} sets: {} refs x {}, {} queries",
                        s.f16.len(),
                        worst.refs,
                        worst.dim,
                        worst.queries
                    ),
                ));
            }
        }
        if let Some(m) = &self.memory {
            let a = &m.agent;
            let limit = a.model_file_bytes as f64 + 1.25 * a.matrix_bytes as f64 + 64.0 * MIB;
            t.push(TargetCheck::new(
                "resident_memory",
                "resident memory <= model file + 1.25 x reference matrix + 64 MiB (31,500 references)",
                a.rss_bytes as f64 / MIB,
                Relation::AtMost,
                limit / MIB,
                true,
                format!(
                    "agent RSS after serving {:.1} MiB (once ready {:.1}, peak {:.1}); model file {:.1} MiB, reference matrix {:.1} MiB ({} x {})",
                    a.rss_bytes as f64 / MIB,
                    a.rss_at_ready_bytes as f64 / MIB,
                    a.peak_rss_bytes as f64 / MIB,
                    a.model_file_bytes as f64 / MIB,
                    a.matrix_bytes as f64 / MIB,
                    a.refs,
                    a.dim
                ),
            ));
            t.push(TargetCheck::new(
                "ready",
                "ready within 2 s with 31,500 references (TensorRT engine build excluded)",
                a.ready_s,
                Relation::AtMost,
                2.0,
                true,
                format!(
                    "spawn to \"online\" {:.3} s; to a first answer {:.3} s",
                    a.ready_s, a.first_answer_s
                ),
            ));
        }
        self.targets = t;
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the report: {e}\"}}"))
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        self.write_text(&mut out);
        out
    }

    fn write_text(&self, out: &mut String) {
        let (m, mc) = (&self.model, &self.machine);
        let _ = writeln!(
            out,
            "retail-agent bench{}: model {} (fingerprint {}, {:.1} MiB, {} input, {}-d embedding, {} classes{})",
            if self.quick { " --quick" } else { "" },
            m.id,
            m.fingerprint,
            m.file_bytes as f64 / MIB,
            m.input,
            m.dim,
            m.classes,
            if m.bundled_test_model { "; the bundled test model" } else { "" }
        );
        let _ = writeln!(
            out,
            "machine: {} cores; ONNX Runtime {} on {}; thread budget {} intra-op thread(s), spinning {}, {} decode worker(s), {} I/O thread(s); pipeline max_batch {}, max_delay_ms {}",
            mc.cores,
            mc.onnxruntime,
            mc.provider,
            mc.intra_threads,
            if mc.allow_spinning { "on" } else { "off" },
            mc.decode_workers,
            mc.io_threads,
            m.max_batch,
            m.max_delay_ms
        );
        if let Some(b) = &self.broker {
            let _ = writeln!(out, "broker: {b}");
        }
        if let Some(i) = &self.inference {
            let _ = writeln!(out, "\nRaw inference (ONNX Runtime alone on ready tensors)");
            let rows = i
                .batches
                .iter()
                .map(|b| vec![b.batch.to_string(), f1(b.images_per_s), f3(b.ms_per_batch)])
                .collect::<Vec<_>>();
            table(out, &["batch", "images/s", "ms/batch"], &rows);
        }
        if let Some(s) = &self.stages {
            let _ = writeln!(out, "\nPer-crop stage costs (one thread, mean)");
            let rows = vec![
                vec![
                    format!(
                        "8-crop MessagePack request ({:.0} KB)",
                        s.request_bytes as f64 / 1024.0
                    ),
                    "read (per request)".into(),
                    f1(s.request_read_us),
                ],
                vec![
                    format!("224x224 crop ({:.1} KB JPEG)", s.crop_bytes_mean / 1024.0),
                    "decode".into(),
                    f1(s.crop_decode_us),
                ],
                vec![
                    String::new(),
                    "resize+normalise".into(),
                    f1(s.crop_resize_normalise_us),
                ],
                vec![
                    format!(
                        "1920x1080 frame ({:.0} KB JPEG)",
                        s.frame_bytes as f64 / 1024.0
                    ),
                    "decode (per frame)".into(),
                    f1(s.frame_decode_us),
                ],
                vec![
                    "box cut from the frame".into(),
                    "resize+normalise".into(),
                    f1(s.bbox_resize_normalise_us),
                ],
                vec![
                    format!("embedding, {} references", s.search_refs),
                    "search".into(),
                    f1(s.search_us),
                ],
            ];
            table(out, &["input", "stage", "us"], &rows);
        }
        if let Some(p) = &self.pipeline {
            let _ = writeln!(
                out,
                "\nOffline pipeline (encoded requests to results, no MQTT), saturated; the daemon's split is {} intra-op / {} decode",
                p.production.intra_threads, p.production.decode_workers
            );
            let rows = p
                .splits
                .iter()
                .map(|s| {
                    vec![
                        s.intra_threads.to_string(),
                        s.decode_workers.to_string(),
                        on_off(s.allow_spinning),
                        s.crops_per_request.to_string(),
                        s.in_flight.to_string(),
                        f1(s.crops_per_s),
                        f2(s.mean_batch),
                        format!("{:.0}%", s.in_place * 100.0),
                    ]
                })
                .collect::<Vec<_>>();
            table(
                out,
                &[
                    "intra-op",
                    "decode",
                    "spinning",
                    "crops/request",
                    "in flight",
                    "crops/s",
                    "mean batch",
                    "in place",
                ],
                &rows,
            );
            let _ = writeln!(
                out,
                "  best: {} crops/s ({} intra-op, {} decode, {} crop(s) per request)",
                f1(p.best.crops_per_s),
                p.best.intra_threads,
                p.best.decode_workers,
                p.best.crops_per_request
            );
        }
        if let Some(s) = &self.search {
            let _ = writeln!(
                out,
                "\nSearch alone (one thread; {}) next to sgemm of the same shape",
                s.method
            );
            let rows = s
                .cases
                .iter()
                .map(|c| {
                    vec![
                        c.labels.to_string(),
                        c.refs_per_label.to_string(),
                        c.dim.to_string(),
                        c.refs.to_string(),
                        c.batch.to_string(),
                        f3(c.search_ms),
                        f3(c.gemm_ms),
                        f2(c.search_over_gemm),
                    ]
                })
                .collect::<Vec<_>>();
            table(
                out,
                &[
                    "labels",
                    "refs/label",
                    "dim",
                    "refs",
                    "batch",
                    "search ms",
                    "sgemm ms",
                    "search/sgemm",
                ],
                &rows,
            );
            let _ = writeln!(out, "f16 reference matrix against f32");
            let rows = s
                .f16
                .iter()
                .map(|f| {
                    vec![
                        f.refs_per_label.to_string(),
                        f.dim.to_string(),
                        f.refs.to_string(),
                        f1(f.f32_matrix_bytes as f64 / MIB),
                        f1(f.f16_matrix_bytes as f64 / MIB),
                        f.queries.to_string(),
                        format!("{:.2}%", f.top1_agreement * 100.0),
                    ]
                })
                .collect::<Vec<_>>();
            table(
                out,
                &[
                    "refs/label",
                    "dim",
                    "refs",
                    "f32 MiB",
                    "f16 MiB",
                    "queries",
                    "top-1 agreement",
                ],
                &rows,
            );
        }
        if let Some(mem) = &self.memory {
            let _ = writeln!(
                out,
                "\nMemory: reference matrices in the daemon's index (this process)"
            );
            let rows = mem
                .reference_sets
                .iter()
                .map(|r| {
                    vec![
                        r.labels.to_string(),
                        r.refs_per_label.to_string(),
                        r.dim.to_string(),
                        r.refs.to_string(),
                        f1(r.matrix_bytes as f64 / MIB),
                        f1(r.rss_growth_bytes as f64 / MIB),
                        f1(r.build_ms),
                    ]
                })
                .collect::<Vec<_>>();
            table(
                out,
                &[
                    "labels",
                    "refs/label",
                    "dim",
                    "refs",
                    "matrix MiB",
                    "RSS growth MiB",
                    "build ms",
                ],
                &rows,
            );
            let a = &mem.agent;
            let _ = writeln!(
                out,
                "  the agent with {} references x {}: ready {:.3} s, first answer {:.3} s after spawn; RSS {:.1} MiB once ready, {:.1} MiB (peak {:.1}) after serving; model file {:.1} MiB, reference matrix {:.1} MiB",
                a.refs,
                a.dim,
                a.ready_s,
                a.first_answer_s,
                a.rss_at_ready_bytes as f64 / MIB,
                a.rss_bytes as f64 / MIB,
                a.peak_rss_bytes as f64 / MIB,
                a.model_file_bytes as f64 / MIB,
                a.matrix_bytes as f64 / MIB
            );
        }
        if let Some(e) = &self.end_to_end {
            let _ = writeln!(
                out,
                "\nEnd to end (agent process, broker, the bench's client; {} references served; ready {:.3} s after spawn)",
                e.refs, e.ready_s
            );
            let rows = e
                .saturated
                .iter()
                .map(|s| {
                    vec![
                        s.crops_per_request.to_string(),
                        s.in_flight.to_string(),
                        f1(s.crops_per_s),
                        f1(s.requests_per_s),
                        f2(s.mean_batch),
                    ]
                })
                .collect::<Vec<_>>();
            table(
                out,
                &[
                    "crops/request",
                    "in flight",
                    "crops/s",
                    "requests/s",
                    "mean batch",
                ],
                &rows,
            );
            let rows = [
                ("unloaded (one at a time)", &e.unloaded),
                ("Poisson, 50% of saturation", &e.at_50_percent),
                ("Poisson, 90% of saturation", &e.at_90_percent),
            ]
            .iter()
            .map(|(name, l)| {
                vec![
                    name.to_string(),
                    l.offered_per_s.map_or_else(|| "-".into(), f1),
                    f1(l.achieved_per_s),
                    l.samples.to_string(),
                    f3(l.p50_ms),
                    f3(l.p95_ms),
                    f3(l.p99_ms),
                    f3(l.max_ms),
                ]
            })
            .collect::<Vec<_>>();
            table(
                out,
                &[
                    "single-crop round trip",
                    "offered/s",
                    "answered/s",
                    "samples",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "max ms",
                ],
                &rows,
            );
            let _ = writeln!(
                out,
                "  agent RSS afterwards {:.1} MiB (peak {:.1})",
                e.agent_rss_bytes as f64 / MIB,
                e.agent_peak_rss_bytes as f64 / MIB
            );
        }
        if let Some(s) = &self.sweep {
            let _ = writeln!(
                out,
                "\nSweep: max_batch x linger (max_delay_ms), end to end"
            );
            let rows = s
                .points
                .iter()
                .map(|p| {
                    vec![
                        p.max_batch.to_string(),
                        p.max_delay_ms.to_string(),
                        f1(p.saturated_1_crop_per_s),
                        f2(p.mean_batch_1_crop),
                        f1(p.saturated_8_crops_per_s),
                        f2(p.mean_batch_8_crops),
                        f3(p.unloaded_p50_ms),
                        f3(p.unloaded_p99_ms),
                        f3(p.at_50_percent_p50_ms),
                        f3(p.at_50_percent_p99_ms),
                    ]
                })
                .collect::<Vec<_>>();
            table(
                out,
                &[
                    "max_batch",
                    "linger ms",
                    "1-crop crops/s",
                    "batch",
                    "8-crop crops/s",
                    "batch",
                    "unloaded p50",
                    "p99",
                    "50% load p50",
                    "p99",
                ],
                &rows,
            );
            if let (Some(h), Some(l)) = (s.highest_throughput(), s.lowest_unloaded_latency()) {
                let _ = writeln!(
                    out,
                    "  highest 8-crop throughput: max_batch {}, linger {} ms; lowest unloaded p50: max_batch {}, linger {} ms",
                    h.max_batch, h.max_delay_ms, l.max_batch, l.max_delay_ms
                );
            }
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\nTargets (ratio = measured / limit)");
            let rows = self
                .targets
                .iter()
                .map(|t| {
                    vec![
                        match t.verdict {
                            Verdict::Pass => "PASS".to_string(),
                            Verdict::Miss => "MISS".to_string(),
                        },
                        if t.applies {
                            String::new()
                        } else {
                            "(other model)".into()
                        },
                        t.id.clone(),
                        f3(t.measured),
                        format!("{} {}", t.relation.symbol(), f3(t.limit)),
                        f3(t.ratio),
                        t.detail.clone(),
                    ]
                })
                .collect::<Vec<_>>();
            table(
                out,
                &["", "", "target", "measured", "limit", "ratio", "detail"],
                &rows,
            );
        }
    }
}

fn f1(v: f64) -> String {
    format!("{v:.1}")
}

fn f2(v: f64) -> String {
    format!("{v:.2}")
}

fn f3(v: f64) -> String {
    format!("{v:.3}")
}

fn on_off(b: bool) -> String {
    if b { "on" } else { "off" }.to_string()
}

/// Writes a table indented by two spaces, columns right-aligned except the
/// last when it is text wider than its header (a detail column).
fn table(out: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let last = headers.len().saturating_sub(1);
    let left_last = headers.get(last) == Some(&"detail");
    let mut line = |cells: &[String]| {
        let mut text = String::from(" ");
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last && left_last {
                let _ = write!(text, "  {cell}");
            } else {
                let _ = write!(text, "  {cell:>w$}");
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_passes_on_its_side_of_the_limit() {
        let at_most = TargetCheck::new("a", "a", 1.0, Relation::AtMost, 1.3, true, String::new());
        assert_eq!(at_most.verdict, Verdict::Pass);
        let at_least =
            TargetCheck::new("b", "b", 0.8, Relation::AtLeast, 0.85, true, String::new());
        assert_eq!(at_least.verdict, Verdict::Miss);
        assert!((at_least.ratio - 0.8 / 0.85).abs() < 1e-12);
        let nan = TargetCheck::new(
            "c",
            "c",
            f64::NAN,
            Relation::AtMost,
            1.0,
            true,
            String::new(),
        );
        assert_eq!(nan.verdict, Verdict::Miss);
    }

    #[test]
    fn tables_align_their_columns() {
        let mut out = String::new();
        table(
            &mut out,
            &["batch", "images/s"],
            &[
                vec!["1".into(), "10.0".into()],
                vec!["16".into(), "1234.5".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{out}");
    }
}
