//! The optional Prometheus endpoint (`metrics.prometheus_listen`): `GET
//! /metrics` answers the same counters and stage latencies as the Metrics
//! message, in Prometheus's text exposition format (0.0.4), as lifetime
//! totals and cumulative histograms, plus the agent's identity, its
//! reference DB and its health.
//!
//! Owns the text rendering and a deliberately small HTTP/1.1 responder
//! (GET and HEAD, one request per connection, bounded reads and a timeout):
//! a scrape endpoint needs nothing more, and no HTTP stack is otherwise in
//! the agent. It does not collect anything: [`crate::metrics`] does.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::health::{Health, Verdict};
use crate::metrics::{Metrics, Stage, BUCKET_BOUNDS_US};
use crate::refdb::RefDb;

/// Largest request head read from a scraper.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Longest a scraper may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoint reports besides the metrics themselves.
pub struct Exported {
    pub metrics: Arc<Metrics>,
    pub refdb: Arc<RefDb>,
    pub health: Health,
    pub device_id: String,
    pub model_id: String,
    pub fingerprint: String,
    pub provider: String,
}

/// Renders every metric in the text exposition format.
pub fn render(e: &Exported) -> String {
    let mut out = String::with_capacity(4096);
    let labels = format!(
        "device_id=\"{}\",model=\"{}\",fingerprint=\"{}\",provider=\"{}\",version=\"{}\"",
        escape(&e.device_id),
        escape(&e.model_id),
        escape(&e.fingerprint),
        escape(&e.provider),
        env!("CARGO_PKG_VERSION")
    );
    header(
        &mut out,
        "retail_agent_info",
        "gauge",
        "The agent's identity (always 1).",
    );
    let _ = writeln!(out, "retail_agent_info{{{labels}}} 1");

    let t = e.metrics.totals();
    for (name, help, value) in [
        (
            "retail_agent_requests_total",
            "Crop requests accepted.",
            t.requests,
        ),
        (
            "retail_agent_crops_total",
            "Crops in accepted requests.",
            t.crops,
        ),
        (
            "retail_agent_errors_total",
            "Requests and crops that failed, and messages refused.",
            t.errors,
        ),
        (
            "retail_agent_dropped_total",
            "Requests dropped for room (each also reported on the errors topic).",
            t.dropped,
        ),
        (
            "retail_agent_batches_total",
            "Inference batches run.",
            t.batches,
        ),
        (
            "retail_agent_batched_crops_total",
            "Crops run in inference batches.",
            t.batched_crops,
        ),
        (
            "retail_agent_batches_in_place_total",
            "Inference batches run straight from the decode workers' slots, without a copy.",
            t.batches_in_place,
        ),
        (
            "retail_agent_read_holds_total",
            "Times the agent stopped reading from the broker while its queue was full of held QoS 1 requests (flow control).",
            t.read_holds,
        ),
        (
            "retail_agent_read_hold_milliseconds_total",
            "Time spent not reading from the broker for flow control.",
            t.read_hold_ms,
        ),
    ] {
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    header(
        &mut out,
        "retail_agent_queue_depth",
        "gauge",
        "Requests waiting in the ingest queue.",
    );
    let _ = writeln!(out, "retail_agent_queue_depth {}", e.metrics.queue_depth());

    let name = "retail_agent_stage_latency_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "Latency of each stage of a request (total: from receipt to the result).",
    );
    for stage in Stage::ALL {
        let b = e.metrics.lifetime(stage);
        let mut cumulative = 0u64;
        for (bound, count) in BUCKET_BOUNDS_US.iter().zip(&b.counts) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{stage=\"{}\",le=\"{}\"}} {cumulative}",
                stage.name(),
                *bound as f64 / 1e6
            );
        }
        let count = b.count();
        let _ = writeln!(
            out,
            "{name}_bucket{{stage=\"{}\",le=\"+Inf\"}} {count}",
            stage.name()
        );
        let _ = writeln!(
            out,
            "{name}_sum{{stage=\"{}\"}} {}",
            stage.name(),
            b.sum_us as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{stage=\"{}\"}} {count}", stage.name());
    }

    let meta = e.refdb.meta();
    for (name, help, value) in [
        (
            "retail_agent_refdb_version",
            "Version of the reference DB.",
            meta.version,
        ),
        (
            "retail_agent_refdb_references",
            "References in the DB.",
            meta.refs,
        ),
        (
            "retail_agent_refdb_labels",
            "Labels in the DB.",
            meta.labels,
        ),
    ] {
        header(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    header(
        &mut out,
        "retail_agent_healthy",
        "gauge",
        "1 while every thread and task of the agent is alive and none is stuck.",
    );
    let healthy = matches!(e.health.check(), Verdict::Healthy);
    let _ = writeln!(out, "retail_agent_healthy {}", u8::from(healthy));
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Binds `addr`; the error names the config key.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.prometheus_listen: cannot listen on {addr}: {e}"))
}

/// Serves scrapes until `stopping` turns true.
pub async fn serve(
    listener: TcpListener,
    exported: Arc<Exported>,
    mut stopping: watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "Prometheus endpoint listening (GET /metrics)");
    }
    loop {
        tokio::select! {
            () = stopped(&mut stopping) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let exported = exported.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &exported).await {
                            debug!(%peer, "Prometheus scrape failed: {e}");
                        }
                    });
                }
                Err(e) => {
                    warn!("Prometheus endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Resolves once `stopping` is true (or its sender is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await.map(|_| ());
}

async fn answer(mut stream: TcpStream, exported: &Exported) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(exported),
        ),
        ("GET" | "HEAD", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "retail-agent: metrics at /metrics\n".to_string(),
        ),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n".into(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line that ends a request head.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
