//! Fleet reference updates end to end: the real binary over a real
//! Mosquitto, signed updates built from the contract, acks and Status read
//! as a fleet back end would, the operator's CLI, SIGKILLs, and a fleet of
//! agent processes.

mod common;
mod daemon_support;
mod fleet_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{to_json, AgentHome, Mosquitto, TestClient};
use daemon_support::{model_fingerprint, now_ms};
use fleet_support::*;
use retail_testkit::digest::Content;
use serde_json::Value;

const FLEET: &str = "north";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The model's embedding dimension, from the bundled manifest.
fn model_dim(home: &AgentHome) -> usize {
    let cfg = home.load();
    retail_agent::manifest::ModelManifest::load(&cfg.manifest_path())
        .unwrap()
        .file
        .embedding
        .dim
}

fn assert_ack(
    ack: &Value,
    id: Option<&str>,
    status: &str,
    version: u64,
    content: &Content,
    what: &str,
) {
    assert_eq!(ack["status"], status, "{what}: status in {ack}");
    match id {
        Some(id) => assert_eq!(ack["update_id"], id, "{what}: update_id in {ack}"),
        None => assert!(
            ack["update_id"].is_null(),
            "{what}: update_id must be null in {ack}"
        ),
    }
    assert_eq!(ack["version"], version, "{what}: version in {ack}");
    assert_eq!(ack["digest"], content.digest(), "{what}: digest in {ack}");
    assert_eq!(ack["refs"], content.0.len() as u64, "{what}: refs in {ack}");
    if status == "applied" {
        assert!(
            ack.get("reason").is_none(),
            "{what}: an applied ack has no reason: {ack}"
        );
    } else {
        assert!(
            ack["reason"].is_string(),
            "{what}: a reason is given: {ack}"
        );
    }
}

#[test]
fn every_rule_of_the_handling_order_gets_the_contracts_ack_and_stores_nothing_else() {
    let broker = Mosquitto::start("");
    let (k1, k2, stranger) = (
        FleetKey::generate(),
        FleetKey::generate(),
        FleetKey::generate(),
    );
    let home = device_home("dev-a", FLEET, broker.port, &[("k1", &k1), ("k2", &k2)], "");
    let dim = model_dim(&home);
    let fp = model_fingerprint();
    let images = reference_images();
    let _agent = AgentProcess::start(&home);
    rt().block_on(async {
        let mut c = TestClient::connect(
            broker.port,
            "fleet-backend",
            &["ror/dev-a/status", "ror/dev-a/refdb/ack"],
        )
        .await;
        let st = wait_online(&mut c, "dev-a", Duration::from_secs(30)).await;
        assert_eq!(st["refdb"]["version"], 0);
        let fleet_topic = format!("ror/fleet/{FLEET}/refdb");
        let dev_topic = "ror/dev-a/refdb";
        let mut content = Content::default();
        let mut version: u64;
        let t = Duration::from_secs(30);

        // Applied: three image upserts, broadcast to the fleet.
        let ops: Vec<_> = images[..3]
            .iter()
            .map(|(l, n, b)| upsert_image(&format!("{l}/{n}"), l, b))
            .collect();
        for (l, n, b) in &images[..3] {
            content.image(&format!("{l}/{n}"), l, b);
        }
        let u1 = Update::new("u1", FLEET, Some(0), 1, ops);
        c.publish(&fleet_topic, 1, u1.signed(&k1, "k1")).await;
        let ack = next_ack(&mut c, "dev-a", t).await.expect("ack of u1");
        version = 1;
        assert_ack(&ack, Some("u1"), "applied", version, &content, "u1");
        let st = wait_status_version(broker.port, "dev-a", 1).await;
        assert_eq!(st["refdb"]["digest"], content.digest());

        // Rule 1: random bytes; an envelope that is not one; bad signature; unknown key.
        let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
            ("random bytes", vec![0x13, 0x37, 0xff, 0x00, 0x42], None),
            (
                "a map that is no envelope",
                encode(&rmpv::Value::Map(vec![(
                    rmpv::Value::from("key_id"),
                    rmpv::Value::from(5),
                )])),
                None,
            ),
            (
                "bad signature",
                {
                    let u = Update::new("u-badsig", FLEET, Some(1), 2, vec![clear()]);
                    let body = u.body();
                    let mut sig = k1.sign(&body);
                    sig[0] ^= 0x80;
                    envelope("k1", &sig, &body)
                },
                Some("u-badsig"),
            ),
            (
                "signed by an untrusted key",
                Update::new("u-stranger", FLEET, Some(1), 2, vec![clear()]).signed(&stranger, "k1"),
                Some("u-stranger"),
            ),
            (
                "unknown key id",
                Update::new("u-unknown-key", FLEET, Some(1), 2, vec![clear()]).signed(&k1, "k9"),
                Some("u-unknown-key"),
            ),
            (
                "signed body that is no RefUpdate",
                {
                    let body = encode(&rmpv::Value::Map(vec![
                        (rmpv::Value::from("update_id"), rmpv::Value::from("u-shape")),
                        (rmpv::Value::from("version"), rmpv::Value::from("two")),
                    ]));
                    envelope("k1", &k1.sign(&body), &body)
                },
                Some("u-shape"),
            ),
            (
                "wrong fleet",
                Update::new("u-south", "south", Some(1), 2, vec![clear()]).signed(&k1, "k1"),
                Some("u-south"),
            ),
        ];
        for (what, payload, id) in cases {
            c.publish(&fleet_topic, 1, payload).await;
            let ack = next_ack(&mut c, "dev-a", t)
                .await
                .unwrap_or_else(|| panic!("{what}: no ack"));
            assert_ack(&ack, id, "rejected", version, &content, what);
        }

        // Another device's update is ignored without an ack: the next ack is the next update's.
        let mut other = Update::new("u-other", FLEET, Some(1), 2, vec![clear()]);
        other.target = Some("dev-b".into());
        c.publish(&fleet_topic, 1, other.signed(&k1, "k1")).await;

        // Rules 3-6 and 7, each leaving the DB as it is.
        let mut expired = Update::new("u-expired", FLEET, Some(1), 2, vec![clear()]);
        expired.expires_ms = Some(now_ms() - 1);
        let undecodable = Update::new(
            "u-badimage",
            FLEET,
            Some(1),
            2,
            vec![
                upsert_image("good/1", "good", &images[5].2),
                upsert_image("bad/1", "bad", b"\xff\xd8\xff this is no JPEG"),
            ],
        );
        let other_model = Update::new(
            "u-fp",
            FLEET,
            Some(1),
            2,
            vec![upsert_embedding(
                "e/1",
                "e",
                &vec![0.1; dim],
                "0123456789abcdef",
            )],
        );
        let other_dim = Update::new(
            "u-dim",
            FLEET,
            Some(1),
            2,
            vec![upsert_embedding("e/1", "e", &vec![0.1; dim + 1], &fp)],
        );
        let bad_op = Update::new("u-badop", FLEET, Some(1), 2, vec![delete("")]);
        let unknown_op = Update::new(
            "u-unknown-op",
            FLEET,
            Some(1),
            2,
            vec![encode_op_named("explode")],
        );
        let cases: Vec<(&str, Update, &str)> = vec![
            (
                "replay",
                Update::new("u1", FLEET, Some(0), 1, vec![clear()]),
                "duplicate",
            ),
            (
                "replay with a new version",
                Update::new("u1", FLEET, Some(1), 7, vec![clear()]),
                "duplicate",
            ),
            ("expired", expired, "expired"),
            (
                "stale",
                Update::new("u-stale", FLEET, Some(0), 1, vec![clear()]),
                "stale",
            ),
            (
                "stale without base",
                Update::new("u-stale2", FLEET, None, 1, vec![clear()]),
                "stale",
            ),
            (
                "gap",
                Update::new("u-gap", FLEET, Some(5), 6, vec![clear()]),
                "gap",
            ),
            ("undecodable image", undecodable, "rejected"),
            ("embedding of another model", other_model, "rejected"),
            ("embedding of another dimension", other_dim, "rejected"),
            ("invalid op", bad_op, "rejected"),
            ("unknown op", unknown_op, "rejected"),
        ];
        for (what, u, status) in cases {
            c.publish(dev_topic, 1, u.signed(&k1, "k1")).await;
            let ack = next_ack(&mut c, "dev-a", t)
                .await
                .unwrap_or_else(|| panic!("{what}: no ack"));
            assert_ack(&ack, Some(&u.update_id), status, version, &content, what);
        }

        // Applied: an embedding upsert of the running model, signed with the
        // second key (rotation), sent as a JSON envelope on the device topic.
        let e: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut u2 = Update::new(
            "u2",
            FLEET,
            Some(1),
            2,
            vec![
                upsert_embedding("emb/1", "emb", &e, &fp),
                delete(&format!("{}/{}", images[0].0, images[0].1)),
            ],
        );
        u2.target = Some("dev-a".into());
        content.embedding("emb/1", "emb", &e);
        content
            .0
            .remove(&format!("{}/{}", images[0].0, images[0].1));
        let body = u2.body();
        c.publish(dev_topic, 1, envelope_json("k2", &k2.sign(&body), &body))
            .await;
        let ack = next_ack(&mut c, "dev-a", t).await.expect("ack of u2");
        version = 2;
        assert_ack(
            &ack,
            Some("u2"),
            "applied",
            version,
            &content,
            "u2 (second key, JSON)",
        );

        // A snapshot (null base, clear first) replaces everything.
        let snap = Update::new(
            "u-snap",
            FLEET,
            None,
            10,
            vec![
                clear(),
                upsert_image("s/1", "s", &images[7].2),
                delete_label("nothing-here"),
            ],
        );
        content = Content::default();
        content.image("s/1", "s", &images[7].2);
        c.publish(&fleet_topic, 1, snap.signed(&k1, "k1")).await;
        let ack = next_ack(&mut c, "dev-a", t)
            .await
            .expect("ack of the snapshot");
        assert_ack(&ack, Some("u-snap"), "applied", 10, &content, "snapshot");
        let st = wait_status_version(broker.port, "dev-a", 10).await;
        assert_eq!(st["refdb"]["digest"], content.digest());
        assert_eq!(st["refdb"]["refs"], 1);
    });
}

/// An op with an unknown `op` name.
fn encode_op_named(name: &str) -> rmpv::Value {
    rmpv::Value::Map(vec![(rmpv::Value::from("op"), rmpv::Value::from(name))])
}

/// One update of the SIGKILL stream: update v upserts six references
/// `v{v}/{j}` (`added`: id, label, index of the image) and deletes three of
/// update v-1's (`removed`).
struct StreamStep {
    ops: Vec<rmpv::Value>,
    added: Vec<(String, String, usize)>,
    removed: Vec<String>,
}

fn stream_update(v: u64, images: &[(String, String, Vec<u8>)]) -> StreamStep {
    let mut ops = Vec::new();
    let mut added = Vec::new();
    let mut removed = Vec::new();
    for j in 0..6usize {
        let idx = (v as usize * 7 + j * 13) % images.len();
        let (label, _, bytes) = &images[idx];
        let id = format!("v{v}/{j}");
        ops.push(upsert_image(&id, label, bytes));
        added.push((id, label.clone(), idx));
    }
    if v > 1 {
        for j in 0..3 {
            let id = format!("v{}/{j}", v - 1);
            ops.push(delete(&id));
            removed.push(id);
        }
    }
    StreamStep {
        ops,
        added,
        removed,
    }
}

#[test]
fn sigkill_in_a_stream_of_updates_never_loses_an_applied_update_nor_half_applies_one() {
    const ROUNDS: u64 = 20;
    const PER_ROUND: u64 = 6;
    let broker = Mosquitto::start("");
    let key = FleetKey::generate();
    let home = device_home("dev-k", FLEET, broker.port, &[("k1", &key)], "");
    let images = reference_images();
    // Digest of the DB at every version.
    let mut content = Content::default();
    let mut digests = vec![content.digest()];
    let mut updates = Vec::new();
    for v in 1..=ROUNDS * PER_ROUND {
        let StreamStep {
            ops,
            added,
            removed,
        } = stream_update(v, &images);
        for (id, label, idx) in added {
            content.image(&id, &label, &images[idx].2);
        }
        for id in removed {
            content.0.remove(&id);
        }
        digests.push(content.digest());
        updates.push(Update::new(&format!("k{v}"), FLEET, Some(v - 1), v, ops).signed(&key, "k1"));
    }
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let rt = rt();
    let mut c = rt.block_on(TestClient::connect(
        broker.port,
        "kill-watch",
        &["ror/dev-k/status", "ror/dev-k/refdb/ack"],
    ));
    let mut applied_before_kill = Vec::new();
    for round in 0..ROUNDS {
        let mut agent = AgentProcess::start(&home);
        let target = round * PER_ROUND;
        rt.block_on(async {
            // The previous round's unacknowledged updates are delivered again
            // (persistent session): wait until all of them are in.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let st = wait_online(&mut c, "dev-k", deadline - Instant::now()).await;
                let v = st["refdb"]["version"].as_u64().unwrap();
                assert_eq!(
                    st["refdb"]["digest"].as_str().unwrap(),
                    digests[v as usize],
                    "round {round}: Status digest at version {v}"
                );
                if v == target {
                    break;
                }
                assert!(v < target, "round {round}: version {v} beyond {target}");
            }
            while c.next(Duration::from_millis(50)).await.is_some() {}
            for u in &updates[target as usize..(target + PER_ROUND) as usize] {
                c.publish(&format!("ror/fleet/{FLEET}/refdb"), 1, u.clone())
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(20 + random(400))).await;
        });
        agent.kill9();
        let mut max_applied = 0;
        rt.block_on(async {
            while let Some((topic, payload, _)) = c.next(Duration::from_millis(200)).await {
                if topic.ends_with("/refdb/ack") {
                    let a = to_json(&payload);
                    if a["status"] == "applied" {
                        max_applied = max_applied.max(a["version"].as_u64().unwrap());
                    }
                }
            }
        });
        let stats = db_stats(&home);
        let v = stats["version"].as_u64().unwrap();
        assert!(
            v >= max_applied,
            "round {round}: update {max_applied} was acked applied but the DB is at {v}"
        );
        assert_eq!(
            stats["digest"].as_str().unwrap(),
            digests[v as usize],
            "round {round}: the DB at version {v} is not exactly updates 1..={v}"
        );
        applied_before_kill.push((v - target, max_applied.saturating_sub(target)));
    }
    // The last round's leftovers arrive after one more start.
    let _agent = AgentProcess::start(&home);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = wait_online(&mut c, "dev-k", deadline - Instant::now()).await;
            if st["refdb"]["version"] == ROUNDS * PER_ROUND {
                assert_eq!(
                    st["refdb"]["digest"].as_str().unwrap(),
                    digests[(ROUNDS * PER_ROUND) as usize]
                );
                break;
            }
        }
    });
    println!("updates durable / acked applied at each SIGKILL (of {PER_ROUND} sent): {applied_before_kill:?}");
    let mid_stream = applied_before_kill
        .iter()
        .filter(|(d, _)| *d > 0 && *d < PER_ROUND)
        .count();
    assert!(
        mid_stream >= 3,
        "too few kills landed mid-stream to prove anything: {applied_before_kill:?}"
    );
}

/// Runs `retail-agent fleet ARGS -c CONFIG`; (exit code, stdout, stderr).
fn fleet_cli(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .arg("fleet")
        .args(args)
        .arg("-c")
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A folder of reference images: `labels` labels of the synthetic set, `per_label` images each.
fn refs_dir(labels: usize, per_label: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut by_label: BTreeMap<String, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    for (l, n, b) in reference_images() {
        by_label.entry(l).or_default().push((n, b));
    }
    for (l, files) in by_label.into_iter().take(labels) {
        std::fs::create_dir_all(dir.path().join(&l)).unwrap();
        for (n, b) in files.into_iter().take(per_label) {
            std::fs::write(dir.path().join(&l).join(n), b).unwrap();
        }
    }
    dir
}

fn status_json(config: &std::path::Path) -> (i32, Value) {
    let (code, out, err) = fleet_cli(config, &["status", "--json", "--wait-s", "2"]);
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("fleet status --json: {e}: {out}\n{err}"));
    (code, v)
}

#[test]
fn the_operator_cli_keeps_a_fleet_identical_and_its_exit_codes_tell_what_happened() {
    let broker = Mosquitto::start("");
    let keys = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(["fleet", "keygen", "--out"])
        .arg(keys.path())
        .args(["--key-id", "ops"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let private = keys.path().join("ops.pk8");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public = std::fs::read_to_string(keys.path().join("ops.pub"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(public.len(), 64);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("ops = \"{public}\"")));
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(["fleet", "keygen", "--out"])
        .arg(keys.path())
        .args(["--key-id", "ops"])
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "an existing key is never overwritten"
    );

    let section = format!("[fleet_updates.trusted_keys]\nops = \"{public}\"\n");
    let home = |dev: &str| {
        AgentHome::new(
            &format!("device_id = \"{dev}\"\nfleet = \"{FLEET}\""),
            &format!(
                "[bus]\nport = {}\nreconnect_min_ms = 50\n[metrics]\ninterval_s = 1\n{section}",
                broker.port
            ),
        )
    };
    let (h1, h2, h3, op) = (
        home("dev-1"),
        home("dev-2"),
        home("dev-3"),
        home("operator"),
    );
    let cfg = op.config_path.clone();
    let key = private.to_str().unwrap();
    let _a1 = AgentProcess::start(&h1);
    let mut a2 = AgentProcess::start(&h2);
    let _a3 = AgentProcess::start(&h3);
    rt().block_on(async {
        let mut c = TestClient::connect(broker.port, "cli-watch", &["ror/+/status"]).await;
        wait_all_online(
            &mut c,
            &["dev-1", "dev-2", "dev-3"],
            Duration::from_secs(30),
        )
        .await;
    });

    let (code, v) = status_json(&cfg);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["online"], 3);
    assert!(v["diverging"].as_array().unwrap().is_empty());

    // Push images, then centrally computed embeddings in chunks of 5.
    let refs = refs_dir(3, 4);
    let (code, out, err) = fleet_cli(
        &cfg,
        &[
            "push",
            "--refs",
            refs.path().to_str().unwrap(),
            "--key",
            key,
        ],
    );
    assert_eq!(code, 0, "push: {out}\n{err}");
    assert!(
        out.contains("3 of 3 device(s) applied all 1 update(s)"),
        "{out}"
    );
    let more = refs_dir(5, 3);
    let (code, out, err) = fleet_cli(
        &cfg,
        &[
            "push",
            "--refs",
            more.path().to_str().unwrap(),
            "--embed",
            "--chunk",
            "5",
            "--key",
            key,
            "--json",
        ],
    );
    assert_eq!(code, 0, "push --embed: {out}\n{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["updates"].as_array().unwrap().len(),
        3,
        "15 refs in chunks of 5: {report}"
    );
    let devices = report["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 3);
    assert_eq!(devices[0]["digest"], devices[1]["digest"]);
    assert_eq!(devices[0]["digest"], devices[2]["digest"]);
    assert_eq!(devices[0]["version"], 4);

    // dev-1 and dev-2 get an update of their own; dev-3 now lags and
    // diverges, and status says so.
    let one = refs_dir(1, 1);
    for dev in ["dev-1", "dev-2"] {
        let (code, out, err) = fleet_cli(
            &cfg,
            &[
                "push",
                "--device",
                dev,
                "--refs",
                one.path().to_str().unwrap(),
                "--key",
                key,
            ],
        );
        assert_eq!(code, 0, "push --device {dev}: {out}\n{err}");
        assert!(out.contains("1 of 1 device(s) applied"), "{out}");
    }
    let (code, v) = status_json(&cfg);
    assert_eq!(code, 2, "a diverging device is exit status 2: {v}");
    assert_eq!(v["diverging"], serde_json::json!(["dev-3"]));

    // A push chains on the majority's version: dev-3 answers gap.
    let other = refs_dir(2, 1);
    let (code, out, _) = fleet_cli(
        &cfg,
        &[
            "push",
            "--refs",
            other.path().to_str().unwrap(),
            "--key",
            key,
        ],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("dev-3                    gap"), "{out}");
    assert!(out.contains("dev-1                    applied"), "{out}");

    // A snapshot repairs it: all at one digest, the expected one.
    let all = refs_dir(12, 10);
    let (code, out, err) = fleet_cli(
        &cfg,
        &[
            "snapshot",
            "--refs",
            all.path().to_str().unwrap(),
            "--key",
            key,
            "--max-bytes",
            "200000",
        ],
    );
    assert_eq!(code, 0, "snapshot: {out}\n{err}");
    assert!(
        out.contains("matching the snapshot's expected digest"),
        "{out}"
    );
    let (code, v) = status_json(&cfg);
    assert_eq!(code, 0, "{v}");
    let refs_now = |v: &Value| {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["status"]["refdb"]["refs"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(refs_now(&v), vec![120, 120, 120]);

    // Delete a label everywhere.
    let (code, out, err) = fleet_cli(
        &cfg,
        &["delete", "--label", "acme-cola-330ml", "--key", key],
    );
    assert_eq!(code, 0, "delete: {out}\n{err}");
    let (code, v) = status_json(&cfg);
    assert_eq!(code, 0);
    assert_eq!(refs_now(&v), vec![110, 110, 110]);
    assert!(
        v["devices"][0]["metrics"].is_object(),
        "metrics are shown: {v}"
    );

    // A device that does not answer: exit status 3.
    let pid = a2.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    let (code, out, _) = fleet_cli(
        &cfg,
        &[
            "delete",
            "--ref",
            "berry-jam-370g/00.jpg",
            "--key",
            key,
            "--timeout-s",
            "3",
        ],
    );
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("no answer"), "{out}");
    let _ = a2.child.id();

    // A wrong key is rejected by every device: exit status 2.
    let wrong = tempfile::tempdir().unwrap();
    let wk = FleetKey::generate();
    let wrong_key = wrong.path().join("ops.pk8");
    wk.write(&wrong_key);
    let (code, out, _) = fleet_cli(
        &cfg,
        &[
            "delete",
            "--label",
            "x",
            "--key",
            wrong_key.to_str().unwrap(),
            "--timeout-s",
            "20",
        ],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("rejected"), "{out}");
    a2.kill9();
}

#[test]
fn fifty_agent_processes_converge_on_one_snapshot_broadcast() {
    const AGENTS: usize = 50;
    let broker = Mosquitto::start("");
    let keys = tempfile::tempdir().unwrap();
    let key = FleetKey::generate();
    let key_path = keys.path().join("k1.pk8");
    key.write(&key_path);
    let homes: Vec<AgentHome> = (0..AGENTS)
        .map(|i| {
            device_home(
                &format!("dev-{i:02}"),
                FLEET,
                broker.port,
                &[("k1", &key)],
                "",
            )
        })
        .collect();
    for h in &homes {
        // One ONNX Runtime thread and one decode worker each: 50 agents share 2 cores.
        let text = std::fs::read_to_string(&h.config_path).unwrap();
        let text = text.replace("[runtime]\n", "[runtime]\nintra_threads = 1\n");
        std::fs::write(
            &h.config_path,
            format!("{text}\n[pipeline]\ndecode_workers = 1\n"),
        )
        .unwrap();
    }
    let op = device_home("operator", FLEET, broker.port, &[("k1", &key)], "");
    let started = Instant::now();
    let _agents: Vec<AgentProcess> = homes.iter().map(AgentProcess::start).collect();
    rt().block_on(async {
        let mut c = TestClient::connect(broker.port, "fleet-watch", &["ror/+/status"]).await;
        let mut online = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(180);
        while online.len() < AGENTS {
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("agents online in time");
            let (topic, payload, _) = c.next(left).await.expect("agents online in time");
            let v = to_json(&payload);
            if v["state"] == "online" {
                online.insert(topic);
            }
        }
    });
    println!(
        "{AGENTS} agents online {:.1} s after start",
        started.elapsed().as_secs_f64()
    );
    let refs = refs_dir(12, 4);
    let t = Instant::now();
    let (code, out, err) = fleet_cli(
        &op.config_path,
        &[
            "snapshot",
            "--refs",
            refs.path().to_str().unwrap(),
            "--key",
            key_path.to_str().unwrap(),
            "--timeout-s",
            "300",
        ],
    );
    let converged = t.elapsed();
    assert_eq!(code, 0, "snapshot: {out}\n{err}");
    assert!(
        out.contains(&format!("{AGENTS} of {AGENTS} device(s) applied")),
        "{out}"
    );
    assert!(
        out.contains("1 distinct digest(s), matching the snapshot's expected digest"),
        "{out}"
    );
    println!("snapshot of 48 images broadcast to {AGENTS} agents: all acked applied with one digest in {:.2} s", converged.as_secs_f64());
    let (code, v) = status_json(&op.config_path);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["online"], AGENTS as u64);
    assert!(v["diverging"].as_array().unwrap().is_empty());
    let digests: std::collections::BTreeSet<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["online"] == true)
        .map(|d| d["status"]["refdb"]["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests.len(), 1);
    assert_eq!(v["majority_digest"].as_str(), digests.first().copied());
}

fn p95(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * 0.95).ceil() as usize).clamp(1, v.len()) - 1]
}

#[test]
fn crops_keep_being_answered_while_an_image_update_is_embedded() {
    let broker = Mosquitto::start("");
    let key = FleetKey::generate();
    let trusted = format!(
        "[fleet_updates.trusted_keys]\nk1 = \"{}\"\n",
        key.public_hex()
    );
    let home = daemon_support::enrolled_home(
        &format!("device_id = \"dev-l\"\nfleet = \"{FLEET}\""),
        &format!("[bus]\nport = {}\n{trusted}", broker.port),
    );
    let _agent = AgentProcess::start(&home);
    let queries = common::queries();
    let images = reference_images();
    rt().block_on(async {
        let mut c = TestClient::connect(broker.port, "checkout", &["ror/dev-l/status", "ror/dev-l/results", "ror/dev-l/refdb/ack"]).await;
        let st = wait_online(&mut c, "dev-l", Duration::from_secs(30)).await;
        let v0 = st["refdb"]["version"].as_u64().unwrap();
        let mut seq = 0;
        let mut ask = || {
            seq += 1;
            let (_, img) = &queries[seq % queries.len()];
            (format!("q{seq}"), common::msgpack_request(&format!("q{seq}"), &[img]))
        };
        // Idle latency.
        let mut idle = Vec::new();
        for _ in 0..40 {
            let (id, req) = ask();
            let t = Instant::now();
            c.publish("ror/dev-l/crops", 1, req).await;
            let r = to_json(&c.next_on("ror/dev-l/results", Duration::from_secs(10)).await.expect("result"));
            assert_eq!(r["request_id"], id.as_str());
            idle.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        // An update of 360 image references, then crops one after another
        // until its ack comes.
        let ops: Vec<_> = (0..360).map(|i| {
            let (l, _, b) = &images[i % images.len()];
            upsert_image(&format!("new/{i}"), l, b)
        }).collect();
        let u = Update::new("big", FLEET, Some(v0), v0 + 1, ops);
        c.publish(&format!("ror/fleet/{FLEET}/refdb"), 1, u.signed(&key, "k1")).await;
        let started = Instant::now();
        let mut during = Vec::new();
        let mut applied = None;
        let mut new_version_seen = false;
        while applied.is_none() {
            assert!(started.elapsed() < Duration::from_secs(120), "the update did not finish");
            let (id, req) = ask();
            let t = Instant::now();
            c.publish("ror/dev-l/crops", 1, req).await;
            let r = loop {
                let (topic, payload, _) = c.next(Duration::from_secs(30)).await.expect("a crop is answered during the update");
                let v = to_json(&payload);
                if topic.ends_with("/refdb/ack") {
                    assert_eq!(v["status"], "applied", "{v}");
                    applied = Some(started.elapsed());
                } else if topic.ends_with("/results") {
                    break v;
                }
            };
            assert_eq!(r["request_id"], id.as_str());
            let version = r["refdb_version"].as_u64().unwrap();
            let new_refs = r["items"][0]["candidates"].as_array().unwrap().iter().any(|c| c["ref_id"].as_str().unwrap().starts_with("new/"));
            if version == v0 {
                assert!(!new_refs, "a result of version {v0} saw references of the update: {r}");
                assert!(!new_version_seen, "version went back to {v0}");
                if applied.is_none() {
                    during.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            } else {
                assert_eq!(version, v0 + 1, "{r}");
                new_version_seen = true;
            }
        }
        let applied = applied.unwrap();
        println!(
            "crop latency p95: idle {:.1} ms; during the 360-image update {:.1} ms ({} crops answered while it was embedded for {:.2} s)",
            p95(&mut idle), p95(&mut during.clone()), during.len(), applied.as_secs_f64()
        );
        assert!(!during.is_empty(), "no crop was answered while the update was embedded");
    });
}

/// Damages the DB's log in the middle, as a bad flash page would: sled
/// then opens without an error but without the data.
fn damage_db(home: &AgentHome) {
    let db = home.path().join("state/refdb/db");
    let len = std::fs::metadata(&db).unwrap().len();
    use std::io::{Seek, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.seek(std::io::SeekFrom::Start(len / 2)).unwrap();
    f.write_all(&[0xa5; 8192]).unwrap();
}

#[test]
fn a_corrupt_db_is_moved_aside_reported_in_the_status_and_restored_by_a_snapshot() {
    let broker = Mosquitto::start("");
    let key = FleetKey::generate();
    let trusted = format!(
        "[fleet_updates.trusted_keys]\nk1 = \"{}\"\n",
        key.public_hex()
    );
    let home = daemon_support::enrolled_home(
        &format!("device_id = \"dev-c\"\nfleet = \"{FLEET}\""),
        &format!(
            "[bus]\nport = {}\n[refdb]\non_corrupt = \"reset\"\n{trusted}",
            broker.port
        ),
    );
    damage_db(&home);
    let agent = AgentProcess::start(&home);
    let images = reference_images();
    rt().block_on(async {
        let mut c = TestClient::connect(
            broker.port,
            "watch-c",
            &["ror/dev-c/status", "ror/dev-c/refdb/ack"],
        )
        .await;
        let st = wait_online(&mut c, "dev-c", Duration::from_secs(30)).await;
        assert_eq!(st["refdb"]["refs"], 0, "{st}");
        let reset = &st["refdb_reset"];
        assert!(
            reset["reason"].as_str().unwrap().contains("lost data"),
            "{st}"
        );
        let aside = std::path::PathBuf::from(reset["moved_to"].as_str().unwrap());
        assert!(
            aside.join("db").exists(),
            "the broken DB is kept at {}",
            aside.display()
        );
        let errors = agent
            .log()
            .lines()
            .filter(|l| l.contains(" ERROR "))
            .count();
        assert_eq!(errors, 1, "one error line says so:\n{}", agent.log());
        // The fleet's snapshot restores it.
        let mut content = Content::default();
        let ops: Vec<_> = images[..4]
            .iter()
            .map(|(l, n, b)| {
                content.image(&format!("{l}/{n}"), l, b);
                upsert_image(&format!("{l}/{n}"), l, b)
            })
            .collect();
        let snap = Update::new("restore", FLEET, None, 3, [vec![clear()], ops].concat());
        c.publish("ror/dev-c/refdb", 1, snap.signed(&key, "k1"))
            .await;
        let ack = next_ack(&mut c, "dev-c", Duration::from_secs(30))
            .await
            .unwrap();
        assert_ack(
            &ack,
            Some("restore"),
            "applied",
            3,
            &content,
            "snapshot after a reset",
        );
    });
}

#[test]
fn with_on_corrupt_fail_a_corrupt_db_stops_the_agent_with_one_clear_line() {
    let home =
        daemon_support::enrolled_home("device_id = \"dev-f\"", "[refdb]\non_corrupt = \"fail\"\n");
    damage_db(&home);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(["run", "-c"])
        .arg(&home.config_path)
        .env("RUST_LOG", "error")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("corrupt") && stderr.contains("lost data"),
        "{stderr}"
    );
    assert!(
        home.path().join("state/refdb/db").exists(),
        "nothing is moved with \"fail\""
    );
    let stats = home.cli(&["db", "stats"]);
    assert!(
        !stats.status.success(),
        "db stats refuses the damaged DB too"
    );
}

/// A small ext4 file system on a loop device mounted at `dir` with
/// `errors=remount-ro`, as a device's data partition would be (needs root,
/// as CI has); unmounted on drop.
struct SmallDisk {
    dir: std::path::PathBuf,
    image: std::path::PathBuf,
    _images: tempfile::TempDir,
}

fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} (needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl SmallDisk {
    fn mount(dir: &std::path::Path, mb: u64) -> Self {
        let images = tempfile::tempdir().unwrap();
        let image = images.path().join("state.ext4");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(mb << 20)
            .unwrap();
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        std::fs::create_dir_all(dir).unwrap();
        let disk = Self {
            dir: dir.to_path_buf(),
            image,
            _images: images,
        };
        disk.attach();
        disk
    }

    fn attach(&self) {
        run(
            "mount",
            &[
                "-o",
                "loop,errors=remount-ro",
                self.image.to_str().unwrap(),
                self.dir.to_str().unwrap(),
            ],
        );
    }

    /// An I/O error as the kernel would see one: ext4 turns itself
    /// read-only under the running agent.
    fn fail(&self) {
        let out = std::process::Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&self.dir)
            .output()
            .unwrap();
        let source = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let name = source.rsplit('/').next().unwrap().to_string();
        std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "1")
            .expect("trigger an ext4 error");
    }

    /// Unmounts, repairs (fsck) and mounts again, as a reboot would.
    fn repair(&self) {
        run("umount", &[self.dir.to_str().unwrap()]);
        let _ = std::process::Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(&self.image)
            .output();
        self.attach();
    }

    /// Fills the file system up to the last byte; returns the filler.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let small = [0u8; 4096];
        while f.write_all(&small[..]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// Expects update `id` refused with `reason` in its ack, the DB still at
/// `version` with `content`.
async fn expect_refused(
    c: &mut TestClient,
    dev: &str,
    id: &str,
    reason: &str,
    content: &Content,
    version: u64,
) {
    let ack = next_ack(c, dev, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no ack for {id}"));
    assert_ack(&ack, Some(id), "rejected", version, content, id);
    assert!(ack["reason"].as_str().unwrap().contains(reason), "{ack}");
}

/// Expects crop request `asked` answered without error from DB `version`.
async fn expect_served(c: &mut TestClient, dev: &str, asked: &str, version: u64) {
    let r = to_json(
        &c.next_on(&format!("ror/{dev}/results"), Duration::from_secs(20))
            .await
            .expect("result"),
    );
    assert_eq!(
        (r["request_id"].as_str(), r["refdb_version"].as_u64()),
        (Some(asked), Some(version)),
        "{r}"
    );
    assert!(r["items"][0]["error"].is_null(), "{r}");
}

#[test]
fn a_full_or_read_only_state_dir_refuses_an_update_and_the_last_good_db_keeps_serving() {
    let broker = Mosquitto::start("");
    let key = FleetKey::generate();
    let dev = "dev-disk";
    let home = device_home(dev, FLEET, broker.port, &[("k1", &key)], "");
    let disk = SmallDisk::mount(&home.path().join("state"), 64);
    let agent = AgentProcess::start(&home);
    let images = reference_images();
    let queries = common::queries();
    let outcome = rt().block_on(async {
        let ack_topic = format!("ror/{dev}/refdb/ack");
        let results = format!("ror/{dev}/results");
        let mut c = TestClient::connect(
            broker.port,
            "fleet-disk",
            &[&format!("ror/{dev}/status"), &ack_topic, &results],
        )
        .await;
        wait_online(&mut c, dev, Duration::from_secs(30)).await;
        let publisher = c.client.clone();
        let send = |u: &Update| {
            let payload = u.signed(&key, "k1");
            let client = publisher.clone();
            let topic = format!("ror/fleet/{FLEET}/refdb");
            async move {
                client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap()
            }
        };
        let batch = |from: usize, n: usize, content: &mut Content| {
            (from..from + n)
                .map(|i| {
                    let (label, _, bytes) = &images[i % images.len()];
                    let id = format!("r{i}");
                    content.image(&id, label, bytes);
                    upsert_image(&id, label, bytes)
                })
                .collect::<Vec<_>>()
        };
        let mut served = 0;
        let mut ask = || {
            served += 1;
            let id = format!("q{served}");
            let req = common::msgpack_request(&id, &[&queries[served % queries.len()].1]);
            let client = publisher.clone();
            let topic = format!("ror/{dev}/crops");
            async move {
                client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, req)
                    .await
                    .unwrap();
                id
            }
        };

        let mut v1 = Content::default();
        let u1 = Update::new("u1", FLEET, Some(0), 1, batch(0, 20, &mut v1));
        send(&u1).await;
        let ack = next_ack(&mut c, dev, Duration::from_secs(60))
            .await
            .expect("ack u1");
        assert_ack(&ack, Some("u1"), "applied", 1, &v1, "u1");

        // A full disk: refused before anything is written, with a reason,
        // and the last good DB keeps serving.
        let filler = disk.fill();
        let mut v2 = v1.clone();
        let u2 = Update::new("u2", FLEET, Some(1), 2, batch(20, 20, &mut v2));
        send(&u2).await;
        expect_refused(&mut c, dev, "u2", "free space", &v1, 1).await;
        let id = ask().await;
        expect_served(&mut c, dev, &id, 1).await;

        // Space again: the same update applies (a rejected id is not burnt).
        std::fs::remove_file(&filler).unwrap();
        send(&u2).await;
        let ack = next_ack(&mut c, dev, Duration::from_secs(60))
            .await
            .expect("ack u2 again");
        assert_ack(&ack, Some("u2"), "applied", 2, &v2, "u2 with space");

        // The file system turns read-only under the agent (an I/O
        // error): refused cleanly, and the last good DB keeps serving.
        disk.fail();
        let mut v3 = v2.clone();
        let u3 = Update::new("u3", FLEET, Some(2), 3, batch(40, 10, &mut v3));
        send(&u3).await;
        expect_refused(&mut c, dev, "u3", "Read-only", &v2, 2).await;
        let id = ask().await;
        expect_served(&mut c, dev, &id, 2).await;
        (publisher, u3, v3)
    });
    let (publisher, u3, v3) = outcome;
    // A reboot: the file system is repaired, the DB holds the last good
    // content, and the refused update applies.
    drop(agent);
    disk.repair();
    assert_eq!(db_stats(&home)["version"], 2);
    let _agent = AgentProcess::start(&home);
    rt().block_on(async {
        let ack_topic = format!("ror/{dev}/refdb/ack");
        let mut c = TestClient::connect(
            broker.port,
            "fleet-disk-2",
            &[&format!("ror/{dev}/status"), &ack_topic],
        )
        .await;
        wait_online(&mut c, dev, Duration::from_secs(30)).await;
        drop(publisher);
        c.publish(
            &format!("ror/fleet/{FLEET}/refdb"),
            1,
            u3.signed(&key, "k1"),
        )
        .await;
        let ack = next_ack(&mut c, dev, Duration::from_secs(60))
            .await
            .expect("ack u3 again");
        assert_ack(&ack, Some("u3"), "applied", 3, &v3, "u3 after the repair");
    });
}
