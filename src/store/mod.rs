//! The store: where each completed epoch is committed, atomically, with the source
//! positions that produced it.
//!
//! A [`Commit`] carries absolute row values (never increments), deletions of rows whose
//! counted events were all voided, the epoch, the source positions, the lengths of the
//! staging log and the dead-letter file at that point, and counter increments. A
//! source whose position is not a number (a Kinesis sequence number) also commits a
//! checkpoint string. Applying
//! a commit whose epoch is not newer than the stored one is refused, so a replayed or
//! stale commit can never double count.
//!
//! Implementations: [`embedded::EmbeddedStore`] (the default; a write-ahead log and
//! snapshots in the data directory) and [`redis::RedisStore`] (one server or a
//! Cluster). [`StoreConfig`] picks one. Callers: `ingest` (the committer), `tally
//! export`, `tally replay` ([`swap`]: a shadow store compared with the live one and
//! swapped into it).

pub mod embedded;
pub mod export;
pub mod frame;
pub mod redis;
pub mod swap;

use crate::dataflow::{Epoch, RowKey, RowUpdate, RowValue};
use crate::model::Millis;
use crate::pipeline::View;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Counts kept with the aggregates, committed with them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Records read (good and bad).
    pub records: u64,
    /// Events counted or voided: accepted by admission.
    pub accepted: u64,
    /// Redeliveries dropped silently.
    pub duplicates: u64,
    /// Dead letters by reason code.
    pub dead_letters: BTreeMap<String, u64>,
    /// `late` dead letters by provider.
    pub late_by_provider: BTreeMap<String, u64>,
    /// Voids whose target never came, by provider.
    pub orphans_by_provider: BTreeMap<String, u64>,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        fn merge(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
            for (k, v) in from {
                *into.entry(k.clone()).or_default() += v;
            }
        }
        self.records += other.records;
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        merge(&mut self.dead_letters, &other.dead_letters);
        merge(&mut self.late_by_provider, &other.late_by_provider);
        merge(&mut self.orphans_by_provider, &other.orphans_by_provider);
    }

    pub fn dead_letter_total(&self) -> u64 {
        self.dead_letters.values().sum()
    }
}

/// What the store knows about the last committed epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The last committed epoch; 0 before the first commit.
    pub epoch: Epoch,
    /// The largest event time read up to that epoch (the watermark is this minus lateness).
    pub clock: Millis,
    /// Per source name, the byte offset just after the last record committed (for a
    /// record-numbered source, the count of records committed).
    pub positions: BTreeMap<String, u64>,
    /// Per source name, where to resume a source whose position does not fit a number
    /// (a Kinesis shard: its sequence number; see `source::kinesis`).
    #[serde(default)]
    pub checkpoints: BTreeMap<String, String>,
    /// Length of the staging log that holds exactly the committed epochs.
    pub staging_len: u64,
    /// Length of the dead-letter file that holds exactly the committed dead letters.
    pub dead_letters_len: u64,
    pub counters: Counters,
    /// The views the rows were computed with (fixed at the first commit).
    pub views: Vec<View>,
}

/// One epoch's commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Commit {
    pub epoch: Epoch,
    pub clock: Millis,
    pub positions: BTreeMap<String, u64>,
    /// Per source name, its checkpoint after this epoch (see [`Meta::checkpoints`]).
    #[serde(default)]
    pub checkpoints: BTreeMap<String, String>,
    pub staging_len: u64,
    pub dead_letters_len: u64,
    pub counters: Counters,
    pub changes: Vec<RowUpdate>,
}

/// A store failure, and whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Refused: the commit is not newer than what is stored (a stale or second writer).
    #[error("commit of epoch {offered} refused: the store already holds epoch {stored}")]
    Stale { offered: Epoch, stored: Epoch },
    /// The pipeline's views differ from the ones the store was built with.
    #[error("the store was built with other views than the pipeline's ({0}); use another data directory, or rebuild this one")]
    ViewsChanged(String),
    /// The disk or the files failed (retry may help once the outside problem is fixed).
    #[error("store I/O at {path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The files are not what this version writes.
    #[error("store at {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    /// The store cannot be reached now; the same commit may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another writer has taken over the store since this one opened it.
    #[error("commit refused: another writer (generation {theirs}) took over the store from this one (generation {mine})")]
    Superseded { mine: u64, theirs: u64 },
    /// The store came back holding less than was committed to it (Redis lost writes).
    #[error("the store holds epoch {stored} but epoch {committed} was committed to it: it lost writes; restart to rebuild from what it holds")]
    Lost { stored: Epoch, committed: Epoch },
    /// The store's settings are wrong.
    #[error("store configuration: {0}")]
    Config(String),
    /// Redis refused a command for a reason other than the above.
    #[error("Redis refused: {0}")]
    Redis(String),
}

impl StoreError {
    /// Worth retrying the same call later.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Which store a run uses.
#[derive(Clone, Debug, Default)]
pub enum StoreConfig {
    /// The embedded store in the data directory.
    #[default]
    Embedded,
    Redis(Box<redis::RedisConfig>),
}

impl StoreConfig {
    /// Opens the store as its writer.
    pub fn open(&self, data_dir: &std::path::Path) -> Result<Box<dyn Store>, StoreError> {
        Ok(match self {
            StoreConfig::Embedded => Box::new(embedded::EmbeddedStore::open(data_dir)?),
            StoreConfig::Redis(c) => Box::new(redis::RedisStore::open((**c).clone())?),
        })
    }

    /// Opens the store to read it, leaving any writer in place.
    pub fn open_reader(&self, data_dir: &std::path::Path) -> Result<Box<dyn Store>, StoreError> {
        Ok(match self {
            StoreConfig::Embedded => Box::new(embedded::EmbeddedStore::open_reader(data_dir)?),
            StoreConfig::Redis(c) => Box::new(redis::RedisStore::open_reader((**c).clone())?),
        })
    }
}

/// Rows held in memory, by key and rank.
pub(crate) type RowMap = crate::dataflow::table::Parted<(RowKey, u32), RowValue>;

/// A row as stored: its key, its rank (0 unless top-k) and value.
pub type StoredRow = ((RowKey, u32), RowValue);

/// The interface every store implements.
pub trait Store: Send {
    /// The last commit's metadata.
    fn meta(&self) -> &Meta;

    /// Fixes the views on first use; afterwards they must match.
    fn bind_views(&mut self, views: &[View]) -> Result<(), StoreError>;

    /// Applies one epoch atomically: all of it or none of it. After
    /// [`StoreError::Unavailable`] the same commit may be offered again.
    fn commit(&mut self, c: &Commit) -> Result<(), StoreError>;

    /// Every stored row, in no particular order.
    fn rows(&mut self) -> Result<Vec<StoredRow>, StoreError>;

    /// The stored rows whose window starts in `starts`, in no particular order (what
    /// the compaction of some days needs, without a copy of every other day's rows).
    fn rows_starting(
        &mut self,
        starts: std::ops::Range<crate::model::Millis>,
    ) -> Result<Vec<StoredRow>, StoreError> {
        let mut rows = self.rows()?;
        rows.retain(|r| starts.contains(&r.0 .0.start));
        Ok(rows)
    }
}

/// Checks and fixes views: shared by every store.
pub(crate) fn check_views(meta: &mut Meta, views: &[View]) -> Result<bool, StoreError> {
    if meta.views.is_empty() {
        meta.views = views.to_vec();
        return Ok(true);
    }
    if meta.views != views {
        let stored: Vec<_> = meta.views.iter().map(|v| v.name.as_str()).collect();
        return Err(StoreError::ViewsChanged(format!(
            "stored: {}",
            stored.join(", ")
        )));
    }
    Ok(false)
}

/// Applies a commit to metadata and rows held in memory: shared by every store.
pub(crate) fn apply(meta: &mut Meta, rows: &mut RowMap, c: &Commit) -> Result<(), StoreError> {
    use crate::dataflow::table::RowRef;
    advance(meta, c)?;
    for u in &c.changes {
        let k = RowRef(&u.key, u.rank);
        match (&u.value, rows.get_mut(&k)) {
            // Most changes are to rows that exist: their key is not copied.
            (Some(v), Some(held)) => *held = v.clone(),
            (Some(v), None) => {
                rows.insert((u.key.clone(), u.rank), v.clone());
            }
            (None, _) => {
                rows.remove(&k);
            }
        }
    }
    Ok(())
}

/// The metadata after a commit; refused unless the commit is newer.
pub(crate) fn advance(meta: &mut Meta, c: &Commit) -> Result<(), StoreError> {
    if c.epoch <= meta.epoch {
        return Err(StoreError::Stale {
            offered: c.epoch,
            stored: meta.epoch,
        });
    }
    meta.epoch = c.epoch;
    meta.clock = c.clock;
    meta.positions
        .extend(c.positions.iter().map(|(k, v)| (k.clone(), *v)));
    meta.checkpoints
        .extend(c.checkpoints.iter().map(|(k, v)| (k.clone(), v.clone())));
    meta.staging_len = c.staging_len;
    meta.dead_letters_len = c.dead_letters_len;
    meta.counters.add(&c.counters);
    Ok(())
}
