//! Offline recognition: the model, its preprocessing and the decode limits
//! bundled for work that embeds images one batch at a time (enrolment,
//! evaluation, the `recognize` command, image upserts of fleet updates).
//!
//! The daemon's pipeline uses the same pieces split over threads; this type
//! is the simple, synchronous path.

use image::RgbImage;

use crate::config::{LoadedConfig, OnCorrupt};
use crate::engine::{Engine, EngineError, EngineOptions, EngineOutput};
use crate::manifest::{ManifestError, ModelManifest};
use crate::refdb::{RefDb, RefDbError, RefDbSettings};
use crate::vision::decode::{decode_image, DecodeLimits, VisionError};
use crate::vision::preprocess::{InputGeometry, Preprocessor};

#[derive(Debug, thiserror::Error)]
pub enum RecognizerError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Vision(#[from] VisionError),
    #[error(transparent)]
    RefDb(#[from] RefDbError),
}

/// The classifier head's answer for one image.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassifierGuess {
    pub label: String,
    pub probability: f32,
}

/// What the model says about one image.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// L2-normalised embedding.
    pub embedding: Vec<f32>,
    pub classifier: Option<ClassifierGuess>,
}

pub struct Recognizer {
    engine: Engine,
    pre: Preprocessor,
    limits: DecodeLimits,
    batch: Vec<f32>,
    rgb: Vec<u8>,
    out: EngineOutput,
}

/// Geometry of a manifest's input.
pub fn geometry(manifest: &ModelManifest) -> InputGeometry {
    InputGeometry {
        width: manifest.file.input.width,
        height: manifest.file.input.height,
        preprocess: manifest.file.preprocess.clone(),
    }
}

/// Engine options from a loaded config.
pub fn engine_options(cfg: &LoadedConfig) -> EngineOptions {
    let mut runtime = cfg.config.runtime.clone();
    runtime.onnxruntime_library = runtime.onnxruntime_library.map(|p| cfg.resolve(&p));
    EngineOptions {
        runtime,
        engine_cache_dir: cfg.engine_cache_dir(),
        max_batch: cfg.config.pipeline.max_batch,
    }
}

/// Opens the reference DB of `cfg` for the model `engine` runs.
pub fn open_refdb(cfg: &LoadedConfig, engine: &Engine) -> Result<RefDb, RefDbError> {
    RefDb::open(
        &cfg.refdb_dir(),
        refdb_settings(cfg, engine.manifest(), engine.dim()),
    )
}

/// Opens the reference DB and re-embeds the references that another model
/// embedded (those whose image was kept), logging what stays unsearchable.
pub fn open_refdb_reembedding(
    cfg: &LoadedConfig,
    recognizer: &mut Recognizer,
) -> Result<RefDb, RefDbError> {
    let db = open_refdb(cfg, recognizer.engine())?;
    if db.snapshot().stale().next().is_some() {
        let (done, left) = db.reembed_stale(|image| recognizer.embed_one(image))?;
        tracing::info!(
            reembedded = done,
            "re-embedded references of another model with the running one"
        );
        if left > 0 {
            tracing::warn!(
                count = left,
                "references of another model without a stored image are not searched; enrol them again"
            );
        }
    }
    Ok(db)
}

/// Opens the DB as [`open_refdb_reembedding`] does; when it is corrupt and
/// `refdb.on_corrupt = "reset"`, moves it aside, starts with an empty one
/// and says so (one error line here, and the returned note for the
/// Status). With `"fail"` the corruption is the error.
pub fn open_refdb_recovering(
    cfg: &LoadedConfig,
    recognizer: &mut Recognizer,
) -> Result<(RefDb, Option<crate::protocol::RefDbReset>), RefDbError> {
    let err = match open_refdb_reembedding(cfg, recognizer) {
        Ok(db) => return Ok((db, None)),
        Err(e) if e.is_corrupt() && cfg.config.refdb.on_corrupt == OnCorrupt::Reset => e,
        Err(e) => {
            if e.is_corrupt() {
                tracing::error!("reference DB is corrupt and refdb.on_corrupt = \"fail\": {e}");
            }
            return Err(e);
        }
    };
    let dir = cfg.refdb_dir();
    let ts_ms = crate::clock::now_ms();
    let aside = dir.with_file_name(format!("refdb.corrupt-{ts_ms}"));
    std::fs::rename(&dir, &aside).map_err(|e| {
        RefDbError::Store(crate::refdb::StoreError::Open {
            path: dir.clone(),
            message: format!(
                "corrupt ({err}), and it cannot be moved aside to {}: {e}",
                aside.display()
            ),
            corrupt: true,
        })
    })?;
    tracing::error!(
        moved_to = %aside.display(),
        "reference DB is corrupt ({err}); moved it aside and started empty (refdb.on_corrupt = \"reset\"): the fleet's next snapshot restores it"
    );
    let db = open_refdb(cfg, recognizer.engine())?;
    Ok((
        db,
        Some(crate::protocol::RefDbReset {
            reason: err.to_string(),
            moved_to: aside.display().to_string(),
            ts_ms,
        }),
    ))
}

/// The DB settings for a model with embeddings of `dim`.
pub fn refdb_settings(cfg: &LoadedConfig, manifest: &ModelManifest, dim: usize) -> RefDbSettings {
    RefDbSettings {
        dim,
        model_fingerprint: manifest.fingerprint().to_string(),
        prototypes_per_class: cfg.config.recognition.prototypes_per_class,
        precision: cfg.config.recognition.reference_precision,
        store_images: cfg.config.refdb.store_images,
        cache_mb: cfg.config.refdb.cache_mb,
        remember_updates: cfg.config.fleet_updates.remember_updates,
    }
}

impl Recognizer {
    /// Loads the manifest and the model that `cfg` names.
    pub fn from_config(cfg: &LoadedConfig) -> Result<Self, RecognizerError> {
        Self::with_options(cfg, &engine_options(cfg))
    }

    /// Loads the manifest and the model that `cfg` names, with `options`
    /// (the daemon's carry its thread budget).
    pub fn with_options(
        cfg: &LoadedConfig,
        options: &EngineOptions,
    ) -> Result<Self, RecognizerError> {
        let manifest = ModelManifest::load(&cfg.manifest_path())?;
        let engine = Engine::load(manifest, options)?;
        Ok(Self::new(engine, DecodeLimits::from(&cfg.config.limits)))
    }

    pub fn new(engine: Engine, limits: DecodeLimits) -> Self {
        let pre = Preprocessor::new(geometry(engine.manifest()));
        Self {
            engine,
            pre,
            limits,
            batch: Vec::new(),
            rgb: Vec::new(),
            out: EngineOutput::default(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Gives the engine back (e.g. to the daemon's inference thread).
    pub fn into_engine(self) -> Engine {
        self.engine
    }

    /// Decodes and embeds one encoded image.
    pub fn embed_single(&mut self, image: &[u8]) -> Result<Embedded, RecognizerError> {
        self.embed_encoded(&[image])
            .pop()
            .unwrap_or_else(|| Err(EngineError::Run("no result".into()).into()))
    }

    /// Embeds one encoded image; the embedding only, the error as text.
    pub fn embed_one(&mut self, image: &[u8]) -> Result<Vec<f32>, String> {
        self.embed_single(image)
            .map(|e| e.embedding)
            .map_err(|e| e.to_string())
    }

    pub fn limits(&self) -> &DecodeLimits {
        &self.limits
    }

    /// Decodes and embeds encoded images; one result per image, in order.
    /// A bad image fails alone.
    pub fn embed_encoded(&mut self, images: &[&[u8]]) -> Vec<Result<Embedded, RecognizerError>> {
        let decoded: Vec<Result<RgbImage, VisionError>> = images
            .iter()
            .map(|bytes| decode_image(bytes, &self.limits))
            .collect();
        self.embed_decoded(decoded)
    }

    /// Embeds decoded images (errors pass through in place).
    pub fn embed_decoded(
        &mut self,
        images: Vec<Result<RgbImage, VisionError>>,
    ) -> Vec<Result<Embedded, RecognizerError>> {
        let per_image = self.engine.image_len();
        let mut slots: Vec<Result<usize, RecognizerError>> = Vec::with_capacity(images.len());
        self.batch.clear();
        let mut n = 0;
        for img in images {
            let slot = img.map_err(RecognizerError::from).and_then(|img| {
                self.batch.resize((n + 1) * per_image, 0.0);
                self.pre
                    .prepare(&img, None, &mut self.rgb, &mut self.batch[n * per_image..])
                    .map_err(RecognizerError::from)?;
                n += 1;
                Ok(n - 1)
            });
            if slot.is_err() {
                self.batch.truncate(n * per_image);
            }
            slots.push(slot);
        }
        if n > 0 {
            if let Err(e) = self.engine.run(&self.batch, n, &mut self.out) {
                let message = e.to_string();
                return slots
                    .into_iter()
                    .map(|s| s.and_then(|_| Err(EngineError::Run(message.clone()).into())))
                    .collect();
            }
        }
        let dim = self.engine.dim();
        let classes = self.engine.classes();
        let labels = &self.engine.manifest().classifier_labels;
        slots
            .into_iter()
            .map(|s| {
                s.map(|i| Embedded {
                    embedding: self.out.embeddings[i * dim..(i + 1) * dim].to_vec(),
                    classifier: (classes > 0).then(|| {
                        best_class(
                            &self.out.class_probs[i * classes..(i + 1) * classes],
                            labels,
                        )
                    }),
                })
            })
            .collect()
    }
}

/// The most probable class of a probability row.
pub fn best_class(probs: &[f32], labels: &[String]) -> ClassifierGuess {
    let (i, p) = probs
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, 0.0));
    ClassifierGuess {
        label: labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("class-{i}")),
        probability: p,
    }
}
