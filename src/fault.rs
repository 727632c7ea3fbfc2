//! Fault injection for the supervision tests, compiled only with the cargo
//! feature `fault-injection` (the test suite's build; never a release or a
//! package). A request whose `request_id` is `fault:<what>-<where>` makes
//! the part that handles it misbehave:
//!
//! - `fault:panic-decode`, `fault:panic-inference`: a panic while handling
//!   that one message or batch (caught: only that request fails);
//! - `fault:die-decode`, `fault:die-inference`: a panic outside the
//!   per-message guard, which ends the thread;
//! - `fault:wedge-decode`, `fault:wedge-inference`, `fault:wedge-bus`: the
//!   part blocks forever while busy.
//!
//! Without the feature [`inject`] is an empty inline function.

/// Where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Decode,
    Inference,
    Bus,
}

/// Whether the fault fires inside the part's per-message guard (a panic there
/// fails the message) or outside it (a panic there ends the thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Guarded,
    Unguarded,
}

#[cfg(feature = "fault-injection")]
pub fn inject(site: Site, scope: Scope, request_id: &str) {
    let Some(fault) = request_id.strip_prefix("fault:") else {
        return;
    };
    let (what, place) = fault.split_once('-').unwrap_or((fault, ""));
    let here = match site {
        Site::Decode => "decode",
        Site::Inference => "inference",
        Site::Bus => "bus",
    };
    if place != here {
        return;
    }
    match (what, scope) {
        ("panic", Scope::Guarded) => panic!("injected fault: {request_id}"),
        ("die", Scope::Unguarded) => panic!("injected fault: {request_id}"),
        ("wedge", Scope::Guarded) => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        _ => {}
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn inject(_site: Site, _scope: Scope, _request_id: &str) {}

/// Whether fault injection is compiled in (for the tests to check).
pub const ENABLED: bool = cfg!(feature = "fault-injection");
