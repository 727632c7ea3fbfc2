//! systemd's notification protocol as the daemon speaks it: `READY=1` once
//! it serves, `EXTEND_TIMEOUT_USEC` while it starts (a TensorRT engine build
//! or a broker that is not there yet can take minutes), `STATUS=` lines, and
//! `WATCHDOG=1` pings.
//!
//! Owns reading `WATCHDOG_USEC` / `WATCHDOG_PID` and the message format (via
//! the `sd-notify` crate); it does not decide when the agent is healthy
//! ([`crate::health`]) or when to ping (the daemon's supervision loop). Without
//! `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

/// How often the daemon tells systemd that it is still starting, and by how
/// much it extends the start timeout each time.
pub const EXTEND_EVERY: Duration = Duration::from_secs(10);
pub const EXTEND_BY: Duration = Duration::from_secs(30);

/// Talks to the service manager named by `NOTIFY_SOCKET`, if any.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads the watchdog period from `WATCHDOG_USEC`; when `WATCHDOG_PID` is
    /// set it must name this process (as in `sd_watchdog_enabled(3)`).
    pub fn from_env() -> Self {
        let usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&u| u > 0);
        let for_us = match std::env::var("WATCHDOG_PID") {
            Ok(pid) => pid.trim().parse::<u32>().ok() == Some(std::process::id()),
            Err(_) => true,
        };
        Self {
            watchdog: usec.filter(|_| for_us).map(Duration::from_micros),
        }
    }

    /// The watchdog timeout systemd enforces (`WatchdogSec`), if any.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// How often to ping: half the timeout, as systemd recommends.
    pub fn ping_every(&self) -> Option<Duration> {
        self.watchdog
            .map(|t| (t / 2).max(Duration::from_millis(10)))
    }

    pub fn ready(&self, status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        send(&[NotifyState::Status(status)]);
    }

    /// Asks for `by` more time to start, saying why.
    pub fn extend_start(&self, by: Duration, status: &str) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        send(&[
            NotifyState::ExtendTimeoutUsec(usec),
            NotifyState::Status(status),
        ]);
    }

    pub fn ping(&self) {
        if self.watchdog.is_some() {
            send(&[NotifyState::Watchdog]);
        }
    }

    pub fn stopping(&self) {
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        debug!("cannot notify the service manager: {e}");
    }
}
