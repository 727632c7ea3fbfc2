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
use retail_testkit::{crops::image_crop, process::KillOnDrop, topics::topic};
use rmpv::Value as Mp;

/// A device's topics, written out from the contract.
struct DevTopics {
    crops: String,
    results: String,
    errors: String,
    status: String,
}

impl DevTopics {
    fn new(dev: &str) -> Self {
        Self {
            crops: topic(dev, "crops"),
            results: topic(dev, "results"),
            errors: topic(dev, "errors"),
            status: topic(dev, "status"),
        }
    }
}

fn home(device: &str, port: u16, bus: &str, sections: &str) -> AgentHome {
    broker_home(device, port, bus, sections)
}

async fn start(home: &AgentHome) -> Agent {
    start_connected(home).await
}

/// A MessagePack request: `request_id` first, then `crops`, then any
/// `extra` fields (a large `frame`, say).
fn request(id: &str, crops: Vec<Mp>, extra: Vec<(&str, Mp)>) -> Vec<u8> {
    let mut pairs = vec![("request_id", Mp::from(id)), ("crops", Mp::Array(crops))];
    pairs.extend(extra);
    mp_encode(&mp_map(pairs))
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
    let (answered, reported) = answers_and_reports(c, results, errors, ids, timeout).await;
    (answered, reported.into_keys().collect())
}

/// Publishes, at QoS 1, single-crop requests `{prefix}-{i:02}` for `range`
/// (the client queues them while it is disconnected).
async fn publish_range(c: &TestClient, crops: &str, prefix: &str, range: std::ops::Range<usize>) {
    let qs = one_query_per_label(&queries());
    for i in range {
        let r = request(
            &format!("{prefix}-{i:02}"),
            vec![image_crop(&qs[i % LABELS].1)],
            vec![],
        );
        c.client
            .publish(crops, rumqttc::QoS::AtLeastOnce, false, r)
            .await
            .expect("queue a publish");
    }
}

/// Waits until every id in `want` has a result on `results` (those already
/// in `answered` count); panics with the missing ids and `context()`.
async fn wait_answered(
    c: &mut TestClient,
    results: &str,
    want: &HashSet<String>,
    mut answered: HashSet<String>,
    timeout: Duration,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !want.is_subset(&answered) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((t, p, _)) = c.next(left).await else {
            let missing: Vec<_> = want.difference(&answered).collect();
            panic!("unanswered: {missing:?}; {}", context());
        };
        if t == results {
            if let Some(id) = to_json(&p)["request_id"].as_str() {
                answered.insert(id.to_string());
            }
        }
    }
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
    let DevTopics {
        crops,
        results,
        errors,
        status,
    } = DevTopics::new(dev);
    let agent = start(&h).await;
    let mut c =
        TestClient::connect(broker.port, "big-in-client", &[&results, &errors, &status]).await;
    // 17 MB, over the agent's 16 MiB and under the broker's 20 MB limit.
    let big = request(
        "big-1",
        vec![image_crop(&qs[0].1)],
        vec![("frame", Mp::Binary(vec![0xab; 17_000_000]))],
    );
    c.publish(&crops, 1, big).await;
    c.publish(
        &crops,
        1,
        request("after-1", vec![image_crop(&qs[1].1)], vec![]),
    )
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
    c.publish(
        &crops,
        1,
        request("after-2", vec![image_crop(&qs[2].1)], vec![]),
    )
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
    let DevTopics {
        crops,
        results,
        errors,
        status,
    } = DevTopics::new(dev);
    let agent = start(&h).await;
    let mut c =
        TestClient::connect(broker.port, "big-lim-client", &[&results, &errors, &status]).await;
    let big = request(
        "big-2",
        vec![image_crop(&qs[0].1)],
        vec![("frame", Mp::Binary(vec![1; 2_000_000]))],
    );
    c.publish(&crops, 1, big).await;
    c.publish(
        &crops,
        1,
        request("after-3", vec![image_crop(&qs[3].1)], vec![]),
    )
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
    let DevTopics {
        crops,
        results,
        errors,
        status,
    } = DevTopics::new(dev);
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
    c.publish(
        &crops,
        1,
        request("after-4", vec![image_crop(&qs[4].1)], vec![]),
    )
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
    let DevTopics {
        crops,
        results,
        errors,
        ..
    } = DevTopics::new(dev);
    let agent = start(&h).await;
    let mut c = TestClient::connect(broker.port, "burst1-client", &[&results, &errors]).await;
    const N: usize = 1500;
    let ids: Vec<String> = (0..N).map(|i| format!("q1-{i:05}")).collect();
    for (i, id) in ids.iter().enumerate() {
        c.publish(
            &crops,
            1,
            request(id, vec![image_crop(&qs[i % LABELS].1)], vec![]),
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
    let DevTopics {
        crops,
        results,
        errors,
        ..
    } = DevTopics::new(dev);
    let agent = start(&h).await;
    let mut c = TestClient::connect(broker.port, "flood0-client", &[&results, &errors]).await;
    // 20 requests on the idle agent: the speed to be back at after the flood.
    let twenty = |tag: &str| -> Vec<String> { (0..20).map(|i| format!("{tag}-{i}")).collect() };
    let before_ids = twenty("before");
    let before = Instant::now();
    for (i, id) in before_ids.iter().enumerate() {
        c.publish(
            &crops,
            1,
            request(id, vec![image_crop(&qs[i % LABELS].1)], vec![]),
        )
        .await;
    }
    let refs: Vec<&str> = before_ids.iter().map(String::as_str).collect();
    let (got, _) = collect_results(&mut c, &results, &errors, &refs, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 20);
    let idle = before.elapsed();
    const N: usize = 20000;
    let started = Instant::now();
    for i in 0..N {
        c.publish(
            &crops,
            0,
            request(
                &format!("f-{i:05}"),
                vec![image_crop(&qs[i % LABELS].1)],
                vec![],
            ),
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
    let ids = twenty("after");
    for (i, id) in ids.iter().enumerate() {
        c.publish(
            &crops,
            1,
            request(id, vec![image_crop(&qs[i % LABELS].1)], vec![]),
        )
        .await;
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (got, _) = collect_results(&mut c, &results, &errors, &refs, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 20);
    let after = after.elapsed();
    eprintln!("20 requests answered in {idle:?} before the flood, {after:?} after it");
    // Full speed: within a few times the idle agent's time (the machine is
    // shared and noisy), plus the time the last reports take to drain.
    assert!(
        after <= idle * 4 + Duration::from_secs(2),
        "20 requests took {after:?} after the flood, {idle:?} before it"
    );
    agent.stop().await.expect("clean stop");
}

/// Publishes one QoS 1 request and waits for its result.
async fn answered_once(
    c: &mut TestClient,
    crops: &str,
    results: &str,
    errors: &str,
    id: &str,
    payload: Vec<u8>,
) {
    c.publish(crops, 1, payload).await;
    let (got, _) = collect_results(c, results, errors, &[id], Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{id} answered");
}

/// A process's resident memory in kB: (now, peak).
fn rss_kb(pid: u32) -> (u64, u64) {
    let r = retail_agent::bench::Resident::of_process(pid)
        .unwrap_or_else(|e| panic!("resident memory of {pid}: {e}"));
    (r.now / 1024, r.peak / 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_requests_keeps_memory_within_the_queue_byte_bound() {
    // 120 requests of 3 MiB of raw pixels each (360 MiB) as fast as QoS 0
    // allows, against pipeline.queue_max_bytes = 16 MiB: the agent's peak
    // memory stays within the bound plus its fixed working set, every
    // request is answered or reported, and it serves at full speed after.
    const QUEUE_MB: u64 = 16;
    const N: usize = 120;
    let broker = Mosquitto::start("");
    let dev = "bigflood";
    let h = home(
        dev,
        broker.port,
        "",
        &format!(
            "[pipeline]\nqueue_capacity = 1000\nqueue_max_bytes = {}\n",
            QUEUE_MB << 20
        ),
    );
    let DevTopics {
        crops,
        results,
        errors,
        status,
    } = DevTopics::new(dev);
    let mut c = TestClient::connect(
        broker.port,
        "bigflood-client",
        &[&results, &errors, &status],
    )
    .await;
    let log = std::fs::File::create(h.path().join("agent.log")).unwrap();
    let agent = KillOnDrop::new(
        std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
            .args(["run", "-c"])
            .arg(&h.config_path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let pid = agent.id();
    let online = Instant::now() + Duration::from_secs(30);
    loop {
        let left = online.saturating_duration_since(Instant::now());
        let (_, p, _) = c.next(left).await.expect("the agent comes online");
        if to_json(&p)["state"] == "online" {
            break;
        }
    }
    // Warm: one request through every stage, so the baseline holds the
    // model's and the runtime's buffers.
    let (w, hgt) = (1024u32, 1024u32);
    let pixels: Vec<u8> = (0..(w * hgt * 3) as usize)
        .map(|i| (i % 251) as u8)
        .collect();
    let raw = |id: &str| {
        request(
            id,
            vec![mp_map(vec![(
                "raw",
                mp_map(vec![
                    ("width", Mp::from(w)),
                    ("height", Mp::from(hgt)),
                    ("format", Mp::from("rgb8")),
                    ("data", Mp::Binary(pixels.clone())),
                ]),
            )])],
            vec![],
        )
    };
    answered_once(&mut c, &crops, &results, &errors, "warm", raw("warm")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (baseline, _) = rss_kb(pid);

    let payload = raw("x");
    for i in 0..N {
        let mut p = payload.clone();
        // Same length, distinct id: "x" -> one letter per request.
        let id_at = p
            .windows(2)
            .position(|w| w == [0xa1, b'x'])
            .expect("the id")
            + 1;
        p[id_at] = b'A' + (i % 26) as u8;
        c.publish(&crops, 0, p).await;
    }
    let mut answered = 0usize;
    let mut reported = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut peak_during = 0;
    while answered + reported < N {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((t, p, _)) = c.next(left).await else {
            panic!("{answered} answered, {reported} reported of {N}");
        };
        peak_during = peak_during.max(rss_kb(pid).0);
        let v = to_json(&p);
        if t == results {
            answered += 1;
        } else if t == errors {
            let reason = v["reason"].as_str().unwrap_or_default();
            assert!(reason.starts_with("dropped"), "{v}");
            reported += match v["request_id"].as_str() {
                Some(_) => 1,
                None => reason
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .expect("the aggregate report says how many"),
            };
        }
    }
    let (_, peak) = rss_kb(pid);
    let growth_mb = peak.saturating_sub(baseline) / 1024;
    eprintln!(
        "large QoS 0 flood: {N} x 3 MiB, {answered} answered, {reported} reported; RSS baseline {} MiB, peak {} MiB (+{growth_mb} MiB; queue bound {QUEUE_MB} MiB)",
        baseline / 1024,
        peak / 1024
    );
    // The bound: the queue's bytes, plus what is in the hands of the bus
    // (MQTT read buffers, a packet being handed over), of the decode worker
    // (a request and its pixels), the drop reports' prefixes and the
    // allocator's slack: 64 MiB beyond the queue (measured: 35 to 51).
    let allowed = QUEUE_MB + 64;
    assert!(
        growth_mb <= allowed,
        "peak RSS grew {growth_mb} MiB over the baseline; allowed {allowed} MiB"
    );
    assert!(
        answered > 0 && reported > 0,
        "{answered} answered, {reported} reported"
    );
    // Full speed again.
    answered_once(&mut c, &crops, &results, &errors, "after", raw("after")).await;
    drop(agent);
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
    let agents: Vec<KillOnDrop> = homes
        .iter()
        .map(|h| {
            let log = std::fs::File::create(h.path().join("agent.log")).unwrap();
            KillOnDrop::new(
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

/// A network namespace joined to the root one by a veth pair, for cutting
/// an agent off its broker; removed when dropped.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?} failed (network namespaces need root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new() -> Self {
        let id = std::process::id() % 10_000;
        let name = format!("ra-test-{id}");
        let (host_if, ns_if) = (format!("rah{id}"), format!("ran{id}"));
        let net = format!("10.211.{}", id % 250);
        let (host_ip, ns_ip) = (format!("{net}.1"), format!("{net}.2"));
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_ns(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
        in_ns(&["link", "set", &ns_if, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        Self {
            name,
            host_if,
            host_ip,
        }
    }

    fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_partition_publishes_the_will_and_every_qos1_request_is_answered_after() {
    let net = Netns::new();
    let host_ip = net.host_ip.clone();
    let broker = Mosquitto::start_with_config(|port, dir| {
        format!(
            "listener {port} 127.0.0.1\nlistener {port} {host_ip}\nuser root\nallow_anonymous true\npersistence true\npersistence_location {d}/\nmax_queued_messages 10000\nlog_dest file {d}/mosquitto.log\n",
            d = dir.display()
        )
    });
    let dev = "cut-off";
    let h = enrolled_home(
        &format!("device_id = {dev:?}\nfleet = \"store-9\""),
        &format!(
            "[bus]\nhost = {:?}\nport = {}\nkeep_alive_s = 5\nreconnect_min_ms = 200\nreconnect_max_ms = 2000\n",
            net.host_ip, broker.port
        ),
    );
    let (crops, results, status) = (
        topic(dev, "crops"),
        topic(dev, "results"),
        topic(dev, "status"),
    );
    let mut c =
        TestClient::connect_persistent(broker.port, "cut-off-checkout", &[&results, &status]).await;
    let log = std::fs::File::create(h.path().join("agent.log")).unwrap();
    let _agent = KillOnDrop::new(
        std::process::Command::new("ip")
            .args(["netns", "exec", &net.name])
            .arg(env!("CARGO_BIN_EXE_retail-agent"))
            .args(["run", "-c"])
            .arg(&h.config_path)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent in its namespace"),
    );
    let agent_log = || std::fs::read_to_string(h.path().join("agent.log")).unwrap_or_default();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen
        .iter()
        .any(|(t, v): &(String, serde_json::Value)| *t == status && v["state"] == "online")
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((t, p, _)) = c.next(left).await else {
            panic!("the agent never came online; its log:\n{}", agent_log());
        };
        seen.push((t, to_json(&p)));
    }
    publish_range(&c, &crops, "cut", 0..10).await;
    net.link(false);
    let cut = Instant::now();
    publish_range(&c, &crops, "cut", 10..20).await;
    // Keep-alive 5 s: the broker gives up on the agent after 7.5 s and
    // publishes its Will.
    let mut will_after = None;
    while will_after.is_none() && cut.elapsed() < Duration::from_secs(20) {
        if let Some((t, p, _)) = c.next(Duration::from_millis(200)).await {
            let v = to_json(&p);
            if t == status && v["state"] == "offline" {
                will_after = Some(cut.elapsed());
            }
            seen.push((t, v));
        }
    }
    let will_after = will_after.unwrap_or_else(|| {
        panic!(
            "no Will while the agent was cut off; its log:\n{}",
            agent_log()
        )
    });
    net.link(true);
    let healed = Instant::now();
    publish_range(&c, &crops, "cut", 20..30).await;
    let want: HashSet<String> = (0..30).map(|i| format!("cut-{i:02}")).collect();
    let answered: HashSet<String> = seen
        .iter()
        .filter(|(t, _)| *t == results)
        .filter_map(|(_, v)| v["request_id"].as_str().map(str::to_string))
        .collect();
    wait_answered(
        &mut c,
        &results,
        &want,
        answered,
        Duration::from_secs(60),
        || format!("after the partition; agent log:\n{}", agent_log()),
    )
    .await;
    eprintln!(
        "partition: Will {:.1} s after the cut; all 30 answered {:.1} s after healing",
        will_after.as_secs_f64(),
        healed.elapsed().as_secs_f64()
    );
}

/// Seconds the broker stays down in the outage test: 30 with
/// `RELIABILITY_OUTAGE_S=30`, 10 by default to keep CI short.
fn outage() -> Duration {
    Duration::from_secs(
        std::env::var("RELIABILITY_OUTAGE_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos1_request_published_around_a_broker_outage_is_answered() {
    let mut broker = Mosquitto::start("");
    let dev = "outage";
    let h = home(dev, broker.port, "", "");
    let (crops, results) = (topic(dev, "crops"), topic(dev, "results"));
    let agent = start(&h).await;
    let mut c = TestClient::connect_persistent(broker.port, "outage-checkout", &[&results]).await;
    publish_range(&c, &crops, "out", 0..10).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    tokio::task::block_in_place(|| broker.stop());
    // Published while the broker is down: the checkout's client keeps them.
    publish_range(&c, &crops, "out", 10..20).await;
    tokio::time::sleep(outage()).await;
    tokio::task::block_in_place(|| broker.start_again());
    let back = Instant::now();
    publish_range(&c, &crops, "out", 20..30).await;
    let want: HashSet<String> = (0..30).map(|i| format!("out-{i:02}")).collect();
    wait_answered(
        &mut c,
        &results,
        &want,
        HashSet::new(),
        Duration::from_secs(60),
        || format!("after a {:?} outage", outage()),
    )
    .await;
    eprintln!(
        "broker down {:?}: all 30 answered {:.1} s after it came back",
        outage(),
        back.elapsed().as_secs_f64()
    );
    agent.stop().await.expect("clean stop");
}

// ---- Flow control under floods that fill every buffer (issue: a QoS 1
// flood used to wedge the agent: holding back the event loop also held
// back its own PUBACKs and pings, and the publisher blocked behind them).

/// A broker whose in-flight window toward each client is unlimited: it
/// sends every queued QoS 1 request at once, as Mosquitto 2.0 does in
/// practice under a burst, so the agent's own flow control is all there is.
fn unlimited_window_broker() -> Mosquitto {
    Mosquitto::start_with_config(|port, dir| {
        format!(
            "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\nmax_queued_messages 200000\nmax_inflight_messages 0\nmax_packet_size 20000000\nlog_dest file {}/mosquitto.log\n",
            dir.display()
        )
    })
}

/// The agent of `h` as a process of its own, logging at INFO into
/// `agent.log` in its home; returns once its Status says online.
async fn spawn_logged_agent(h: &AgentHome, c: &mut TestClient) -> (KillOnDrop, std::path::PathBuf) {
    let log_path = h.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let agent = KillOnDrop::new(
        std::process::Command::new(env!("CARGO_BIN_EXE_retail-agent"))
            .args(["run", "-c"])
            .arg(&h.config_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let online = Instant::now() + Duration::from_secs(60);
    loop {
        let left = online.saturating_duration_since(Instant::now());
        let (_, p, _) = c.next(left).await.expect("the agent comes online");
        if to_json(&p)["state"] == "online" {
            break;
        }
    }
    (agent, log_path)
}

/// Lines of the agent's log that say it stalled, lost the broker or gave
/// up, and how many times it connected.
fn stalls_and_connections(log_path: &std::path::Path) -> (Vec<String>, usize) {
    let text = std::fs::read_to_string(log_path).unwrap();
    let stalls = text
        .lines()
        .filter(|l| l.contains("stuck") || l.contains("connection failed") || l.contains("exiting"))
        .map(str::to_string)
        .collect();
    let connections = text
        .lines()
        .filter(|l| l.contains("connected to the broker"))
        .count();
    (stalls, connections)
}

/// Collects, for the ids in `want`, results (answered) and ErrorReports
/// (id -> reason) until each id has one or `timeout` passes.
async fn answers_and_reports(
    c: &mut TestClient,
    results: &str,
    errors: &str,
    want: &HashSet<String>,
    timeout: Duration,
) -> (HashSet<String>, std::collections::HashMap<String, String>) {
    let mut answered = HashSet::new();
    let mut reported = std::collections::HashMap::new();
    let deadline = Instant::now() + timeout;
    while answered.len() + reported.len() < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((t, p, _)) = c.next(left).await else {
            let missing: Vec<_> = want
                .iter()
                .filter(|id| !answered.contains(*id) && !reported.contains_key(*id))
                .take(10)
                .collect();
            panic!(
                "after {timeout:?}: {} answered, {} reported of {}; missing e.g. {missing:?}",
                answered.len(),
                reported.len(),
                want.len()
            );
        };
        let v = to_json(&p);
        let Some(id) = v["request_id"].as_str().filter(|id| want.contains(*id)) else {
            continue;
        };
        if t == results {
            answered.insert(id.to_string());
        } else if t == errors {
            reported.insert(
                id.to_string(),
                v["reason"].as_str().unwrap_or_default().to_string(),
            );
        }
    }
    (answered, reported)
}

/// Publishes `n` single-crop QoS 1 requests `{prefix}-{i:05}` as fast as
/// the client goes; `special(i)` may replace one with another payload.
async fn qos1_burst(
    c: &TestClient,
    crops: &str,
    prefix: &str,
    n: usize,
    special: impl Fn(usize, &str) -> Option<Vec<u8>>,
) -> Vec<String> {
    let qs = one_query_per_label(&queries());
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{prefix}-{i:05}");
        let payload = special(i, &id)
            .unwrap_or_else(|| request(&id, vec![image_crop(&qs[i % LABELS].1)], vec![]));
        c.client
            .publish(crops, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .expect("queue a publish");
        ids.push(id);
    }
    ids
}

/// After a burst: a normal request is answered within half the keep-alive
/// (15 s with the default 30 s), and the log shows no stall, no lost
/// connection and no reconnection.
async fn answers_promptly_and_never_stalled(
    c: &mut TestClient,
    t: &DevTopics,
    log_path: &std::path::Path,
    probe: &str,
) {
    let qs = one_query_per_label(&queries());
    let sent = Instant::now();
    c.publish(
        &t.crops,
        1,
        request(probe, vec![image_crop(&qs[0].1)], vec![]),
    )
    .await;
    let (got, _) =
        collect_results(c, &t.results, &t.errors, &[probe], Duration::from_secs(15)).await;
    assert_eq!(got.len(), 1, "{probe} answered within 15 s after the burst");
    eprintln!("{probe} answered {:?} after it was sent", sent.elapsed());
    let (stalls, connections) = stalls_and_connections(log_path);
    assert!(
        stalls.is_empty(),
        "the agent stalled or lost the broker: {stalls:#?}"
    );
    assert_eq!(connections, 1, "the agent reconnected during the burst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_burst_past_every_internal_buffer_is_answered_in_full_without_a_stall_or_reconnect()
{
    // 3,000 requests against a queue of 16: far past the queue, its hard
    // limit, the 1,024-message channel to the publisher and rumqttc's
    // 1,024-request queue together, which is where the old cycle closed.
    const N: usize = 3000;
    let broker = unlimited_window_broker();
    let dev = "qos1-wall";
    let t = DevTopics::new(dev);
    let h = home(dev, broker.port, "", "[pipeline]\nqueue_capacity = 16\n");
    let mut c = TestClient::connect(
        broker.port,
        "qos1-wall-client",
        &[&t.results, &t.errors, &t.status],
    )
    .await;
    let (agent, log_path) = spawn_logged_agent(&h, &mut c).await;
    let started = Instant::now();
    let ids = qos1_burst(&c, &t.crops, "w", N, |_, _| None).await;
    let want: HashSet<String> = ids.into_iter().collect();
    let (answered, reported) = answers_and_reports(
        &mut c,
        &t.results,
        &t.errors,
        &want,
        Duration::from_secs(240),
    )
    .await;
    assert_eq!(
        (answered.len(), reported.len()),
        (N, 0),
        "every QoS 1 request answered, none dropped: {:?}",
        reported.iter().take(3).collect::<Vec<_>>()
    );
    eprintln!("{N} QoS 1 requests answered in {:?}", started.elapsed());
    answers_promptly_and_never_stalled(&mut c, &t, &log_path, "after-wall").await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_flood_logs_a_few_summary_lines_and_a_qos1_burst_after_it_is_answered_in_full() {
    const FLOOD: usize = 20_000;
    const N: usize = 2000;
    let broker = unlimited_window_broker();
    let dev = "flood-then-wall";
    let t = DevTopics::new(dev);
    let h = home(dev, broker.port, "", "[pipeline]\nqueue_capacity = 16\n");
    let mut c = TestClient::connect(
        broker.port,
        "ftw-client",
        &[&t.results, &t.errors, &t.status],
    )
    .await;
    let (agent, log_path) = spawn_logged_agent(&h, &mut c).await;
    let lines_before = std::fs::read_to_string(&log_path).unwrap().lines().count();
    let qs = one_query_per_label(&queries());
    for i in 0..FLOOD {
        c.publish(
            &t.crops,
            0,
            request(
                &format!("f-{i:05}"),
                vec![image_crop(&qs[i % LABELS].1)],
                vec![],
            ),
        )
        .await;
    }
    // Every flood request answered or reported (one by one or in an
    // aggregate report).
    let (mut answered, mut reported, mut aggregated) = (0usize, 0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(180);
    while answered + reported + aggregated < FLOOD {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((topic, p, _)) = c.next(left).await else {
            panic!("flood: {answered} answered, {reported} reported, {aggregated} aggregated of {FLOOD}");
        };
        let v = to_json(&p);
        if topic == t.results {
            answered += 1;
        } else if topic == t.errors {
            match v["request_id"].as_str() {
                Some(_) => reported += 1,
                None => {
                    aggregated += v["reason"]
                        .as_str()
                        .and_then(|r| r.split_whitespace().nth(1))
                        .and_then(|n| n.parse::<usize>().ok())
                        .expect("the aggregate report says how many")
                }
            }
        }
    }
    // Let the last summary line be written (one per kind every 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let flood_lines = log.lines().count() - lines_before;
    eprintln!(
        "QoS 0 flood of {FLOOD}: {answered} answered, {reported} reported, {aggregated} in aggregate; {flood_lines} log lines"
    );
    assert!(
        reported + aggregated > FLOOD / 2,
        "the flood overflowed the queue"
    );
    assert!(
        flood_lines < 200,
        "{flood_lines} log lines for a flood of {FLOOD}:\n{}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    assert!(
        log.contains("request dropped") && log.contains("more since the last line"),
        "drops are logged, as summaries:\n{log}"
    );

    let ids = qos1_burst(&c, &t.crops, "a", N, |_, _| None).await;
    let want: HashSet<String> = ids.into_iter().collect();
    let (answered, reported) = answers_and_reports(
        &mut c,
        &t.results,
        &t.errors,
        &want,
        Duration::from_secs(240),
    )
    .await;
    assert_eq!((answered.len(), reported.len()), (N, 0));
    answers_promptly_and_never_stalled(&mut c, &t, &log_path, "after-flood-and-wall").await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_and_answers_mixed_into_a_qos1_burst_are_each_reported_and_the_rest_answered(
) {
    const N: usize = 2000;
    let broker = unlimited_window_broker();
    let dev = "mixed-wall";
    let t = DevTopics::new(dev);
    // Requests over 256 KiB are refused; so is an answer that would not fit.
    let h = home(
        dev,
        broker.port,
        "max_packet_bytes = 262144",
        "[pipeline]\nqueue_capacity = 16\n[limits]\nmax_crops = 1000\n",
    );
    let mut c = TestClient::connect(
        broker.port,
        "mixed-client",
        &[&t.results, &t.errors, &t.status],
    )
    .await;
    let (agent, log_path) = spawn_logged_agent(&h, &mut c).await;
    let big_frame = Mp::Binary(vec![0x5a; 17 << 20]);
    let tiny_raw = mp_map(vec![(
        "raw",
        mp_map(vec![
            ("width", Mp::from(2)),
            ("height", Mp::from(2)),
            ("format", Mp::from("rgb8")),
            ("data", Mp::Binary(vec![128; 12])),
        ]),
    )]);
    let qs = one_query_per_label(&queries());
    let (large, too_many): (HashSet<usize>, HashSet<usize>) = (
        (0..N).filter(|i| i % 400 == 7).collect(),
        (0..N).filter(|i| i % 150 == 11).collect(),
    );
    let ids = qos1_burst(&c, &t.crops, "m", N, |i, id| {
        if large.contains(&i) {
            // 17 MB: a frame no request of this agent may carry.
            Some(request(
                id,
                vec![image_crop(&qs[0].1)],
                vec![("frame", big_frame.clone())],
            ))
        } else if too_many.contains(&i) {
            // 600 crops x 12 candidates: an answer over 256 KiB.
            Some(request(
                id,
                vec![tiny_raw.clone(); 600],
                vec![("top_k", Mp::from(20))],
            ))
        } else {
            None
        }
    })
    .await;
    let want: HashSet<String> = ids.iter().cloned().collect();
    let (answered, reported) = answers_and_reports(
        &mut c,
        &t.results,
        &t.errors,
        &want,
        Duration::from_secs(240),
    )
    .await;
    for (i, id) in ids.iter().enumerate() {
        if large.contains(&i) || too_many.contains(&i) {
            let reason = reported
                .get(id)
                .unwrap_or_else(|| panic!("{id} is reported, not answered"));
            assert!(reason.contains("bus.max_packet_bytes"), "{id}: {reason}");
        } else {
            assert!(
                answered.contains(id),
                "{id} answered: {:?}",
                reported.get(id)
            );
        }
    }
    eprintln!(
        "{} answered, {} reported ({} of 17 MB, {} oversized answers)",
        answered.len(),
        reported.len(),
        large.len(),
        too_many.len()
    );
    answers_promptly_and_never_stalled(&mut c, &t, &log_path, "after-mixed").await;
    drop(agent);
}
