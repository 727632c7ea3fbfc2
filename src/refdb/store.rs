//! Durable storage of references in sled.
//!
//! One tree, three key spaces: `r:<ref_id>` holds a [`StoredRef`]
//! (MessagePack), `m:version` the DB version, `u:<update_id>` the updates
//! already applied. Every change is one atomic `sled::Batch` followed by a
//! flush, so a change is either wholly on disk or not at all. The in-memory
//! index is not this module's business.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::digest::SourceKind;

const REF_PREFIX: &[u8] = b"r:";
const UPDATE_PREFIX: &[u8] = b"u:";
const VERSION_KEY: &[u8] = b"m:version";
const FORMAT_KEY: &[u8] = b"m:format";
/// Layout version of what this module writes.
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open reference DB at {path}: {message}")]
    Open {
        path: PathBuf,
        message: String,
        /// The files are there but unreadable (as opposed to, say, a
        /// permission error): moving them aside may help.
        corrupt: bool,
    },
    /// Another process (usually the running agent) holds the DB's lock.
    #[error("the reference DB at {path} is in use by another process (is the retail-agent service running?). Stop the agent first (`systemctl stop retail-agent`), or send the references to the running agent as a fleet update (`retail-agent fleet push`)")]
    InUse { path: PathBuf },
    #[error("reference DB I/O failed: {0}")]
    Io(#[from] sled::Error),
    #[error("reference DB record {key} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error("reference DB at {path} has layout version {found}; this agent reads {FORMAT}")]
    Format { path: PathBuf, found: u32 },
}

/// Whether sled failed to open because another process holds the DB's
/// file lock. sled reports it as a plain I/O error ("could not acquire lock
/// on …"), so its text is the only sign.
fn is_lock_conflict(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io)
        if io.kind() == std::io::ErrorKind::WouldBlock
            || io.to_string().contains("could not acquire lock"))
}

/// A reference as stored on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRef {
    pub ref_id: String,
    pub label: String,
    pub kind: SourceKind,
    #[serde(with = "serde_bytes")]
    pub source_sha256: Vec<u8>,
    pub embedding: Vec<f32>,
    pub model_fingerprint: String,
    /// The source image, kept so the reference can be re-embedded when the
    /// model changes (absent for embedding upserts or when disabled).
    #[serde(default, with = "serde_bytes")]
    pub image: Option<Vec<u8>>,
}

/// One change to the stored references.
#[derive(Debug, Clone)]
pub enum StoreChange {
    Put(StoredRef),
    Remove(String),
}

pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// How many applied update ids are remembered.
    remembered: std::sync::atomic::AtomicUsize,
}

impl Store {
    /// Opens (or creates) the store in `dir` with a page cache of `cache_mb`.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self, StoreError> {
        let open_err = |e: &dyn std::fmt::Display, corrupt: bool| StoreError::Open {
            path: dir.to_path_buf(),
            message: e.to_string(),
            corrupt,
        };
        let sled_err = |e: sled::Error| {
            if is_lock_conflict(&e) {
                return StoreError::InUse {
                    path: dir.to_path_buf(),
                };
            }
            let corrupt = matches!(
                e,
                sled::Error::Corruption { .. }
                    | sled::Error::ReportableBug(_)
                    | sled::Error::Unsupported(_)
            ) || matches!(&e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData || io.kind() == std::io::ErrorKind::UnexpectedEof);
            open_err(&e, corrupt)
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(&e, false))?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_mb.max(1) * 1024 * 1024)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(sled_err)?;
        let tree = db.open_tree("refdb").map_err(sled_err)?;
        match tree.get(FORMAT_KEY)? {
            None => {
                tree.insert(FORMAT_KEY, &FORMAT.to_le_bytes())?;
            }
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u32::from_le_bytes)
                    .unwrap_or(u32::MAX);
                if found != FORMAT {
                    return Err(StoreError::Format {
                        path: dir.to_path_buf(),
                        found,
                    });
                }
            }
        }
        let remembered = tree.scan_prefix(UPDATE_PREFIX).count();
        Ok(Self {
            db,
            tree,
            remembered: remembered.into(),
        })
    }

    pub fn version(&self) -> Result<u64, StoreError> {
        Ok(match self.tree.get(VERSION_KEY)? {
            None => 0,
            Some(v) => {
                v.as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        key: "m:version".into(),
                        message: format!("{} bytes", v.len()),
                    })?
            }
        })
    }

    /// All references in ascending byte order of `ref_id`.
    pub fn load_all(&self) -> Result<Vec<StoredRef>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(REF_PREFIX) {
            let (key, value) = item?;
            let record: StoredRef =
                rmp_serde::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    message: e.to_string(),
                })?;
            out.push(record);
        }
        Ok(out)
    }

    /// The stored image of a reference, when one was kept.
    pub fn image(&self, ref_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.tree.get(ref_key(ref_id))? {
            None => Ok(None),
            Some(v) => {
                let r: StoredRef = rmp_serde::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    key: ref_id.into(),
                    message: e.to_string(),
                })?;
                Ok(r.image)
            }
        }
    }

    /// Whether `update_id` was applied before.
    pub fn was_applied(&self, update_id: &str) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(update_key(update_id))?)
    }

    /// Applies `changes`, sets the version and records `update_id`, as one
    /// atomic batch, and waits until it is on disk. Beyond `remember`
    /// applied update ids (plus an eighth, to prune in bulk), the oldest
    /// (lowest version) are forgotten in the same batch.
    pub fn commit(
        &self,
        changes: &[StoreChange],
        version: u64,
        update_id: Option<&str>,
        remember: usize,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for change in changes {
            match change {
                StoreChange::Put(r) => {
                    let bytes = rmp_serde::to_vec_named(r).map_err(|e| StoreError::Corrupt {
                        key: r.ref_id.clone(),
                        message: e.to_string(),
                    })?;
                    batch.insert(ref_key(&r.ref_id), bytes);
                }
                StoreChange::Remove(id) => batch.remove(ref_key(id)),
            }
        }
        batch.insert(VERSION_KEY, &version.to_be_bytes());
        let mut remembered = self.remembered.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(id) = update_id {
            let key = update_key(id);
            if !self.tree.contains_key(&key)? {
                remembered += 1;
            }
            if remembered > remember.max(1) + remember / 8 {
                remembered -= self.prune_updates(&mut batch, remembered - remember.max(1))?;
            }
            batch.insert(key, &version.to_be_bytes());
        }
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        self.remembered
            .store(remembered, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Adds to `batch` the removal of the `count` oldest remembered update
    /// ids; returns how many.
    fn prune_updates(&self, batch: &mut sled::Batch, count: usize) -> Result<usize, StoreError> {
        let mut all: Vec<(u64, sled::IVec)> = Vec::new();
        for item in self.tree.scan_prefix(UPDATE_PREFIX) {
            let (key, value) = item?;
            let version = value
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            all.push((version, key));
        }
        all.sort();
        let n = count.min(all.len());
        for (_, key) in all.into_iter().take(n) {
            batch.remove(key);
        }
        Ok(n)
    }

    /// How many applied update ids are remembered.
    pub fn remembered_updates(&self) -> usize {
        self.remembered.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

fn ref_key(ref_id: &str) -> Vec<u8> {
    [REF_PREFIX, ref_id.as_bytes()].concat()
}

fn update_key(update_id: &str) -> Vec<u8> {
    [UPDATE_PREFIX, update_id.as_bytes()].concat()
}
