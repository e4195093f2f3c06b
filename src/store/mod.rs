//! The store: where each completed epoch is committed, atomically, with the source
//! positions that produced it.
//!
//! A [`Commit`] carries absolute row values (never increments), deletions of rows whose
//! counted events were all voided, the epoch, the source positions, the lengths of the
//! staging log and the dead-letter file at that point, and counter increments. Applying
//! a commit whose epoch is not newer than the stored one is refused, so a replayed or
//! stale commit can never double count.
//!
//! Implementations: [`embedded::EmbeddedStore`] (the default; a write-ahead log and
//! snapshots in the data directory). Callers: `ingest` (the committer), `tally export`.

pub mod embedded;
pub mod export;
pub mod frame;

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
    /// Per source name, the byte offset just after the last record committed.
    pub positions: BTreeMap<String, u64>,
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
    #[error("store I/O at {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The files are not what this version writes.
    #[error("store at {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
}

/// Rows held in memory, by key and rank.
pub type RowMap = std::collections::HashMap<(RowKey, u32), RowValue, ahash::RandomState>;

/// A row as stored: its key, its rank (0 unless top-k) and value.
pub type StoredRow = ((RowKey, u32), RowValue);

/// The interface every store implements (embedded now; Redis in its own issue).
pub trait Store: Send {
    /// The last commit's metadata.
    fn meta(&self) -> &Meta;

    /// Fixes the views on first use; afterwards they must match.
    fn bind_views(&mut self, views: &[View]) -> Result<(), StoreError>;

    /// Applies one epoch atomically: all of it or none of it.
    fn commit(&mut self, c: Commit) -> Result<(), StoreError>;

    /// Every stored row, in no particular order.
    fn rows(&self) -> Vec<StoredRow>;
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
pub(crate) fn apply(meta: &mut Meta, rows: &mut RowMap, c: Commit) -> Result<(), StoreError> {
    if c.epoch <= meta.epoch {
        return Err(StoreError::Stale {
            offered: c.epoch,
            stored: meta.epoch,
        });
    }
    for u in c.changes {
        let k = (u.key, u.rank);
        match u.value {
            Some(v) => {
                rows.insert(k, v);
            }
            None => {
                rows.remove(&k);
            }
        }
    }
    meta.epoch = c.epoch;
    meta.clock = c.clock;
    meta.positions.extend(c.positions);
    meta.staging_len = c.staging_len;
    meta.dead_letters_len = c.dead_letters_len;
    meta.counters.add(&c.counters);
    Ok(())
}
