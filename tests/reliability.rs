//! One bad message or a flood must never take the agent off the bus, loop
//! it, or lose an acknowledged request: oversized requests and answers,
//! QoS 1 bursts over the queue, QoS 0 floods with every drop reported.
//! Driven over a real Mosquitto (started per test on a free port) with a
//! client that knows only the contract (`shared/spec/PROTOCOL.md`).

mod common;
mod daemon_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{queries, to_json, AgentHome, Mosquitto, TestClient};
use daemon_support::*;
use retail_agent::daemon::Agent;
use rmpv::Value as Mp;

fn topic(device: &str, leaf: &str) -> String {
    format!("ror/{device}/{leaf}")
}

fn home(device: &str, port: u16, bus: &str, sections: &str) -> AgentHome {
    enrolled_home(
        &format!("device_id = {device:?}\nfleet = \"store-9\""),
        &format!(
            "[bus]\nport = {port}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n{bus}\n{sections}"
        ),
    )
}

async fn start(home: &AgentHome) -> Agent {
    let agent = Agent::start(home.load()).await.expect("agent starts");
    assert!(
        agent.wait_connected(Duration::from_secs(10)).await,
        "agent did not connect to Mosquitto"
    );
    agent
}

/// A MessagePack request: `request_id` first, then `crops`, then any
/// `extra` fields (a large `frame`, say).
fn request(id: &str, crops: Vec<Mp>, extra: Vec<(&str, Mp)>) -> Vec<u8> {
    let mut pairs = vec![("request_id", Mp::from(id)), ("crops", Mp::Array(crops))];
    pairs.extend(extra);
    mp_encode(&mp_map(pairs))
}

fn image(bytes: &[u8]) -> Mp {
    mp_map(vec![("image", Mp::Binary(bytes.to_vec()))])
}

/// Everything a client sees within `window`: (topic, payload as JSON).
async fn drain(c: &mut TestClient, window: Duration) -> Vec<(String, serde_json::Value)> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    while let Some((t, p, _)) = c
        .next(deadline.saturating_duration_since(Instant::now()))
        .await
    {
        out.push((t, to_json(&p)));
    }
    out
}

/// The first message on `topic` whose request_id is `id`, among those
/// already `seen` or arriving within `timeout` (all kept in `seen`).
async fn answer_for(
    c: &mut TestClient,
    topic: &str,
    id: &str,
    timeout: Duration,
    seen: &mut Vec<(String, serde_json::Value)>,
) -> serde_json::Value {
    let hit = |t: &str, v: &serde_json::Value| t == topic && v["request_id"] == id;
    if let Some((_, v)) = seen.iter().find(|(t, v)| hit(t, v)) {
        return v.clone();
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((t, p, _)) = c.next(left).await else {
            let topics: Vec<(&str, &serde_json::Value)> = seen
                .iter()
                .map(|(t, v)| (t.as_str(), &v["request_id"]))
                .collect();
            panic!("nothing for {id} on {topic} within {timeout:?}; seen: {topics:?}");
        };
        let v = to_json(&p);
        seen.push((t.clone(), v.clone()));
        if hit(&t, &v) {
            return v;
        }
    }
}

/// Results and error reports for `ids`: (answered ids, reported ids);
/// panics with counts after `timeout`.
async fn results_or_reports(
    c: &mut TestClient,
    results: &str,
    errors: &str,
    ids: &HashSet<String>,
    timeout: Duration,
) -> (HashSet<String>, HashSet<String>) {
    let (mut answered, mut reported) = (HashSet::new(), HashSet::new());
    let deadline = Instant::now() + timeout;
    while answered.len() + reported.len() < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((t, p, _)) = c.next(left).await else {
            panic!(
                "after {timeout:?}: {} of {} answered, {} reported",
                answered.len(),
                ids.len(),
                reported.len()
            );
        };
        let v = to_json(&p);
        let Some(id) = v["request_id"].as_str().filter(|id| ids.contains(*id)) else {
            continue;
        };
        if t == results {
            answered.insert(id.to_string());
        } else if t == errors {
            reported.insert(id.to_string());
        }
    }
    (answered, reported)
}

fn offline_statuses(seen: &[(String, serde_json::Value)], status: &str) -> usize {
    seen.iter()
        .filter(|(t, v)| t == status && v["state"] == "offline")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_consumed_and_reported_once_not_redelivered_forever() {
    let qs = one_query_per_label(&queries());
    let broker = Mosquitto::start("");
    let dev = "big-in";
    let h = home(dev, broker.port, "max_packet_bytes = 16777216", "");
    let (crops, results, errors, status) = (
        topic(dev, "crops"),
        topic(dev, "results"),
        topic(dev, "errors"),
        topic(dev, "status"),
    );
    let agent = start(&h).await;
    let mut c =
        TestClient::connect(broker.port, "big-in-client", &[&results, &errors, &status]).await;
    // 17 MB, over the agent's 16 MiB and under the broker's 20 MB limit.
    let big = request(
        "big-1",
        vec![image(&qs[0].1)],
        vec![("frame", Mp::Binary(vec![0xab; 17_000_000]))],
    );
    c.publish(&crops, 1, big).await;
    c.publish(&crops, 1, request("after-1", vec![image(&qs[1].1)], vec![]))
        .await;
    let mut seen = Vec::new();
    let report = answer_for(&mut c, &errors, "big-1", Duration::from_secs(20), &mut seen).await;
    let reason = check_error_report(&report, Some("big-1"));
    assert!(
        reason.contains("bytes exceeds bus.max_packet_bytes (16777216)"),
        "{reason}"
    );
    let after = answer_for(
        &mut c,
        &results,
        "after-1",
        Duration::from_secs(20),
        &mut seen,
    )
    .await;
    check_result(&after, &Expect::labels("after-1", dev, &[qs[1].0.as_str()]));
    seen.extend(drain(&mut c, Duration::from_secs(3)).await);
    assert_eq!(
        offline_statuses(&seen, &status),
        0,
        "no reconnection: {seen:?}"
    );
    let reports = seen
        .iter()
        .filter(|(t, v)| *t == errors && v["request_id"] == "big-1")
        .count();
    assert_eq!(reports, 1, "reported once");
    assert!(agent.wait_connected(Duration::from_millis(10)).await);

    // It was acknowledged: a restarted agent does not get it again.
    agent.stop().await.expect("clean stop");
    let agent = start(&h).await;
    c.publish(&crops, 1, request("after-2", vec![image(&qs[2].1)], vec![]))
        .await;
    let mut seen = Vec::new();
    answer_for(
        &mut c,
        &results,
        "after-2",
        Duration::from_secs(20),
        &mut seen,
    )
    .await;
    seen.extend(drain(&mut c, Duration::from_secs(2)).await);
    assert!(
        !seen
            .iter()
            .any(|(t, v)| *t == errors && v["request_id"] == "big-1"),
        "the oversized request came back after a restart: {seen:?}"
    );
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_message_size_limit_drops_oversized_requests_and_the_agent_keeps_serving() {
    let qs = one_query_per_label(&queries());
    let broker = Mosquitto::start("message_size_limit 1000000");
    let dev = "big-lim";
    let h = home(dev, broker.port, "", "");
    let (crops, results, errors, status) = (
        topic(dev, "crops"),
        topic(dev, "results"),
        topic(dev, "errors"),
        topic(dev, "status"),
    );
    let agent = start(&h).await;
    let mut c =
        TestClient::connect(broker.port, "big-lim-client", &[&results, &errors, &status]).await;
    let big = request(
        "big-2",
        vec![image(&qs[0].1)],
        vec![("frame", Mp::Binary(vec![1; 2_000_000]))],
    );
    c.publish(&crops, 1, big).await;
    c.publish(&crops, 1, request("after-3", vec![image(&qs[3].1)], vec![]))
        .await;
    let mut seen = Vec::new();
    let v = answer_for(
        &mut c,
        &results,
        "after-3",
        Duration::from_secs(20),
        &mut seen,
    )
    .await;
    check_result(&v, &Expect::labels("after-3", dev, &[qs[3].0.as_str()]));
    seen.extend(drain(&mut c, Duration::from_secs(2)).await);
    assert_eq!(offline_statuses(&seen, &status), 0, "{seen:?}");
    assert!(agent.wait_connected(Duration::from_millis(10)).await);
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_never_exceed_the_packet_limit_and_never_loop_the_connection() {
    let qs = one_query_per_label(&queries());
    let broker = Mosquitto::start("");
    let dev = "big-out";
    let h = home(
        dev,
        broker.port,
        "max_packet_bytes = 65536",
        "[limits]\nmax_crops = 1000\n",
    );
    let (crops, results, errors, status) = (
        topic(dev, "crops"),
        topic(dev, "results"),
        topic(dev, "errors"),
        topic(dev, "status"),
    );
    let agent = start(&h).await;
    let mut c =
        TestClient::connect(broker.port, "big-out-client", &[&results, &errors, &status]).await;
    let raw = || {
        mp_map(vec![(
            "raw",
            mp_map(vec![
                ("width", Mp::from(2)),
                ("height", Mp::from(2)),
                ("format", Mp::from("rgb8")),
                ("data", Mp::Binary(vec![128; 12])),
            ]),
        )])
    };
    // 1. A result that would not fit: 300 crops x 12 candidates.
    let many: Vec<Mp> = (0..300).map(|_| raw()).collect();
    c.publish(
        &crops,
        1,
        request("many-crops", many, vec![("top_k", Mp::from(20))]),
    )
    .await;
    // 2. A crop id far over the echo limit.
    let long_id = mp_map(vec![
        ("id", Mp::from("i".repeat(30_000))),
        ("image", Mp::Binary(qs[0].1.clone())),
    ]);
    c.publish(&crops, 1, request("long-id", vec![long_id], vec![]))
        .await;
    // 3. A bbox of 5,000 numbers: its item error quotes a bounded excerpt.
    let bbox = mp_map(vec![(
        "bbox",
        Mp::Array(
            (0..5000)
                .map(|i| Mp::from(i as f64 + 0.123456789))
                .collect(),
        ),
    )]);
    c.publish(
        &crops,
        1,
        request(
            "long-bbox",
            vec![bbox],
            vec![("frame", Mp::Binary(qs[0].1.clone()))],
        ),
    )
    .await;
    c.publish(&crops, 1, request("after-4", vec![image(&qs[4].1)], vec![]))
        .await;

    let mut seen = Vec::new();
    let r = answer_for(
        &mut c,
        &errors,
        "many-crops",
        Duration::from_secs(90),
        &mut seen,
    )
    .await;
    let reason = check_error_report(&r, Some("many-crops"));
    assert!(reason.contains("bus.max_packet_bytes"), "{reason}");
    let r = answer_for(
        &mut c,
        &errors,
        "long-id",
        Duration::from_secs(90),
        &mut seen,
    )
    .await;
    let reason = check_error_report(&r, Some("long-id"));
    assert!(reason.contains("crop 0") && reason.len() < 200, "{reason}");
    let r = answer_for(
        &mut c,
        &results,
        "long-bbox",
        Duration::from_secs(90),
        &mut seen,
    )
    .await;
    let error = r["items"][0]["error"].as_str().expect("an item error");
    assert!(
        error.len() < 300 && error.contains("5000 numbers"),
        "{error}"
    );
    let r = answer_for(
        &mut c,
        &results,
        "after-4",
        Duration::from_secs(90),
        &mut seen,
    )
    .await;
    check_result(&r, &Expect::labels("after-4", dev, &[qs[4].0.as_str()]));
    seen.extend(drain(&mut c, Duration::from_secs(2)).await);
    assert_eq!(offline_statuses(&seen, &status), 0, "{seen:?}");
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_burst_over_the_queue_is_held_back_at_the_broker_and_fully_answered() {
    let qs = one_query_per_label(&queries());
    let broker = Mosquitto::start("");
    let dev = "burst1";
    let h = home(dev, broker.port, "", "[pipeline]\nqueue_capacity = 32\n");
    let (crops, results, errors) = (
        topic(dev, "crops"),
        topic(dev, "results"),
        topic(dev, "errors"),
    );
    let agent = start(&h).await;
    let mut c = TestClient::connect(broker.port, "burst1-client", &[&results, &errors]).await;
    const N: usize = 1500;
    let ids: Vec<String> = (0..N).map(|i| format!("q1-{i:05}")).collect();
    for (i, id) in ids.iter().enumerate() {
        c.publish(
            &crops,
            1,
            request(id, vec![image(&qs[i % LABELS].1)], vec![]),
        )
        .await;
    }
    let want: HashSet<String> = ids.into_iter().collect();
    let (answered, reported) =
        results_or_reports(&mut c, &results, &errors, &want, Duration::from_secs(120)).await;
    assert_eq!(
        (answered.len(), reported.len()),
        (N, 0),
        "QoS 1 requests were dropped"
    );
    assert_eq!(agent.metrics().totals().dropped, 0);
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_flood_gets_every_request_answered_or_reported_and_full_speed_after() {
    let qs = one_query_per_label(&queries());
    let broker = Mosquitto::start("");
    let dev = "flood0";
    let h = home(dev, broker.port, "", "[pipeline]\nqueue_capacity = 8\n");
    let (crops, results, errors) = (
        topic(dev, "crops"),
        topic(dev, "results"),
        topic(dev, "errors"),
    );
    let agent = start(&h).await;
    let mut c = TestClient::connect(broker.port, "flood0-client", &[&results, &errors]).await;
    const N: usize = 20000;
    let started = Instant::now();
    for i in 0..N {
        c.publish(
            &crops,
            0,
            request(&format!("f-{i:05}"), vec![image(&qs[i % LABELS].1)], vec![]),
        )
        .await;
    }
    let published = started.elapsed();
    // Every request: one result, or one ErrorReport, or a share of an
    // aggregate report.
    let mut answered: HashSet<String> = HashSet::new();
    let (mut reported, mut aggregated) = (HashSet::new(), 0u64);
    let deadline = Instant::now() + Duration::from_secs(180);
    while answered.len() + reported.len() + (aggregated as usize) < N {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((t, p, _)) = c.next(left).await else {
            panic!(
                "{} results, {} reports, {aggregated} aggregated of {N}; dropped per metrics: {}",
                answered.len(),
                reported.len(),
                agent.metrics().totals().dropped
            );
        };
        let v = to_json(&p);
        if t == results {
            answered.insert(v["request_id"].as_str().unwrap().to_string());
        } else if t == errors {
            let reason = v["reason"].as_str().unwrap_or_default();
            assert!(reason.starts_with("dropped"), "{v}");
            match v["request_id"].as_str() {
                Some(id) => {
                    assert!(reported.insert(id.to_string()), "reported twice: {id}");
                }
                None => {
                    let n: u64 = reason
                        .split_whitespace()
                        .nth(1)
                        .and_then(|n| n.parse().ok())
                        .expect("the aggregate report says how many");
                    aggregated += n;
                }
            }
        }
    }
    assert!(answered.is_disjoint(&reported));
    assert_eq!(
        agent.metrics().totals().dropped,
        reported.len() as u64 + aggregated,
        "every drop counted is reported"
    );
    eprintln!(
        "QoS 0 flood of {N} in {:.1} s: {} answered, {} reported, {aggregated} in aggregate",
        published.as_secs_f64(),
        answered.len(),
        reported.len()
    );
    // Full speed again right after.
    let after = Instant::now();
    let ids: Vec<String> = (0..20).map(|i| format!("after-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        c.publish(
            &crops,
            1,
            request(id, vec![image(&qs[i % LABELS].1)], vec![]),
        )
        .await;
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (got, _) = collect_results(&mut c, &results, &errors, &refs, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 20);
    eprintln!(
        "20 requests after the flood answered in {:?}",
        after.elapsed()
    );
    agent.stop().await.expect("clean stop");
}

/// Kills the child process when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_agents_with_one_device_id_say_so_and_back_off_instead_of_fighting() {
    let broker = Mosquitto::start("");
    let dev = "twin";
    // Default backoff (200 ms doubling to 30 s), not the tests' fast one.
    let homes: Vec<AgentHome> = (0..2)
        .map(|_| {
            enrolled_home(
                &format!("device_id = {dev:?}\nfleet = \"store-9\""),
                &format!("[bus]\nport = {}\n", broker.port),
            )
        })
        .collect();
    let agents: Vec<Killed> = homes
        .iter()
        .map(|h| {
            let log = std::fs::File::create(h.path().join("agent.log")).unwrap();
            Killed(
                std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
                    .args(["run", "-c"])
                    .arg(&h.config_path)
                    .env("RUST_LOG", "info")
                    .stdout(std::process::Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("start retail-agent run"),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_secs(15));
    drop(agents);
    let logs: Vec<String> = homes
        .iter()
        .map(|h| std::fs::read_to_string(h.path().join("agent.log")).unwrap())
        .collect();
    let said_so = logs.iter().any(|l| {
        l.contains("another agent is online with this device_id")
            || l.contains("is another agent using this device_id")
    });
    let connections: Vec<usize> = logs
        .iter()
        .map(|l| l.matches("connected to the broker").count())
        .collect();
    assert!(
        said_so,
        "no agent named the duplicate device_id:\n{}",
        logs.join("\n---\n")
    );
    // Reconnecting at the minimum delay would be ~75 connections each in
    // 15 s; doubling with jitter allows at most ~8.
    assert!(
        connections.iter().all(|&n| n <= 12),
        "connections per agent in 15 s: {connections:?}"
    );
    eprintln!("two agents, one device_id, 15 s: connections {connections:?}");
}
