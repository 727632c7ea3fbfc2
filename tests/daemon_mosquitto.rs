//! The daemon against a real Mosquitto (started per test on a free port):
//! contract interop, a broker restart mid-stream, TLS and mutual TLS, a
//! shared pool of agents, SIGTERM of the real binary and a stale Will.
//! These tests fail (they never skip) when mosquitto is not installed.
//!
//! Topic names are written out from `shared/spec/PROTOCOL.md` (root `ror`),
//! not taken from the crate.

mod common;
mod daemon_support;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    free_port, queries, to_json, wait_for_port, AgentHome, Mosquitto, TestClient, TestPki,
};
use daemon_support::*;
use retail_agent::daemon::Agent;
use retail_testkit::{crops::image_crop, process::KillOnDrop, topics::topic};
use rmpv::Value as Mp;
use serde_json::json;

const FLEET: &str = "store-9";

fn mosquitto(extra: &str) -> Mosquitto {
    Mosquitto::start(extra)
}

/// An enrolled agent home for a broker on `port`. `bus` lines go into the
/// `[bus]` section; `sections` follow it.
fn home(device: &str, port: u16, bus: &str, sections: &str) -> AgentHome {
    broker_home(device, port, bus, sections)
}

async fn start(home: &AgentHome) -> Agent {
    start_connected(home).await
}

/// A MessagePack request with `labels` (indices into `qs`) as crops.
fn mp_request(id: &str, qs: &[(String, Vec<u8>)], labels: &[usize]) -> Vec<u8> {
    mp_encode(&mp_map(vec![
        ("request_id", Mp::from(id)),
        (
            "crops",
            Mp::Array(labels.iter().map(|&l| image_crop(&qs[l].1)).collect()),
        ),
    ]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_only_client_gets_schema_exact_results_in_both_encodings() {
    let qs = one_query_per_label(&queries());
    let broker = mosquitto("");
    let h = home("mq-interop", broker.port, "", "");
    let agent = start(&h).await;
    let (crops, results, errors) = (
        topic("mq-interop", "crops"),
        topic("mq-interop", "results"),
        topic("mq-interop", "errors"),
    );
    let mut c = TestClient::connect(broker.port, "interop-client", &[&results, &errors]).await;

    let json_req = json!({
        "request_id": "interop-json",
        "camera_id": "cam-east",
        "frame_id": 123456789012u64,
        "ts_ms": now_ms(),
        "top_k": 2,
        "crops": [
            {"id": "a", "image": b64(&qs[10].1)},
            {"image": b64(&qs[11].1)},
        ],
    });
    c.publish(&crops, 1, serde_json::to_vec(&json_req).unwrap())
        .await;
    let raw = image::load_from_memory(&qs[5].1).unwrap().to_rgb8();
    let mp_req = mp_map(vec![
        ("request_id", Mp::from("interop-mp")),
        ("camera_id", Mp::from("cam-west")),
        ("frame_id", Mp::from(7u64)),
        ("ts_ms", Mp::from(now_ms())),
        ("top_k", Mp::from(12u8)),
        (
            "crops",
            Mp::Array(vec![
                image_crop(&qs[0].1),
                mp_map(vec![
                    ("id", Mp::from("raw-1")),
                    (
                        "raw",
                        mp_map(vec![
                            ("width", Mp::from(raw.width())),
                            ("height", Mp::from(raw.height())),
                            ("format", Mp::from("rgb8")),
                            ("data", Mp::Binary(raw.as_raw().clone())),
                        ]),
                    ),
                ]),
            ]),
        ),
    ]);
    c.publish(&crops, 0, mp_encode(&mp_req)).await;

    let (got, errs) = collect_results(
        &mut c,
        &results,
        &errors,
        &["interop-json", "interop-mp"],
        Duration::from_secs(20),
    )
    .await;
    assert!(errs.is_empty(), "unexpected error reports: {errs:?}");
    let p = &got["interop-json"];
    assert!(is_json(p), "JSON in, JSON out");
    check_result(
        &serde_json::from_slice(p).unwrap(),
        &Expect {
            request_id: "interop-json".into(),
            camera_id: Some("cam-east".into()),
            frame_id: Some(123456789012),
            device_id: "mq-interop".into(),
            ids: vec!["a".into(), "1".into()],
            want: vec![Want::Label(qs[10].0.clone()), Want::Label(qs[11].0.clone())],
            candidates: 2,
        },
    );
    let p = &got["interop-mp"];
    assert!(is_msgpack_map(p), "MessagePack in, MessagePack map out");
    check_result(
        &to_json(p),
        &Expect {
            request_id: "interop-mp".into(),
            camera_id: Some("cam-west".into()),
            frame_id: Some(7),
            device_id: "mq-interop".into(),
            ids: vec!["0".into(), "raw-1".into()],
            want: vec![Want::Label(qs[0].0.clone()), Want::Label(qs[5].0.clone())],
            candidates: 12,
        },
    );
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_in_flight_when_the_broker_loses_our_session_are_sent_again() {
    // rumqttc forgets unacknowledged publishes when it reconnects to a broker
    // that has no session for it; the agent must send them again itself.
    let qs = one_query_per_label(&queries());
    let mut broker = mosquitto("log_type all\n");
    // A single crop waits max_delay_ms for its batch: time to freeze the broker.
    let h = home(
        "mq-lost",
        broker.port,
        "",
        "[pipeline]\nmax_batch = 8\nmax_delay_ms = 700\n",
    );
    let agent = start(&h).await;
    let c = TestClient::connect(broker.port, "lost-checkout", &[]).await;
    c.publish(
        &topic("mq-lost", "crops"),
        1,
        mp_request("lost-1", &qs, &[3]),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Frozen: the agent publishes its result into a connection that never
    // acknowledges it. Then the broker dies and comes back with no session.
    broker.freeze();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::block_in_place(|| broker.restart_losing_sessions());
    let results = topic("mq-lost", "results");
    let needle = "Received PUBLISH from retail-agent-mq-lost";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = broker.log();
        if log
            .lines()
            .any(|l| l.contains(needle) && l.contains(&format!("'{results}'")))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the in-flight result never reached the new broker; its log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos1_request_is_answered_across_a_broker_restart() {
    let qs = one_query_per_label(&queries());
    let mut broker = mosquitto("");
    let h = home("mq-restart", broker.port, "", "");
    let agent = start(&h).await;
    let (crops, results) = (topic("mq-restart", "crops"), topic("mq-restart", "results"));
    // A persistent session: QoS 1 results published while the client is
    // disconnected are kept for it, and its unacknowledged publishes resent.
    let mut c = TestClient::connect_persistent(broker.port, "restart-checkout", &[&results]).await;

    const N: usize = 40;
    let ids: Vec<String> = (0..N).map(|i| format!("restart-{i:02}")).collect();
    let labels_of = |i: usize| -> Vec<usize> { vec![i % LABELS, (i * 5 + 1) % LABELS] };
    // The first half at once, so the agent has a backlog when the broker goes.
    for (i, id) in ids.iter().enumerate().take(N / 2) {
        c.publish(&crops, 1, mp_request(id, &qs, &labels_of(i)))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::task::block_in_place(|| broker.restart());
    let restarted = Instant::now();
    for (i, id) in ids.iter().enumerate().skip(N / 2) {
        c.publish(&crops, 1, mp_request(id, &qs, &labels_of(i)))
            .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut answers: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    while answers.len() < N {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((t, p, _)) = c.next(left).await else {
            let missing: Vec<_> = ids.iter().filter(|i| !answers.contains_key(*i)).collect();
            panic!(
                "{} of {N} requests answered; missing {missing:?}; agent connected: {}; broker log:\n{}",
                answers.len(),
                agent.wait_connected(Duration::from_millis(1)).await,
                broker.log()
            );
        };
        assert_eq!(t, results);
        let v = to_json(&p);
        let id = v["request_id"].as_str().expect("request_id").to_string();
        let i = ids
            .iter()
            .position(|x| *x == id)
            .expect("a request we sent");
        let labels: Vec<&str> = labels_of(i).into_iter().map(|l| qs[l].0.as_str()).collect();
        check_result(&v, &Expect::labels(&id, "mq-restart", &labels));
        *answers.entry(id).or_default() += 1;
    }
    assert!(
        agent.wait_connected(Duration::from_secs(1)).await,
        "the agent is connected again"
    );
    let duplicates: usize = answers.values().map(|n| n - 1).sum();
    eprintln!(
        "broker restart: all {N} answered {:.1} s after the restart ({duplicates} duplicates)",
        restarted.elapsed().as_secs_f64()
    );
    agent.stop().await.expect("clean stop");
}

/// The Common Name of the agent's client certificate in the TLS tests.
const DEVICE_CN: &str = "retail-agent-device";

/// Mosquitto with its plain listener (for the test client) and a TLS
/// listener; returns (broker, TLS port).
fn tls_broker(pki: &TestPki, require_certificate: bool) -> (Mosquitto, u16) {
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_certificate}\n",
        pki.ca.display(),
        pki.server_cert.display(),
        pki.server_key.display(),
    );
    let broker = mosquitto(&extra);
    wait_for_port(tls_port);
    (broker, tls_port)
}

/// Sends one request to `device` over the plain listener; returns the
/// result's JSON value, or None after `timeout`.
async fn ask(
    port: u16,
    device: &str,
    client_id: &str,
    qs: &[(String, Vec<u8>)],
    label: usize,
    timeout: Duration,
) -> Option<serde_json::Value> {
    let results = topic(device, "results");
    let mut c = TestClient::connect(port, client_id, &[&results]).await;
    let id = format!("{device}-probe");
    c.publish(&topic(device, "crops"), 1, mp_request(&id, qs, &[label]))
        .await;
    let p = c.next_on(&results, timeout).await?;
    let v = to_json(&p);
    check_result(&v, &Expect::labels(&id, device, &[&qs[label].0]));
    Some(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_agent_verifies_the_broker_and_answers_over_tls() {
    let qs = one_query_per_label(&queries());
    let pki = TestPki::new(&[DEVICE_CN]);
    let (broker, tls_port) = tls_broker(&pki, false);
    let tls = format!("[bus.tls]\nca_file = {:?}\n", pki.ca.display().to_string());
    // "localhost" here: the server certificate's DNS name is checked.
    let h = home("mq-tls", tls_port, "host = \"localhost\"", &tls);
    let agent = start(&h).await;
    let v = ask(
        broker.port,
        "mq-tls",
        "tls-probe",
        &qs,
        4,
        Duration::from_secs(20),
    )
    .await;
    assert!(v.is_some(), "no answer from the agent connected over TLS");
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_agent_with_a_client_certificate_answers_and_one_without_is_refused() {
    let qs = one_query_per_label(&queries());
    let pki = TestPki::new(&[DEVICE_CN]);
    let (broker, tls_port) = tls_broker(&pki, true);
    let with_cert = format!(
        "[bus.tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        pki.ca.display().to_string(),
        pki.clients[DEVICE_CN].0.display().to_string(),
        pki.clients[DEVICE_CN].1.display().to_string(),
    );
    let h = home("mq-mtls", tls_port, "host = \"127.0.0.1\"", &with_cert);
    let agent = start(&h).await;
    let v = ask(
        broker.port,
        "mq-mtls",
        "mtls-probe",
        &qs,
        7,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        v.is_some(),
        "no answer from the agent connected with mutual TLS"
    );

    // Same CA, no client certificate: the broker must refuse it.
    let without = format!("[bus.tls]\nca_file = {:?}\n", pki.ca.display().to_string());
    let h2 = home("mq-nocert", tls_port, "host = \"127.0.0.1\"", &without);
    let refused = Agent::start(h2.load()).await.expect("agent starts");
    assert!(
        !refused.wait_connected(Duration::from_secs(4)).await,
        "an agent without a client certificate connected to a require_certificate broker"
    );
    let v = ask(
        broker.port,
        "mq-nocert",
        "nocert-probe",
        &qs,
        7,
        Duration::from_secs(3),
    )
    .await;
    assert!(
        v.is_none(),
        "the agent without a client certificate answered: {v:?}"
    );
    refused.stop().await.expect("clean stop");
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pool_answers_every_request_exactly_once() {
    let qs = one_query_per_label(&queries());
    let broker = mosquitto("");
    let ha = home("a", broker.port, "pool = \"lane\"", "");
    let hb = home("b", broker.port, "pool = \"lane\"", "");
    let a = start(&ha).await;
    let b = start(&hb).await;
    // Each agent answers on its own topic first: its subscriptions (sent
    // together with the pool's) are in place.
    for (dev, label) in [("a", 1), ("b", 2)] {
        let v = ask(
            broker.port,
            dev,
            &format!("warm-{dev}"),
            &qs,
            label,
            Duration::from_secs(20),
        )
        .await;
        assert!(v.is_some(), "agent {dev} does not answer");
    }

    let (ra, rb) = (topic("a", "results"), topic("b", "results"));
    let mut c = TestClient::connect(broker.port, "pool-client", &[&ra, &rb]).await;
    const N: usize = 30;
    let ids: Vec<String> = (0..N).map(|i| format!("pool-{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        c.publish("ror/pool/lane/crops", 1, mp_request(id, &qs, &[i % LABELS]))
            .await;
    }
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut by_agent: HashMap<String, usize> = HashMap::new();
    let mut settle: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Once everything is in, keep listening a little for duplicates.
        let until = settle.unwrap_or(deadline);
        let left = until.saturating_duration_since(Instant::now());
        let Some((t, p, _)) = c.next(left).await else {
            break;
        };
        let v = to_json(&p);
        let id = v["request_id"].as_str().expect("request_id").to_string();
        let i = ids
            .iter()
            .position(|x| *x == id)
            .unwrap_or_else(|| panic!("unexpected result {id}"));
        let device = if t == ra { "a" } else { "b" };
        check_result(&v, &Expect::labels(&id, device, &[&qs[i % LABELS].0]));
        *count.entry(id).or_default() += 1;
        *by_agent.entry(device.to_string()).or_default() += 1;
        if count.len() == N && settle.is_none() {
            settle = Some(Instant::now() + Duration::from_millis(1500));
        }
    }
    let missing: Vec<_> = ids.iter().filter(|i| !count.contains_key(*i)).collect();
    assert!(missing.is_empty(), "never answered: {missing:?}");
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    eprintln!("shared pool: {by_agent:?}");
    assert!(
        by_agent.get("a").copied().unwrap_or(0) > 0 && by_agent.get("b").copied().unwrap_or(0) > 0,
        "Mosquitto round-robins a shared subscription: both agents answer some ({by_agent:?})"
    );
    a.stop().await.expect("clean stop");
    b.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_binary_cleanly_and_leaves_an_offline_status() {
    let qs = one_query_per_label(&queries());
    let broker = mosquitto("");
    let device = "mq-sigterm";
    let h = home(device, broker.port, "", "");
    let status = topic(device, "status");
    let results = topic(device, "results");
    let mut watch = TestClient::connect(broker.port, "sigterm-watch", &[&status, &results]).await;

    let log = std::fs::File::create(h.path().join("agent.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_retail-agent"))
        .arg("run")
        .arg("-c")
        .arg(&h.config_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start retail-agent run");
    let pid = child.id();
    let mut guard = KillOnDrop::new(child);
    let agent_log = || std::fs::read_to_string(h.path().join("agent.log")).unwrap_or_default();

    let p = watch
        .next_on(&status, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| {
            panic!(
                "no online Status from the binary; its log:\n{}",
                agent_log()
            )
        });
    let boot = check_status(&to_json(&p), "online", device, FLEET);

    for n in 0..3usize {
        watch
            .publish(
                &topic(device, "crops"),
                1,
                mp_request(&format!("sig-{n}"), &qs, &[n, n + 3]),
            )
            .await;
    }
    let mut answered = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (t, p, _) = watch
            .next(left)
            .await
            .unwrap_or_else(|| panic!("{} of 3 answers; log:\n{}", answered.len(), agent_log()));
        if t != results {
            continue;
        }
        let v = to_json(&p);
        let id = v["request_id"].as_str().unwrap().to_string();
        let n: usize = id.strip_prefix("sig-").unwrap().parse().unwrap();
        check_result(&v, &Expect::labels(&id, device, &[&qs[n].0, &qs[n + 3].0]));
        answered.insert(id);
    }

    common::unsafe_sigterm(pid);
    let child = &mut *guard;
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still running 20 s after SIGTERM; log:\n{}",
            agent_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        exit.success(),
        "exit status {exit:?} after SIGTERM; log:\n{}",
        agent_log()
    );

    let p = watch
        .next_on(&status, Duration::from_secs(10))
        .await
        .expect("the offline Status after SIGTERM");
    assert_eq!(check_status(&to_json(&p), "offline", device, FLEET), boot);
    let mut late = TestClient::connect(broker.port, "sigterm-late", &[&status]).await;
    let (t, p, retained) = late
        .next(Duration::from_secs(10))
        .await
        .expect("a retained Status");
    assert_eq!(t, status);
    assert!(retained, "the offline Status is retained");
    assert_eq!(check_status(&to_json(&p), "offline", device, FLEET), boot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_offline_will_is_overwritten_by_the_running_agents_online_status() {
    let broker = mosquitto("");
    let device = "mq-stale";
    let h = home(device, broker.port, "", "");
    let agent = start(&h).await;
    let boot = agent.boot_id();
    let status = topic(device, "status");
    let mut watch = TestClient::connect(broker.port, "stale-watch", &[&status]).await;
    let p = watch
        .next_on(&status, Duration::from_secs(10))
        .await
        .expect("the online Status");
    assert_eq!(check_status(&to_json(&p), "online", device, FLEET), boot);

    let stale = mp_encode(&mp_map(vec![
        ("state", Mp::from("offline")),
        ("device_id", Mp::from(device)),
        ("boot_id", Mp::from("stale-boot")),
    ]));
    watch
        .client
        .publish(&status, rumqttc::QoS::AtLeastOnce, true, stale)
        .await
        .unwrap();
    // The watcher sees the stale Will, then the agent's online Status.
    let p = watch
        .next_on(&status, Duration::from_secs(10))
        .await
        .expect("the stale Will");
    assert_eq!(to_json(&p)["boot_id"], "stale-boot");
    let p = watch
        .next_on(&status, Duration::from_secs(10))
        .await
        .expect("the agent publishes its online Status again");
    assert_eq!(check_status(&to_json(&p), "online", device, FLEET), boot);

    let mut late = TestClient::connect(broker.port, "stale-late", &[&status]).await;
    let (t, p, retained) = late
        .next(Duration::from_secs(10))
        .await
        .expect("a retained Status");
    assert_eq!(t, status);
    assert!(retained);
    assert_eq!(
        check_status(&to_json(&p), "online", device, FLEET),
        boot,
        "the retained Status is the running agent's, not the stale Will"
    );
    agent.stop().await.expect("clean stop");
    let p = watch
        .next_on(&status, Duration::from_secs(10))
        .await
        .expect("the offline Status on stop");
    assert_eq!(check_status(&to_json(&p), "offline", device, FLEET), boot);
}
