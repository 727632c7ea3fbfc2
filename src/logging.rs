//! Logging set-up shared by every command: a `tracing` subscriber on stderr,
//! plain or JSON (for journald and log shippers), filtered by the config or
//! `RUST_LOG`.

/// Starts logging to stderr; later calls do nothing.
pub fn init(filter: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
