//! What a configuration needs beyond its shape, checked once before the
//! agent runs: the trusted fleet keys parse, the TLS files it names load
//! into a client configuration, the state directory is usable. `run` (the
//! daemon) and `check-config` call [`check`]; loading a config does not, so
//! that parsing stays pure and `config` stays a leaf that the rest reads.
//! What the checks produce (the parsed keys) is handed on, not parsed again.

use crate::config::{ConfigError, LoadedConfig};
use crate::fleet::keys::TrustedKeys;

/// A configuration that passed [`check`], with what the checks parsed.
pub struct Checked {
    pub trusted_keys: TrustedKeys,
}

/// Runs every check; the first that fails names its setting.
pub fn check(cfg: &LoadedConfig) -> Result<Checked, ConfigError> {
    let trusted_keys = TrustedKeys::parse(&cfg.config.fleet_updates.trusted_keys)
        .map_err(|e| ConfigError::Invalid(format!("fleet_updates.trusted_keys: {e}")))?;
    if let Some(tls) = cfg.resolved_tls() {
        crate::bus::tls::client_config(&tls).map_err(|e| ConfigError::Unusable {
            key: "bus.tls".into(),
            message: format!("{e:#}"),
        })?;
    }
    cfg.check_state_dir()?;
    Ok(Checked { trusted_keys })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::config::{ConfigError, LoadedConfig};

    /// The preflight of `cfg`, without what it parsed.
    fn preflight(cfg: &LoadedConfig) -> Result<(), ConfigError> {
        super::check(cfg).map(|_| ())
    }

    /// A config in `dir` whose state directory and TLS section are `state`
    /// and `tls` (TOML, may be empty); loading must succeed.
    fn load_in(dir: &Path, state: &Path, tls: &str) -> LoadedConfig {
        LoadedConfig::from_toml(
            &format!("state_dir = {:?}\n{tls}", state.display().to_string()),
            &dir.join("agent.toml"),
            dir.to_path_buf(),
            std::iter::empty(),
        )
        .expect("config parses")
    }

    /// A self-signed certificate and its key (mode 0600), as PEM files in
    /// `dir`.
    fn write_cert_and_key(dir: &Path) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert, key)
    }

    #[test]
    fn a_tls_key_readable_by_others_fails_the_preflight_check_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (_cert, key) = write_cert_and_key(dir.path());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let tls =
            "[bus.tls]\nca_file = \"cert.pem\"\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n";
        let cfg = load_in(dir.path(), Path::new("state"), tls);
        let err = preflight(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("bus.tls") && err.contains(&format!("chmod 600 {}", key.display())),
            "{err}"
        );
    }

    #[test]
    fn usable_tls_files_and_state_dir_pass_the_preflight_check() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _key) = write_cert_and_key(dir.path());
        let tls = format!(
            "[bus.tls]\nca_file = \"cert.pem\"\ncert_file = {:?}\nkey_file = \"key.pem\"\n",
            cert.display().to_string()
        );
        let cfg = load_in(dir.path(), Path::new("state/not/yet/there"), &tls);
        preflight(&cfg).unwrap();
        assert!(
            !dir.path().join("state").exists(),
            "the check creates nothing"
        );
    }

    #[test]
    fn missing_or_garbage_tls_files_fail_the_preflight_check() {
        let dir = tempfile::tempdir().unwrap();
        write_cert_and_key(dir.path());
        std::fs::write(dir.path().join("garbage.pem"), "not a PEM file\n").unwrap();
        std::fs::write(
            dir.path().join("bad-base64.pem"),
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let cases = [
            ("ca_file = \"missing.pem\"", "missing.pem"),
            ("ca_file = \"garbage.pem\"", "garbage.pem"),
            ("ca_file = \"bad-base64.pem\"", "bad-base64.pem"),
            (
                "ca_file = \"cert.pem\"\ncert_file = \"missing.pem\"\nkey_file = \"key.pem\"",
                "missing.pem",
            ),
            (
                "ca_file = \"cert.pem\"\ncert_file = \"cert.pem\"\nkey_file = \"missing.key\"",
                "missing.key",
            ),
            (
                "ca_file = \"cert.pem\"\ncert_file = \"cert.pem\"\nkey_file = \"garbage.pem\"",
                "garbage.pem",
            ),
        ];
        for (tls, named) in cases {
            let cfg = load_in(
                dir.path(),
                Path::new("state"),
                &format!("[bus.tls]\n{tls}\n"),
            );
            let err = preflight(&cfg).unwrap_err();
            assert!(matches!(err, ConfigError::Unusable { .. }), "{err:?}");
            let text = err.to_string();
            assert!(
                text.contains("bus.tls") && text.contains(named),
                "{tls}: {text}"
            );
        }
    }

    #[test]
    fn a_state_dir_that_is_not_a_directory_fails_the_preflight_check() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "x").unwrap();
        for state in ["file", "file/state"] {
            let cfg = load_in(dir.path(), Path::new(state), "");
            let err = preflight(&cfg).unwrap_err().to_string();
            assert!(
                err.contains("state_dir") && err.contains("not a directory"),
                "{state}: {err}"
            );
        }
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(dir.path().join("state/refdb"), "x").unwrap();
        let err = preflight(&load_in(dir.path(), Path::new("state"), ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("refdb"), "{err}");
    }

    #[test]
    fn a_read_only_state_dir_fails_the_preflight_check() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        let mut states = vec![locked.clone(), locked.join("state")];
        if tempfile::tempfile_in(&locked).is_ok() {
            // Root writes through mode bits, not into /proc.
            states = vec![PathBuf::from("/proc/retail-agent-state")];
            if !Path::new("/proc/self").exists() {
                return;
            }
        }
        for state in states {
            let err = preflight(&load_in(dir.path(), &state, ""))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("state_dir") && err.contains("not writable"),
                "{}: {err}",
                state.display()
            );
        }
    }
}
