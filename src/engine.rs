//! ONNX Runtime: finding the library, choosing the execution provider,
//! checking the model against its manifest and running batches.
//!
//! Owns the `ort` session. It takes a ready NCHW batch and returns
//! embeddings (L2-normalised) and classifier scores; it knows nothing of
//! images ([`crate::vision`]) or of references ([`crate::refdb`]). A session
//! is `!Sync` to run, so the daemon keeps the engine on its own thread.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::ep::{self, ExecutionProvider};
use ort::session::Session;
use ort::value::{TensorRef, ValueType};

use crate::config::{ExecutionProviderKind, RuntimeConfig};
use crate::manifest::ModelManifest;

/// Environment variable naming the ONNX Runtime library, as ort reads it.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("ONNX Runtime library not found (looked in: {searched}). Install it (`pip install onnxruntime`, or JetPack's onnxruntime-gpu on a Jetson) and set runtime.onnxruntime_library or ORT_DYLIB_PATH to its libonnxruntime.so")]
    LibraryNotFound { searched: String },
    #[error("cannot load ONNX Runtime from {path}: {message}. Point runtime.onnxruntime_library or ORT_DYLIB_PATH at a libonnxruntime.so of version 1.17 or newer")]
    Library { path: PathBuf, message: String },
    #[error("ONNX Runtime was already loaded from {loaded}; cannot switch to {requested} in the same process")]
    LibraryConflict { loaded: PathBuf, requested: PathBuf },
    #[error("cannot load model {path}: {message}. The file is corrupt or not an ONNX model: download it again or regenerate it")]
    Model { path: PathBuf, message: String },
    #[error("model {path} does not match its manifest {manifest}: {message}")]
    Mismatch {
        path: PathBuf,
        manifest: PathBuf,
        message: String,
    },
    #[error(
        "no execution provider could be used ({tried}); add \"cpu\" to runtime.execution_providers"
    )]
    NoProvider { tried: String },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("batch of {got} values is not {n} images of {per_image} values")]
    BatchShape {
        got: usize,
        n: usize,
        per_image: usize,
    },
}

struct LoadedRuntime {
    path: PathBuf,
    env: ort::environment::Environment,
}

static RUNTIME: OnceLock<LoadedRuntime> = OnceLock::new();

/// Finds the ONNX Runtime library: the configured path, then `ORT_DYLIB_PATH`,
/// then well-known places (a pip-installed `onnxruntime` in a virtualenv
/// beside the working directory or the executable, user and system
/// site-packages, `/usr/lib/<arch>-linux-gnu`, `/usr/local/lib`).
pub fn locate_library(configured: Option<&Path>) -> Result<PathBuf, EngineError> {
    if let Some(p) = configured {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(ORT_DYLIB_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let candidates = well_known_library_dirs();
    for dir in &candidates {
        if let Some(found) = find_library_in(dir) {
            return Ok(found);
        }
    }
    Err(EngineError::LibraryNotFound {
        searched: format!(
            "runtime.onnxruntime_library, ${ORT_DYLIB_ENV}, {}",
            candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

fn well_known_library_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    let mut venvs: Vec<PathBuf> = vec![PathBuf::from(".venv")];
    if let Ok(exe) = std::env::current_exe() {
        for anc in exe.ancestors().skip(1).take(4) {
            venvs.push(anc.join(".venv"));
        }
    }
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        venvs.insert(0, PathBuf::from(v));
    }
    for v in venvs {
        roots.push(v.join("lib"));
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        roots.push(home.join(".local/lib"));
        if let Ok(entries) = std::fs::read_dir(home.join(".pyenv/versions")) {
            roots.extend(entries.flatten().map(|e| e.path().join("lib")));
        }
    }
    roots.push(PathBuf::from("/usr/local/lib"));
    roots.push(PathBuf::from("/usr/lib"));
    let mut dirs = Vec::new();
    for root in roots {
        if let Ok(entries) = std::fs::read_dir(&root) {
            let mut pythons: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("python3"))
                })
                .collect();
            pythons.sort();
            for py in pythons.into_iter().rev() {
                dirs.push(py.join("site-packages/onnxruntime/capi"));
                dirs.push(py.join("dist-packages/onnxruntime/capi"));
            }
        }
    }
    dirs.push(PathBuf::from(
        "/usr/lib/python3/dist-packages/onnxruntime/capi",
    ));
    dirs.push(PathBuf::from(format!(
        "/usr/lib/{}-linux-gnu",
        std::env::consts::ARCH
    )));
    dirs.push(PathBuf::from("/usr/local/lib"));
    dirs
}

fn find_library_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == "libonnxruntime.so" || n.starts_with("libonnxruntime.so."))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Loads ONNX Runtime once per process and returns its environment.
pub fn runtime(
    configured: Option<&Path>,
) -> Result<&'static ort::environment::Environment, EngineError> {
    let path = locate_library(configured)?;
    if let Some(rt) = RUNTIME.get() {
        if rt.path != path {
            return Err(EngineError::LibraryConflict {
                loaded: rt.path.clone(),
                requested: path,
            });
        }
        return Ok(&rt.env);
    }
    if !path.is_file() {
        return Err(EngineError::Library {
            path,
            message: "no such file".into(),
        });
    }
    let lib_err = |message: String| EngineError::Library {
        path: path.clone(),
        message,
    };
    let env = ort::init_from(&path)
        .map_err(|e| lib_err(e.to_string()))?
        .with_name("retail-agent")
        .build()
        .map_err(|e| lib_err(e.to_string()))?;
    let rt = RUNTIME.get_or_init(|| LoadedRuntime { path, env });
    Ok(&rt.env)
}

/// Path of the ONNX Runtime library loaded in this process, if any.
pub fn loaded_library() -> Option<&'static Path> {
    RUNTIME.get().map(|rt| rt.path.as_path())
}

/// Options the engine needs beyond the manifest.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub runtime: RuntimeConfig,
    /// Where TensorRT keeps built engines and its timing cache (one
    /// subdirectory per model, TensorRT version and GPU:
    /// [`crate::engine_cache`]).
    pub engine_cache_dir: PathBuf,
    /// Largest batch the pipeline runs: TensorRT's optimisation profile is
    /// built for 1 to this (held within the manifest's `max_batch`).
    pub max_batch: usize,
}

/// Results of one batch, reused between runs to avoid allocation.
#[derive(Debug, Default, Clone)]
pub struct EngineOutput {
    /// `n * dim` embeddings, L2-normalised when the manifest says so.
    pub embeddings: Vec<f32>,
    /// `n * classes` probabilities, when the model has a classifier.
    pub class_probs: Vec<f32>,
    pub n: usize,
}

/// A loaded model, ready to run batches.
pub struct Engine {
    session: Session,
    manifest: ModelManifest,
    provider: ExecutionProviderKind,
    dim: usize,
    classes: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.manifest.id())
            .field("provider", &self.provider)
            .field("dim", &self.dim)
            .finish()
    }
}

impl Engine {
    /// Loads ONNX Runtime, opens the manifest's model with the first
    /// execution provider that works, and checks its tensors.
    pub fn load(manifest: ModelManifest, options: &EngineOptions) -> Result<Self, EngineError> {
        let env = runtime(options.runtime.onnxruntime_library.as_deref())?;
        let mut tried = Vec::new();
        let mut last_model_error = None;
        for &kind in &options.runtime.execution_providers {
            match open_session(env, &manifest, options, kind) {
                Ok(session) => {
                    let engine = Self::checked(session, manifest, kind)?;
                    tracing::info!(
                        provider = kind.name(),
                        model = engine.manifest.id(),
                        fingerprint = engine.manifest.fingerprint(),
                        onnxruntime = %loaded_library().map(|p| p.display().to_string()).unwrap_or_default(),
                        "model loaded"
                    );
                    return Ok(engine);
                }
                Err(OpenError::Provider(message)) => {
                    tracing::warn!(
                        provider = kind.name(),
                        "execution provider unusable, trying the next: {message}"
                    );
                    tried.push(format!("{}: {message}", kind.name()));
                }
                Err(OpenError::Model(message)) => {
                    if kind == ExecutionProviderKind::Cpu {
                        return Err(EngineError::Model {
                            path: manifest.onnx_path.clone(),
                            message,
                        });
                    }
                    tracing::warn!(
                        provider = kind.name(),
                        "model failed to load with this provider, trying the next: {message}"
                    );
                    tried.push(format!("{}: {message}", kind.name()));
                    last_model_error = Some(message);
                }
            }
        }
        match last_model_error {
            Some(message) => Err(EngineError::Model {
                path: manifest.onnx_path.clone(),
                message,
            }),
            None => Err(EngineError::NoProvider {
                tried: tried.join("; "),
            }),
        }
    }

    fn checked(
        session: Session,
        manifest: ModelManifest,
        provider: ExecutionProviderKind,
    ) -> Result<Self, EngineError> {
        let (dim, classes) =
            check_tensors(&session, &manifest).map_err(|message| EngineError::Mismatch {
                path: manifest.onnx_path.clone(),
                manifest: manifest.manifest_path.clone(),
                message,
            })?;
        Ok(Self {
            session,
            manifest,
            provider,
            dim,
            classes,
        })
    }

    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    /// The execution provider actually in use.
    pub fn provider(&self) -> ExecutionProviderKind {
        self.provider
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of classifier classes (0 without a classifier).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Values of one image in the input tensor.
    pub fn image_len(&self) -> usize {
        3 * self.manifest.file.input.width as usize * self.manifest.file.input.height as usize
    }

    /// Runs `n` images laid out NCHW in `input`, in chunks of the
    /// manifest's `max_batch`, and writes the results into `out`.
    pub fn run(
        &mut self,
        input: &[f32],
        n: usize,
        out: &mut EngineOutput,
    ) -> Result<(), EngineError> {
        let per_image = self.image_len();
        if input.len() != n * per_image {
            return Err(EngineError::BatchShape {
                got: input.len(),
                n,
                per_image,
            });
        }
        out.n = n;
        out.embeddings.clear();
        out.class_probs.clear();
        let (h, w) = (
            self.manifest.file.input.height as usize,
            self.manifest.file.input.width as usize,
        );
        let max_batch = self.manifest.file.max_batch;
        let classifier = self
            .manifest
            .file
            .classifier
            .as_ref()
            .map(|c| c.name.clone());
        for (chunk_index, chunk) in input.chunks(max_batch * per_image).enumerate() {
            let b = chunk.len() / per_image;
            let tensor = TensorRef::from_array_view(([b, 3, h, w], chunk))
                .map_err(|e| EngineError::Run(e.to_string()))?;
            let input_name = self.manifest.file.input.name.as_str();
            let outputs = self
                .session
                .run(ort::inputs![input_name => tensor])
                .map_err(|e| EngineError::Run(e.to_string()))?;
            let emb_name = &self.manifest.file.embedding.name;
            let (_, emb) = outputs
                .get(emb_name)
                .ok_or_else(|| EngineError::Run(format!("output {emb_name} missing")))?
                .try_extract_tensor::<f32>()
                .map_err(|e| EngineError::Run(e.to_string()))?;
            if emb.len() != b * self.dim {
                return Err(EngineError::Run(format!(
                    "embedding output has {} values for {b} images of dimension {} (chunk {chunk_index})",
                    emb.len(),
                    self.dim
                )));
            }
            out.embeddings.extend_from_slice(emb);
            if let Some(name) = &classifier {
                let (_, probs) = outputs
                    .get(name)
                    .ok_or_else(|| EngineError::Run(format!("output {name} missing")))?
                    .try_extract_tensor::<f32>()
                    .map_err(|e| EngineError::Run(e.to_string()))?;
                if probs.len() != b * self.classes {
                    return Err(EngineError::Run(format!(
                        "classifier output has {} values for {b} images of {} classes",
                        probs.len(),
                        self.classes
                    )));
                }
                out.class_probs.extend_from_slice(probs);
            }
        }
        if self.manifest.file.embedding.normalize {
            for row in out.embeddings.chunks_exact_mut(self.dim) {
                crate::refdb::index::l2_normalize(row);
            }
        }
        if self.classes > 0 {
            for row in out.class_probs.chunks_exact_mut(self.classes) {
                softmax_unless_probabilities(row);
            }
        }
        Ok(())
    }
}

enum OpenError {
    /// The execution provider cannot be used here.
    Provider(String),
    /// The model itself failed to load.
    Model(String),
}

fn open_session(
    env: &ort::environment::Environment,
    manifest: &ModelManifest,
    options: &EngineOptions,
    kind: ExecutionProviderKind,
) -> Result<Session, OpenError> {
    let rt = &options.runtime;
    let input = &manifest.file.input;
    let available = match kind {
        ExecutionProviderKind::Tensorrt => ep::TensorRT::is_available(),
        ExecutionProviderKind::Cuda => ep::CUDA::is_available(),
        ExecutionProviderKind::Cpu => Ok(true),
    };
    match available {
        Ok(true) => {}
        Ok(false) => {
            return Err(OpenError::Provider(
                "not compiled into this ONNX Runtime library".into(),
            ))
        }
        Err(e) => return Err(OpenError::Provider(e.to_string())),
    }
    let dispatch = match kind {
        ExecutionProviderKind::Tensorrt => {
            let cache = crate::engine_cache::directory(
                &options.engine_cache_dir,
                manifest.fingerprint(),
                rt.device_index,
            );
            let fresh = std::fs::read_dir(&cache).map_or(true, |mut d| d.next().is_none());
            tracing::info!(
                cache = %cache.display(),
                "TensorRT engine cache{}",
                if fresh {
                    ": empty, so TensorRT builds the engine now (minutes on a Jetson; cached for later starts)"
                } else {
                    ""
                }
            );
            if let Err(e) = std::fs::create_dir_all(&cache) {
                return Err(OpenError::Provider(format!(
                    "cannot create the engine cache directory {}: {e}",
                    cache.display()
                )));
            }
            let cache = cache.display().to_string();
            let shape = |b: usize| format!("{}:{b}x3x{}x{}", input.name, input.height, input.width);
            let batch = options.max_batch.clamp(1, manifest.file.max_batch.max(1));
            let mut trt = ep::TensorRT::default();
            if rt.tensorrt_workspace_mb > 0 {
                trt = trt.with_max_workspace_size(
                    usize::try_from(rt.tensorrt_workspace_mb.saturating_mul(1 << 20))
                        .unwrap_or(usize::MAX),
                );
            }
            trt.with_device_id(rt.device_index)
                .with_fp16(rt.tensorrt_fp16)
                .with_engine_cache(true)
                .with_engine_cache_path(&cache)
                .with_timing_cache(true)
                .with_timing_cache_path(&cache)
                .with_profile_min_shapes(shape(1))
                .with_profile_opt_shapes(shape(batch))
                .with_profile_max_shapes(shape(batch))
                .build()
        }
        ExecutionProviderKind::Cuda => ep::CUDA::default().with_device_id(rt.device_index).build(),
        // ort's CPU provider turns ONNX Runtime's memory arena off unless
        // asked; without it every run maps its activations afresh (page
        // faults on each batch: 4x slower at batch 8 on the bundled model).
        ExecutionProviderKind::Cpu => ep::CPU::default().with_arena_allocator(true).build(),
    }
    .error_on_failure();
    // The memory pattern plans one block of activations per input shape,
    // and the batch size varies from run to run: with it on, ONNX Runtime
    // kept 43 MiB more after batches of 1 to 8 on a 1.5 GFLOPs model, for
    // no measurable speed (`retail-agent bench`; ONNX Runtime's own advice
    // for dynamic batches).
    let mut builder = Session::builder(env)
        .map_err(|e| OpenError::Provider(e.to_string()))?
        .with_no_environment_execution_providers()
        .map_err(|e| OpenError::Provider(e.to_string()))?
        .with_memory_pattern(false)
        .map_err(|e| OpenError::Provider(e.to_string()))?;
    if rt.intra_threads > 0 {
        builder = builder
            .with_intra_threads(rt.intra_threads)
            .map_err(|e| OpenError::Provider(e.to_string()))?;
    }
    if let Some(spin) = rt.allow_spinning {
        builder = builder
            .with_intra_op_spinning(spin)
            .map_err(|e| OpenError::Provider(e.to_string()))?;
    }
    let mut builder = builder
        .with_execution_providers([dispatch])
        .map_err(|e| OpenError::Provider(e.to_string()))?;
    builder
        .commit_from_file(&manifest.onnx_path)
        .map_err(|e| OpenError::Model(e.to_string()))
}

/// Checks the session's tensors against the manifest; returns the embedding
/// dimension and the number of classes.
fn check_tensors(session: &Session, manifest: &ModelManifest) -> Result<(usize, usize), String> {
    let f = &manifest.file;
    let describe = |outlets: &[ort::value::Outlet]| {
        outlets
            .iter()
            .map(|o| format!("`{}` {}", o.name(), shape_text(o.dtype())))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let inputs = session.inputs();
    let outputs = session.outputs();
    let input = inputs
        .iter()
        .find(|o| o.name() == f.input.name)
        .ok_or_else(|| {
            format!(
                "input `{}` not found; the model's inputs are {} (set input.name)",
                f.input.name,
                describe(inputs)
            )
        })?;
    let dims = float_dims(input.dtype())
        .ok_or_else(|| format!("input `{}` is not a float32 tensor", f.input.name))?;
    let expected = [-1, 3, i64::from(f.input.height), i64::from(f.input.width)];
    let matches = dims.len() == 4
        && dims
            .iter()
            .zip(expected.iter())
            .skip(1)
            .all(|(d, e)| *d < 0 || d == e);
    if !matches {
        return Err(format!(
            "input `{}` has shape {:?}, the manifest says [batch, 3, {}, {}] (set input.width/height)",
            f.input.name, dims, f.input.height, f.input.width
        ));
    }
    let output = |name: &str| {
        outputs.iter().find(|o| o.name() == name).ok_or_else(|| {
            format!(
                "output `{name}` not found; the model's outputs are {}",
                describe(outputs)
            )
        })
    };
    let emb = output(&f.embedding.name)?;
    let emb_dims = float_dims(emb.dtype())
        .ok_or_else(|| format!("output `{}` is not a float32 tensor", f.embedding.name))?;
    let last = emb_dims.last().copied().unwrap_or(-1);
    if emb_dims.len() != 2 || (last >= 0 && last as usize != f.embedding.dim) {
        return Err(format!(
            "embedding output `{}` has shape {:?}, the manifest says [batch, {}] (set embedding.dim)",
            f.embedding.name, emb_dims, f.embedding.dim
        ));
    }
    let classes = match &f.classifier {
        None => 0,
        Some(c) => {
            let out = output(&c.name)?;
            let dims = float_dims(out.dtype())
                .ok_or_else(|| format!("output `{}` is not a float32 tensor", c.name))?;
            let n = manifest.classifier_labels.len();
            let last = dims.last().copied().unwrap_or(-1);
            if dims.len() != 2 || (last >= 0 && last as usize != n) {
                return Err(format!(
                    "classifier output `{}` has shape {:?} but the labels file has {n} labels",
                    c.name, dims
                ));
            }
            n
        }
    };
    Ok((f.embedding.dim, classes))
}

fn float_dims(t: &ValueType) -> Option<Vec<i64>> {
    match t {
        ValueType::Tensor { ty, shape, .. } if *ty == ort::value::TensorElementType::Float32 => {
            Some(shape.to_vec())
        }
        _ => None,
    }
}

fn shape_text(t: &ValueType) -> String {
    match t {
        ValueType::Tensor { ty, shape, .. } => format!("{ty:?}{:?}", shape.to_vec()),
        other => format!("{other:?}"),
    }
}

/// Applies a softmax to `row` unless it already looks like probabilities
/// (NVIDIA does not document whether `probs` is one).
pub fn softmax_unless_probabilities(row: &mut [f32]) {
    let sum: f32 = row.iter().sum();
    let is_probs = row.iter().all(|v| (0.0..=1.0).contains(v)) && (sum - 1.0).abs() < 1e-3;
    if is_probs {
        return;
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        total += *v;
    }
    if total > 0.0 {
        row.iter_mut().for_each(|v| *v /= total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_leaves_probabilities_alone_and_normalises_logits() {
        let mut p = [0.25, 0.75];
        softmax_unless_probabilities(&mut p);
        assert_eq!(p, [0.25, 0.75]);
        let mut l = [1.0, 1.0, 3.0];
        softmax_unless_probabilities(&mut l);
        assert!((l.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(l[2] > l[0]);
    }

    #[test]
    fn an_explicit_library_path_wins_over_the_search() {
        let p = locate_library(Some(Path::new("/opt/ort/libonnxruntime.so"))).unwrap();
        assert_eq!(p, PathBuf::from("/opt/ort/libonnxruntime.so"));
    }
}
