//! A locked-down bus (issue 9, item 14): the example Mosquitto configuration
//! shipped in `agent-config/mosquitto/` (TLS only, client certificates, an
//! ACL confining each device to its own topics and its fleet's update
//! topic), run exactly as shipped with generated certificates. Only the
//! port, the file paths, the run-as user and the log/persistence directory
//! are substituted; every other byte of `mosquitto.conf` and `acl` is the
//! shipped one.
//!
//! Also: the bus password never reaches the logs or `check-config`'s
//! output, and private keys that other users can read are refused.
//!
//! Topic names are written out from `shared/spec/PROTOCOL.md` (root `ror`).
//! These tests fail (they never skip) when mosquitto is not installed.

mod common;
mod daemon_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{queries, repo_path, to_json, AgentHome, Mosquitto, TestClient, TestPki};
use daemon_support::*;
use retail_agent::config::TlsConfig;
use retail_agent::daemon::Agent;
use retail_testkit::{crops::image_crop, topics::topic};
use rmpv::Value as Mp;

/// The fleet and devices of the shipped ACL's example blocks.
const FLEET: &str = "store-9";
const A: &str = "lane-1";
const B: &str = "lane-2";
const CHECKOUT: &str = "checkout";
const OPERATOR: &str = "fleet-operator";

fn fleet_topic() -> String {
    format!("ror/fleet/{FLEET}/refdb")
}

// ---------------------------------------------------------------- broker

/// The shipped file `agent-config/mosquitto/{name}`.
fn shipped(name: &str) -> String {
    let path = repo_path(&format!("agent-config/mosquitto/{name}"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` with each `(line, replacement)` applied; every line must occur
/// exactly once, as a whole line, so the shipped file cannot drift away
/// from what is tested without this test noticing.
fn substitute_lines(text: &str, subs: &[(&str, String)]) -> String {
    let mut out = text.to_string();
    for (line, with) in subs {
        let count = text.lines().filter(|l| l == line).count();
        assert_eq!(
            count, 1,
            "the shipped mosquitto.conf must hold `{line}` once"
        );
        out = out.replacen(&format!("\n{line}\n"), &format!("\n{with}\n"), 1);
    }
    out
}

/// Mosquitto running the shipped `mosquitto.conf` and `acl`, with `pki`'s
/// server certificate, on a free loopback port.
fn locked_down_broker(pki: &TestPki) -> Mosquitto {
    let conf = shipped("mosquitto.conf");
    let acl = shipped("acl");
    Mosquitto::start_with_config(|port, dir| {
        let acl_path = dir.join("retail-agent.acl");
        std::fs::write(&acl_path, &acl).unwrap();
        let d = dir.display();
        substitute_lines(
            &conf,
            &[
                // Loopback only, on a free port.
                ("listener 8883", format!("listener {port} 127.0.0.1")),
                // As root, Mosquitto switches to this user, which cannot
                // read this test's private directory; ignored by Mosquitto
                // when the tests do not run as root.
                ("user mosquitto", "user root".into()),
                (
                    "acl_file /etc/mosquitto/retail-agent.acl",
                    format!("acl_file {}", acl_path.display()),
                ),
                (
                    "cafile /etc/mosquitto/certs/ca.pem",
                    format!("cafile {}", pki.ca.display()),
                ),
                (
                    "certfile /etc/mosquitto/certs/server.pem",
                    format!("certfile {}", pki.server_cert.display()),
                ),
                (
                    "keyfile /etc/mosquitto/certs/server.key",
                    format!("keyfile {}", pki.server_key.display()),
                ),
                (
                    "persistence_location /var/lib/mosquitto/",
                    format!("persistence_location {d}/"),
                ),
                (
                    "log_dest file /var/log/mosquitto/mosquitto.log",
                    format!("log_dest file {d}/mosquitto.log"),
                ),
            ],
        )
    })
}

/// Whether an MQTT client (clean session, client id `id`) gets a CONNACK
/// from the broker on `port` within a few seconds; `tls` None is plain TCP.
async fn connects(port: u16, id: &str, tls: Option<Arc<rustls::ClientConfig>>) -> bool {
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some(tls) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    let (_client, mut events) = rumqttc::AsyncClient::new(opts, 10);
    let attempt = async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                    return ack.code == rumqttc::ConnectReturnCode::Success
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or(false)
}

/// Everything `client` receives within `window`, then until nothing more
/// arrives for 100 ms: (topic, payload).
async fn drain(client: &mut TestClient, window: Duration) -> Vec<(String, Vec<u8>)> {
    let deadline = Instant::now() + window;
    let mut got = Vec::new();
    loop {
        // After the window, until nothing more comes for 100 ms: with
        // `Duration::ZERO` this takes what was already delivered.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match client.next(left).await {
            Some((t, p, _)) => got.push((t, p)),
            None => break,
        }
    }
    got
}

/// `got` for a failure message: topic and the start of each payload.
fn describe(got: &[(String, Vec<u8>)]) -> Vec<String> {
    got.iter()
        .map(|(t, p)| {
            let text = String::from_utf8_lossy(&p[..p.len().min(40)]).into_owned();
            format!("{t}: {text:?} ({} bytes)", p.len())
        })
        .collect()
}

/// What `got` holds on `device`'s topics.
fn on_device(got: &[(String, Vec<u8>)], device: &str) -> Vec<String> {
    let prefix = format!("ror/{device}/");
    let mine: Vec<_> = got
        .iter()
        .filter(|(t, _)| t.starts_with(&prefix))
        .cloned()
        .collect();
    describe(&mine)
}

fn request(id: &str, image: &[u8]) -> Vec<u8> {
    mp_encode(&mp_map(vec![
        ("request_id", Mp::from(id)),
        ("crops", Mp::Array(vec![image_crop(image)])),
    ]))
}

/// An enrolled agent for `device` of the ACL's fleet, on the TLS broker.
fn tls_home(device: &str, port: u16, tls: &TlsConfig) -> AgentHome {
    let path = |p: &Option<PathBuf>| p.as_ref().unwrap().display().to_string();
    enrolled_home(
        &format!("device_id = {device:?}\nfleet = {FLEET:?}"),
        &format!(
            "[bus]\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n\
             [bus.tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            tls.ca_file.display().to_string(),
            path(&tls.cert_file),
            path(&tls.key_file),
        ),
    )
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_broker_accepts_only_tls_clients_with_a_certificate_of_its_ca() {
    let pki = TestPki::new(&[A]);
    let stranger = TestPki::new(&[A]);
    let broker = locked_down_broker(&pki);
    assert!(
        connects(broker.port, "probe-ok", Some(pki.client(A))).await,
        "a client with a certificate of the broker's CA was refused"
    );
    assert!(
        !connects(broker.port, "probe-plain", None).await,
        "a plain-TCP client connected to the TLS-only broker"
    );
    assert!(
        !connects(broker.port, "probe-nocert", Some(pki.anonymous_client())).await,
        "a TLS client without a certificate connected"
    );
    // Same CN, another CA (the client trusts our broker's CA).
    let mut forged = stranger.tls(A);
    forged.ca_file = pki.ca.clone();
    let forged = retail_agent::bus::tls::client_config(&forged).unwrap();
    assert!(
        !connects(broker.port, "probe-forged", Some(forged)).await,
        "a certificate from another CA was accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_a_serves_the_checkout_but_its_certificate_cannot_reach_device_b_or_the_fleet_update_topic(
) {
    let qs = one_query_per_label(&queries());
    let pki = TestPki::new(&[A, B, CHECKOUT, OPERATOR]);
    let broker = locked_down_broker(&pki);
    let port = broker.port;

    // Device A's agent, exactly as an operator would configure it.
    let home = tls_home(A, port, &pki.tls(A));
    let agent = Agent::start(home.load()).await.expect("agent starts");
    assert!(
        agent.wait_connected(Duration::from_secs(10)).await,
        "the agent did not connect to the locked-down broker:\n{}",
        broker.log()
    );

    // The checkout back end gets A's answer through the ACL.
    let mut checkout = TestClient::connect_tls(
        port,
        "checkout-1",
        &[
            &topic(A, "results"),
            &topic(A, "errors"),
            &topic(B, "results"),
            &topic(B, "errors"),
        ],
        pki.client(CHECKOUT),
    )
    .await;
    checkout
        .publish(&topic(A, "crops"), 1, request("via-acl", &qs[3].1))
        .await;
    let answer = checkout
        .next_on(&topic(A, "results"), Duration::from_secs(20))
        .await
        .expect("device A answered the checkout's request");
    check_result(
        &to_json(&answer),
        &Expect::labels("via-acl", A, &[&qs[3].0]),
    );

    // The operator sees A's retained Status (A may write its own status).
    let mut operator = TestClient::connect_tls(
        port,
        "operator-1",
        &["ror/+/status", "ror/+/refdb/ack"],
        pki.client(OPERATOR),
    )
    .await;
    let status = operator
        .next_on(&topic(A, "status"), Duration::from_secs(10))
        .await
        .expect("device A's retained Status");
    check_status(&to_json(&status), "online", A, FLEET);

    // Legitimate readers of B's topics and of the fleet's update topic.
    let mut b_reader = TestClient::connect_tls(
        port,
        "lane-2-reader",
        &[
            &topic(B, "crops"),
            &topic(B, "status"),
            &topic(B, "refdb"),
            &fleet_topic(),
        ],
        pki.client(B),
    )
    .await;

    // An intruder holding A's certificate (A's username) tries B's topics
    // and the fleet update topic. Mosquitto acknowledges and silently drops
    // denied publishes (MQTT 3.1.1), so the proof is that nobody receives
    // them while an allowed control message sent after them does arrive.
    let mut intruder = TestClient::connect_tls(
        port,
        "lane-1-intruder",
        &[&topic(B, "crops"), "ror/+/crops", "ror/+/results", "#"],
        pki.client(A),
    )
    .await;
    for leaf in ["crops", "results", "errors", "status", "metrics", "refdb"] {
        let t = topic(B, leaf);
        let payload = if leaf == "crops" {
            request("forged-for-b", &qs[1].1)
        } else {
            format!("forged by A on {t}").into_bytes()
        };
        intruder
            .client
            .publish(&t, rumqttc::QoS::AtLeastOnce, leaf == "status", payload)
            .await
            .unwrap();
    }
    intruder
        .publish(&fleet_topic(), 1, b"forged update by A".to_vec())
        .await;
    // The control: A may write its own errors topic, which the checkout reads.
    intruder
        .publish(&topic(A, "errors"), 1, b"control from A".to_vec())
        .await;
    let control = checkout
        .next_on(&topic(A, "errors"), Duration::from_secs(10))
        .await;
    assert_eq!(
        control.as_deref(),
        Some(&b"control from A"[..]),
        "the allowed control message did not arrive"
    );
    let window = Duration::from_millis(1500);
    let seen_by_b = drain(&mut b_reader, window).await;
    assert!(
        seen_by_b.is_empty(),
        "A's certificate published to B's topics or the fleet update topic: {:?}",
        describe(&seen_by_b)
    );
    let seen_by_checkout = on_device(&drain(&mut checkout, Duration::ZERO).await, B);
    assert!(
        seen_by_checkout.is_empty(),
        "forged results/errors of B reached the checkout: {seen_by_checkout:?}"
    );
    let seen_by_operator = drain(&mut operator, Duration::ZERO).await;
    assert!(
        seen_by_operator.is_empty(),
        "a forged status or an ack of a forged update reached the operator: {:?}",
        describe(&seen_by_operator)
    );
    let intruder_before = drain(&mut intruder, Duration::ZERO).await;

    // A's certificate cannot read B's crops either: the checkout's request
    // for B reaches B's reader and not the intruder.
    checkout
        .publish(&topic(B, "crops"), 1, request("for-b", &qs[2].1))
        .await;
    let for_b = b_reader
        .next_on(&topic(B, "crops"), Duration::from_secs(10))
        .await;
    assert!(
        for_b.is_some(),
        "B's reader did not get the checkout's request"
    );
    let mut intruder_seen = intruder_before;
    intruder_seen.extend(drain(&mut intruder, window).await);
    let stolen = on_device(&intruder_seen, B);
    assert!(
        stolen.is_empty(),
        "A's certificate read B's topics: {stolen:?}"
    );
    // Its subscriptions work for what A may read (its own retained status).
    assert!(
        intruder_seen.iter().any(|(t, _)| *t == topic(A, "status")),
        "the intruder's `#` subscription delivered nothing at all: {:?}",
        intruder_seen.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );

    // Only the operator may publish to the fleet update topic: its message
    // reaches B's reader and device A's update session, which acknowledges
    // it (rejected: it is not a signed update).
    operator
        .publish(&fleet_topic(), 1, b"not a signed update".to_vec())
        .await;
    let update = b_reader
        .next_on(&fleet_topic(), Duration::from_secs(10))
        .await;
    assert_eq!(
        update.as_deref(),
        Some(&b"not a signed update"[..]),
        "the operator's update did not reach the fleet"
    );
    let ack = operator
        .next_on(&topic(A, "refdb/ack"), Duration::from_secs(10))
        .await
        .expect("device A acknowledged the operator's update");
    let ack = to_json(&ack);
    assert_eq!(ack["status"], "rejected", "{ack}");
    agent.stop().await.expect("clean stop");
}

/// Runs the real binary with `args` and the config of `home`; returns
/// (success, stdout + stderr).
fn cli(home: &AgentHome, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(args)
        .arg("-c")
        .arg(&home.config_path)
        .envs(env.iter().copied())
        .output()
        .expect("run retail-agent");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const PASSWORD: &str = "pw-Zq81xv0c";

#[test]
fn the_bus_password_never_appears_in_check_config_output_or_errors() {
    let home = AgentHome::new(
        "",
        &format!("[bus]\nusername = \"agent\"\npassword = {PASSWORD:?}\n"),
    );
    let (ok, out) = cli(&home, &["check-config"], &[]);
    assert!(ok, "{out}");
    assert!(
        !out.contains(PASSWORD),
        "check-config printed the password:\n{out}"
    );
    assert!(
        out.contains("********"),
        "the password is not shown masked:\n{out}"
    );

    let (ok, out) = cli(
        &AgentHome::new("", ""),
        &["check-config"],
        &[("RETAIL_AGENT__BUS__PASSWORD", PASSWORD)],
    );
    assert!(ok, "{out}");
    assert!(
        !out.contains(PASSWORD),
        "check-config printed the password:\n{out}"
    );

    // A password of the wrong type is an error that names the key, not the
    // value (serde would quote it).
    let home = AgentHome::new("", "[bus]\npassword = 7654321987\n");
    let (ok, out) = cli(&home, &["check-config"], &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("bus.password"), "{out}");
    assert!(
        !out.contains("7654321987"),
        "the error quoted the password:\n{out}"
    );
}

#[test]
fn the_bus_password_never_appears_in_the_daemons_logs_even_at_trace_level() {
    let broker = Mosquitto::start("");
    let home = enrolled_home(
        "device_id = \"pw-agent\"",
        &format!(
            "[bus]\nport = {}\nusername = \"agent\"\npassword = {PASSWORD:?}\n",
            broker.port
        ),
    );
    let log_path = home.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .args(["run", "-c"])
        .arg(&home.config_path)
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start retail-agent run");
    let deadline = Instant::now() + Duration::from_secs(30);
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    while !read().contains("connected to the broker") {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent did not connect:\n{}", read());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    common::unsafe_sigterm(child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = read();
    assert!(text.contains("stopped"), "no clean stop:\n{text}");
    assert!(
        !text.contains(PASSWORD),
        "the password appears in the agent's log: {:?}",
        text.lines()
            .filter(|l| l.contains(PASSWORD))
            .collect::<Vec<_>>()
    );
}

/// Makes `path` readable by everyone (as a careless copy would).
fn open_up(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_key_readable_by_others_is_refused_by_check_config_and_the_daemon() {
    let pki = TestPki::new(&[A]);
    let tls = pki.tls(A);
    let key = tls.key_file.clone().unwrap();
    open_up(&key);
    let home = tls_home(A, 8883, &tls);
    let fix = format!("chmod 600 {}", key.display());
    let (ok, out) = cli(&home, &["check-config"], &[]);
    assert!(
        !ok,
        "check-config accepted a key readable by others:\n{out}"
    );
    assert!(out.contains(&fix), "{out}");
    let err = Agent::start(home.load())
        .await
        .err()
        .expect("the daemon refuses a key readable by others");
    assert!(format!("{err:#}").contains(&fix), "{err:#}");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, out) = cli(&home, &["check-config"], &[]);
    assert!(ok, "{out}");
}

#[test]
fn a_fleet_signing_key_readable_by_others_is_refused_by_the_fleet_commands() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("ops.pk8");
    let pkcs8 =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    std::fs::write(&key, pkcs8.as_ref()).unwrap();
    open_up(&key);
    let home = AgentHome::new("fleet = \"store-9\"", "");
    let (ok, out) = cli(
        &home,
        &[
            "fleet",
            "delete",
            "--label",
            "x",
            "--key",
            key.to_str().unwrap(),
            "--timeout-s",
            "1",
        ],
        &[("RUST_LOG", "warn")],
    );
    assert!(
        !ok,
        "the fleet command used a key readable by others:\n{out}"
    );
    assert!(
        out.contains(&format!("chmod 600 {}", key.display())),
        "{out}"
    );
}
