//! Prometheus metrics: the `metrics` facade, recorded by `metrics-exporter-prometheus`
//! and served as text on `GET /metrics` by `tally run --metrics-addr HOST:PORT`.
//!
//! Names are the constants below. The committer updates the counters from each
//! committed epoch, so they count what the store holds (a replay after a restart
//! does not count twice). Store health: [`STORE_UP`] drops to 0 for the length of an
//! outage (and [`STORE_OUTAGE_SECONDS`] records its length), [`EPOCHS_PENDING`] shows the epochs closed but not committed (reading
//! stops at `ingest::IN_FLIGHT_RECORDS` records or `ingest::IN_FLIGHT_EPOCHS` epochs), and [`COMMIT_LAG`] how long the epoch being
//! committed has waited.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

/// Records read and committed, good and bad (counter).
pub const RECORDS: &str = "tally_records_total";
/// Events counted or voided: admitted by the dataflow (counter).
pub const ACCEPTED: &str = "tally_accepted_total";
/// Redeliveries dropped silently (counter).
pub const DUPLICATES: &str = "tally_duplicates_total";
/// Dead letters, label `reason` (counter).
pub const DEAD_LETTERS: &str = "tally_dead_letters_total";
/// Epochs committed to the store (counter).
pub const EPOCHS_COMMITTED: &str = "tally_epochs_committed_total";
/// The last epoch the store holds (gauge).
pub const LAST_EPOCH: &str = "tally_last_committed_epoch";
/// Epochs closed but not yet committed; reading pauses at 4 (gauge).
pub const EPOCHS_PENDING: &str = "tally_epochs_pending";
/// How long the epoch being committed has waited since it closed, seconds (gauge).
pub const COMMIT_LAG: &str = "tally_commit_lag_seconds";
/// From an epoch's close to its commit, seconds (histogram).
pub const COMMIT_SECONDS: &str = "tally_commit_seconds";
/// Inside the store's commit, retries in an outage included, seconds (histogram).
pub const STORE_COMMIT_SECONDS: &str = "tally_store_commit_seconds";
/// 1 while the store takes commits, 0 during an outage (gauge).
pub const STORE_UP: &str = "tally_store_up";
/// Each store outage's length, seconds, recorded when it ends (histogram: `_count`
/// is the number of outages, `_sum` the time commits were paused).
pub const STORE_OUTAGE_SECONDS: &str = "tally_store_outage_seconds";
/// The largest event time committed, Unix seconds (gauge).
pub const EVENT_TIME: &str = "tally_event_time_seconds";
/// Wall clock minus the largest event time committed, seconds: how far behind live
/// the committed aggregates are (large during a backfill) (gauge).
pub const FRESHNESS: &str = "tally_freshness_seconds";
/// Bytes of a file input not yet committed, label `source` (gauge).
pub const SOURCE_LAG_BYTES: &str = "tally_source_lag_bytes";
/// Records a source handed over, label `source` (counter; read, not yet committed).
pub const SOURCE_RECORDS: &str = "tally_source_records_total";
/// Bytes of those records, label `source` (counter).
pub const SOURCE_BYTES: &str = "tally_source_bytes_total";
/// How far a Kinesis shard's reader is behind the shard's newest record
/// (MillisBehindLatest), seconds, label `source` (gauge).
pub const SOURCE_LAG_SECONDS: &str = "tally_source_lag_seconds";
/// Calls a broker refused for throughput, backed off and retried, label `source`
/// (counter).
pub const SOURCE_THROTTLED: &str = "tally_source_throttled_total";
/// Records a Fluvio partition holds past the next one its reader will read, label
/// `source` (gauge; read from the cluster every 5 s).
pub const SOURCE_LAG_RECORDS: &str = "tally_source_lag_records";
/// Entries held in the dataflow's state, label `stage`: `admit` (event ids within
/// the dedup horizon), `voids` (void-resolution slots), `rows` (open rows) (gauge).
pub const STATE_ENTRIES: &str = "tally_state_entries";
/// Failed store commits, label `kind`: `unavailable` (retried) or `refused` (the
/// run stops) (counter).
pub const STORE_ERRORS: &str = "tally_store_errors_total";
/// gRPC calls of the Tally services, labels `rpc` (the method) and `code` (the gRPC
/// status code name), seconds until the response starts (histogram).
pub const QUERY_SECONDS: &str = "tally_query_seconds";

/// Bytes in the staging log's files: about the horizon's worth of epochs once the
/// oldest files are trimmed (gauge).
pub const STAGING_LOG_BYTES: &str = "tally_staging_log_bytes";

/// Counted events and voids staged to the lake for compaction (counter).
pub const ARCHIVE_STAGED: &str = "tally_archive_staged_facts_total";
/// Failed writes of staged facts to the lake; they are kept and tried again (counter).
pub const ARCHIVE_STAGE_ERRORS: &str = "tally_archive_stage_errors_total";
/// The last epoch whose facts are in the lake (gauge).
pub const ARCHIVE_STAGED_EPOCH: &str = "tally_archive_staged_epoch";
/// Provider-days compacted, label `outcome`: `published`, `unchanged`, `mismatch`
/// (verification failed, the previous version kept) or `failed` (counter).
pub const COMPACTIONS: &str = "tally_compactions_total";
/// Rows written to compacted Parquet event files (counter).
pub const COMPACTED_ROWS: &str = "tally_compacted_rows_total";
/// One provider-day's compaction, seconds (histogram).
pub const COMPACTION_SECONDS: &str = "tally_compaction_seconds";
/// The last provider-local date published for any provider, as the Unix time of its
/// midnight UTC (gauge).
pub const COMPACTED_DATE: &str = "tally_compacted_date_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same handle).
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let latency: Vec<f64> = (0..16).map(|i| 0.0005 * 2f64.powi(i)).collect();
        let outage = [1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0];
        let query: Vec<f64> = (0..16).map(|i| 0.000_05 * 2f64.powi(i)).collect();
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(COMMIT_SECONDS.into()), &latency)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(STORE_COMMIT_SECONDS.into()), &latency)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(STORE_OUTAGE_SECONDS.into()), &outage)
            })
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(QUERY_SECONDS.into()), &query))
            .expect("buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder (a test harness's) may be installed already: keep ours
        // for rendering either way.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(RECORDS, "Records read and committed, good and bad");
    describe_counter!(
        ACCEPTED,
        "Events counted or voided (admitted by the dataflow)"
    );
    describe_counter!(DUPLICATES, "Redeliveries dropped silently");
    describe_counter!(DEAD_LETTERS, "Dead letters by reason code");
    describe_counter!(EPOCHS_COMMITTED, "Epochs committed to the store");
    describe_gauge!(LAST_EPOCH, "The last epoch the store holds");
    describe_gauge!(
        EPOCHS_PENDING,
        "Epochs closed but not yet committed (reading pauses at 4)"
    );
    describe_gauge!(
        COMMIT_LAG,
        Unit::Seconds,
        "How long the epoch being committed has waited since it closed"
    );
    describe_histogram!(
        COMMIT_SECONDS,
        Unit::Seconds,
        "From an epoch's close to its commit"
    );
    describe_histogram!(
        STORE_COMMIT_SECONDS,
        Unit::Seconds,
        "Inside the store's commit (retries in an outage included)"
    );
    describe_gauge!(
        STORE_UP,
        "1 while the store takes commits, 0 during an outage"
    );
    describe_histogram!(
        STORE_OUTAGE_SECONDS,
        Unit::Seconds,
        "Each store outage's length, recorded when it ends"
    );
    describe_gauge!(
        EVENT_TIME,
        Unit::Seconds,
        "The largest event time committed (Unix seconds)"
    );
    describe_gauge!(
        FRESHNESS,
        Unit::Seconds,
        "Wall clock minus the largest event time committed"
    );
    describe_gauge!(
        SOURCE_LAG_BYTES,
        Unit::Bytes,
        "Bytes of a file input not yet committed"
    );
    describe_counter!(
        SOURCE_RECORDS,
        "Records a source handed over (read, not yet committed), by source"
    );
    describe_counter!(
        SOURCE_BYTES,
        Unit::Bytes,
        "Bytes of the records a source handed over, by source"
    );
    describe_gauge!(
        SOURCE_LAG_RECORDS,
        "Records a Fluvio partition holds past its reader's next offset"
    );
    describe_gauge!(
        SOURCE_LAG_SECONDS,
        Unit::Seconds,
        "How far a Kinesis shard's reader is behind its newest record"
    );
    describe_counter!(
        SOURCE_THROTTLED,
        "Broker calls refused for throughput, backed off and retried, by source"
    );
    describe_counter!(
        ARCHIVE_STAGED,
        "Counted events and voids staged to the lake for compaction"
    );
    describe_counter!(
        ARCHIVE_STAGE_ERRORS,
        "Failed writes of staged facts to the lake (kept, tried again)"
    );
    describe_gauge!(
        ARCHIVE_STAGED_EPOCH,
        "The last epoch whose facts are in the lake"
    );
    describe_counter!(
        COMPACTIONS,
        "Provider-days compacted, by outcome: published, unchanged, mismatch, failed"
    );
    describe_counter!(
        COMPACTED_ROWS,
        "Rows written to compacted Parquet event files"
    );
    describe_histogram!(
        COMPACTION_SECONDS,
        Unit::Seconds,
        "One provider-day's compaction"
    );
    describe_gauge!(
        COMPACTED_DATE,
        "The last provider-local date published, Unix time of its midnight UTC"
    );
    describe_gauge!(
        STAGING_LOG_BYTES,
        Unit::Bytes,
        "Bytes in the staging log's files (trimmed of epochs a restart would skip)"
    );
    describe_gauge!(
        STATE_ENTRIES,
        "Entries held in the dataflow's state, by stage (admit, voids, rows)"
    );
    describe_counter!(
        STORE_ERRORS,
        "Failed store commits by kind (unavailable: retried; refused: the run stops)"
    );
    describe_histogram!(
        QUERY_SECONDS,
        Unit::Seconds,
        "gRPC calls by rpc and status code, until the response starts"
    );
}

/// Serves `GET /metrics` on `addr` from a background thread; returns the bound
/// address (port 0 picks a free one).
pub fn serve(addr: &str) -> std::io::Result<SocketAddr> {
    let handle = install();
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("tally-metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(e) = answer(conn, handle) {
                    tracing::debug!(error = %e, "metrics request");
                }
            }
        })?;
    tracing::info!(addr = %bound, "metrics on http://{bound}/metrics");
    Ok(bound)
}

/// One HTTP/1.x request, one answer, connection closed.
fn answer(conn: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.by_ref().take(8192).read_line(&mut request)?;
    // Skip the headers.
    loop {
        let mut line = String::new();
        if reader.by_ref().take(8192).read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let mut w = conn;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_served_over_http() {
        let addr = serve("127.0.0.1:0").unwrap();
        metrics::counter!(RECORDS).increment(7);
        metrics::gauge!(STORE_UP).set(1.0);
        let get = |req: &[u8]| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(req).unwrap();
            let mut text = String::new();
            c.read_to_string(&mut text).unwrap();
            text
        };
        let text = get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("tally_records_total 7"), "{text}");
        assert!(text.contains("tally_store_up 1"), "{text}");
        assert!(get(b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    }
}
