//! The process heap: handing memory the program has freed back to the
//! system. glibc keeps freed pages in its per-thread arenas, so resident
//! memory stays at its high-water mark after a large, short-lived use (a
//! reference DB load, a bench section) unless asked. Owns nothing else:
//! measuring memory is the bench's, deciding when to call this is the
//! caller's.

/// Arenas the daemon lets glibc keep ([`limit_arenas`]).
pub const DAEMON_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at `arenas` unless `MALLOC_ARENA_MAX` is set
/// (the user's choice wins); elsewhere this does nothing. glibc gives
/// threads up to 8 arenas per core, and each keeps its own free memory: the
/// daemon's threads (inference, decode, finisher, async runtime, sled's)
/// then hold freed memory in several places. Call before threads start.
pub fn limit_arenas(arenas: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; it is called
        // before the daemon starts its threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}

/// Returns the allocator's free memory to the system (glibc's
/// `malloc_trim`); elsewhere this does nothing.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it is
    // thread-safe and touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}
