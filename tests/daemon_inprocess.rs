//! The daemon end to end on the in-process broker (rumqttd): requests in
//! both encodings, frames with boxes, bad crops and payloads, overload, the
//! retained Status and the Metrics message, all checked against
//! `shared/spec/PROTOCOL.md`.

mod common;
mod daemon_support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{inprocess_broker, queries, to_json, AgentHome, TestClient};
use daemon_support::*;
use retail_agent::daemon::Agent;
use retail_testkit::crops::image_crop;
use rmpv::Value as Mp;
use serde_json::json;

const FLEET: &str = "store-7";

/// A broker, an enrolled agent home and a connected agent; `sections` are
/// appended to the config after `[bus]`.
async fn start_agent(device: &str, sections: &str) -> (AgentHome, Agent, u16) {
    let port = inprocess_broker();
    let home = enrolled_home(
        &format!("device_id = {device:?}\nfleet = {FLEET:?}"),
        &format!("[bus]\nport = {port}\nreconnect_max_ms = 1000\n{sections}"),
    );
    let agent = Agent::start(home.load()).await.expect("agent starts");
    assert!(
        agent.wait_connected(Duration::from_secs(10)).await,
        "agent did not connect to the in-process broker"
    );
    (home, agent, port)
}

/// This process's resident memory now, in kB.
fn vm_rss_kb() -> u64 {
    retail_agent::bench::Resident::of_self()
        .expect("/proc/self/status")
        .now
        / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_msgpack_requests_are_answered_in_kind_with_schema_exact_results() {
    let qs = one_query_per_label(&queries());
    let (_home, agent, port) = start_agent("inproc-enc", "").await;
    let t = agent.topics().clone();
    let mut c = TestClient::connect(port, "checkout-enc", &[&t.results, &t.errors]).await;

    // JSON: echoed camera/frame ids, one explicit crop id, top_k 3, an unknown field.
    let json_req = json!({
        "request_id": "json-1",
        "camera_id": "lane-3",
        "frame_id": 9001u64,
        "ts_ms": now_ms(),
        "top_k": 3,
        "extension": {"ignored": true},
        "crops": [
            {"image": b64(&qs[0].1)},
            {"id": "shelf-b", "image": b64(&qs[1].1)},
            {"image": b64(&qs[2].1)},
            {"image": b64(&qs[3].1)},
        ],
    });
    c.publish(&t.crops, 1, serde_json::to_vec(&json_req).unwrap())
        .await;
    // MessagePack: every label, top_k far above the cap (clamped to 20, so
    // all 12 labels come back as candidates).
    let mp_req = mp_map(vec![
        ("request_id", Mp::from("mp-1")),
        ("top_k", Mp::from(200u8)),
        (
            "crops",
            Mp::Array(qs.iter().map(|(_, b)| image_crop(b)).collect()),
        ),
    ]);
    c.publish(&t.crops, 1, mp_encode(&mp_req)).await;
    // JSON without top_k: recognition.top_k (5).
    c.publish(
        &t.crops,
        0,
        common::json_request("json-default", &[&qs[4].1, &qs[5].1]),
    )
    .await;

    let (got, errs) = collect_results(
        &mut c,
        &t.results,
        &t.errors,
        &["json-1", "mp-1", "json-default"],
        Duration::from_secs(20),
    )
    .await;
    assert!(errs.is_empty(), "unexpected error reports: {errs:?}");

    let p = &got["json-1"];
    assert!(is_json(p), "a JSON request must be answered in JSON");
    let v: serde_json::Value = serde_json::from_slice(p).expect("valid JSON");
    check_result(
        &v,
        &Expect {
            request_id: "json-1".into(),
            camera_id: Some("lane-3".into()),
            frame_id: Some(9001),
            device_id: "inproc-enc".into(),
            ids: vec!["0".into(), "shelf-b".into(), "2".into(), "3".into()],
            want: qs[..4]
                .iter()
                .map(|(l, _)| Want::Label(l.clone()))
                .collect(),
            candidates: 3,
        },
    );

    let p = &got["mp-1"];
    assert!(
        is_msgpack_map(p),
        "a MessagePack request must be answered with a MessagePack map, first byte 0x{:02x}",
        p[0]
    );
    let decoded = rmpv::decode::read_value(&mut &p[..]).expect("valid MessagePack");
    assert!(decoded.is_map());
    let v = to_json(p);
    let labels: Vec<&str> = qs.iter().map(|(l, _)| l.as_str()).collect();
    let mut e = Expect::labels("mp-1", "inproc-enc", &labels);
    e.candidates = LABELS.min(MAX_TOP_K);
    check_result(&v, &e);
    let all: HashSet<&str> = labels.iter().copied().collect();
    for item in v["items"].as_array().unwrap() {
        let cands: HashSet<&str> = item["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["label"].as_str().unwrap())
            .collect();
        assert_eq!(
            cands, all,
            "top_k 200 (clamped to 20) lists every label once"
        );
    }

    let p = &got["json-default"];
    assert!(is_json(p));
    check_result(
        &to_json(p),
        &Expect::labels("json-default", "inproc-enc", &[&qs[4].0, &qs[5].0]),
    );

    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_bboxes_are_cut_out_clipped_to_the_frame_and_recognised() {
    let all = queries();
    // Second query image of four labels.
    let mut picks: Vec<(String, image::RgbImage)> = Vec::new();
    for (label, _) in &all {
        if picks.iter().any(|(l, _)| l == label) {
            continue;
        }
        let second = all
            .iter()
            .filter(|(l, _)| l == label)
            .nth(1)
            .expect("two queries per label");
        let img = image::load_from_memory(&second.1).unwrap().to_rgb8();
        picks.push((label.clone(), img));
        if picks.len() == 4 {
            break;
        }
    }
    let dims: Vec<(f64, f64)> = picks
        .iter()
        .map(|(_, img)| (f64::from(img.width()), f64::from(img.height())))
        .collect();
    let (fw, fh) = (640u32, 360u32);
    let mut frame = image::RgbImage::from_pixel(fw, fh, image::Rgb([90, 90, 90]));
    let (right, bottom) = (f64::from(fw) - dims[2].0, f64::from(fh) - dims[2].1);
    // Where each image goes (top left), and the box a detector sends for it.
    let places: [((f64, f64), [f64; 4]); 4] = [
        ((20.0, 40.0), [20.0, 40.0, dims[0].0, dims[0].1]),
        ((200.0, 100.0), [200.0, 100.0, dims[1].0, dims[1].1]),
        // Flush with the bottom-right corner; the box runs past both edges.
        (
            (right, bottom),
            [right, bottom, dims[2].0 + 60.0, dims[2].1 + 45.0],
        ),
        // At the origin; the box starts left of and above the frame.
        (
            (0.0, 0.0),
            [-50.0, -30.0, dims[3].0 + 50.0, dims[3].1 + 30.0],
        ),
    ];
    for (i, ((x, y), _)) in places.iter().enumerate() {
        image::imageops::overlay(&mut frame, &picks[i].1, *x as i64, *y as i64);
    }
    let mut png = Vec::new();
    frame
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();

    let (_home, agent, port) = start_agent("inproc-frame", "").await;
    let t = agent.topics().clone();
    let mut c = TestClient::connect(port, "checkout-frame", &[&t.results, &t.errors]).await;
    let bbox = |b: [f64; 4]| Mp::Array(b.iter().map(|v| Mp::F64(*v)).collect());
    let mut crops: Vec<Mp> = places
        .iter()
        .enumerate()
        .map(|(i, (_, b))| {
            mp_map(vec![
                ("id", Mp::from(format!("box-{i}"))),
                ("bbox", bbox(*b)),
            ])
        })
        .collect();
    // Entirely outside the frame (right/below, and left): item errors.
    crops.push(mp_map(vec![
        ("id", Mp::from("outside")),
        ("bbox", bbox([700.0, 400.0, 50.0, 50.0])),
    ]));
    crops.push(mp_map(vec![("bbox", bbox([-300.0, 10.0, 100.0, 50.0]))]));
    let req = mp_map(vec![
        ("request_id", Mp::from("frame-1")),
        ("camera_id", Mp::from("lane-1")),
        ("frame_id", Mp::from(77u64)),
        ("frame", Mp::Binary(png)),
        ("crops", Mp::Array(crops)),
    ]);
    c.publish(&t.crops, 1, mp_encode(&req)).await;

    let (got, errs) = collect_results(
        &mut c,
        &t.results,
        &t.errors,
        &["frame-1"],
        Duration::from_secs(20),
    )
    .await;
    assert!(errs.is_empty(), "unexpected error reports: {errs:?}");
    let p = &got["frame-1"];
    assert!(is_msgpack_map(p));
    let mut want: Vec<Want> = picks.iter().map(|(l, _)| Want::Label(l.clone())).collect();
    want.push(Want::Error);
    want.push(Want::Error);
    check_result(
        &to_json(p),
        &Expect {
            request_id: "frame-1".into(),
            camera_id: Some("lane-1".into()),
            frame_id: Some(77),
            device_id: "inproc-frame".into(),
            ids: vec![
                "box-0".into(),
                "box-1".into(),
                "box-2".into(),
                "box-3".into(),
                "outside".into(),
                "5".into(),
            ],
            want,
            candidates: DEFAULT_TOP_K,
        },
    );
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_crop_is_an_item_error_and_its_neighbours_still_match() {
    let qs = one_query_per_label(&queries());
    let (_home, agent, port) = start_agent("inproc-badcrop", "").await;
    let t = agent.topics().clone();
    let mut c = TestClient::connect(port, "checkout-bad", &[&t.results, &t.errors]).await;
    let raw = image::load_from_memory(&qs[9].1).unwrap().to_rgb8();
    let req = json!({
        "request_id": "bad-crop",
        "crops": [
            {"image": b64(&qs[6].1)},
            {"id": "junk", "image": b64(b"\xff\xd8 definitely not a JPEG")},
            {"image": b64(&qs[7].1)},
            {"id": "no-source"},
            {"id": "raw", "raw": {"width": raw.width(), "height": raw.height(), "format": "rgb8", "data": b64(raw.as_raw())}},
        ],
    });
    c.publish(&t.crops, 1, serde_json::to_vec(&req).unwrap())
        .await;
    let (got, errs) = collect_results(
        &mut c,
        &t.results,
        &t.errors,
        &["bad-crop"],
        Duration::from_secs(20),
    )
    .await;
    assert!(
        errs.is_empty(),
        "a bad crop must not fail the request: {errs:?}"
    );
    let p = &got["bad-crop"];
    assert!(is_json(p));
    check_result(
        &to_json(p),
        &Expect {
            request_id: "bad-crop".into(),
            camera_id: None,
            frame_id: None,
            device_id: "inproc-badcrop".into(),
            ids: vec![
                "0".into(),
                "junk".into(),
                "2".into(),
                "no-source".into(),
                "raw".into(),
            ],
            want: vec![
                Want::Label(qs[6].0.clone()),
                Want::Error,
                Want::Label(qs[7].0.clone()),
                Want::Error,
                Want::Label(qs[9].0.clone()),
            ],
            candidates: DEFAULT_TOP_K,
        },
    );
    // Failed crops take no slot: the good ones ran in place, in one batch.
    let totals = agent.metrics().totals();
    assert_eq!((totals.batches, totals.batches_in_place), (1, 1));
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_runs_a_requests_crops_at_once_in_one_batch_up_to_max_batch() {
    let qs = one_query_per_label(&queries());
    let (_home, agent, port) = start_agent("inproc-batch", "[pipeline]\nmax_batch = 4\n").await;
    let t = agent.topics().clone();
    let mut c = TestClient::connect(port, "checkout-batch", &[&t.results, &t.errors]).await;
    // One request at a time, so inference is idle when each arrives: its
    // crops leave together at once, split only beyond max_batch.
    for (id, crops, batch) in [("b1", 1, 1), ("b3", 3, 3), ("b4", 4, 4), ("b6", 6, 4)] {
        let images: Vec<&[u8]> = (0..crops).map(|i| qs[i % qs.len()].1.as_slice()).collect();
        c.publish(&t.crops, 1, common::json_request(id, &images))
            .await;
        let (got, errs) = collect_results(
            &mut c,
            &t.results,
            &t.errors,
            &[id],
            Duration::from_secs(20),
        )
        .await;
        assert!(errs.is_empty(), "{id}: {errs:?}");
        let v = to_json(&got[id]);
        assert_eq!(
            u64_of(&v, "batch_size", id),
            batch,
            "{id}: {crops} crops with max_batch 4"
        );
        assert_eq!(arr_of(&v, "items", id).len(), crops, "{id}");
    }
    // Each request's crops got consecutive slots, so every batch (b6 made
    // two) ran from them in place, without a copy.
    let totals = agent.metrics().totals();
    assert_eq!((totals.batches, totals.batches_in_place), (5, 5));
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crops_beyond_the_slots_are_copied_into_the_batch_and_answered_alike() {
    let qs = one_query_per_label(&queries());
    // max_batch 1: 4 slots, so a request of 6 crops gets 4 slots and 2
    // buffers of their own, whose batches are copied.
    let (_home, agent, port) = start_agent("inproc-copy", "[pipeline]\nmax_batch = 1\n").await;
    let t = agent.topics().clone();
    let mut c = TestClient::connect(port, "checkout-copy", &[&t.results, &t.errors]).await;
    let images: Vec<&[u8]> = (0..6).map(|i| qs[i].1.as_slice()).collect();
    c.publish(&t.crops, 1, common::json_request("copy6", &images))
        .await;
    let (got, errs) = collect_results(
        &mut c,
        &t.results,
        &t.errors,
        &["copy6"],
        Duration::from_secs(20),
    )
    .await;
    assert!(errs.is_empty(), "{errs:?}");
    let items = arr_of(&to_json(&got["copy6"]), "items", "copy6").clone();
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["decision"], "match", "crop {i}: {item}");
        assert_eq!(item["label"], qs[i].0.as_str(), "crop {i}: {item}");
    }
    let totals = agent.metrics().totals();
    assert_eq!((totals.batches, totals.batches_in_place), (6, 4));
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_payloads_get_error_reports_and_the_agent_keeps_answering() {
    let qs = one_query_per_label(&queries());
    let (_home, agent, port) = start_agent("inproc-undecodable", "[limits]\nmax_crops = 4\n").await;
    let t = agent.topics().clone();
    let mut c = TestClient::connect(port, "checkout-undec", &[&t.results, &t.errors]).await;

    // Random bytes that are neither JSON nor a MessagePack map.
    use rand::RngCore;
    let mut garbage = vec![0u8; 64];
    rand::thread_rng().fill_bytes(&mut garbage);
    garbage[0] = 0x00;
    c.publish(&t.crops, 1, garbage).await;
    // JSON with a wrong-typed field.
    let wrong =
        json!({"request_id": "bad-type", "top_k": "three", "crops": [{"image": b64(&qs[0].1)}]});
    c.publish(&t.crops, 1, serde_json::to_vec(&wrong).unwrap())
        .await;
    // MessagePack with a wrong-typed field.
    let wrong_mp = mp_map(vec![
        ("request_id", Mp::from("bad-type-mp")),
        ("frame_id", Mp::from("not a number")),
        ("crops", Mp::Array(vec![image_crop(&qs[0].1)])),
    ]);
    c.publish(&t.crops, 1, mp_encode(&wrong_mp)).await;
    // Over limits.max_crops.
    let images: Vec<&[u8]> = qs[..5].iter().map(|(_, b)| b.as_slice()).collect();
    c.publish(&t.crops, 1, common::json_request("too-many", &images))
        .await;

    // Four reports, in any order.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reports: Vec<Vec<u8>> = Vec::new();
    while reports.len() < 4 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (topic, payload, _) = c
            .next(left)
            .await
            .unwrap_or_else(|| panic!("only {} of 4 error reports arrived", reports.len()));
        assert_ne!(
            topic,
            t.results,
            "an undecodable request was answered: {}",
            to_json(&payload)
        );
        if topic == t.errors {
            reports.push(payload);
        }
    }
    let mut by_id: HashMap<Option<String>, Vec<u8>> = HashMap::new();
    for r in reports {
        let id = to_json(&r)["request_id"].as_str().map(str::to_string);
        assert!(
            by_id.insert(id.clone(), r).is_none(),
            "two reports for {id:?}"
        );
    }
    let unreadable = by_id
        .get(&None)
        .expect("a report without request_id for the random bytes");
    check_error_report(&to_json(unreadable), None);
    let p = by_id
        .get(&Some("bad-type".into()))
        .expect("a report for bad-type");
    assert!(is_json(p), "a JSON request's report is JSON");
    check_error_report(&to_json(p), Some("bad-type"));
    let p = by_id
        .get(&Some("bad-type-mp".into()))
        .expect("a report for bad-type-mp");
    assert!(
        is_msgpack_map(p),
        "a MessagePack request's report is MessagePack"
    );
    check_error_report(&to_json(p), Some("bad-type-mp"));
    let p = by_id
        .get(&Some("too-many".into()))
        .expect("a report for too-many");
    check_error_report(&to_json(p), Some("too-many"));

    // Still serving.
    c.publish(
        &t.crops,
        1,
        common::json_request("after-errors", &[&qs[3].1, &qs[11].1]),
    )
    .await;
    let (got, errs) = collect_results(
        &mut c,
        &t.results,
        &t.errors,
        &["after-errors"],
        Duration::from_secs(20),
    )
    .await;
    assert!(errs.is_empty(), "{errs:?}");
    check_result(
        &to_json(&got["after-errors"]),
        &Expect::labels("after-errors", "inproc-undecodable", &[&qs[3].0, &qs[11].0]),
    );
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_every_request_answered_or_reported_with_bounded_memory() {
    // rumqttd delivers at the subscription's QoS (1), not the publisher's
    // (0), so here the flood is held back at the broker rather than
    // dropped: every request is answered or reported either way. Drops of
    // real QoS 0 floods are tested over Mosquitto (tests/reliability.rs).
    let qs = one_query_per_label(&queries());
    let (_home, agent, port) = start_agent(
        "inproc-flood",
        "[pipeline]\nqueue_capacity = 2\nmax_batch = 1\ndecode_workers = 1\n",
    )
    .await;
    let t = agent.topics().clone();
    let mut c = TestClient::connect(port, "flooder", &[&t.results, &t.errors]).await;
    let rss_before = vm_rss_kb();

    const N: usize = 200;
    let ids: Vec<String> = (0..N).map(|i| format!("flood-{i:03}")).collect();
    let truth = |i: usize| -> Vec<usize> { (0..4).map(|k| (i + k) % LABELS).collect() };
    for (i, id) in ids.iter().enumerate() {
        let req = mp_map(vec![
            ("request_id", Mp::from(id.as_str())),
            (
                "crops",
                Mp::Array(truth(i).into_iter().map(|l| image_crop(&qs[l].1)).collect()),
            ),
        ]);
        c.publish(&t.crops, 0, mp_encode(&req)).await;
    }

    let mut answered: HashSet<String> = HashSet::new();
    let mut dropped: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while answered.len() + dropped.len() < N {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((topic, payload, _)) = c.next(left).await else {
            panic!(
                "{} answered + {} reported dropped of {N}: some requests vanished",
                answered.len(),
                dropped.len()
            );
        };
        let v = to_json(&payload);
        if topic == t.results {
            let id = v["request_id"].as_str().expect("request_id").to_string();
            let i = ids
                .iter()
                .position(|x| *x == id)
                .expect("a request we sent");
            let labels: Vec<&str> = truth(i).into_iter().map(|l| qs[l].0.as_str()).collect();
            check_result(&v, &Expect::labels(&id, "inproc-flood", &labels));
            assert!(answered.insert(id.clone()), "{id} answered twice");
            assert!(!dropped.contains(&id), "{id} both dropped and answered");
        } else if topic == t.errors {
            let id = v["request_id"]
                .as_str()
                .expect("a drop report names the request")
                .to_string();
            let reason = check_error_report(&v, Some(&id));
            assert!(
                reason.to_lowercase().contains("drop"),
                "the report says the request was dropped: {reason}"
            );
            assert!(ids.contains(&id), "a request we sent: {id}");
            assert!(dropped.insert(id.clone()), "{id} reported twice");
            assert!(!answered.contains(&id), "{id} both answered and dropped");
        }
    }
    let rss_after = vm_rss_kb();
    assert!(!answered.is_empty(), "some requests must still be answered");
    let totals = agent.metrics().totals();
    assert_eq!(
        totals.dropped,
        dropped.len() as u64,
        "every drop counted is reported"
    );
    let growth_mb = rss_after.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mb < 300,
        "RSS grew by {growth_mb} MB under overload ({rss_before} kB -> {rss_after} kB)"
    );
    eprintln!(
        "overload: {} answered, {} dropped, RSS +{growth_mb} MB",
        answered.len(),
        dropped.len()
    );
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_status_is_online_while_running_and_offline_after_stop() {
    let (_home, agent, port) = start_agent("inproc-status", "").await;
    let t = agent.topics().clone();
    let meta = agent.refdb().meta();
    let boot = agent.boot_id();

    let mut watcher = TestClient::connect(port, "status-watcher", &[&t.status]).await;
    let p = watcher
        .next_on(&t.status, Duration::from_secs(10))
        .await
        .expect("a Status on the status topic");
    let v = to_json(&p);
    assert!(is_msgpack_map(&p), "Status uses bus.encoding (msgpack)");
    assert_eq!(check_status(&v, "online", "inproc-status", FLEET), boot);
    assert_eq!(v["refdb"]["version"].as_u64(), Some(meta.version));
    assert_eq!(v["refdb"]["digest"].as_str(), Some(meta.digest.as_str()));

    // A late subscriber gets it as a retained message.
    let mut late = TestClient::connect(port, "status-late-1", &[&t.status]).await;
    let (topic, p, retained) = late
        .next(Duration::from_secs(10))
        .await
        .expect("the retained Status");
    assert_eq!(topic, t.status);
    assert!(retained, "the Status must be retained");
    assert_eq!(
        check_status(&to_json(&p), "online", "inproc-status", FLEET),
        boot
    );
    drop(late);

    agent.stop().await.expect("clean stop");
    let p = watcher
        .next_on(&t.status, Duration::from_secs(10))
        .await
        .expect("the offline Status on stop");
    assert_eq!(
        check_status(&to_json(&p), "offline", "inproc-status", FLEET),
        boot
    );
    let mut late = TestClient::connect(port, "status-late-2", &[&t.status]).await;
    let (topic, p, retained) = late
        .next(Duration::from_secs(10))
        .await
        .expect("the retained offline Status");
    assert_eq!(topic, t.status);
    assert!(retained, "the offline Status must be retained");
    assert_eq!(
        check_status(&to_json(&p), "offline", "inproc-status", FLEET),
        boot
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_published_every_interval_with_counts_and_latencies() {
    let qs = one_query_per_label(&queries());
    let (_home, agent, port) = start_agent("inproc-metrics", "[metrics]\ninterval_s = 1\n").await;
    let t = agent.topics().clone();
    let mut c = TestClient::connect(port, "metrics-watcher", &[&t.metrics, &t.results]).await;
    let sizes = [1usize, 2, 3];
    for (n, size) in sizes.iter().enumerate() {
        let images: Vec<&[u8]> = qs[..*size].iter().map(|(_, b)| b.as_slice()).collect();
        c.publish(
            &t.crops,
            1,
            common::msgpack_request(&format!("m-{n}"), &images),
        )
        .await;
    }
    let want_requests = sizes.len() as u64;
    let want_crops: u64 = sizes.iter().sum::<usize>() as u64;
    let (mut requests, mut crops, mut results, mut messages) = (0u64, 0u64, 0usize, 0usize);
    let mut saw_latency = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(requests == want_requests && crops == want_crops && saw_latency && results == 3) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((topic, p, _)) = c.next(left).await else {
            panic!(
                "metrics counted {requests}/{want_requests} requests, {crops}/{want_crops} crops, latency seen: {saw_latency}, {results} results, {messages} metrics messages"
            );
        };
        if topic == t.metrics {
            messages += 1;
            assert!(is_msgpack_map(&p), "Metrics uses bus.encoding (msgpack)");
            let v = to_json(&p);
            let (r, k) = check_metrics(&v, "inproc-metrics");
            requests += r;
            crops += k;
            let total = &v["latency_us"]["total"];
            if total["max"].as_u64().unwrap() > 0 {
                saw_latency = true;
                assert!(total["p50"].as_u64().unwrap() > 0);
                assert!(v["latency_us"]["infer"]["max"].as_u64().unwrap() > 0);
            }
            assert!(requests <= want_requests && crops <= want_crops);
        } else if topic == t.results {
            results += 1;
        }
    }
    assert!(agent.metrics().totals().requests >= want_requests);
    agent.stop().await.expect("clean stop");
}
