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
    #[error("{0} holds no images (looked in every sub-folder)")]
    NoImages(PathBuf),
}

/// Sub-folder depth [`scan_any`] descends to (it also guards against
/// symbolic-link loops).
const MAX_DEPTH: usize = 16;

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

/// All images anywhere under `root`, whatever the folder layout, sorted by
/// path. Their label is the folder they are in (relative to `root`; "." for
/// `root` itself) and their id the path relative to `root`.
pub fn scan_any(root: &Path) -> Result<Vec<LabeledImage>, DatasetError> {
    let mut out = Vec::new();
    let mut pending = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = pending.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| DatasetError::Read {
            path: dir.clone(),
            source,
        })?;
        for path in entries.flatten().map(|e| e.path()) {
            if path.is_dir() {
                if depth < MAX_DEPTH {
                    pending.push((path, depth + 1));
                }
            } else if path.is_file() && is_image(&path) {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let label = rel
                    .parent()
                    .map(|p| p.to_string_lossy().into_owned())
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| ".".into());
                out.push(LabeledImage {
                    ref_id: rel.to_string_lossy().into_owned(),
                    label,
                    path,
                });
            }
        }
    }
    if out.is_empty() {
        return Err(DatasetError::NoImages(root.to_path_buf()));
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_any_finds_images_in_any_layout_and_ignores_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("aisle3/shelf2")).unwrap();
        for f in [
            "top.jpg",
            "notes.txt",
            "aisle3/a.PNG",
            "aisle3/shelf2/b.jpeg",
        ] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        let found = scan_any(root).unwrap();
        let ids: Vec<&str> = found.iter().map(|i| i.ref_id.as_str()).collect();
        assert_eq!(ids, ["aisle3/a.PNG", "aisle3/shelf2/b.jpeg", "top.jpg"]);
        assert_eq!(found[2].label, ".");
        assert_eq!(found[1].label, "aisle3/shelf2");
    }

    #[test]
    fn scan_any_of_an_empty_or_missing_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        assert!(matches!(
            scan_any(dir.path()),
            Err(DatasetError::NoImages(_))
        ));
        assert!(matches!(
            scan_any(&dir.path().join("missing")),
            Err(DatasetError::Read { .. })
        ));
    }
}
