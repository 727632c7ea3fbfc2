//! The process heap: handing memory the program has freed back to the
//! system. glibc keeps freed pages in its per-thread arenas, so resident
//! memory stays at its high-water mark after a large, short-lived use (a
//! reference DB load, a bench section) unless asked. Owns nothing else:
//! measuring memory is the bench's, deciding when to call this is the
//! caller's.

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
