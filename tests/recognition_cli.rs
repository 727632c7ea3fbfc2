//! The offline commands driven through the real binary, a real ONNX Runtime
//! and a real sled directory: enrol, recognise, evaluate, export/import,
//! and the one-line errors for the mistakes users make.

mod common;

use common::{repo_path, AgentHome};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

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
