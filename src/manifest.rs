//! Model manifests: what the agent must know about an ONNX model to run it.
//!
//! A manifest (TOML under `agent-config/models/`) names the ONNX file, its
//! tensors and the preprocessing the model was trained with. This module owns
//! parsing, validating and fingerprinting; it does not run the model
//! ([`crate::engine`]) nor preprocess images ([`crate::vision`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read model manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model manifest {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot read model file {path}: {source} (download it and set `onnx` in {manifest})")]
    ModelFile {
        path: PathBuf,
        manifest: PathBuf,
        source: std::io::Error,
    },
    #[error("model file {path} has SHA-256 {actual}, but its manifest pins {expected}: the file is corrupt or another version; download it again or update `sha256` in the manifest")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("cannot read labels file {path}: {source}")]
    Labels {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorOrder {
    Rgb,
    Bgr,
}

/// How a crop is brought to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResizeMode {
    /// Stretch to the input size, ignoring aspect (DeepStream's nvinfer).
    Stretch,
    /// Keep aspect, fit inside, pad the rest with `pad` (0–255).
    Letterbox {
        #[serde(default)]
        pad: u8,
    },
    /// Stretch to `round(size * ratio)`, then cut the centre (TAO's eval path
    /// uses ratio 1.14: 255 then 224).
    ResizeThenCenterCrop { ratio: f32 },
}

/// Resampling filter of the resize; `bilinear` reproduces Pillow's
/// antialiased bilinear, as TAO trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    Bilinear,
    Bicubic,
    Nearest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    pub color_order: ColorOrder,
    /// Multiplies 0–255 pixel values before mean/std (usually 1/255).
    pub scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub resize: ResizeMode,
    #[serde(default = "default_filter")]
    pub filter: ResizeFilter,
}

fn default_filter() -> ResizeFilter {
    ResizeFilter::Bilinear
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    /// Input width and height in pixels (NCHW, 3 channels).
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    pub name: String,
    /// Expected dimension; checked against the model.
    pub dim: usize,
    /// L2-normalise embeddings (NVIDIA's tools do; twice is harmless).
    #[serde(default = "default_true")]
    pub normalize: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierSpec {
    pub name: String,
    /// One label per line; line index = output column.
    pub labels: PathBuf,
}

/// A model manifest as written in TOML.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Short model id reported in results, e.g. `nvidia-ror-v2.0`.
    pub id: String,
    /// Human description, including which source the values follow.
    #[serde(default)]
    pub description: String,
    /// ONNX file, relative to the manifest's directory.
    pub onnx: PathBuf,
    /// Optional pinned SHA-256 (hex) of the ONNX file.
    #[serde(default)]
    pub sha256: Option<String>,
    pub input: InputSpec,
    pub preprocess: Preprocess,
    pub embedding: EmbeddingSpec,
    #[serde(default)]
    pub classifier: Option<ClassifierSpec>,
    /// Largest batch to feed the model (TensorRT profiles are built for it).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
}

fn default_max_batch() -> usize {
    16
}

/// A loaded manifest with resolved paths, the model bytes' fingerprint and
/// the classifier labels.
#[derive(Debug, Clone)]
pub struct ModelManifest {
    pub file: ManifestFile,
    pub manifest_path: PathBuf,
    pub onnx_path: PathBuf,
    /// Full lower-case hex SHA-256 of the ONNX file.
    pub sha256: String,
    pub classifier_labels: Vec<String>,
}

impl ModelManifest {
    /// Reads and validates the manifest at `path` and hashes its ONNX file.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: ManifestFile = toml::from_str(&text).map_err(|e| ManifestError::Invalid {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let onnx_path = dir.join(&file.onnx);
        let bytes = std::fs::read(&onnx_path).map_err(|source| ManifestError::ModelFile {
            path: onnx_path.clone(),
            manifest: path.to_path_buf(),
            source,
        })?;
        let classifier_labels = match &file.classifier {
            Some(c) => {
                let labels_path = dir.join(&c.labels);
                read_labels(&labels_path)?
            }
            None => Vec::new(),
        };
        Self::from_parts(
            file,
            path.to_path_buf(),
            onnx_path,
            &bytes,
            classifier_labels,
        )
    }

    /// Builds a manifest from an already-parsed file and the model bytes
    /// (used for the embedded demo model).
    pub fn from_parts(
        file: ManifestFile,
        manifest_path: PathBuf,
        onnx_path: PathBuf,
        model_bytes: &[u8],
        classifier_labels: Vec<String>,
    ) -> Result<Self, ManifestError> {
        let invalid = |message: String| ManifestError::Invalid {
            path: manifest_path.clone(),
            message,
        };
        validate(&file).map_err(invalid)?;
        let sha256 = sha256_hex(model_bytes);
        if let Some(expected) = &file.sha256 {
            if !expected.eq_ignore_ascii_case(&sha256) {
                return Err(ManifestError::Checksum {
                    path: onnx_path,
                    expected: expected.clone(),
                    actual: sha256,
                });
            }
        }
        if file.classifier.is_some() && classifier_labels.is_empty() {
            return Err(invalid("the classifier labels file is empty".into()));
        }
        Ok(Self {
            file,
            manifest_path,
            onnx_path,
            sha256,
            classifier_labels,
        })
    }

    /// First 16 hex digits of the ONNX file's SHA-256, as the contract names it.
    pub fn fingerprint(&self) -> &str {
        &self.sha256[..16]
    }

    pub fn id(&self) -> &str {
        &self.file.id
    }
}

fn validate(f: &ManifestFile) -> Result<(), String> {
    if f.id.is_empty() {
        return Err("`id` must not be empty".into());
    }
    if f.input.width == 0 || f.input.height == 0 || f.input.width > 4096 || f.input.height > 4096 {
        return Err("input width and height must be between 1 and 4096".into());
    }
    if f.embedding.dim == 0 {
        return Err("embedding.dim must be at least 1".into());
    }
    if f.preprocess.std.iter().any(|s| !s.is_finite() || *s == 0.0) {
        return Err("preprocess.std values must be finite and non-zero".into());
    }
    if !f.preprocess.scale.is_finite() || f.preprocess.mean.iter().any(|m| !m.is_finite()) {
        return Err("preprocess.scale and preprocess.mean must be finite".into());
    }
    if let ResizeMode::ResizeThenCenterCrop { ratio } = f.preprocess.resize {
        if !(1.0..=4.0).contains(&ratio) {
            return Err("resize ratio must be between 1.0 and 4.0".into());
        }
    }
    if f.max_batch == 0 {
        return Err("max_batch must be at least 1".into());
    }
    Ok(())
}

/// Reads a labels file: one label per line, trailing whitespace trimmed,
/// blank trailing lines ignored.
pub fn read_labels(path: &Path) -> Result<Vec<String>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Labels {
        path: path.to_path_buf(),
        source,
    })?;
    let mut labels: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
    while labels.last().is_some_and(String::is_empty) {
        labels.pop();
    }
    Ok(labels)
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

pub use crate::text::hex;
