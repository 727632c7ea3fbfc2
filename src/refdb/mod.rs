//! The reference DB: durable references (sled), their content digest and
//! version, and the in-memory index that answers searches.
//!
//! Writers are serialised and build a complete new [`Snapshot`] that is
//! swapped in only after the change is durable, so recognition keeps
//! serving the old snapshot meanwhile and never sees half an update.
//! Computing embeddings from images is the caller's job (it owns the model).

pub use retail_contract::digest;
pub mod export;
pub mod index;
mod seal;
pub mod store;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

pub use digest::SourceKind;
pub use index::{Candidate, Decision, Index, Recognition};
pub use store::{StoreError, StoredRef};

use digest::DigestBuilder;
use store::{Store, StoreChange};

/// Longest `ref_id` or label accepted, in bytes.
pub const MAX_ID_BYTES: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum RefDbError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reference {ref_id:?} has a {got}-dimensional embedding; the model produces {expected} dimensions")]
    Dimension {
        ref_id: String,
        got: usize,
        expected: usize,
    },
    #[error("reference {ref_id:?} was embedded by model {got}; the running model is {expected} (send the image instead, or an embedding from this model)")]
    Fingerprint {
        ref_id: String,
        got: String,
        expected: String,
    },
    #[error("reference {ref_id:?}: {message}")]
    InvalidRef { ref_id: String, message: String },
}

/// The DB state that decides whether an update may apply: its version and
/// the updates it remembers applying.
pub trait LedgerView {
    fn version(&self) -> u64;
    fn was_applied(&self, update_id: &str) -> bool;
}

/// The DB as seen under its writer lock (nothing changes it meanwhile).
struct Locked<'a> {
    store: &'a Store,
    version: u64,
}

/// Rough bytes a stored reference takes on disk (for the free-space check).
fn stored_size(r: &StoredRef) -> u64 {
    (r.image.as_ref().map_or(0, Vec::len)
        + r.embedding.len() * 4
        + r.ref_id.len()
        + r.label.len()
        + 256) as u64
}

/// Whether the ledger holds `update_id`; a read error counts as "no" (the
/// stale and gap rules still guard the DB) and is logged.
fn ledger_has(store: &Store, update_id: &str) -> bool {
    store.was_applied(update_id).unwrap_or_else(|e| {
        tracing::warn!("cannot read the applied-update ledger: {e}");
        false
    })
}

impl LedgerView for Locked<'_> {
    fn version(&self) -> u64 {
        self.version
    }
    fn was_applied(&self, update_id: &str) -> bool {
        ledger_has(self.store, update_id)
    }
}

impl LedgerView for RefDb {
    fn version(&self) -> u64 {
        self.snapshot().meta.version
    }
    fn was_applied(&self, update_id: &str) -> bool {
        ledger_has(&self.store(), update_id)
    }
}

impl RefDbError {
    /// Whether the DB's files are there but unreadable (sled corruption, a
    /// record that does not decode), as opposed to, say, a permission error.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            Self::Store(StoreError::Open { corrupt: true, .. } | StoreError::Corrupt { .. })
        )
    }
}

/// What the contract reports about a DB: `{version, digest, refs, labels}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbMeta {
    pub version: u64,
    pub digest: String,
    pub refs: u64,
    pub labels: u64,
}

/// A reference to add or replace.
#[derive(Debug, Clone)]
pub struct NewRef {
    pub ref_id: String,
    pub label: String,
    pub kind: SourceKind,
    pub source_sha256: [u8; 32],
    pub embedding: Vec<f32>,
    pub model_fingerprint: String,
    pub image: Option<Vec<u8>>,
}

impl NewRef {
    /// A reference embedded by this agent from `image`.
    pub fn from_image(
        ref_id: String,
        label: String,
        image: Vec<u8>,
        embedding: Vec<f32>,
        model_fingerprint: &str,
    ) -> Self {
        Self {
            ref_id,
            label,
            kind: SourceKind::Image,
            source_sha256: digest::source_sha256(&image),
            embedding,
            model_fingerprint: model_fingerprint.to_string(),
            image: Some(image),
        }
    }

    /// A reference given as an embedding computed elsewhere.
    pub fn from_embedding(
        ref_id: String,
        label: String,
        embedding: Vec<f32>,
        model_fingerprint: String,
    ) -> Self {
        Self {
            ref_id,
            label,
            kind: SourceKind::Embedding,
            source_sha256: digest::source_sha256(&digest::embedding_bytes(&embedding)),
            embedding,
            model_fingerprint,
            image: None,
        }
    }
}

/// One operation of an update; applied in order.
#[derive(Debug, Clone)]
pub enum RefOp {
    Upsert(NewRef),
    Delete(String),
    DeleteLabel(String),
    Clear,
}

/// Settings that tie the DB to the running model.
#[derive(Debug, Clone)]
pub struct RefDbSettings {
    pub dim: usize,
    pub model_fingerprint: String,
    pub prototypes_per_class: usize,
    /// How the in-memory reference matrix is stored.
    pub precision: index::Precision,
    pub store_images: bool,
    pub cache_mb: u64,
    /// Applied update ids remembered (for `duplicate`); the oldest are
    /// pruned beyond it (a replay that old is `stale` anyway).
    pub remember_updates: usize,
}

/// Everything known about one stored reference except its vector.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    pub label: String,
    pub kind: SourceKind,
    pub source_sha256: [u8; 32],
    pub model_fingerprint: String,
    /// Row in the index; `None` when the reference cannot be searched with
    /// the running model (embedded by another model).
    pub row: Option<u32>,
}

/// An immutable view of the DB: what a search uses.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub index: Index,
    pub meta: DbMeta,
    /// All stored references by `ref_id` (ascending byte order).
    pub entries: BTreeMap<String, EntryInfo>,
}

impl Default for DbMeta {
    fn default() -> Self {
        Self {
            version: 0,
            digest: DigestBuilder::default().finish(),
            refs: 0,
            labels: 0,
        }
    }
}

impl Snapshot {
    /// References that the running model cannot search (other model).
    pub fn stale(&self) -> impl Iterator<Item = (&String, &EntryInfo)> {
        self.entries.iter().filter(|(_, e)| e.row.is_none())
    }
}

pub struct RefDb {
    /// Replaced as a whole when the DB's whole content is (see
    /// [`RefDb::apply_guarded`]).
    store: Swappable<Store>,
    dir: std::path::PathBuf,
    settings: RefDbSettings,
    current: Swappable<Snapshot>,
    writer: Mutex<()>,
}

/// A value readers share and a writer replaces whole: readers get the
/// current one cheaply and keep it as long as they need it. A poisoned lock
/// still holds a whole value (it is only ever replaced whole), so it is
/// used as it is.
struct Swappable<T>(RwLock<Arc<T>>);

impl<T> Swappable<T> {
    fn new(value: T) -> Self {
        Self(RwLock::new(Arc::new(value)))
    }

    fn get(&self) -> Arc<T> {
        match self.0.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn set(&self, value: Arc<T>) {
        match self.0.write() {
            Ok(mut g) => *g = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
    }
}

/// A reference's vector while an update is worked out.
enum Vector {
    /// A row of the current index.
    Row(u32),
    /// A new embedding.
    New(Vec<f32>),
    /// A row of the embeddings read when the DB was opened.
    Loaded(usize),
    /// No embedding the running model can search.
    Stale,
}

struct Working {
    info: EntryInfo,
    vector: Vector,
}

impl RefDb {
    /// Opens the DB in `dir` and builds the index for the running model.
    pub fn open(dir: &Path, settings: RefDbSettings) -> Result<Self, RefDbError> {
        store::clean_replacement(dir);
        let store = Store::open(dir, settings.cache_mb)?;
        let version = store.version()?;
        let mut work = BTreeMap::new();
        // Embeddings go into one buffer as they are read, not into a small
        // allocation each between the entries' strings, which kept tens of
        // MiB of freed memory from going back (31,500 references).
        let mut loaded: Vec<f32> = Vec::new();
        store.for_each_meta(|r| {
            let source_sha256: [u8; 32] =
                r.source_sha256
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt {
                        key: r.ref_id.clone(),
                        message: "source digest is not 32 bytes".into(),
                    })?;
            let usable = r.embedding.len() == settings.dim
                && r.model_fingerprint == settings.model_fingerprint;
            let vector = if usable {
                let row = loaded.len() / settings.dim.max(1);
                loaded.extend_from_slice(&r.embedding);
                Vector::Loaded(row)
            } else {
                tracing::warn!(
                    ref_id = %r.ref_id,
                    dim = r.embedding.len(),
                    model = %r.model_fingerprint,
                    "reference was embedded by another model; it is not searched until re-embedded (`retail-agent db reembed`; the daemon does it at start-up)"
                );
                Vector::Stale
            };
            work.insert(
                r.ref_id,
                Working {
                    info: EntryInfo {
                        label: r.label,
                        kind: r.kind,
                        source_sha256,
                        model_fingerprint: r.model_fingerprint,
                        row: None,
                    },
                    vector,
                },
            );
            Ok(())
        })?;
        let snapshot = build_snapshot(&settings, None, &loaded, work, version);
        drop(loaded);
        if let Some(why) = seal::check(dir, &snapshot.meta) {
            return Err(RefDbError::Store(StoreError::Open {
                path: dir.to_path_buf(),
                message: why,
                corrupt: true,
            }));
        }
        seal::write(dir, &snapshot.meta).map_err(|e| {
            RefDbError::Store(StoreError::Open {
                path: dir.to_path_buf(),
                message: format!("cannot write its seal: {e}"),
                corrupt: false,
            })
        })?;
        // Every stored reference has been read: a fresh handle drops the
        // pages sled kept of them (see `Store::reopen`).
        let store = store.reopen(dir, settings.cache_mb)?;
        let db = Self {
            store: Swappable::new(store),
            dir: dir.to_path_buf(),
            settings,
            current: Swappable::new(snapshot),
            writer: Mutex::new(()),
        };
        // Reading every stored reference back leaves tens of MiB freed in
        // glibc's arenas (two full 64 MiB arenas with 31,500 references).
        crate::heap::release_free_memory();
        Ok(db)
    }

    /// The live store (briefly shared; replaced on a whole-content change).
    fn store(&self) -> Arc<Store> {
        self.store.get()
    }

    /// The current snapshot; cheap, never blocks on a writer for long.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.get()
    }

    pub fn meta(&self) -> DbMeta {
        self.snapshot().meta.clone()
    }

    pub fn settings(&self) -> &RefDbSettings {
        &self.settings
    }

    /// Whether an update with this id was applied before.
    pub fn was_applied(&self, update_id: &str) -> Result<bool, RefDbError> {
        Ok(self.store().was_applied(update_id)?)
    }

    /// The stored source image of a reference, if kept.
    pub fn image(&self, ref_id: &str) -> Result<Option<Vec<u8>>, RefDbError> {
        Ok(self.store().image(ref_id)?)
    }

    /// All stored records, for export.
    pub fn records(&self) -> Result<Vec<StoredRef>, RefDbError> {
        Ok(self.store().load_all()?)
    }

    /// How many applied update ids are remembered (bounded by
    /// `remember_updates`).
    pub fn remembered_updates(&self) -> usize {
        self.store().remembered_updates()
    }

    pub fn size_on_disk(&self) -> u64 {
        self.store().size_on_disk()
    }

    pub fn flush(&self) -> Result<(), RefDbError> {
        Ok(self.store().flush()?)
    }

    /// Re-embeds, with `embed`, the references of another model that kept
    /// their source image, so they are searched again; the content (and so
    /// the digest and version) is unchanged. Returns how many were
    /// re-embedded and how many stay unsearchable (no image, or `embed`
    /// failed on it).
    pub fn reembed_stale(
        &self,
        mut embed: impl FnMut(&[u8]) -> Result<Vec<f32>, String>,
    ) -> Result<(usize, usize), RefDbError> {
        let snapshot = self.snapshot();
        let mut ops = Vec::new();
        let mut left = 0;
        for (ref_id, info) in snapshot.stale() {
            let Some(image) = self.store().image(ref_id)? else {
                left += 1;
                continue;
            };
            match embed(&image) {
                Ok(embedding) => ops.push(RefOp::Upsert(NewRef {
                    ref_id: ref_id.clone(),
                    label: info.label.clone(),
                    kind: info.kind,
                    source_sha256: info.source_sha256,
                    embedding,
                    model_fingerprint: self.settings.model_fingerprint.clone(),
                    image: Some(image),
                })),
                Err(why) => {
                    tracing::warn!(ref_id = %ref_id, "cannot re-embed reference: {why}");
                    left += 1;
                }
            }
        }
        let done = ops.len();
        if done > 0 {
            self.apply(ops, snapshot.meta.version, None)?;
        }
        Ok((done, left))
    }

    /// Checks an op against the running model without applying it.
    pub fn validate(&self, op: &RefOp) -> Result<(), RefDbError> {
        let check_id = |id: &str, what: &str| {
            if id.is_empty() || id.len() > MAX_ID_BYTES {
                Err(RefDbError::InvalidRef {
                    ref_id: id.to_string(),
                    message: format!("{what} must be 1 to {MAX_ID_BYTES} bytes"),
                })
            } else {
                Ok(())
            }
        };
        match op {
            RefOp::Upsert(r) => {
                check_id(&r.ref_id, "ref_id")?;
                if r.label.is_empty() || r.label.len() > MAX_ID_BYTES {
                    return Err(RefDbError::InvalidRef {
                        ref_id: r.ref_id.clone(),
                        message: format!("label must be 1 to {MAX_ID_BYTES} bytes"),
                    });
                }
                if r.embedding.len() != self.settings.dim {
                    return Err(RefDbError::Dimension {
                        ref_id: r.ref_id.clone(),
                        got: r.embedding.len(),
                        expected: self.settings.dim,
                    });
                }
                if r.embedding.iter().any(|v| !v.is_finite()) {
                    return Err(RefDbError::InvalidRef {
                        ref_id: r.ref_id.clone(),
                        message: "embedding has non-finite values".into(),
                    });
                }
                if r.model_fingerprint != self.settings.model_fingerprint {
                    return Err(RefDbError::Fingerprint {
                        ref_id: r.ref_id.clone(),
                        got: r.model_fingerprint.clone(),
                        expected: self.settings.model_fingerprint.clone(),
                    });
                }
                Ok(())
            }
            RefOp::Delete(id) => check_id(id, "ref_id"),
            RefOp::DeleteLabel(label) => check_id(label, "label"),
            RefOp::Clear => Ok(()),
        }
    }

    /// Applies `ops` in order, all or nothing, and sets the version to
    /// `version`; records `update_id` as applied. Returns once the change is
    /// durable and the new snapshot serves searches.
    pub fn apply(
        &self,
        ops: Vec<RefOp>,
        version: u64,
        update_id: Option<&str>,
    ) -> Result<DbMeta, RefDbError> {
        self.apply_guarded(ops, version, update_id, |_| {
            Ok::<(), std::convert::Infallible>(())
        })?
        .map_err(|never| match never {})
    }

    /// Like [`RefDb::apply`], but first asks `guard`, under the writer lock,
    /// whether the DB's state still allows the change (check-and-set): a
    /// refusal is returned as `Ok(Err(..))` and nothing is written.
    pub fn apply_guarded<E>(
        &self,
        ops: Vec<RefOp>,
        version: u64,
        update_id: Option<&str>,
        guard: impl FnOnce(&dyn LedgerView) -> Result<(), E>,
    ) -> Result<Result<DbMeta, E>, RefDbError> {
        for op in &ops {
            self.validate(op)?;
        }
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let live = self.store();
        let view = Locked {
            store: &live,
            version: self.snapshot().meta.version,
        };
        if let Err(refused) = guard(&view) {
            return Ok(Err(refused));
        }
        let old = self.snapshot();
        let replaces_all = matches!(ops.first(), Some(RefOp::Clear));
        let mut work: BTreeMap<String, Working> = old
            .entries
            .iter()
            .map(|(id, info)| {
                let vector = match info.row {
                    Some(r) => Vector::Row(r),
                    None => Vector::Stale,
                };
                (
                    id.clone(),
                    Working {
                        info: info.clone(),
                        vector,
                    },
                )
            })
            .collect();
        let mut upserted: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        for op in ops {
            match op {
                RefOp::Upsert(r) => {
                    let image = if self.settings.store_images {
                        r.image
                    } else {
                        None
                    };
                    upserted.insert(r.ref_id.clone(), image);
                    work.insert(
                        r.ref_id,
                        Working {
                            info: EntryInfo {
                                label: r.label,
                                kind: r.kind,
                                source_sha256: r.source_sha256,
                                model_fingerprint: r.model_fingerprint,
                                row: None,
                            },
                            vector: Vector::New(r.embedding),
                        },
                    );
                }
                RefOp::Delete(id) => {
                    work.remove(&id);
                }
                RefOp::DeleteLabel(label) => work.retain(|_, w| w.info.label != label),
                RefOp::Clear => work.clear(),
            }
        }
        let mut changes: Vec<StoreChange> = old
            .entries
            .keys()
            .filter(|id| !work.contains_key(*id))
            .map(|id| StoreChange::Remove(id.clone()))
            .collect();
        for (id, image) in upserted {
            if let Some(w) = work.get(&id) {
                if let Vector::New(embedding) = &w.vector {
                    changes.push(StoreChange::Put(StoredRef {
                        ref_id: id.clone(),
                        label: w.info.label.clone(),
                        kind: w.info.kind,
                        source_sha256: w.info.source_sha256.to_vec(),
                        embedding: embedding.clone(),
                        model_fingerprint: w.info.model_fingerprint.clone(),
                        image,
                    }));
                }
            }
        }
        let snapshot = Arc::new(build_snapshot(
            &self.settings,
            Some(&old.index),
            &[],
            work,
            version,
        ));
        let meta = snapshot.meta.clone();
        let needed: u64 = changes
            .iter()
            .map(|c| match c {
                StoreChange::Put(r) => stored_size(r),
                StoreChange::Remove(_) => 64,
            })
            .sum();
        if replaces_all {
            // A fresh DB swapped in whole: the old one's space comes back
            // at once (sled would keep growing), and a failure at any
            // point leaves the old DB serving.
            store::ensure_space(&self.dir, needed)?;
            self.replace_store(&live, changes, version, update_id, &meta)?;
        } else {
            // sled writes a change to its log twice over at worst.
            store::ensure_space(&self.dir, needed.saturating_mul(2))?;
            live.commit(&changes, version, update_id, self.settings.remember_updates)?;
        }
        drop(live);
        if let Err(e) = seal::write(&self.dir, &meta) {
            // The change is durable in sled; a stale seal only means the
            // next open sees a DB ahead of it, which is accepted.
            tracing::warn!("cannot update the reference DB's seal: {e}");
        }
        self.current.set(snapshot);
        crate::heap::release_free_memory();
        Ok(Ok(meta))
    }
}

impl RefDb {
    /// Builds a fresh DB beside the live one holding exactly `changes`'
    /// references (a whole-content change: every entry is a Put) and swaps
    /// it in atomically; then removes the old one.
    fn replace_store(
        &self,
        live: &Arc<Store>,
        changes: Vec<StoreChange>,
        version: u64,
        update_id: Option<&str>,
        meta: &DbMeta,
    ) -> Result<(), RefDbError> {
        let next = store::replacement_dir(&self.dir);
        store::clean_replacement(&self.dir);
        let records: Vec<StoredRef> = changes
            .into_iter()
            .filter_map(|c| match c {
                StoreChange::Put(r) => Some(r),
                StoreChange::Remove(_) => None,
            })
            .collect();
        let built = live
            .build_fresh(
                &next,
                self.settings.cache_mb,
                records,
                version,
                update_id,
                self.settings.remember_updates,
            )
            .map_err(RefDbError::from)
            .and_then(|()| {
                seal::write(&next, meta).map_err(|e| {
                    RefDbError::Store(StoreError::Replace {
                        path: self.dir.clone(),
                        message: format!("cannot seal the new DB: {e}"),
                    })
                })
            });
        if let Err(e) = built {
            store::clean_replacement(&self.dir);
            return Err(e);
        }
        let opened = live.swap_in(&self.dir, self.settings.cache_mb)?;
        self.store.set(Arc::new(opened));
        // The old DB now lives at `next`; its last handles go with `live`
        // and any reader's; removing its directory is safe meanwhile.
        store::clean_replacement(&self.dir);
        Ok(())
    }
}

/// The snapshot of `work`: its index rows are in `ref_id` order, read from
/// `old_index` ([`Vector::Row`]), `loaded` ([`Vector::Loaded`], `dim`
/// floats a row) or the working entry itself, without copying a vector
/// the index does not need copied.
fn build_snapshot(
    settings: &RefDbSettings,
    old_index: Option<&Index>,
    loaded: &[f32],
    work: BTreeMap<String, Working>,
    version: u64,
) -> Snapshot {
    let dim = settings.dim;
    let mut digest = DigestBuilder::default();
    let mut entries = BTreeMap::new();
    let mut vectors: Vec<Cow<'_, [f32]>> = Vec::with_capacity(work.len());
    for (id, mut w) in work {
        digest.add(&id, &w.info.label, w.info.kind, &w.info.source_sha256);
        let vector = match w.vector {
            Vector::Row(r) => old_index.map(|i| i.vector(r as usize)),
            Vector::New(v) => Some(Cow::Owned(v)),
            Vector::Loaded(r) => loaded.get(r * dim..(r + 1) * dim).map(Cow::Borrowed),
            Vector::Stale => None,
        };
        w.info.row = vector.map(|v| {
            vectors.push(v);
            (vectors.len() - 1) as u32
        });
        entries.insert(id, w.info);
    }
    let labels = entries
        .values()
        .map(|e| e.label.as_str())
        .collect::<BTreeSet<_>>()
        .len();
    let index = Index::build_with(
        dim,
        entries.iter().filter_map(|(id, e)| {
            let v = vectors.get(e.row? as usize)?;
            Some((id.as_str(), e.label.as_str(), &v[..]))
        }),
        settings.prototypes_per_class,
        settings.precision,
    );
    let meta = DbMeta {
        version,
        digest: digest.finish(),
        refs: entries.len() as u64,
        labels: labels as u64,
    };
    Snapshot {
        index,
        meta,
        entries,
    }
}
