//! `retail-agent bench --quick --json` through the real binary on the
//! bundled test model: every figure of the performance issue is present,
//! positive and finite, and every target is checked. The verdicts are not
//! asserted: machines are noisy. Needs Mosquitto (scripts/test.sh installs
//! it), which the bench starts itself.

mod common;

use serde_json::Value;

use common::AgentHome;

/// The number at `path` (`a.b.c`), which must be positive and finite.
fn positive(v: &Value, path: &str) -> f64 {
    let x = at(v, path)
        .as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {}", at(v, path)));
    assert!(x.is_finite() && x > 0.0, "{path} = {x}");
    x
}

fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(v, |v, key| match key.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[key],
        })
}

/// The element of the array at `path` whose fields equal `fields`.
fn find<'a>(v: &'a Value, path: &str, fields: &[(&str, u64)]) -> &'a Value {
    at(v, path)
        .as_array()
        .unwrap_or_else(|| panic!("{path} is not an array"))
        .iter()
        .find(|e| fields.iter().all(|(k, x)| e[*k].as_u64() == Some(*x)))
        .unwrap_or_else(|| panic!("no element {fields:?} in {path}"))
}

#[test]
fn a_quick_bench_reports_every_figure_and_target() {
    let home = AgentHome::new("", "");
    let started = std::time::Instant::now();
    let out = home.cli(&["bench", "--quick", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed:\n{stderr}");
    eprintln!("bench --quick took {:?}", started.elapsed());
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });

    assert_eq!(r["model"]["bundled_test_model"], Value::Bool(true));
    positive(&r, "machine.cores");

    // Raw inference at batch 1, 4, 8, 16.
    for batch in [1, 4, 8, 16] {
        let b = find(&r, "inference.batches", &[("batch", batch)]);
        positive(b, "images_per_s");
        positive(b, "ms_per_batch");
    }

    // Offline pipeline: every split at 1 and 8 crops per request, and the best.
    for crops in [1, 8] {
        let s = find(&r, "pipeline.splits", &[("crops_per_request", crops)]);
        positive(s, "crops_per_s");
        positive(s, "mean_batch");
    }
    positive(&r, "pipeline.best.crops_per_s");

    // End to end: saturation at 1 and 8 crops, latency unloaded, 50%, 90%.
    for crops in [1, 8] {
        let s = find(&r, "end_to_end.saturated", &[("crops_per_request", crops)]);
        positive(s, "crops_per_s");
        positive(s, "mean_batch");
    }
    for load in ["unloaded", "at_50_percent", "at_90_percent"] {
        for p in ["p50_ms", "p95_ms", "p99_ms"] {
            positive(&r, &format!("end_to_end.{load}.{p}"));
        }
        positive(&r, &format!("end_to_end.{load}.achieved_per_s"));
    }
    positive(&r, "end_to_end.at_50_percent.offered_per_s");
    positive(&r, "end_to_end.ready_s");
    positive(&r, "end_to_end.agent_rss_bytes");

    // Per-crop stage costs.
    for stage in [
        "crop_decode_us",
        "crop_resize_normalise_us",
        "frame_decode_us",
        "bbox_resize_normalise_us",
        "search_us",
    ] {
        positive(&r, &format!("stages.{stage}"));
    }

    // Search: 315 labels x {1, 20, 100} refs x {448, 2048} dims at batch 1
    // and 16, next to the GEMM; the f16 matrix of each set.
    for refs in [1, 20, 100] {
        for dim in [448, 2048] {
            for batch in [1, 16] {
                let c = find(
                    &r,
                    "search.cases",
                    &[
                        ("labels", 315),
                        ("refs_per_label", refs),
                        ("dim", dim),
                        ("batch", batch),
                    ],
                );
                positive(c, "search_ms");
                positive(c, "gemm_ms");
            }
            let f = find(&r, "search.f16", &[("refs_per_label", refs), ("dim", dim)]);
            let (f32_bytes, f16_bytes) = (
                positive(f, "f32_matrix_bytes"),
                positive(f, "f16_matrix_bytes"),
            );
            assert_eq!(f32_bytes, (315 * refs * dim * 4) as f64);
            assert!(f16_bytes < f32_bytes);
            positive(f, "top1_agreement");

            // Memory of the same set in the daemon's index.
            let m = find(
                &r,
                "memory.reference_sets",
                &[("refs_per_label", refs), ("dim", dim)],
            );
            assert_eq!(positive(m, "matrix_bytes"), f32_bytes);
            let growth = m["rss_growth_bytes"].as_f64().expect("rss_growth_bytes");
            assert!(growth.is_finite() && growth >= 0.0);
        }
    }

    // The agent's memory and start-up with 31,500 references.
    assert_eq!(r["memory"]["agent"]["refs"].as_u64(), Some(31_500));
    for figure in [
        "ready_s",
        "first_answer_s",
        "rss_at_ready_bytes",
        "rss_bytes",
        "matrix_bytes",
        "model_file_bytes",
    ] {
        positive(&r, &format!("memory.agent.{figure}"));
    }

    // Every target, with its ratio and verdict.
    let mut expected = vec![
        "round_trip".to_string(),
        "end_to_end_vs_offline_pipeline".into(),
        "end_to_end_vs_raw_inference".into(),
        "resize_vs_decode".into(),
        "f16_memory".into(),
        "f16_top1_agreement".into(),
        "resident_memory".into(),
        "ready".into(),
    ];
    for refs in [1, 20, 100] {
        for dim in [448, 2048] {
            expected.push(format!("search_vs_gemm_315x{refs}x{dim}"));
        }
    }
    let targets = r["targets"].as_array().expect("targets");
    for id in &expected {
        let t = targets
            .iter()
            .find(|t| t["id"] == id.as_str())
            .unwrap_or_else(|| panic!("target {id} missing"));
        positive(t, "measured");
        positive(t, "limit");
        positive(t, "ratio");
        assert!(t["verdict"] == "pass" || t["verdict"] == "miss", "{t}");
    }
    assert_eq!(targets.len(), expected.len());
}

#[test]
fn sections_and_the_model_manifest_can_be_chosen() {
    let home = AgentHome::new("", "");
    let manifest = home.path().join("models/retail-test.toml");
    let out = home.cli(&[
        "bench",
        "--quick",
        "--json",
        "--sections",
        "inference,stages",
        "--model-manifest",
        manifest.to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(r["inference"].is_object() && r["stages"].is_object());
    for absent in ["pipeline", "search", "memory", "end_to_end", "sweep"] {
        assert!(r[absent].is_null(), "{absent} ran");
    }
    let ids: Vec<&str> = r["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert_eq!(ids, ["resize_vs_decode"]);

    let bad = home.cli(&["bench", "--sections", "nonsense"]);
    assert!(!bad.status.success());
}
