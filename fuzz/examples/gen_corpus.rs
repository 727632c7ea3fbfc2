//! Writes the seed corpus (retail_agent_fuzz::seeds) to corpus/<target>/,
//! beside what the fuzzer has added:
//!   cargo +nightly run --manifest-path fuzz/Cargo.toml --example gen_corpus
use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for s in retail_agent_fuzz::seeds::all() {
        let dir = root.join(s.target);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("seed_{}", s.name));
        std::fs::write(&path, &s.bytes)?;
        println!("{} ({} bytes)", path.display(), s.bytes.len());
    }
    Ok(())
}
