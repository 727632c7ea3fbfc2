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
    /// Refused before writing anything: the DB stays as it was.
    #[error("not enough free space for the reference DB at {path}: this change needs about {needed_mb} MiB plus a {margin_mb} MiB margin, {available_mb} MiB are free; nothing was written")]
    NoSpace {
        path: PathBuf,
        needed_mb: u64,
        available_mb: u64,
        margin_mb: u64,
    },
    #[error("cannot replace the reference DB at {path}: {message}")]
    Replace { path: PathBuf, message: String },
    /// Refused before writing anything: the DB stays as it was.
    #[error("the reference DB at {path} cannot be written: {why}; nothing was written (the last good DB keeps serving). Make the state directory writable again (is the file system mounted read-only?)")]
    NotWritable { path: PathBuf, why: String },
}

/// Free space kept on the DB's file system beyond what a change needs
/// (sled's log and a seal rewrite need room of their own).
pub const SPACE_MARGIN: u64 = 32 * 1024 * 1024;

/// Refuses a change of about `needed` bytes when the file system holding
/// `dir` has less than that plus [`SPACE_MARGIN`] free. A full disk in the
/// middle of a sled write can leave the DB unreadable; this check keeps the
/// agent from getting there by itself.
/// Also refuses when the file system is mounted read-only or the directory
/// is not writable by this process: sled must not meet those errors half
/// way through a write either.
pub fn ensure_space(dir: &Path, needed: u64) -> Result<(), StoreError> {
    let Some((available, read_only)) = file_system(dir) else {
        return Ok(()); // unknown: let the write itself tell
    };
    if read_only {
        return Err(StoreError::NotWritable {
            path: dir.to_path_buf(),
            why: "its file system is mounted read-only".into(),
        });
    }
    if let Err(e) = writable(dir) {
        return Err(StoreError::NotWritable {
            path: dir.to_path_buf(),
            why: e.to_string(),
        });
    }
    if available < needed.saturating_add(SPACE_MARGIN) {
        let mb = |b: u64| b.div_ceil(1024 * 1024);
        return Err(StoreError::NoSpace {
            path: dir.to_path_buf(),
            needed_mb: mb(needed),
            available_mb: available / (1024 * 1024),
            margin_mb: mb(SPACE_MARGIN),
        });
    }
    Ok(())
}

/// Whether files can be created in `dir` (or its nearest existing
/// ancestor), found by creating and removing one: the mount flags and
/// `access(2)` miss a file system that the kernel turned read-only after an
/// error (ext4's `errors=remount-ro`), and so would root's permissions.
fn writable(dir: &Path) -> std::io::Result<()> {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let file = probe.join(format!(".write-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&file)?;
    std::fs::remove_file(&file)
}

/// Bytes available to this (unprivileged) process on `dir`'s file system,
/// and whether it is mounted read-only.
fn file_system(dir: &Path) -> Option<(u64, bool)> {
    use std::os::unix::ffi::OsStrExt;
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent()?;
    }
    let path = std::ffi::CString::new(probe.as_os_str().as_bytes()).ok()?;
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a plain
    // out-parameter that statvfs fills on success.
    unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stat) != 0 {
            return None;
        }
        Some((
            (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64),
            stat.f_flag & libc::ST_RDONLY != 0,
        ))
    }
}

/// Atomically exchanges two directories (Linux `renameat2` with
/// `RENAME_EXCHANGE`): at every instant each path names one complete DB.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where a replacement DB for `dir` is built (and where the replaced one
/// waits for removal).
pub fn replacement_dir(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".next");
    dir.with_file_name(name)
}

/// Removes what a replacement interrupted by a crash left beside `dir`: a
/// DB half built (crash before the exchange) or the replaced DB (after).
pub fn clean_replacement(dir: &Path) {
    let next = replacement_dir(dir);
    if next.exists() {
        tracing::info!(path = %next.display(), "removing what an interrupted DB replacement left");
        if let Err(e) = std::fs::remove_dir_all(&next) {
            tracing::warn!(path = %next.display(), "cannot remove it: {e}");
        }
    }
}

/// Whether sled failed to open because another process holds the DB's
/// file lock. sled reports it as a plain I/O error ("could not acquire lock
/// on …"), so its text is the only sign.
fn is_lock_conflict(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io)
        if io.kind() == std::io::ErrorKind::WouldBlock
            || io.to_string().contains("could not acquire lock"))
}

/// What opening the DB needs of a stored reference: all but its image
/// (images are read one at a time when needed, never all at once).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StoredMeta {
    pub ref_id: String,
    pub label: String,
    pub kind: SourceKind,
    #[serde(with = "serde_bytes")]
    pub source_sha256: Vec<u8>,
    pub embedding: Vec<f32>,
    pub model_fingerprint: String,
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
        remove_unfinished_snapshots(dir);
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
        self.for_each_ref(|r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// Hands every reference, without its image, to `each` in ascending
    /// byte order of `ref_id`, one at a time: nothing holds them all.
    pub fn for_each_meta(
        &self,
        each: impl FnMut(StoredMeta) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.for_each_ref(each)
    }

    /// Hands every stored reference, read as `T` (a record or part of
    /// one), to `each` in ascending byte order of `ref_id`.
    fn for_each_ref<T: serde::de::DeserializeOwned>(
        &self,
        mut each: impl FnMut(T) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for item in self.tree.scan_prefix(REF_PREFIX) {
            let (key, value) = item?;
            let record = rmp_serde::from_slice(&value).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                message: e.to_string(),
            })?;
            each(record)?;
        }
        Ok(())
    }

    /// Builds a fresh DB in `dir` (which must not exist) holding `records`
    /// at `version` and the applied-update ledger of `self` (plus
    /// `update_id`), then closes it. The live DB is not touched.
    pub fn build_fresh(
        &self,
        dir: &Path,
        cache_mb: u64,
        records: Vec<StoredRef>,
        version: u64,
        update_id: Option<&str>,
        remember: usize,
    ) -> Result<(), StoreError> {
        let fresh = Store::open(dir, cache_mb)?;
        let mut batch = sled::Batch::default();
        let mut remembered = 0;
        for item in self.tree.scan_prefix(UPDATE_PREFIX) {
            let (key, value) = item?;
            batch.insert(key, value);
            remembered += 1;
        }
        fresh.tree.apply_batch(batch)?;
        fresh
            .remembered
            .store(remembered, std::sync::atomic::Ordering::Relaxed);
        let changes: Vec<StoreChange> = records.into_iter().map(StoreChange::Put).collect();
        fresh.commit(&changes, version, update_id, remember)?;
        Ok(())
    }

    /// Replaces the DB in `dir` (this store) by the one built in `next`
    /// with [`Store::build_fresh`]: an atomic exchange of the directories,
    /// then the new DB is opened. On failure the old DB is back in place.
    /// The caller drops `self` and then calls [`clean_replacement`].
    pub fn swap_in(&self, dir: &Path, cache_mb: u64) -> Result<Store, StoreError> {
        let next = replacement_dir(dir);
        let fail = |message: String| StoreError::Replace {
            path: dir.to_path_buf(),
            message,
        };
        self.db.flush()?;
        exchange(dir, &next).map_err(|e| fail(format!("exchanging directories: {e}")))?;
        if let Some(parent) = dir.parent() {
            if let Ok(d) = std::fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        match open_once_released(dir, cache_mb) {
            Ok(store) => Ok(store),
            Err(e) => {
                // Put the old DB back; it is still whole.
                exchange(dir, &next).map_err(|e2| {
                    fail(format!(
                        "the new DB does not open ({e}) and the old one cannot be put back: {e2}"
                    ))
                })?;
                Err(fail(format!("the new DB does not open: {e}")))
            }
        }
    }

    /// Closes this handle and opens the DB in `dir` afresh. sled keeps
    /// every page it has read in memory, whatever its cache capacity: about
    /// 95 MiB after reading 31,500 references of 448 floats once. A fresh
    /// handle starts with none of it.
    pub fn reopen(self, dir: &Path, cache_mb: u64) -> Result<Store, StoreError> {
        self.db.flush()?;
        drop(self);
        open_once_released(dir, cache_mb)
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

/// Removes the snapshot files sled was still writing when it was stopped
/// (`snap.*.generating`; a full disk leaves them empty). sled renames a
/// snapshot into place only once complete, so they hold nothing needed,
/// but sled 0.34 fails to open ("Read corrupted data") while one is there.
fn remove_unfinished_snapshots(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing an unfinished sled snapshot");
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(file = %entry.path().display(), "cannot remove it: {e}");
            }
        }
    }
}

fn ref_key(ref_id: &str) -> Vec<u8> {
    [REF_PREFIX, ref_id.as_bytes()].concat()
}

fn update_key(update_id: &str) -> Vec<u8> {
    [UPDATE_PREFIX, update_id.as_bytes()].concat()
}

/// Opens the DB in `dir` once this process's last handle on it has let go:
/// the DB just built by [`Store::build_fresh`] and swapped into `dir`, or
/// the one [`Store::reopen`] closed. The old handle is dropped by then, but
/// sled's background work in this process (its flusher, its thread pool's
/// tasks; which one was not established) can still hold the DB and its
/// file lock for a while on a loaded machine, and an immediate open then
/// fails as `InUse` (seen once with 50 agents on 2 cores). So `InUse` is
/// retried for up to [`RELOCK_WAIT`]. Another process is not expected to
/// take the lock in that moment: a swapped-in directory is new, and a
/// reopen lets go only for an instant (if one does, this fails once the
/// wait is over).
fn open_once_released(dir: &Path, cache_mb: u64) -> Result<Store, StoreError> {
    let deadline = std::time::Instant::now() + RELOCK_WAIT;
    loop {
        match Store::open(dir, cache_mb) {
            Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// How long [`open_once_released`] waits for the old handle to let go.
const RELOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_just_built_db_opens_once_its_last_handle_lets_go_of_the_lock() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let held = Store::open(dir.path(), 1).expect("a fresh DB opens");
        // While a handle is alive the lock is taken, even in this process.
        assert!(matches!(
            Store::open(dir.path(), 1),
            Err(StoreError::InUse { .. })
        ));
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let reopened = open_once_released(dir.path(), 1);
        release.join().expect("the releasing thread ends");
        assert!(reopened.is_ok(), "{:?}", reopened.err());
    }
}
