//! Secrets: values that must never be printed (the bus password) and files
//! that must stay private (the bus TLS client key, the fleet's signing key).
//!
//! A [`Secret`] prints as `********` in `Debug` output, so a configuration
//! that reaches a log through `{:?}` or a `tracing` field does not carry
//! the password with it. A private key file that other users can read is as
//! good as published, so [`read_private_file`] refuses it, naming the file
//! and the command that fixes it, rather than using it.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a secret shows instead of its value.
pub const MASK: &str = "********";

/// Mode bits that must be clear on a private file: any access by the
/// file's group or by other users.
pub const GROUP_OTHER_BITS: u32 = 0o077;

/// A string that must not be printed, such as a password. It serializes as
/// itself (the config is written back as it was read; see
/// the agent's `LoadedConfig::to_masked_toml` for what is shown) and
/// prints as [`MASK`] in `Debug` output.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for where it is used (the MQTT CONNECT packet).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(MASK)
    }
}

/// Why a private file was not read.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error("cannot read private key {file}: {error}", file = path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file's group or other users have some access to it.
    #[error(
        "private key {file} is accessible to other users (mode {mode:03o}); refusing to use it: \
         run `chmod 600 {file}` (it must be readable by its owner only)",
        file = path.display()
    )]
    TooOpen { path: PathBuf, mode: u32 },
}

/// Reads the private file at `path` (following symbolic links), refusing it
/// when its permissions give its group or other users any access
/// (`mode & 0o077 != 0`). The mode is read from the opened file, so the
/// file checked is the file read.
pub fn read_private_file(path: &Path) -> Result<Vec<u8>, PrivateFileError> {
    let read_error = |error| PrivateFileError::Read {
        path: path.to_path_buf(),
        error,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode();
    check_private_mode(path, mode)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(read_error)?;
    Ok(bytes)
}

/// Checks the permission bits of the private file at `path`.
pub fn check_private_mode(path: &Path, mode: u32) -> Result<(), PrivateFileError> {
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(PrivateFileError::TooOpen {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_mode(dir: &Path, mode: u32) -> PathBuf {
        let path = dir.join(format!("key-{mode:03o}.pem"));
        std::fs::write(&path, b"private").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_private_file_readable_by_its_owner_only_is_read() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400, 0o700] {
            let path = file_with_mode(dir.path(), mode);
            assert_eq!(read_private_file(&path).unwrap(), b"private");
        }
    }

    #[test]
    fn a_private_file_accessible_to_group_or_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o610, 0o601, 0o666] {
            let path = file_with_mode(dir.path(), mode);
            let err = read_private_file(&path).unwrap_err();
            assert!(
                matches!(err, PrivateFileError::TooOpen { mode: m, .. } if m == mode),
                "{mode:03o}: {err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&format!("chmod 600 {}", path.display())),
                "{text}"
            );
            assert!(text.contains(&format!("{mode:03o}")), "{text}");
        }
    }

    #[test]
    fn a_symlink_to_an_open_private_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = file_with_mode(dir.path(), 0o644);
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            read_private_file(&link),
            Err(PrivateFileError::TooOpen { .. })
        ));
    }

    #[test]
    fn a_missing_private_file_is_a_read_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.key");
        let err = read_private_file(&path).unwrap_err();
        assert!(matches!(err, PrivateFileError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.key"), "{err}");
    }

    #[test]
    fn a_secret_prints_as_a_mask_in_debug_output() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), MASK);
        assert_eq!(format!("{:?}", Some(s.clone())), format!("Some({MASK})"));
        assert_eq!(s.expose(), "hunter2");
    }
}
