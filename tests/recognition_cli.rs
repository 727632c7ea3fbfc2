//! The offline commands driven through the real binary, a real ONNX Runtime
//! and a real sled directory: enrol, recognise, evaluate, export/import,
//! and the one-line errors for the mistakes users make.

mod common;

use common::{repo_path, AgentHome};
use retail_testkit::process::{stderr, stdout};

fn synthetic(sub: &str) -> String {
    repo_path(&format!("testdata/synthetic/{sub}"))
        .display()
        .to_string()
}

#[test]
fn eval_on_the_synthetic_set_reaches_095_top1_at_5_refs_per_class() {
    let home = AgentHome::new("", "");
    let html = home.path().join("report.html");
    let out = home.cli(&[
        "eval",
        "--refs",
        &synthetic("refs"),
        "--queries",
        &synthetic("queries"),
        "--refs-per-class",
        "1,5,all",
        "--json",
        "--html",
        html.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON report");
    let rows = report["rows"].as_array().unwrap();
    let at5 = rows.iter().find(|r| r["refs_per_class"] == "5").unwrap();
    assert_eq!(at5["refs"], 60, "5 references for each of 12 labels");
    assert!(
        at5["top1"].as_f64().unwrap() >= 0.95,
        "top-1 at 5 refs/class: {at5}"
    );
    assert_eq!(report["queries"], 96);
    assert!(report["classifier_accuracy"].as_f64().unwrap() >= 0.9);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("Most confused"));
}

#[test]
fn enrolled_references_recognise_queries_with_their_true_label() {
    let home = AgentHome::new("", "");
    home.enroll_synthetic();
    let q1 = repo_path("testdata/synthetic/queries/green-tea-20bags/03.jpg");
    let q2 = repo_path("testdata/synthetic/queries/mint-gum-10pk/05.jpg");
    let out = home.cli(&[
        "recognize",
        "--json",
        "--top-k",
        "3",
        q1.to_str().unwrap(),
        q2.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["label"], "green-tea-20bags");
    assert_eq!(lines[1]["label"], "mint-gum-10pk");
    assert_eq!(lines[0]["decision"], "match");
    assert_eq!(lines[0]["candidates"].as_array().unwrap().len(), 3);
    assert_eq!(lines[0]["classifier"]["label"], "green-tea-20bags");
}

#[test]
fn export_then_import_elsewhere_keeps_the_content_digest() {
    let home = AgentHome::new("", "");
    home.enroll_synthetic();
    let file = home.path().join("refs.rdb");
    let out = home.cli(&["db", "export", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stats = |h: &AgentHome| -> serde_json::Value {
        let o = h.cli(&["db", "stats", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let before = stats(&home);
    let other = AgentHome::new("", "");
    let out = other.cli(&["db", "import", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after = stats(&other);
    assert_eq!(before["refs"], 120);
    assert_eq!(after["refs"], 120);
    assert_eq!(after["labels"], 12);
    assert_eq!(before["digest"], after["digest"]);
}

fn home_with_manifest_edit(edit: impl Fn(&str) -> String) -> AgentHome {
    let home = AgentHome::new("", "");
    let manifest = home.path().join("models/retail-test.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, edit(&text)).unwrap();
    home
}

fn query() -> String {
    repo_path("testdata/synthetic/queries/acme-cola-330ml/00.jpg")
        .display()
        .to_string()
}

#[test]
fn a_model_whose_input_does_not_match_its_manifest_is_refused_with_the_fix() {
    let home = home_with_manifest_edit(|t| t.replace("name = \"input\"", "name = \"inputs\""));
    let out = home.cli(&["recognize", &query()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("input `inputs` not found"), "{err}");
    assert!(
        err.contains("`input`") && err.contains("set input.name"),
        "{err}"
    );
}

#[test]
fn a_model_whose_embedding_size_does_not_match_its_manifest_is_refused() {
    let home = home_with_manifest_edit(|t| t.replace("dim = 128", "dim = 448"));
    let out = home.cli(&["recognize", &query()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("embedding.dim") && err.contains("448"),
        "{err}"
    );
}

#[test]
fn a_missing_onnxruntime_library_is_reported_with_how_to_fix_it() {
    let home = AgentHome::new("", "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(["recognize", &query(), "-c"])
        .arg(&home.config_path)
        .env(
            "RETAIL_AGENT__RUNTIME__ONNXRUNTIME_LIBRARY",
            "/nonexistent/libonnxruntime.so",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot load ONNX Runtime from /nonexistent/libonnxruntime.so"),
        "{err}"
    );
    assert!(err.contains("ORT_DYLIB_PATH"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn a_file_that_is_not_onnx_runtime_is_refused() {
    let home = AgentHome::new("", "");
    let fake = home.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not a shared object").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(["recognize", &query(), "-c"])
        .arg(&home.config_path)
        .env("RETAIL_AGENT__RUNTIME__ONNXRUNTIME_LIBRARY", &fake)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot load ONNX Runtime from"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_corrupt_model_file_is_reported_as_such() {
    let home = AgentHome::new("", "");
    std::fs::write(
        home.path().join("models/retail-test.onnx"),
        b"\x08\x07garbage",
    )
    .unwrap();
    let out = home.cli(&["recognize", &query()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("corrupt or not an ONNX model"), "{err}");
}

#[test]
fn a_pinned_checksum_catches_a_different_model_file() {
    let home = home_with_manifest_edit(|t| {
        t.replace("onnx = \"retail-test.onnx\"", "onnx = \"retail-test.onnx\"\nsha256 = \"00000000000000000000000000000000000000000000000000000000000000ff\"")
    });
    let out = home.cli(&["recognize", &query()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("manifest pins"), "{}", stderr(&out));
}

#[test]
fn a_corrupt_image_fails_alone_with_a_clear_error() {
    let home = AgentHome::new("", "");
    home.enroll_synthetic();
    let bad = home.path().join("broken.jpg");
    let mut bytes = std::fs::read(query()).unwrap();
    bytes.truncate(200);
    std::fs::write(&bad, bytes).unwrap();
    let out = home.cli(&["recognize", bad.to_str().unwrap(), &query()]);
    assert!(
        !out.status.success(),
        "a failed image makes the command fail"
    );
    let text = stdout(&out);
    assert!(
        text.contains("broken.jpg: error: cannot decode image"),
        "{text}"
    );
    assert!(
        text.contains("00.jpg: acme-cola-330ml"),
        "the good image is still recognised: {text}"
    );
}

#[test]
fn a_reference_of_the_wrong_dimension_is_refused_and_nothing_is_imported() {
    use retail_agent::refdb::{export, SourceKind, StoredRef};
    let home = AgentHome::new("", "");
    let manifest =
        retail_agent::manifest::ModelManifest::load(&home.path().join("models/retail-test.toml"))
            .unwrap();
    let good = StoredRef {
        ref_id: "ok".into(),
        label: "cola".into(),
        kind: SourceKind::Embedding,
        source_sha256: vec![0; 32],
        embedding: vec![0.1; 128],
        model_fingerprint: manifest.fingerprint().into(),
        image: None,
    };
    let bad = StoredRef {
        ref_id: "short".into(),
        embedding: vec![0.1; 64],
        ..good.clone()
    };
    let file = export::ExportFile {
        format: export::FORMAT.into(),
        format_version: export::FORMAT_VERSION,
        exported_ms: 0,
        db_version: 3,
        digest: String::new(),
        model_fingerprint: manifest.fingerprint().into(),
        refs: vec![good, bad],
    };
    let path = home.path().join("bad.rdb");
    std::fs::write(&path, rmp_serde::to_vec_named(&file).unwrap()).unwrap();
    let out = home.cli(&["db", "import", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("\"short\" has a 64-dimensional embedding; the model produces 128"),
        "{err}"
    );
    let stats = home.cli(&["db", "stats", "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stdout(&stats)).unwrap();
    assert_eq!(stats["refs"], 0, "all or nothing");
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_masked() {
    let home = AgentHome::new("", "[bus]\npassword = \"hunter2\"\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(["check-config", "-c"])
        .arg(&home.config_path)
        .env("RETAIL_AGENT__BUS__PORT", "8883")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("port = 8883"),
        "environment override applied: {text}"
    );
    assert!(!text.contains("hunter2") && text.contains("********"));
    let bad = AgentHome::new("", "[bus]\nhots = \"x\"\n");
    let out = bad.cli(&["check-config"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("hots"));
}

#[test]
fn unusable_execution_providers_are_logged_and_the_next_one_is_used() {
    let home = AgentHome::new("", "");
    home.enroll_synthetic();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(["recognize", &query(), "-c"])
        .arg(&home.config_path)
        .env(
            "RETAIL_AGENT__RUNTIME__EXECUTION_PROVIDERS",
            "[\"tensorrt\", \"cuda\", \"cpu\"]",
        )
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    for ep in ["tensorrt", "cuda"] {
        assert!(
            err.lines()
                .any(|l| l.contains("execution provider unusable") && l.contains(ep)),
            "the {ep} failure is logged: {err}"
        );
    }
    assert!(
        err.contains("model loaded") && err.contains("\"cpu\""),
        "{err}"
    );
    assert!(stdout(&out).contains("acme-cola-330ml"));
}

#[test]
fn no_usable_execution_provider_is_an_error_that_says_what_to_add() {
    let home = AgentHome::new("", "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(["recognize", &query(), "-c"])
        .arg(&home.config_path)
        .env("RETAIL_AGENT__RUNTIME__EXECUTION_PROVIDERS", "[\"cuda\"]")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("no execution provider could be used (cuda:"),
        "{err}"
    );
    assert!(err.contains("add \"cpu\""), "{err}");
}

/// The synthetic set split for open-set tests: the first 8 labels enrolled
/// (references and queries), the last 4 held out as unenrolled products in
/// a mixed folder layout (flat files, nested folders, a non-image file).
struct HeldOut {
    dir: tempfile::TempDir,
    known_queries: Vec<std::path::PathBuf>,
    unknown_images: Vec<std::path::PathBuf>,
}

impl HeldOut {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut labels: Vec<_> = std::fs::read_dir(repo_path("testdata/synthetic/refs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        labels.sort();
        let (enrolled, held_out) = labels.split_at(8);
        let copy_dir = |from: &std::path::Path, to: &std::path::Path| -> Vec<std::path::PathBuf> {
            std::fs::create_dir_all(to).unwrap();
            let mut out = Vec::new();
            for e in std::fs::read_dir(from).unwrap() {
                let e = e.unwrap();
                let dest = to.join(e.file_name());
                std::fs::copy(e.path(), &dest).unwrap();
                out.push(dest);
            }
            out
        };
        let mut known_queries = Vec::new();
        for l in enrolled {
            copy_dir(
                &repo_path(&format!("testdata/synthetic/refs/{l}")),
                &dir.path().join("refs").join(l),
            );
            known_queries.extend(copy_dir(
                &repo_path(&format!("testdata/synthetic/queries/{l}")),
                &dir.path().join("queries").join(l),
            ));
        }
        let mut unknown_images = Vec::new();
        for (i, l) in held_out.iter().enumerate() {
            let from = repo_path(&format!("testdata/synthetic/queries/{l}"));
            if i % 2 == 0 {
                for e in std::fs::read_dir(&from).unwrap() {
                    let e = e.unwrap();
                    let dest = dir
                        .path()
                        .join("unknown")
                        .join(format!("{l}-{}", e.file_name().to_string_lossy()));
                    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
                    std::fs::copy(e.path(), &dest).unwrap();
                    unknown_images.push(dest);
                }
            } else {
                unknown_images.extend(copy_dir(&from, &dir.path().join("unknown/shelf/b").join(l)));
            }
        }
        std::fs::write(dir.path().join("unknown/README.txt"), "not an image").unwrap();
        Self {
            dir,
            known_queries,
            unknown_images,
        }
    }

    fn sub(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// (best similarity, best label) of each image, from `recognize` against
/// the enrolled DB: an independent path to the scores.
fn recognized(home: &AgentHome, images: &[std::path::PathBuf]) -> Vec<(f32, String)> {
    let mut args = vec!["recognize", "--json", "--top-k", "1"];
    let paths: Vec<String> = images.iter().map(|p| p.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    let out = home.cli(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["similarity"].as_f64().unwrap() as f32,
                v["candidates"][0]["label"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn open_set_rates_in_eval_match_a_brute_force_count_over_recognize() {
    let set = HeldOut::new();
    let home = AgentHome::new("", "[recognition]\nunknown_threshold = 0.5\n");
    let html = home.path().join("report.html");
    let out = home.cli(&[
        "eval",
        "--refs",
        &set.sub("refs"),
        "--queries",
        &set.sub("queries"),
        "--unknown",
        &set.sub("unknown"),
        "--refs-per-class",
        "all",
        "--json",
        "--html",
        html.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let o = &report["open_set"];
    assert_eq!(o["known_queries"], 64);
    assert_eq!(o["unknown_queries"], 32);

    // Brute force over the same images through `recognize`.
    let out = home.cli(&["enroll", "--refs", &set.sub("refs")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let known: Vec<(f32, bool)> = recognized(&home, &set.known_queries)
        .into_iter()
        .zip(&set.known_queries)
        .map(|((s, label), path)| {
            let truth = path
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap();
            (s, label == truth)
        })
        .collect();
    let unknown: Vec<f32> = recognized(&home, &set.unknown_images)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let (n, m) = (known.len() as f64, unknown.len() as f64);
    let mut wins = 0.0;
    for (k, _) in &known {
        for u in &unknown {
            wins += if k > u {
                1.0
            } else if k == u {
                0.5
            } else {
                0.0
            };
        }
    }
    let close = |a: &serde_json::Value, b: f64, what: &str| {
        let a = a.as_f64().unwrap_or_else(|| panic!("{what} missing"));
        assert!((a - b).abs() < 1e-9, "{what}: eval {a}, brute force {b}");
    };
    close(&o["auroc"], wins / (n * m), "auroc");
    let mut sorted: Vec<f32> = known.iter().map(|k| k.0).collect();
    sorted.sort_by(f32::total_cmp);
    let mut points: Vec<&serde_json::Value> =
        o["operating_points"].as_array().unwrap().iter().collect();
    assert_eq!(points.len(), 5);
    points.push(&o["at_configured_threshold"]);
    for (i, p) in points.iter().enumerate() {
        let t = p["threshold"].as_f64().unwrap() as f32;
        let fu_known = known.iter().filter(|k| k.0 < t).count() as f64 / n;
        let caught = unknown.iter().filter(|&&u| u < t).count() as f64 / m;
        let right = known.iter().filter(|k| k.1 && k.0 >= t).count() as f64 / n;
        close(
            &p["false_unknown_measured"],
            fu_known,
            "false_unknown_measured",
        );
        close(&p["unknown_detection"], caught, "unknown_detection");
        close(&p["accuracy_known"], right, "accuracy_known");
        if i < 5 {
            let q = p["false_unknown"].as_f64().unwrap();
            assert_eq!(t, sorted[(q * n).floor() as usize], "q-quantile at {q}");
            assert!(fu_known <= q, "measured {fu_known} over target {q}");
        } else {
            assert_eq!(t, 0.5);
        }
    }
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("Open set") && page.contains("configured threshold"));

    // The text report shows the same table.
    let out = home.cli(&[
        "eval",
        "--refs",
        &set.sub("refs"),
        "--queries",
        &set.sub("queries"),
        "--unknown",
        &set.sub("unknown"),
        "--refs-per-class",
        "all",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("AUROC"), "{}", stdout(&out));
}

#[test]
fn calibrate_write_sets_the_threshold_for_the_target_and_keeps_comments() {
    let set = HeldOut::new();
    let home = AgentHome::new("", "");
    let original = std::fs::read_to_string(&home.config_path).unwrap();
    let commented = format!(
        "# Store 17, till 3 -- keep this comment\n{}",
        original.replace(
            "[runtime]",
            "[recognition]\n# chosen by hand\nunknown_threshold = 0.5 # before calibration\n\n[runtime]"
        )
    );
    std::fs::write(&home.config_path, &commented).unwrap();
    let out = home.cli(&[
        "calibrate",
        "--refs",
        &set.sub("refs"),
        "--queries",
        &set.sub("queries"),
        "--unknown",
        &set.sub("unknown"),
        "--false-unknown",
        "0.1",
        "--write",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let c: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let t = c["chosen"]["threshold"].as_f64().unwrap() as f32;
    assert!(c["chosen"]["false_unknown_measured"].as_f64().unwrap() <= 0.1);
    let written = std::fs::read_to_string(&home.config_path).unwrap();
    assert!(written.starts_with("# Store 17, till 3 -- keep this comment\n"));
    assert!(written.contains("# chosen by hand\nunknown_threshold = "));
    assert!(written.contains(" # before calibration"), "{written}");
    let table: toml::Table = toml::from_str(&written).unwrap();
    let stored = table["recognition"]["unknown_threshold"]
        .as_float()
        .unwrap() as f32;
    assert_eq!(stored, t, "the config holds exactly the printed threshold");

    // The daemon's own decision with the written config: at most 10% of
    // the enrolled queries come back unknown.
    let out = home.cli(&["enroll", "--refs", &set.sub("refs")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut args = vec!["recognize", "--json"];
    let paths: Vec<String> = set
        .known_queries
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    args.extend(paths.iter().map(String::as_str));
    let out = home.cli(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let unknown = stdout(&out)
        .lines()
        .filter(|l| l.contains("\"decision\":\"unknown\""))
        .count();
    assert!(
        unknown as f64 <= 0.1 * set.known_queries.len() as f64,
        "{unknown} unknown"
    );

    // Without --unknown it still calibrates, on enrolled queries alone.
    let out = home.cli(&[
        "calibrate",
        "--refs",
        &set.sub("refs"),
        "--queries",
        &set.sub("queries"),
        "--false-unknown",
        "0.1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("unknown_threshold = {t}")), "{text}");
    assert!(text.contains("no --unknown images"), "{text}");
}

#[test]
fn empty_or_missing_folders_and_bad_targets_give_clear_errors() {
    let set = HeldOut::new();
    let home = AgentHome::new("", "");
    let empty = home.path().join("empty");
    std::fs::create_dir_all(empty.join("sub")).unwrap();
    let missing = home.path().join("missing");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "eval".into(),
                "--refs".into(),
                set.sub("refs"),
                "--queries".into(),
                set.sub("queries"),
                "--unknown".into(),
                empty.display().to_string(),
            ],
            "--unknown",
        ),
        (
            vec![
                "calibrate".into(),
                "--refs".into(),
                set.sub("refs"),
                "--queries".into(),
                missing.display().to_string(),
            ],
            "--queries",
        ),
        (
            vec![
                "calibrate".into(),
                "--refs".into(),
                empty.display().to_string(),
                "--queries".into(),
                set.sub("queries"),
            ],
            "--refs",
        ),
        (
            vec![
                "calibrate".into(),
                "--refs".into(),
                set.sub("refs"),
                "--queries".into(),
                set.sub("unknown/shelf/b"),
            ],
            "no enrolled queries",
        ),
        (
            vec![
                "calibrate".into(),
                "--refs".into(),
                set.sub("refs"),
                "--queries".into(),
                set.sub("queries"),
                "--false-unknown".into(),
                "1.5".into(),
            ],
            "--false-unknown",
        ),
    ];
    for (args, expect) in cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = home.cli(&argv);
        let err = stderr(&out);
        assert!(!out.status.success(), "{argv:?} succeeded");
        assert!(err.contains(expect), "{argv:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    }
}
