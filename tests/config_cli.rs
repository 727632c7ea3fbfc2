//! `check-config` and the commands that open the reference DB, through the
//! real binary: what cannot work is refused before the daemon would fail,
//! and errors say which key is wrong or what to do.

mod common;

use common::AgentHome;
use retail_agent::refdb::{RefDb, RefDbSettings};
use retail_testkit::process::stderr;

/// Runs `check-config` on a home whose config has `top_level` keys and
/// `sections`; returns (success, stderr).
fn check(top_level: &str, sections: &str, env: &[(&str, &str)]) -> (bool, String) {
    let home = AgentHome::new(top_level, sections);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(["check-config", "-c"])
        .arg(&home.config_path)
        .envs(env.iter().copied())
        .output()
        .expect("run retail-agent");
    (out.status.success(), stderr(&out))
}

#[test]
fn check_config_refuses_configs_the_daemon_cannot_run() {
    let cases = [
        ("", "[bus]\nport = 0\n", "bus.port"),
        ("", "[bus]\nmax_packet_bytes = 0\n", "bus.max_packet_bytes"),
        (
            "",
            "[metrics]\ninterval_s = 9223372036854775807\n",
            "metrics.interval_s",
        ),
        (
            "",
            "[bus.tls]\nca_file = \"missing-ca.pem\"\n",
            "missing-ca.pem",
        ),
        (
            "",
            "[bus.tls]\nca_file = \"ca.pem\"\ncert_file = \"client.pem\"\n",
            "key_file",
        ),
    ];
    for (top, sections, named) in cases {
        let (ok, err) = check(top, sections, &[]);
        assert!(!ok, "{sections} passed check-config");
        assert!(err.contains(named), "{sections}: {err}");
    }
}

#[test]
fn check_config_refuses_a_state_dir_that_is_a_file() {
    let home = AgentHome::new("", "");
    let file = home.path().join("state-file");
    std::fs::write(&file, "x").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(["check-config", "-c"])
        .arg(&home.config_path)
        .env("RETAIL_AGENT__STATE_DIR", &file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("state_dir") && err.contains("not a directory"),
        "{err}"
    );
}

#[test]
fn check_config_names_the_key_of_a_type_error() {
    let (ok, err) = check("", "[bus]\nport = \"18851\"\n", &[]);
    assert!(!ok);
    assert!(
        err.contains("bus.port: invalid type: string \"18851\", expected u16"),
        "{err}"
    );
    assert!(!err.contains("not valid TOML"), "{err}");
}

#[test]
fn check_config_reads_a_numeric_password_from_the_environment_as_a_string() {
    let (ok, err) = check("", "", &[("RETAIL_AGENT__BUS__PASSWORD", "123456")]);
    assert!(ok, "{err}");
}

#[test]
fn enroll_and_db_on_a_db_in_use_say_to_stop_the_agent_or_push_an_update() {
    let home = AgentHome::new("", "");
    // Held as the running daemon holds it.
    let _held = RefDb::open(
        &home.path().join("state/refdb"),
        RefDbSettings {
            dim: 4,
            model_fingerprint: "0123456789abcdef".into(),
            prototypes_per_class: 0,
            precision: Default::default(),
            store_images: true,
            remember_updates: 100,
            cache_mb: 4,
        },
    )
    .expect("open the DB");
    let refs = common::repo_path("testdata/synthetic/refs");
    for args in [
        vec!["enroll", "--refs", refs.to_str().unwrap()],
        vec!["db", "stats"],
    ] {
        let out = home.cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(
            err.contains("in use by another process")
                && err.contains("systemctl stop retail-agent")
                && err.contains("fleet push"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("could not acquire lock"), "{err}");
    }
}
