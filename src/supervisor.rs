//! Turns the agent's health ([`crate::health`]) into action once it serves:
//! `WATCHDOG=1` pings only while every part is healthy, and an exit when a
//! part has died or has stayed wedged for twice the stall limit.
//!
//! It runs on a thread of its own, not on the async runtime, so that a
//! wedged runtime is noticed too: [`runtime_pulse`] keeps a heartbeat that
//! only a running runtime refreshes. Exiting is deliberate and abrupt (no
//! graceful stop, which a wedged part could block forever): unanswered QoS 1
//! requests stay unacknowledged, so the broker delivers them again after the
//! restart, and the dropped connection makes the broker publish the offline
//! Will, so the agent never reports "online" while serving nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, info};

use crate::health::{Health, Verdict};
use crate::watchdog::Notifier;

/// Exit status after a dead or wedged part (`EX_SOFTWARE`): systemd's
/// `Restart=on-failure` restarts the agent.
pub const EXIT_UNHEALTHY: i32 = 70;

/// How often the async runtime proves it still runs.
const PULSE: Duration = Duration::from_millis(250);

/// Refreshes the "async-runtime" heartbeat while the runtime runs tasks.
pub async fn runtime_pulse(health: Health) {
    let beat = health.register("async-runtime");
    loop {
        // Busy from one tick to the next: a runtime that stops running
        // tasks leaves the mark to age into a stall.
        let _busy = beat.busy();
        tokio::time::sleep(PULSE).await;
    }
}

/// The supervision thread.
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    pub fn spawn(health: Health, notifier: Notifier) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || {
                if let Some(why) = watch(&health, &notifier, &flag) {
                    error!("{why}; exiting so that the service manager restarts the agent");
                    notifier.status(&why);
                    std::process::exit(EXIT_UNHEALTHY);
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops supervising (before a graceful stop, whose parts end on purpose).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pings while healthy; returns why the agent must exit, or None once
/// `stop` is set.
fn watch(health: &Health, notifier: &Notifier, stop: &AtomicBool) -> Option<String> {
    let stall = health.stall_after();
    let ping_every = notifier.ping_every();
    let period = ping_every
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1))
        .min(stall / 2)
        .max(Duration::from_millis(10));
    let mut last_ping: Option<Instant> = None;
    let mut reported_stall = false;
    while !stop.load(Ordering::Acquire) {
        match health.check() {
            Verdict::Healthy => {
                if reported_stall {
                    info!("every part of the agent is healthy again; watchdog pings resumed");
                    notifier.status("serving");
                    reported_stall = false;
                }
                if let Some(every) = ping_every {
                    if last_ping.is_none_or(|t| t.elapsed() >= every) {
                        notifier.ping();
                        last_ping = Some(Instant::now());
                    }
                }
            }
            Verdict::Stalled { part, busy } => {
                if busy >= stall * 2 {
                    return Some(format!(
                        "the agent's {part} has been stuck on one piece of work for {:.1} s",
                        busy.as_secs_f64()
                    ));
                }
                if !reported_stall {
                    reported_stall = true;
                    let text = format!(
                        "the agent's {part} has been stuck on one piece of work for {:.1} s (supervision.stall_timeout_s = {}): watchdog pings stopped",
                        busy.as_secs_f64(),
                        stall.as_secs()
                    );
                    error!("{text}");
                    notifier.status(&text);
                }
            }
            Verdict::Dead(death) => {
                let how = if death.panicked { "panicked" } else { "ended" };
                return Some(format!("the agent's {} {how} unexpectedly", death.part));
            }
        }
        std::thread::sleep(period);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_returns_at_a_death_and_not_while_healthy() {
        let health = Health::new(Duration::from_millis(100));
        let beat = health.register("decode-0");
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let h = &health;
            let watcher = s.spawn(|| watch(h, &Notifier::default(), &stop));
            std::thread::sleep(Duration::from_millis(150));
            drop(beat);
            let why = watcher.join().unwrap().expect("a reason to exit");
            assert!(why.contains("decode-0 ended unexpectedly"), "{why}");
        });
    }

    #[test]
    fn watch_returns_after_twice_the_stall_limit_and_stops_on_request() {
        let health = Health::new(Duration::from_millis(50));
        let beat = health.register("inference");
        let busy = beat.busy();
        let started = Instant::now();
        let why = watch(&health, &Notifier::default(), &AtomicBool::new(false)).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(why.contains("inference has been stuck"), "{why}");
        drop(busy);
        assert_eq!(
            watch(&health, &Notifier::default(), &AtomicBool::new(true)),
            None
        );
    }
}
