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

use super::columns;
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
/// Facts per record batch when a flush writes them.
const BATCH_ROWS: usize = 16 * 1024;

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

/// A buffered fact: a counted event or a void, with where it was read (`source`
/// indexes the names given to [`Stager::add`]).
struct Staged {
    tag: &'static str,
    event: crate::model::Event,
    source: u32,
    offset: u64,
    target_ts: Option<Millis>,
}

/// One provider-local day a provider's facts fell in lately.
struct Day {
    /// Its instants, [start, end).
    start: Millis,
    end: Millis,
    date: String,
    /// Its end plus the allowed lateness.
    close: Millis,
    /// Facts of this provider and day are buffered.
    buffered: bool,
}

type Days = std::collections::HashMap<compact_str::CompactString, Vec<Day>, ahash::RandomState>;

/// Emptied date buffers kept for reuse: a flush mostly holds one or two dates.
const SPARE_KEPT: usize = 2;

/// Days remembered per provider: facts mostly fall in the last one or two.
const DAYS_KEPT: usize = 4;

pub struct Stager {
    lake: Lake,
    pipeline: Arc<Pipeline>,
    /// Date -> facts, in the order told.
    buf: BTreeMap<String, Vec<Staged>>,
    /// Emptied buffers of flushed dates, reused: a buffer holds up to 200,000 facts,
    /// and growing a new one from empty at every flush faulted in fresh pages for each
    /// doubling (a sixth of a run's page zeroing).
    spare: Vec<Vec<Staged>>,
    /// The sources' names, by index, as last told.
    names: Vec<String>,
    buffered: usize,
    first: Option<Epoch>,
    last: Epoch,
    staged: Epoch,
    since: Instant,
    /// By provider, the local days its facts fell in lately (so a fact's date is found
    /// without formatting one), newest last.
    days: Days,
    /// The earliest close of a buffered (provider, day): a day that closes is flushed
    /// at once, for its compaction.
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
            spare: Vec::new(),
            names: Vec::new(),
            buffered: 0,
            first: None,
            last: staged,
            staged,
            since: Instant::now(),
            days: Default::default(),
            first_close: Millis::MAX,
        })
    }

    /// The last epoch whose facts are in the lake (replay must reach past it).
    pub fn staged(&self) -> Epoch {
        self.staged
    }

    /// Takes an epoch's facts (an epoch already in the lake is ignored); `names`
    /// names the sources by index.
    pub fn add(&mut self, epoch: Epoch, facts: impl IntoIterator<Item = Fact>, names: &[String]) {
        if epoch <= self.staged {
            return;
        }
        // The names are a registry that only grows (a source's index never changes
        // within a run), so the longest list names every buffered fact.
        if names.len() > self.names.len() {
            self.names = names.to_vec();
        }
        self.first.get_or_insert(epoch);
        self.last = self.last.max(epoch);
        for f in facts {
            let (staged, day_ts) = match f {
                Fact::Counted { event, pos } => {
                    let ts = event.ts;
                    (
                        Staged {
                            tag: "counted",
                            event,
                            source: pos.source,
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
                    Staged {
                        tag: "voided",
                        event: void,
                        source: pos.source,
                        offset: pos.offset,
                        target_ts: Some(target_ts),
                    },
                    target_ts,
                ),
            };
            let day = day_of(
                &mut self.days,
                &self.pipeline,
                &staged.event.provider_id,
                day_ts,
            );
            if !day.buffered {
                day.buffered = true;
                self.first_close = self.first_close.min(day.close);
            }
            match self.buf.get_mut(day.date.as_str()) {
                Some(rows) => rows.push(staged),
                None => {
                    let mut rows = self.spare.pop().unwrap_or_default();
                    rows.push(staged);
                    self.buf.insert(day.date.clone(), rows);
                }
            }
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
            let names = &self.names;
            // Arrow arrays of a chunk at a time: the same few megabytes are reused
            // from chunk to chunk instead of a flush's worth (up to 200,000 facts)
            // allocated, and zeroed by the kernel, at every flush.
            let batches = rows.chunks(BATCH_ROWS).map(|chunk| {
                columns::to_batch_of(
                    columns::STAGING,
                    chunk.len(),
                    chunk.iter().map(|r| columns::RowRef {
                        tag: r.tag,
                        event: &r.event,
                        source: names.get(r.source as usize).map_or("", |n| n.as_str()),
                        offset: r.offset,
                        target_ts: r.target_ts,
                    }),
                )
            });
            let bytes =
                columns::write_parquet_from(batches, columns::props(1, 1 << 20)).map_err(|e| {
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
        let mut written: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (provider, days) in &mut self.days {
            for d in days.iter_mut().filter(|d| d.buffered) {
                d.buffered = false;
                written
                    .entry(d.date.clone())
                    .or_default()
                    .insert(provider.to_string());
            }
        }
        for (_, mut rows) in std::mem::take(&mut self.buf) {
            rows.clear();
            if self.spare.len() < SPARE_KEPT {
                self.spare.push(rows);
            }
        }
        self.buffered = 0;
        self.first = None;
        self.first_close = Millis::MAX;
        Ok(written)
    }

    pub fn lake(&self) -> &Lake {
        &self.lake
    }
}

/// The provider's local day holding `ts`, remembered in `days`.
fn day_of<'a>(days: &'a mut Days, pipeline: &Pipeline, provider: &str, ts: Millis) -> &'a mut Day {
    if !days.contains_key(provider) {
        days.insert(provider.into(), Vec::new());
    }
    let days = days.get_mut(provider).expect("just inserted");
    if let Some(i) = days.iter().position(|d| (d.start..d.end).contains(&ts)) {
        return &mut days[i];
    }
    let date = local_date(pipeline, provider, ts);
    let (start, end) = super::compact::day_bounds(
        pipeline,
        provider,
        super::compact::parse_date(&date).expect("a formatted date"),
    );
    if days.len() >= DAYS_KEPT {
        // Forget the oldest day with nothing buffered; while every kept day has
        // buffered facts, the list grows instead.
        if let Some(i) = days.iter().position(|d| !d.buffered) {
            days.remove(i);
        }
    }
    days.push(Day {
        start,
        end,
        date,
        close: end.saturating_add(pipeline.allowed_lateness.as_millis() as Millis),
        buffered: false,
    });
    days.last_mut().expect("just pushed")
}
