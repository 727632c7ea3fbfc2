//! The contract's topic names (PROTOCOL.md, "Topics") under the default
//! root `ror`, written out from the document rather than taken from the
//! agent's code, so a test that names a topic checks the agent's topics
//! against the spec. The shared-pool topics, the fleet-wide update topic and
//! wildcard filters are left to the few tests that use them, which write
//! them out where they do.

/// The contract's default topic root.
pub const ROOT: &str = "ror";

/// `ror/{device}/{leaf}`: `device`'s topic for `leaf` (`crops`, `results`,
/// `errors`, `status`, `metrics`, `refdb` or `refdb/ack`).
pub fn topic(device: &str, leaf: &str) -> String {
    format!("{ROOT}/{device}/{leaf}")
}
