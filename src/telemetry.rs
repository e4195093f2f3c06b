//! Logging: `tracing` to stderr, filtered by `TALLY_LOG` (default `info`), in human
//! form or as JSON (`TALLY_LOG_FORMAT=json`).

pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = builder.try_init();
}
