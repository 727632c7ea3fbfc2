//! Embeds the synthetic product images of testdata/synthetic into the
//! binary, so `retail-agent demo` is self-contained.

use std::fmt::Write;
use std::path::Path;

fn list(root: &Path) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let Ok(labels) = std::fs::read_dir(root) else {
        return out;
    };
    let mut labels: Vec<_> = labels
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    labels.sort();
    for dir in labels {
        let label = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            out.push((
                label.clone(),
                name,
                f.canonicalize().unwrap().display().to_string(),
            ));
        }
    }
    out
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/synthetic");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut code = String::new();
    for (name, sub) in [("DEMO_REFS", "refs"), ("DEMO_QUERIES", "queries")] {
        let _ = writeln!(
            code,
            "/// (label, file name, bytes) of testdata/synthetic/{sub}."
        );
        let _ = writeln!(code, "pub static {name}: &[(&str, &str, &[u8])] = &[");
        for (label, file, path) in list(&root.join(sub)) {
            let _ = writeln!(code, "    ({label:?}, {file:?}, include_bytes!({path:?})),");
        }
        let _ = writeln!(code, "];");
    }
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("demo_assets.rs");
    std::fs::write(out, code).unwrap();
}
