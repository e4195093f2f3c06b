//! Prometheus metrics: one process-wide registry, served as text on `GET /metrics`
//! by `tally run --metrics-addr HOST:PORT`.
//!
//! The committer updates the counters from each committed epoch, so they count what
//! the store holds (a replay after a restart does not count twice). Store health:
//! `tally_store_up` drops to 0 for the length of an outage, `tally_epochs_pending`
//! shows the epochs closed but not committed (reading stops at `ingest::IN_FLIGHT`),
//! and `tally_commit_lag_seconds` how long the oldest of them has waited.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Every metric Tally exports.
pub struct Metrics {
    registry: Registry,
    pub records: Counter,
    pub accepted: Counter,
    pub duplicates: Counter,
    pub dead_letters: Family<ReasonLabel, Counter>,
    pub epochs_committed: Counter,
    pub last_epoch: Gauge,
    pub epochs_pending: Gauge,
    pub commit_lag_seconds: Gauge<f64, AtomicU64>,
    pub commit_seconds: Histogram,
    pub store_commit_seconds: Histogram,
    pub store_up: Gauge,
    pub store_outages: Counter,
    pub store_outage_seconds: Counter<f64, AtomicU64>,
    pub event_time_seconds: Gauge<f64, AtomicU64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            records: Counter::default(),
            accepted: Counter::default(),
            duplicates: Counter::default(),
            dead_letters: Family::default(),
            epochs_committed: Counter::default(),
            last_epoch: Gauge::default(),
            epochs_pending: Gauge::default(),
            commit_lag_seconds: Gauge::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            store_commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            store_up: Gauge::default(),
            store_outages: Counter::default(),
            store_outage_seconds: Counter::default(),
            event_time_seconds: Gauge::default(),
        };
        let mut r = Registry::with_prefix("tally");
        r.register(
            "records",
            "Records read and committed, good and bad",
            m.records.clone(),
        );
        r.register(
            "accepted",
            "Events counted or voided (admitted by the dataflow)",
            m.accepted.clone(),
        );
        r.register(
            "duplicates",
            "Redeliveries dropped silently",
            m.duplicates.clone(),
        );
        r.register(
            "dead_letters",
            "Dead letters by reason code",
            m.dead_letters.clone(),
        );
        r.register(
            "epochs_committed",
            "Epochs committed to the store",
            m.epochs_committed.clone(),
        );
        r.register(
            "last_committed_epoch",
            "The last epoch the store holds",
            m.last_epoch.clone(),
        );
        r.register(
            "epochs_pending",
            "Epochs closed but not yet committed (reading pauses at 4)",
            m.epochs_pending.clone(),
        );
        r.register(
            "commit_lag_seconds",
            "How long the epoch being committed has waited since it closed",
            m.commit_lag_seconds.clone(),
        );
        r.register(
            "commit_seconds",
            "From an epoch's close to its commit",
            m.commit_seconds.clone(),
        );
        r.register(
            "store_commit_seconds",
            "Inside the store's commit (retries in an outage included)",
            m.store_commit_seconds.clone(),
        );
        r.register(
            "store_up",
            "1 while the store takes commits, 0 during an outage",
            m.store_up.clone(),
        );
        r.register(
            "store_outages",
            "Store outages seen by the committer",
            m.store_outages.clone(),
        );
        r.register(
            "store_outage_seconds",
            "Time spent with commits paused by store outages",
            m.store_outage_seconds.clone(),
        );
        r.register(
            "event_time_seconds",
            "The largest event time committed (Unix seconds)",
            m.event_time_seconds.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

/// Serves `GET /metrics` on `addr` from a background thread; returns the bound
/// address (port 0 picks a free one).
pub fn serve(addr: &str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("tally-metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Err(e) = answer(conn) {
                    tracing::debug!(error = %e, "metrics request");
                }
            }
        })?;
    tracing::info!(addr = %bound, "metrics on http://{bound}/metrics");
    Ok(bound)
}

/// One HTTP/1.x request, one answer, connection closed.
fn answer(conn: TcpStream) -> std::io::Result<()> {
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
            get().render(),
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
        get().records.inc_by(7);
        get().store_up.set(1);
        let addr = serve("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("tally_records_total "), "{text}");
        assert!(text.contains("tally_store_up 1"), "{text}");
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET /nope HTTP/1.1\r\n\r\n").unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    }
}
