//! The seal: the DB's `{version, digest, refs}` written beside sled's files
//! after every change (a small file, replaced atomically).
//!
//! sled recovers from a damaged log by keeping what precedes the damage,
//! so a corrupt DB often opens *without an error*, quietly older or empty.
//! Comparing what opened with the seal turns that into a detected
//! corruption. A DB ahead of its seal is the crash window between a commit
//! and its seal, and is fine.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DbMeta;

const FILE: &str = "retail-agent.seal";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seal {
    version: u64,
    digest: String,
    refs: u64,
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Why `opened` cannot be the DB that was sealed, if it cannot.
pub fn check(dir: &Path, opened: &DbMeta) -> Option<String> {
    let text = std::fs::read(path(dir)).ok()?;
    let Ok(seal) = serde_json::from_slice::<Seal>(&text) else {
        return Some(format!("its seal {} is unreadable", path(dir).display()));
    };
    if opened.version < seal.version {
        return Some(format!(
            "it opened at version {} ({} refs) but version {} ({} refs) was written: storage lost data",
            opened.version, opened.refs, seal.version, seal.refs
        ));
    }
    if opened.version == seal.version && opened.digest != seal.digest {
        return Some(format!(
            "its content at version {} does not match what was written (digest {} instead of {})",
            seal.version, opened.digest, seal.digest
        ));
    }
    None
}

/// Records `meta` as the DB's current state (write, fsync, rename).
pub fn write(dir: &Path, meta: &DbMeta) -> std::io::Result<()> {
    let seal = Seal {
        version: meta.version,
        digest: meta.digest.clone(),
        refs: meta.refs,
    };
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(&seal).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(dir))?;
    std::fs::File::open(dir)?.sync_all()
}
