//! Child processes the tests run: a guard that kills (SIGKILL) and reaps a
//! child when dropped, so a failed test leaves no daemon behind, and the
//! text a finished command wrote. Starting the agent binary (its path,
//! arguments, environment and log file) stays with each test: only a test
//! binary of the agent's package knows `CARGO_BIN_EXE_retail-agent`. A
//! graceful stop (SIGTERM and waiting for the exit) is left to the tests
//! that check one.

use std::ops::{Deref, DerefMut};
use std::process::{Child, Output};

/// A child process that is killed and reaped when this guard is dropped
/// (harmless for one that has exited and was waited for); derefs to the
/// [`Child`] (`id`, `try_wait`, …).
#[derive(Debug)]
pub struct KillOnDrop(Child);

impl KillOnDrop {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        Self(child)
    }
}

impl Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a finished command wrote to stdout, as text (invalid UTF-8
/// replaced).
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What a finished command wrote to stderr, as text (invalid UTF-8
/// replaced).
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
