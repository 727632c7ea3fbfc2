//! The export file: a whole reference DB in one portable, versioned file.
//!
//! Format (`format_version` 1): one MessagePack map with string keys —
//! `format` = `"retail-agent/refdb"`, `format_version` = 1, `exported_ms`,
//! `db_version`, `digest`, `model_fingerprint` (of the exporting agent), and
//! `refs`: an array of `{ref_id, label, kind: "image"|"embedding",
//! source_sha256: bin(32), embedding: [f32], model_fingerprint, image:
//! bin|nil}` in ascending `ref_id` order. Readers reject another `format`
//! or a `format_version` they do not know.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{NewRef, RefDb, RefDbError, RefOp, StoredRef};

pub const FORMAT: &str = "retail-agent/refdb";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a reference DB export: {message}")]
    Format { path: PathBuf, message: String },
    #[error(transparent)]
    Db(#[from] RefDbError),
    #[error("reference {ref_id:?} was embedded by model {got} and carries no image to re-embed it with the running model {expected}")]
    CannotReembed {
        ref_id: String,
        got: String,
        expected: String,
    },
    #[error("re-embedding reference {ref_id:?} failed: {message}")]
    Reembed { ref_id: String, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportFile {
    pub format: String,
    pub format_version: u32,
    pub exported_ms: u64,
    pub db_version: u64,
    pub digest: String,
    pub model_fingerprint: String,
    pub refs: Vec<StoredRef>,
}

/// Writes the whole DB to `path` (atomically: a temporary file renamed).
pub fn export_to(db: &RefDb, path: &Path) -> Result<ExportFile, ExportError> {
    let meta = db.meta();
    let file = ExportFile {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        exported_ms: crate::clock::now_ms(),
        db_version: meta.version,
        digest: meta.digest,
        model_fingerprint: db.settings().model_fingerprint.clone(),
        refs: db.records()?,
    };
    let bytes = rmp_serde::to_vec_named(&file).map_err(|e| ExportError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let tmp = path.with_extension("tmp");
    let write_err = |source| ExportError::Write {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)?;
    Ok(file)
}

/// Reads and checks an export file.
pub fn read(path: &Path) -> Result<ExportFile, ExportError> {
    let bytes = std::fs::read(path).map_err(|source| ExportError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let format_err = |message: String| ExportError::Format {
        path: path.to_path_buf(),
        message,
    };
    let file: ExportFile = rmp_serde::from_slice(&bytes).map_err(|e| format_err(e.to_string()))?;
    if file.format != FORMAT {
        return Err(format_err(format!(
            "format is {:?}, expected {FORMAT:?}",
            file.format
        )));
    }
    if file.format_version != FORMAT_VERSION {
        return Err(format_err(format!(
            "format_version {} is not supported (this agent reads {FORMAT_VERSION})",
            file.format_version
        )));
    }
    Ok(file)
}

impl ExportFile {
    /// The ops that replace a DB's content with this file's. References
    /// from another model are re-embedded from their image with `reembed`.
    pub fn into_ops(
        self,
        model_fingerprint: &str,
        mut reembed: impl FnMut(&[u8]) -> Result<Vec<f32>, String>,
    ) -> Result<Vec<RefOp>, ExportError> {
        let mut ops = vec![RefOp::Clear];
        for r in self.refs {
            let source_sha256: [u8; 32] =
                r.source_sha256
                    .as_slice()
                    .try_into()
                    .map_err(|_| ExportError::Reembed {
                        ref_id: r.ref_id.clone(),
                        message: "source_sha256 is not 32 bytes".into(),
                    })?;
            let embedding = if r.model_fingerprint == model_fingerprint {
                r.embedding
            } else {
                let image = r
                    .image
                    .as_deref()
                    .ok_or_else(|| ExportError::CannotReembed {
                        ref_id: r.ref_id.clone(),
                        got: r.model_fingerprint.clone(),
                        expected: model_fingerprint.to_string(),
                    })?;
                reembed(image).map_err(|message| ExportError::Reembed {
                    ref_id: r.ref_id.clone(),
                    message,
                })?
            };
            ops.push(RefOp::Upsert(NewRef {
                ref_id: r.ref_id,
                label: r.label,
                kind: r.kind,
                source_sha256,
                embedding,
                model_fingerprint: model_fingerprint.to_string(),
                image: r.image,
            }));
        }
        Ok(ops)
    }
}
