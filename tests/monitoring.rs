//! The Prometheus endpoint (`metrics.prometheus_listen`): after real
//! requests over a real Mosquitto, a scrape shows the same counts the agent
//! answered, cumulative stage histograms, the reference DB and health, in
//! the text exposition format; other paths and bad requests get HTTP errors.

mod common;
mod daemon_support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{free_port, json_request, queries, to_json, Mosquitto, TestClient};
use daemon_support::{broker_home, start_connected, REFS};

fn http(port: u16, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

/// `name{labels}` -> value, for every sample line.
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("name value");
            (k.to_string(), v.parse::<f64>().expect("a number"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_what_the_agent_answered() {
    let broker = Mosquitto::start("");
    let port = free_port();
    let dev = "prom-1";
    let home = broker_home(
        dev,
        broker.port,
        "",
        &format!("[metrics]\nprometheus_listen = \"127.0.0.1:{port}\"\n"),
    );
    let agent = start_connected(&home).await;
    let results = format!("ror/{dev}/results");
    let mut client = TestClient::connect(broker.port, "prom-client", &[&results]).await;
    let q = queries();
    for i in 0..3 {
        let crops: Vec<&[u8]> = q.iter().take(i + 1).map(|(_, b)| b.as_slice()).collect();
        client
            .publish(
                &format!("ror/{dev}/crops"),
                1,
                json_request(&format!("p{i}"), &crops),
            )
            .await;
        let r = client
            .next_on(&results, Duration::from_secs(20))
            .await
            .expect("a result");
        assert_eq!(to_json(&r)["request_id"], format!("p{i}"));
    }

    let (head, body) = http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let s = samples(&body);
    assert_eq!(s["retail_agent_requests_total"], 3.0);
    assert_eq!(s["retail_agent_crops_total"], 6.0);
    assert_eq!(s["retail_agent_errors_total"], 0.0);
    assert_eq!(s["retail_agent_refdb_references"], REFS as f64);
    assert_eq!(s["retail_agent_healthy"], 1.0);
    assert!(body.contains(&format!("retail_agent_info{{device_id=\"{dev}\"")));
    assert!(body.contains("# TYPE retail_agent_stage_latency_seconds histogram"));
    for stage in ["queue", "decode", "infer", "search", "total"] {
        let count = s[&format!("retail_agent_stage_latency_seconds_count{{stage=\"{stage}\"}}")];
        assert_eq!(count, 3.0, "{stage}");
        let inf = s[&format!(
            "retail_agent_stage_latency_seconds_bucket{{stage=\"{stage}\",le=\"+Inf\"}}"
        )];
        assert_eq!(inf, count, "{stage}");
        // Cumulative: never decreasing along the bounds.
        let mut last = 0.0;
        for line in body.lines().filter(|l| {
            l.starts_with(&format!(
                "retail_agent_stage_latency_seconds_bucket{{stage=\"{stage}\""
            ))
        }) {
            let v: f64 = line.rsplit_once(' ').unwrap().1.parse().unwrap();
            assert!(v >= last, "{line}");
            last = v;
        }
    }
    let sum = s["retail_agent_stage_latency_seconds_sum{stage=\"total\"}"];
    assert!(sum > 0.0 && sum < 60.0, "{sum}");

    let (head, body) = http(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200") && body.is_empty(),
        "{head}"
    );
    let (head, _) = http(port, "GET /nothing HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http(port, "POST /metrics HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    // Garbage and an endless head are refused without harm.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = s.write_all(&vec![b'x'; 64 * 1024]);
    drop(s);
    let (head, _) = http(port, "GET /metrics HTTP/1.0\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    agent.stop().await.expect("clean stop");
    // Stopped: the endpoint is closed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test]
async fn an_endpoint_that_cannot_listen_fails_the_start_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let home = broker_home(
        "prom-2",
        free_port(),
        "",
        &format!("[metrics]\nprometheus_listen = \"127.0.0.1:{port}\"\n"),
    );
    let err = retail_agent::daemon::Agent::start(home.load())
        .await
        .err()
        .expect("the start fails");
    assert!(
        format!("{err:#}").contains("metrics.prometheus_listen"),
        "{err:#}"
    );
}
