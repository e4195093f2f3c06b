//! Staging for compaction: the dataflow's changes to the counted set ([`Fact`]s) of
//! every committed epoch, written to the lake as small Parquet files, one per
//! provider-local date and flush: `staging/date=YYYY-MM-DD/e<first>-<last>.parquet`.
//!
//! The committer buffers the facts of committed epochs and flushes them every
//! `archive.flush_interval` (or 200,000 facts, as soon as a buffered provider-day has
//! closed so it is compacted while the store holds its rows, and at shutdown), then
//! records the last epoch flushed in `staging/_progress.json`. Facts never flushed (a crash) are not
//! lost: the restart replays the staging log from the epoch after that one (see
//! `ingest`), the dataflow tells the same facts again, and they are flushed then.
//! Facts are applied as sets by compaction, so a fact flushed twice changes nothing.
//!
//! A fact's date is its provider's local date of the event it changes: a counted
//! event's own time, a void's target's time.

use super::columns::{self, Row};
use super::lake::{Lake, LakeError};
use crate::dataflow::{Epoch, Fact};
use crate::model::Millis;
use crate::pipeline::Pipeline;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

/// The object naming the last epoch flushed.
pub const PROGRESS: &str = "staging/_progress.json";
/// Flush once this many facts are buffered, whatever the interval.
const MAX_BUFFERED: usize = 200_000;

/// The provider-local date of `ts`: `YYYY-MM-DD`.
pub fn local_date(p: &Pipeline, provider: &str, ts: Millis) -> String {
    let tz = p.time_zone(provider);
    chrono::DateTime::from_timestamp_millis(ts)
        .expect("decoded times are representable")
        .with_timezone(&tz)
        .date_naive()
        .to_string()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Progress {
    epoch: Epoch,
}

/// The last epoch whose facts the lake holds (0: none).
pub fn staged_epoch(lake: &Lake) -> Result<Epoch, LakeError> {
    match lake.get(PROGRESS)? {
        None => Ok(0),
        Some(b) => serde_json::from_slice::<Progress>(&b)
            .map(|p| p.epoch)
            .map_err(|e| LakeError {
                lake: lake.name().to_owned(),
                what: PROGRESS.into(),
                reason: e.to_string(),
            }),
    }
}

pub struct Stager {
    lake: Lake,
    pipeline: Arc<Pipeline>,
    /// Date -> rows, in the order told.
    buf: BTreeMap<String, Vec<Row>>,
    buffered: usize,
    first: Option<Epoch>,
    last: Epoch,
    staged: Epoch,
    since: Instant,
    /// When each buffered (date, provider) closes (day end plus lateness), and the
    /// earliest of them: a day that closes is flushed at once, for its compaction.
    closes: std::collections::HashMap<(String, String), Millis>,
    first_close: Millis,
}

impl Stager {
    pub fn open(lake: Lake, pipeline: Arc<Pipeline>) -> Result<Stager, LakeError> {
        let staged = staged_epoch(&lake)?;
        metrics::gauge!(crate::metrics::ARCHIVE_STAGED_EPOCH).set(staged as f64);
        Ok(Stager {
            lake,
            pipeline,
            buf: BTreeMap::new(),
            buffered: 0,
            first: None,
            last: staged,
            staged,
            since: Instant::now(),
            closes: Default::default(),
            first_close: Millis::MAX,
        })
    }

    /// The last epoch whose facts are in the lake (replay must reach past it).
    pub fn staged(&self) -> Epoch {
        self.staged
    }

    /// Takes an epoch's facts (an epoch already in the lake is ignored); `names`
    /// names the sources by index.
    pub fn add(&mut self, epoch: Epoch, facts: Vec<Fact>, names: &[String]) {
        if epoch <= self.staged {
            return;
        }
        self.first.get_or_insert(epoch);
        self.last = self.last.max(epoch);
        let name = |i: u32| names.get(i as usize).cloned().unwrap_or_default();
        for f in facts {
            let (row, day_ts) = match f {
                Fact::Counted { event, pos } => {
                    let ts = event.ts;
                    (
                        Row {
                            tag: "counted",
                            event,
                            source: name(pos.source),
                            offset: pos.offset,
                            target_ts: None,
                        },
                        ts,
                    )
                }
                Fact::Voided {
                    void,
                    pos,
                    target_ts,
                } => (
                    Row {
                        tag: "voided",
                        event: void,
                        source: name(pos.source),
                        offset: pos.offset,
                        target_ts: Some(target_ts),
                    },
                    target_ts,
                ),
            };
            let date = local_date(&self.pipeline, &row.event.provider_id, day_ts);
            let key = (date, row.event.provider_id.to_string());
            if !self.closes.contains_key(&key) {
                let day = super::compact::parse_date(&key.0).expect("a formatted date");
                let close = super::compact::day_bounds(&self.pipeline, &key.1, day)
                    .1
                    .saturating_add(self.pipeline.allowed_lateness.as_millis() as Millis);
                self.first_close = self.first_close.min(close);
                self.closes.insert(key.clone(), close);
            }
            self.buf.entry(key.0).or_default().push(row);
            self.buffered += 1;
        }
    }

    /// Whether a flush is due: the interval has passed, the buffer is full, or a
    /// buffered day has closed by `clock` (so it can be compacted while the store
    /// still holds all its rows).
    pub fn due(&self, clock: Millis) -> bool {
        self.first.is_some()
            && (self.buffered >= MAX_BUFFERED
                || self.first_close <= clock
                || self.since.elapsed() >= self.pipeline.archive.flush_interval)
    }

    /// Writes what is buffered to the lake, then the progress; returns the dates
    /// written, with their providers. On failure everything stays buffered for the
    /// next try (a file written twice is the same file).
    pub fn flush(&mut self) -> Result<BTreeMap<String, BTreeSet<String>>, LakeError> {
        let Some(first) = self.first else {
            return Ok(BTreeMap::new());
        };
        self.since = Instant::now();
        for (date, rows) in &self.buf {
            let batch = columns::to_batch(columns::STAGING, rows);
            let bytes =
                columns::write_parquet(&[batch], columns::props(1, 1 << 20)).map_err(|e| {
                    LakeError {
                        lake: self.lake.name().to_owned(),
                        what: format!("staging for {date}"),
                        reason: e.to_string(),
                    }
                })?;
            let path = format!("staging/date={date}/e{first:012}-{:012}.parquet", self.last);
            self.lake.put(&path, bytes).inspect_err(|_| {
                metrics::counter!(crate::metrics::ARCHIVE_STAGE_ERRORS).increment(1);
            })?;
        }
        let progress = serde_json::to_vec(&Progress { epoch: self.last }).expect("json");
        self.lake.put(PROGRESS, progress).inspect_err(|_| {
            metrics::counter!(crate::metrics::ARCHIVE_STAGE_ERRORS).increment(1);
        })?;
        metrics::counter!(crate::metrics::ARCHIVE_STAGED).increment(self.buffered as u64);
        metrics::gauge!(crate::metrics::ARCHIVE_STAGED_EPOCH).set(self.last as f64);
        self.staged = self.last;
        let written = std::mem::take(&mut self.buf)
            .into_iter()
            .map(|(date, rows)| {
                let provs = rows
                    .iter()
                    .map(|r| r.event.provider_id.to_string())
                    .collect();
                (date, provs)
            })
            .collect();
        self.buffered = 0;
        self.first = None;
        self.closes.clear();
        self.first_close = Millis::MAX;
        Ok(written)
    }

    pub fn lake(&self) -> &Lake {
        &self.lake
    }
}
