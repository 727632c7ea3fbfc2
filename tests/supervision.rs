//! Supervision under systemd, seen from a fake `NOTIFY_SOCKET`: `READY=1`
//! only once the broker has acknowledged the subscriptions (the start
//! timeout extended while waiting), `WATCHDOG=1` pings while the agent is
//! healthy, and none once the inference thread, a decode worker or the bus
//! task is wedged; a part that dies takes the process down (so systemd
//! restarts it) and the broker publishes the offline Will; a panic while
//! handling one message fails only that message.
//!
//! Runs the real binary over a real Mosquitto. Faults are injected with
//! crafted request_ids, which only a build with the `fault-injection`
//! feature understands (scripts/test.sh builds the suite with it).

mod common;
mod daemon_support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{json_request, queries, to_json, AgentHome, Mosquitto, TestClient};
use daemon_support::broker_home;
use retail_testkit::{process::KillOnDrop, topics::topic};

/// Collects what the agent sends to its notification socket, with arrival times.
struct FakeSystemd {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl FakeSystemd {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        for line in text.lines() {
                            sink.lock()
                                .unwrap()
                                .push((Instant::now(), line.to_string()));
                        }
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        if Arc::strong_count(&sink) == 1 {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Self {
            _dir: dir,
            path,
            got,
        }
    }

    /// Times of the lines that start with `prefix`.
    fn times(&self, prefix: &str) -> Vec<Instant> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| l.starts_with(prefix))
            .map(|(t, _)| *t)
            .collect()
    }

    fn lines(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    fn wait_for(&self, prefix: &str, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(t) = self.times(prefix).first() {
                return Some(*t);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// The agent binary under a fake systemd with a 1 s watchdog; killed on
/// drop.
struct Agent {
    child: KillOnDrop,
}

impl Agent {
    fn spawn(home: &AgentHome, systemd: &FakeSystemd) -> Self {
        let log = std::fs::File::create(home.path().join("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_retail-agent"))
            .args(["run", "-c"])
            .arg(&home.config_path)
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", &systemd.path)
            .env("WATCHDOG_USEC", "1000000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self {
            child: KillOnDrop::new(child),
        }
    }

    /// The exit status, if the process ends within `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn log(home: &AgentHome) -> String {
    std::fs::read_to_string(home.path().join("agent.log")).unwrap_or_default()
}

/// A home whose parts count as wedged after 1 s.
fn supervised_home(device: &str, port: u16) -> AgentHome {
    broker_home(device, port, "", "[supervision]\nstall_timeout_s = 1\n")
}

fn image() -> Vec<u8> {
    queries().swap_remove(0).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_comes_only_after_the_broker_acknowledges_the_subscriptions() {
    let mut broker = Mosquitto::start("");
    broker.stop();
    let dev = "sup-ready";
    let home = supervised_home(dev, broker.port);
    let systemd = FakeSystemd::new();
    let _agent = Agent::spawn(&home, &systemd);

    // No broker: the agent keeps asking for more start time, never READY.
    let waiting = systemd.wait_for("STATUS=waiting for the broker", Duration::from_secs(30));
    assert!(waiting.is_some(), "{:?}\n{}", systemd.lines(), log(&home));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        systemd.times("READY=1").is_empty(),
        "READY without a broker"
    );
    let extends = systemd.times("EXTEND_TIMEOUT_USEC=");
    assert!(extends.len() >= 2, "{:?}", systemd.lines());

    broker.start_again();
    let mut client =
        TestClient::connect(broker.port, "sup-ready-client", &[&topic(dev, "results")]).await;
    let ready = systemd.wait_for("READY=1", Duration::from_secs(30));
    assert!(
        ready.is_some(),
        "no READY=1: {:?}\n{}",
        systemd.lines(),
        log(&home)
    );
    // READY means subscribed: a QoS 0 request sent at once is not lost.
    client
        .publish(
            &topic(dev, "crops"),
            0,
            json_request("right-after-ready", &[&image()]),
        )
        .await;
    let result = client
        .next_on(&topic(dev, "results"), Duration::from_secs(20))
        .await
        .expect("the request sent right after READY is answered");
    assert_eq!(to_json(&result)["request_id"], "right-after-ready");

    // Healthy: pings every half second (WATCHDOG_USEC = 1 s).
    let since = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pings = systemd
        .times("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t >= since)
        .count();
    assert!(pings >= 4, "{pings} pings in 3 s");
}

/// Wedges one part with a crafted request and checks that the pings stop
/// within the stall limit and that the agent then exits, publishing its
/// offline Will through the broker.
async fn wedged_part_stops_the_pings(part: &str, expect_exit: bool) {
    let broker = Mosquitto::start("");
    let dev = format!("sup-wedge-{part}");
    let home = supervised_home(&dev, broker.port);
    let systemd = FakeSystemd::new();
    let mut agent = Agent::spawn(&home, &systemd);
    assert!(
        systemd
            .wait_for("READY=1", Duration::from_secs(60))
            .is_some(),
        "no READY=1: {}",
        log(&home)
    );
    let mut client = TestClient::connect(
        broker.port,
        &format!("{dev}-client"),
        &[&topic(&dev, "status")],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !systemd.times("WATCHDOG=1").is_empty(),
        "no pings while healthy"
    );

    let wedged_at = Instant::now();
    client
        .publish(
            &topic(&dev, "crops"),
            1,
            json_request(&format!("fault:wedge-{part}"), &[&image()]),
        )
        .await;
    // stall_timeout_s = 1: the pings stop within about a second (plus one
    // supervision period and scheduling slack); none may follow.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let late: Vec<Duration> = systemd
        .times("WATCHDOG=1")
        .into_iter()
        .filter(|t| *t > wedged_at + Duration::from_millis(1700))
        .map(|t| t - wedged_at)
        .collect();
    assert!(
        late.is_empty(),
        "pings went on after the {part} wedged: {late:?}"
    );
    if expect_exit {
        let status = agent.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| {
            panic!(
                "the agent with a wedged {part} did not exit: {}",
                log(&home)
            )
        });
        assert_eq!(
            status.code(),
            Some(retail_agent::supervisor::EXIT_UNHEALTHY),
            "{}",
            log(&home)
        );
        let text = log(&home);
        assert!(text.contains("stuck on one piece of work"), "{text}");
        // The broker saw the connection drop and published the Will.
        let mut offline = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !offline && Instant::now() < deadline {
            if let Some(p) = client
                .next_on(&topic(&dev, "status"), Duration::from_secs(1))
                .await
            {
                offline = to_json(&p)["state"] == "offline";
            }
        }
        assert!(offline, "no offline status after the exit");
    } else {
        // Systemd's watchdog would kill it now; the test does.
        assert!(agent.child.try_wait().unwrap().is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_inference_thread_stops_the_pings_and_the_agent_exits() {
    wedged_part_stops_the_pings("inference", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_decode_worker_stops_the_pings_and_the_agent_exits() {
    wedged_part_stops_the_pings("decode", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_bus_task_stops_the_pings_and_the_agent_exits() {
    wedged_part_stops_the_pings("bus", true).await;
}

/// A part that dies takes the process down with a clear log line.
async fn dead_part_takes_the_agent_down(part: &str, thread: &str) {
    let broker = Mosquitto::start("");
    let dev = format!("sup-die-{part}");
    let home = supervised_home(&dev, broker.port);
    let systemd = FakeSystemd::new();
    let mut agent = Agent::spawn(&home, &systemd);
    assert!(systemd
        .wait_for("READY=1", Duration::from_secs(60))
        .is_some());
    let client = TestClient::connect(broker.port, &format!("{dev}-client"), &[]).await;
    client
        .publish(
            &topic(&dev, "crops"),
            1,
            json_request(&format!("fault:die-{part}"), &[&image()]),
        )
        .await;
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the agent whose {part} died did not exit: {}", log(&home)));
    assert_eq!(
        status.code(),
        Some(retail_agent::supervisor::EXIT_UNHEALTHY)
    );
    let text = log(&home);
    assert!(
        text.contains(&format!("{thread} panicked unexpectedly")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_decode_worker_takes_the_process_down() {
    dead_part_takes_the_agent_down("decode", "decode-0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_inference_thread_takes_the_process_down() {
    dead_part_takes_the_agent_down("inference", "inference").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_one_message_fails_that_message_and_the_agent_serves_on() {
    let broker = Mosquitto::start("");
    let dev = "sup-panic";
    let home = supervised_home(dev, broker.port);
    let systemd = FakeSystemd::new();
    let mut agent = Agent::spawn(&home, &systemd);
    assert!(systemd
        .wait_for("READY=1", Duration::from_secs(60))
        .is_some());
    let mut client = TestClient::connect(
        broker.port,
        "sup-panic-client",
        &[&topic(dev, "results"), &topic(dev, "errors")],
    )
    .await;
    let img = image();
    for (i, part) in ["decode", "inference"].iter().enumerate() {
        let bad = format!("fault:panic-{part}");
        client
            .publish(&topic(dev, "crops"), 1, json_request(&bad, &[&img]))
            .await;
        let good = format!("after-panic-{i}");
        client
            .publish(&topic(dev, "crops"), 1, json_request(&good, &[&img]))
            .await;
        let (mut bad_seen, mut good_seen) = (false, false);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(bad_seen && good_seen) && Instant::now() < deadline {
            let Some((t, payload, _)) = client.next(Duration::from_secs(1)).await else {
                continue;
            };
            let v = to_json(&payload);
            if v["request_id"] == bad.as_str() {
                bad_seen = true;
                let why = if t == topic(dev, "errors") {
                    v["reason"].as_str().unwrap_or_default().to_string()
                } else {
                    v["items"][0]["error"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                };
                assert!(why.contains("internal error"), "{part}: {v}");
            } else if v["request_id"] == good.as_str() {
                assert_eq!(t, topic(dev, "results"));
                assert!(v["items"][0]["error"].is_null(), "{v}");
                good_seen = true;
            }
        }
        assert!(
            bad_seen && good_seen,
            "{part}: bad {bad_seen} good {good_seen}: {}",
            log(&home)
        );
    }
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited"
    );
    let since = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        systemd.times("WATCHDOG=1").iter().any(|t| *t > since),
        "pings stopped after a caught panic"
    );
}

#[test]
fn the_packaged_unit_asks_for_a_watchdog_that_the_agent_pings_in_time() {
    let unit = std::fs::read_to_string(common::repo_path("systemd/retail-agent.service")).unwrap();
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .map(str::to_string)
    };
    assert_eq!(value("Type").as_deref(), Some("notify"));
    let watchdog = value("WatchdogSec").expect("WatchdogSec in the unit");
    let secs: u64 = watchdog
        .trim_end_matches('s')
        .parse()
        .expect("WatchdogSec in seconds");
    // The agent stops pinging after supervision.stall_timeout_s (default
    // 30 s) and exits after twice that; systemd's watchdog must not fire
    // first on a healthy agent, which pings every WatchdogSec/2.
    assert!(secs >= 10, "WatchdogSec={secs}");
}
