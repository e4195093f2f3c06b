//! Tally: exact, windowed sales aggregates from a stream of events, committed exactly once.
//!
//! ```text
//! source (files | stdin | Kinesis | Fluvio)  source::*  positions: (source, offset), checkpoints
//!   -> decode + validate            decode         bad records -> dead letters (reason)
//!   -> epochs, watermark            ingest         cut by time and size; backpressure
//!   -> timely dataflow, N workers   dataflow       dedup -> voids -> windows -> rows
//!      (one process or a cluster)                  (dataflow::cluster: timely networking)
//!   -> committer                    ingest         staging log + dead letters + one
//!                                                  atomic store commit per epoch
//!   -> store (embedded | Redis)     store          rows, positions, counters; export
//! store -> gRPC API                 query          keys, tenants, Watch, Publish
//! ```
//!
//! Modules:
//! - [`model`]: events, money, event time, positions, windows (no I/O).
//! - [`decode`]: bytes to an event or a dead-letter reason (EVENTS.md).
//! - [`pipeline`]: pipeline files (views, lateness, horizon, epochs, time zones).
//! - [`source`]: JSON Lines files, directories, stdin, Kinesis streams, Fluvio topics; the
//!   event generator.
//! - [`ingest`]: the run loop: reading, epochs, the committer, restart.
//! - [`dataflow`]: the timely dataflow (the only user of timely and differential), in
//!   one process or a cluster of processes.
//! - [`store`]: the store interface, the embedded and Redis stores, the export format, the
//!   comparison and swap of a backfill's shadow store (`tally replay`).
//! - [`query`]: the gRPC API (Query, Ingest, Admin, health, reflection), API keys.
//! - [`metrics`]: Prometheus metrics and their HTTP endpoint.
//! - [`archive`]: the staging log of dataflow input, replayed after a restart; the
//!   Parquet lake (staged facts, compaction of closed days, verified against the store).
//! - [`telemetry`]: logging set-up.
//! - [`cli`]: the `tally` commands.

/// mimalloc for every binary built on the library (the `tally` command and the
/// benchmarks): the dataflow frees and reallocates large per-epoch buffers, which
/// glibc hands back to the kernel and faults in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The cores this process may use (1 when that cannot be told): the default number of
/// dataflow workers, and of threads compacting a day's providers.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Tunes the allocator; call first thing in `main`. Freed pages are kept for a second
/// before being handed back: with mimalloc v2's default 10 ms the kernel zeroed the same
/// pages again and again (measured: a third of the ingest thread's time). The mimalloc
/// built here (v3) has 1 s as its default already; this pins it.
pub fn tune_allocator() {
    /// `mi_option_purge_delay` in mimalloc.h (v2 and v3).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a process-wide integer option; called before other threads exist.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
}

/// Makes ring rustls's process-wide crypto provider (every TLS of ours: Redis, the
/// gRPC server and client). Needed since the AWS SDK's HTTPS client also compiles in
/// aws-lc-rs: with two providers rustls cannot pick one by itself. Idempotent.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub mod archive;
pub mod cli;
pub mod dataflow;
pub mod decode;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod query;
pub mod source;
pub mod store;
pub mod telemetry;
