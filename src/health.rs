//! Liveness of the agent's long-running parts: the inference thread, the
//! decode workers, the drop reporter and the bus tasks.
//!
//! Each part holds a [`Heartbeat`] for as long as it runs and marks itself
//! [`Heartbeat::busy`] while it works on one piece of work (a message, a
//! batch, an MQTT event). Waiting for work is healthy however long it lasts;
//! being busy on one piece for longer than the stall limit is not, and
//! neither is a part whose heartbeat was dropped (its thread or task ended)
//! before the agent began to stop. [`Health::check`] gives the verdict.
//!
//! This module only observes. The daemon ([`crate::daemon`]) acts on the
//! verdict: it pings systemd's watchdog only while every part is healthy
//! ([`crate::watchdog`]), and exits when a part has died, so that systemd
//! restarts it instead of leaving an agent that reports "online" and serves
//! nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Shared view of every registered part. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    epoch: Instant,
    stall_after: Duration,
    parts: Mutex<Vec<Arc<Part>>>,
    stopping: AtomicBool,
    /// The first part that died (its name and whether it panicked).
    died: watch::Sender<Option<Death>>,
}

struct Part {
    name: String,
    /// Milliseconds since `epoch` + 1 when the current work began; 0: idle.
    busy_since: AtomicU64,
    alive: AtomicBool,
}

/// A part that ended while the agent was not stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    pub part: String,
    pub panicked: bool,
}

/// What [`Health::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// A part has been busy on one piece of work for `busy` (over the limit).
    Stalled {
        part: String,
        busy: Duration,
    },
    /// A part ended before the agent began to stop.
    Dead(Death),
}

impl Health {
    /// `stall_after`: how long a part may stay busy on one piece of work.
    pub fn new(stall_after: Duration) -> Self {
        let (died, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                stall_after,
                parts: Mutex::new(Vec::new()),
                stopping: AtomicBool::new(false),
                died,
            }),
        }
    }

    /// Registers a part; it is alive until the returned heartbeat is dropped.
    pub fn register(&self, name: impl Into<String>) -> Heartbeat {
        let part = Arc::new(Part {
            name: name.into(),
            busy_since: AtomicU64::new(0),
            alive: AtomicBool::new(true),
        });
        self.inner
            .parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(part.clone());
        Heartbeat {
            part,
            health: self.inner.clone(),
        }
    }

    /// From now on, parts that end are stopping, not dying.
    pub fn begin_stop(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }

    pub fn stall_after(&self) -> Duration {
        self.inner.stall_after
    }

    /// The worst of: a dead part, then the longest stalled one, else healthy.
    pub fn check(&self) -> Verdict {
        if let Some(death) = self.inner.died.borrow().clone() {
            return Verdict::Dead(death);
        }
        let now = self.inner.now_ms();
        let parts = self.inner.parts.lock().unwrap_or_else(|p| p.into_inner());
        let mut worst: Option<(&Part, Duration)> = None;
        for part in parts.iter() {
            let since = part.busy_since.load(Ordering::Acquire);
            if since == 0 || !part.alive.load(Ordering::Acquire) {
                continue;
            }
            let busy = Duration::from_millis(now.saturating_sub(since - 1));
            if busy > self.inner.stall_after && worst.is_none_or(|(_, w)| busy > w) {
                worst = Some((part, busy));
            }
        }
        match worst {
            Some((part, busy)) => Verdict::Stalled {
                part: part.name.clone(),
                busy,
            },
            None => Verdict::Healthy,
        }
    }

    /// Resolves when a part dies (at once if one already has).
    pub async fn died(&self) -> Death {
        let mut rx = self.inner.died.subscribe();
        loop {
            if let Some(d) = rx.borrow_and_update().clone() {
                return d;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `inner`, which `self` keeps alive.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Names of the registered parts that are still running.
    pub fn parts(&self) -> Vec<String> {
        let parts = self.inner.parts.lock().unwrap_or_else(|p| p.into_inner());
        parts
            .iter()
            .filter(|p| p.alive.load(Ordering::Acquire))
            .map(|p| p.name.clone())
            .collect()
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// A part's proof of life, held by the thread or task that runs it.
/// Dropping it (the thread returns or unwinds) marks the part ended.
pub struct Heartbeat {
    part: Arc<Part>,
    health: Arc<Inner>,
}

impl Heartbeat {
    /// Marks the part busy until the guard is dropped.
    pub fn busy(&self) -> Busy<'_> {
        let now = self.health.now_ms() + 1;
        self.part.busy_since.store(now, Ordering::Release);
        Busy { beat: self }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.part.alive.store(false, Ordering::Release);
        self.part.busy_since.store(0, Ordering::Release);
        if self.health.stopping.load(Ordering::Acquire) {
            return;
        }
        let death = Death {
            part: self.part.name.clone(),
            panicked: std::thread::panicking(),
        };
        self.health.died.send_if_modified(|d| {
            if d.is_none() {
                *d = Some(death);
                true
            } else {
                false
            }
        });
    }
}

/// Marks its part busy while it lives.
pub struct Busy<'a> {
    beat: &'a Heartbeat,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.beat.part.busy_since.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_for_work_is_healthy_however_long() {
        let health = Health::new(Duration::from_millis(20));
        let _beat = health.register("decode-0");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(health.check(), Verdict::Healthy);
    }

    #[test]
    fn busy_past_the_limit_is_a_stall_and_ends_with_the_work() {
        let health = Health::new(Duration::from_millis(20));
        let beat = health.register("inference");
        let other = health.register("decode-0");
        {
            let _busy = beat.busy();
            let _short = other.busy();
            std::thread::sleep(Duration::from_millis(40));
            match health.check() {
                Verdict::Stalled { part, busy } => {
                    assert_eq!(part, "inference");
                    assert!(busy >= Duration::from_millis(20));
                }
                v => panic!("expected a stall, got {v:?}"),
            }
        }
        assert_eq!(health.check(), Verdict::Healthy);
        drop(other);
    }

    #[test]
    fn a_part_that_ends_before_the_stop_is_dead_and_after_it_is_not() {
        let health = Health::new(Duration::from_secs(1));
        let beat = health.register("decode-1");
        let t = std::thread::spawn(move || {
            let _beat = beat;
            panic!("worker bug");
        });
        assert!(t.join().is_err());
        assert_eq!(
            health.check(),
            Verdict::Dead(Death {
                part: "decode-1".into(),
                panicked: true
            })
        );

        let health = Health::new(Duration::from_secs(1));
        let beat = health.register("inference");
        health.begin_stop();
        drop(beat);
        assert_eq!(health.check(), Verdict::Healthy);
        assert!(health.parts().is_empty());
    }

    #[tokio::test]
    async fn died_resolves_when_a_part_ends() {
        let health = Health::new(Duration::from_secs(1));
        let beat = health.register("bus");
        let h = health.clone();
        let waiter = tokio::spawn(async move { h.died().await });
        tokio::task::yield_now().await;
        drop(beat);
        let death = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("died() resolved")
            .expect("task ran");
        assert_eq!(death.part, "bus");
        assert!(!death.panicked);
    }
}
