//! Image folders in TAO's layout: `root/<label>/*.jpg`, one sub-folder per
//! label (class index = sorted folder names).
//!
//! Only lists files; decoding belongs to [`crate::vision`].

use std::path::{Path, PathBuf};

/// File extensions taken as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "webp"];

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read folder {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} holds no label folders with images (expected {0}/<label>/*.jpg)")]
    Empty(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabeledImage {
    pub label: String,
    pub path: PathBuf,
    /// `<label>/<file name>`: a stable reference id.
    pub ref_id: String,
}

/// All images under `root`, sorted by label then file name.
pub fn scan(root: &Path) -> Result<Vec<LabeledImage>, DatasetError> {
    let read = |p: &Path| {
        std::fs::read_dir(p).map_err(|source| DatasetError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let mut labels: Vec<PathBuf> = read(root)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    labels.sort();
    let mut out = Vec::new();
    for dir in labels {
        let label = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files: Vec<PathBuf> = read(&dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        files.sort();
        for path in files {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push(LabeledImage {
                ref_id: format!("{label}/{name}"),
                label: label.clone(),
                path,
            });
        }
    }
    if out.is_empty() {
        return Err(DatasetError::Empty(root.to_path_buf()));
    }
    Ok(out)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}
