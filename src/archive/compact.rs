//! Compaction: one provider-local day of staged facts into Parquet, verified against
//! the store before it is published.
//!
//! Lake layout (hive style; a file's provider and date are in its path, not its columns):
//!
//! ```text
//! staging/date=D/e<first>-<last>.parquet          facts of epochs first..=last (stage)
//! events/date=D/provider_id=P/part-NNNNN-H.parquet  counted events, by event time
//! audit/date=D/provider_id=P/part-NNNNN-H.parquet   voided events and their voids
//! aggregates/view=V/date=D/provider_id=P/part-00000-H.parquet  the store's rows
//! manifests/date=D.json                            what is published, per provider
//! reports/date=D/provider_id=P.json                the last verification that failed
//! ```
//!
//! A provider-day is built from what was published before (its events and audit
//! files) plus every staged fact of the day, applied as sets: an event by its id, a void
//! by its target's id; a voided event moves to the audit with its void. Duplicates were
//! removed by the dataflow already (only counted events are facts), so the events of
//! the day are exactly those the store's windows count.
//!
//! Verification: for every view with a day window (top-k views aside) the counts and
//! sums of each group, recomputed from the events, must equal the store's row for that
//! day. A mismatch publishes nothing, writes a report naming the figures that differ,
//! and counts `tally_compactions_total{outcome="mismatch"}`.
//!
//! Providers of a day are compacted in parallel (one thread per core, the biggest
//! first); each is built and written on its own, and only the manifest joins them.
//!
//! Publishing: files are written under `_tmp/`, moved to their final names (each name
//! holds a digest of its bytes, so a new version never overwrites the published one),
//! then the day's manifest is written, once for all its providers: that write is the
//! publication, so a reader of the manifest sees the whole day at one version. Files of
//! the previous version (and, on a local lake, what a put cut short by a crash left)
//! are deleted after it, staging files of the day once every
//! provider of the day is published. A rerun builds the same bytes: when the manifest already
//! says so it writes nothing. A kill at any point leaves the previous manifest and its
//! files readable; the next run completes.

use super::columns::{self, Cols, Pick, AUDIT, EVENTS, STAGING};
use super::lake::{Lake, LakeError};
use crate::dataflow::aggregate::put_value;
use crate::dataflow::{RowKey, Sums};
use crate::model::window::{local_day, WindowSize};
use crate::model::{format_hundredths, Millis, Sum};
use crate::pipeline::{GroupField, Pipeline, View};
use crate::store::StoredRow;
use arrow_array::builder::{
    Decimal128Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder, UInt32Builder,
    UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use chrono::{NaiveDate, TimeZone};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error(transparent)]
    Lake(#[from] LakeError),
    /// A lake file that cannot be read back.
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("{0}")]
    Usage(String),
}

/// One published file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// A currency's figures over a provider-day's counted events (amounts as decimals).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrencySums {
    pub sales_count: i64,
    pub gross_amount: String,
    pub refunds_count: i64,
    pub refunds_amount: String,
    pub net_amount: String,
}

/// The smallest and largest position read of one source among a day's events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub first: u64,
    pub last: u64,
}

/// What is published of one provider-day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderDay {
    /// Counted events (the events files' rows).
    pub rows: u64,
    /// Events cancelled by a void (in the audit, with their voids).
    pub voided: u64,
    pub events: Vec<FileEntry>,
    pub audit: Vec<FileEntry>,
    /// By view name.
    pub aggregates: BTreeMap<String, Vec<FileEntry>>,
    /// By currency.
    pub sums: BTreeMap<String, CurrencySums>,
    /// By source name: the positions the day's events and voids were read at.
    pub positions: BTreeMap<String, Span>,
}

/// `manifests/date=D.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub date: String,
    pub providers: BTreeMap<String, ProviderDay>,
}

/// A figure the lake and the store disagree on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    pub view: String,
    /// The group's values, provider first.
    pub group: Vec<String>,
    pub figure: String,
    pub store: String,
    pub lake: String,
}

/// How one provider-day ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Published {
        rows: u64,
        voided: u64,
        bytes: u64,
    },
    /// Already published exactly so: nothing written.
    Unchanged {
        rows: u64,
    },
    /// Verification failed: nothing published; the report is at `report`.
    Mismatch {
        report: String,
        diffs: Vec<Diff>,
    },
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Published { .. } => "published",
            Outcome::Unchanged { .. } => "unchanged",
            Outcome::Mismatch { .. } => "mismatch",
        }
    }
}

/// A day's compaction.
#[derive(Clone, Debug)]
pub struct DaySummary {
    pub date: String,
    pub providers: Vec<(String, Outcome)>,
    /// Staged facts read.
    pub facts: u64,
    /// Staging files deleted (the day fully published).
    pub staging_deleted: usize,
    pub seconds: f64,
}

impl DaySummary {
    pub fn mismatches(&self) -> usize {
        self.providers
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Mismatch { .. }))
            .count()
    }
}

/// Where compaction is, for a progress bar.
pub enum Step<'a> {
    /// Providers to do.
    Start(usize),
    Done(&'a str, &'a Outcome),
}

/// Settings beyond the pipeline's.
#[derive(Clone, Debug)]
pub struct Settings {
    pub target_file_size: u64,
    /// Rows per row group.
    pub row_group_rows: usize,
    pub zstd_level: i32,
}

impl Settings {
    pub fn of(p: &Pipeline) -> Settings {
        Settings {
            target_file_size: p.archive.target_file_size,
            row_group_rows: 1 << 20,
            zstd_level: 3,
        }
    }
}

pub fn manifest_path(date: &str) -> String {
    format!("manifests/date={date}.json")
}

/// The published manifest of `date`, if any.
pub fn manifest(lake: &Lake, date: &str) -> Result<Option<Manifest>, CompactError> {
    let path = manifest_path(date);
    match lake.get(&path)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| CompactError::File {
                path,
                reason: e.to_string(),
            }),
    }
}

/// Checks a `YYYY-MM-DD` date.
pub fn parse_date(d: &str) -> Result<NaiveDate, CompactError> {
    NaiveDate::parse_from_str(d, "%Y-%m-%d")
        .map_err(|e| CompactError::Usage(format!("'{d}' is not a date (YYYY-MM-DD): {e}")))
}

/// Instants every provider's local day of `dates` lies within, whatever its zone (UTC
/// offsets are under a day): from the first date's UTC midnight less a day to the
/// last's end plus a day. `None` without dates.
pub fn days_span<'a>(
    dates: impl IntoIterator<Item = &'a String>,
) -> Result<Option<std::ops::Range<Millis>>, CompactError> {
    const DAY: Millis = 86_400_000;
    let mut span: Option<std::ops::Range<Millis>> = None;
    for d in dates {
        let start = parse_date(d)?
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists in UTC")
            .and_utc()
            .timestamp_millis();
        let (lo, hi) = (start - DAY, start + 2 * DAY);
        span = Some(match span {
            None => lo..hi,
            Some(s) => s.start.min(lo)..s.end.max(hi),
        });
    }
    Ok(span)
}

/// The provider's local `date` as UTC instants [start, end).
pub fn day_bounds(p: &Pipeline, provider: &str, date: NaiveDate) -> (Millis, Millis) {
    let tz = p.time_zone(provider);
    let noon = date.and_hms_opt(12, 0, 0).expect("noon exists");
    let ts = tz
        .from_local_datetime(&noon)
        .earliest()
        .expect("noon exists in every zone")
        .timestamp_millis();
    let w = local_day(tz, ts);
    (w.start, w.end)
}

/// A lake file's record batches, typed and checked; `None` when `missing_ok` and
/// the file is gone.
fn read_cols(
    lake: &Lake,
    path: &str,
    layout: columns::Layout,
    missing_ok: bool,
) -> Result<Option<Vec<Cols>>, CompactError> {
    let bad = |reason: String| CompactError::File {
        path: path.to_owned(),
        reason,
    };
    let Some(bytes) = lake.get(path)? else {
        return if missing_ok {
            Ok(None)
        } else {
            Err(bad("listed but gone".into()))
        };
    };
    let batches = columns::read_parquet(bytes).map_err(|e| bad(e.to_string()))?;
    batches
        .into_iter()
        .map(|b| Cols::of(layout, b).map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(b);
    d.iter().map(|x| format!("{x:02x}")).collect()
}

/// Splits the picked rows into Parquet files of about `target` bytes each.
fn write_files(
    layout: columns::Layout,
    sources: &[&Cols],
    picks: &[Pick],
    s: &Settings,
) -> Result<Vec<(Vec<u8>, u64)>, parquet::errors::ParquetError> {
    const CHUNK: usize = 64 * 1024;
    let batch = |at: usize| {
        columns::gather(layout, sources, &picks[at..(at + CHUNK).min(picks.len())])
            .map_err(|e| parquet::errors::ParquetError::General(e.to_string()))
    };
    let mut files = Vec::new();
    let mut start = 0;
    while start < picks.len() {
        let mut buf = Vec::new();
        let first = batch(start)?;
        let mut w = parquet::arrow::ArrowWriter::try_new(
            &mut buf,
            first.schema(),
            Some(columns::props(s.zstd_level, s.row_group_rows)),
        )?;
        let mut n = 0u64;
        let mut at = start;
        let mut next = Some(first);
        while let Some(b) = next.take() {
            n += b.num_rows() as u64;
            at += b.num_rows();
            w.write(&b)?;
            if at < picks.len()
                && ((w.bytes_written() + w.in_progress_size()) as u64) < s.target_file_size
            {
                next = Some(batch(at)?);
            }
        }
        w.close()?;
        files.push((buf, n));
        start = at;
    }
    Ok(files)
}

/// The store's rows of one view, provider-day, as one Parquet file: `window`,
/// `window_start`, the group fields after `provider_id` (by name), `rank`, `member`,
/// then every figure of the row.
fn aggregates_file(
    view: &View,
    rows: &[&StoredRow],
    s: &Settings,
) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let n = rows.len();
    let mut window = StringBuilder::new();
    let mut start = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut groups: Vec<StringBuilder> = (1..view.group_by.len())
        .map(|_| StringBuilder::new())
        .collect();
    let mut rank = UInt32Builder::with_capacity(n);
    let mut member = StringBuilder::new();
    let dec = |p: u8| {
        Decimal128Builder::with_capacity(n)
            .with_precision_and_scale(p, 2)
            .expect("a valid decimal")
    };
    let (mut sales, mut refunds) = (Int64Builder::new(), Int64Builder::new());
    let (mut gross, mut refunds_amount, mut net) = (dec(38), dec(38), dec(38));
    let mut distinct = UInt64Builder::new();
    let (mut min, mut max) = (dec(18), dec(18));
    for ((key, r), v) in rows.iter().map(|x| (&x.0, &x.1)) {
        window.append_value(key.size.label());
        start.append_value(key.start);
        for (b, g) in groups.iter_mut().zip(key.group.iter().skip(1)) {
            b.append_value(g);
        }
        rank.append_value(*r);
        member.append_option(v.member.as_deref());
        sales.append_value(v.sums.sales);
        gross.append_value(v.sums.gross);
        refunds.append_value(v.sums.refunds);
        refunds_amount.append_value(v.sums.refunds_amount);
        net.append_value(v.sums.net());
        distinct.append_value(v.distinct_customers);
        min.append_option(v.min_ticket.map(i128::from));
        max.append_option(v.max_ticket.map(i128::from));
    }
    let mut cols: Vec<(String, ArrayRef, bool)> = vec![
        ("window".into(), Arc::new(window.finish()), false),
        ("window_start".into(), Arc::new(start.finish()), false),
    ];
    for (f, mut b) in view.group_by.iter().skip(1).zip(groups) {
        cols.push((f.name(), Arc::new(b.finish()), false));
    }
    cols.push(("rank".into(), Arc::new(rank.finish()), false));
    cols.push(("member".into(), Arc::new(member.finish()), true));
    cols.push(("sales_count".into(), Arc::new(sales.finish()), false));
    cols.push(("gross_amount".into(), Arc::new(gross.finish()), false));
    cols.push(("refunds_count".into(), Arc::new(refunds.finish()), false));
    cols.push((
        "refunds_amount".into(),
        Arc::new(refunds_amount.finish()),
        false,
    ));
    cols.push(("net_amount".into(), Arc::new(net.finish()), false));
    cols.push((
        "distinct_customers".into(),
        Arc::new(distinct.finish()),
        false,
    ));
    cols.push(("min_ticket".into(), Arc::new(min.finish()), true));
    cols.push(("max_ticket".into(), Arc::new(max.finish()), true));
    let batch = RecordBatch::try_from_iter_with_nullable(cols).expect("columns of one length");
    columns::write_parquet(&[batch], columns::props(s.zstd_level, s.row_group_rows))
}

/// A picked row's value for a group-by field (its provider is `prov`).
fn value<'a>(src: &'a Cols, i: usize, prov: &'a str, f: &GroupField) -> &'a str {
    match f {
        GroupField::ProviderId => prov,
        GroupField::ProductId => src.product.value(i),
        GroupField::CustomerId => src.customer.value(i),
        GroupField::Currency => src.currency.value(i),
        GroupField::Attr(n) => src.attr(i, n),
    }
}

fn sums_of(src: &Cols, i: usize) -> Sums {
    Sums::of_parts(src.kind(i), src.hundredths(i), 1)
}

fn add(s: &mut Sums, d: Sums) {
    s.sales += d.sales;
    s.gross += d.gross;
    s.refunds += d.refunds;
    s.refunds_amount += d.refunds_amount;
}

/// Compares the events' figures with the store's day rows, view by view.
fn verify(
    p: &Pipeline,
    prov: &str,
    sources: &[&Cols],
    events: &[Pick],
    store: &[&StoredRow],
    day_start: Millis,
) -> Vec<Diff> {
    let mut diffs = Vec::new();
    for (vi, view) in p.views.iter().enumerate() {
        if view.top_k.is_some() || !view.windows.contains(&WindowSize::LocalDay) {
            continue;
        }
        // Both sides by a 128-bit digest of the group's values, encoded as row digests
        // encode them: an event costs one digest and one probe, and a group's values
        // are only spelled out when its figures differ. A collision of two groups is
        // as unlikely as one of two rows, whose digests are as wide. The lake's
        // groups keep their first event to name them.
        let mut key: Vec<u8> = Vec::with_capacity(128);
        let mut digest = |values: &mut dyn Iterator<Item = &str>| {
            key.clear();
            for v in values {
                put_value(&mut key, v);
            }
            xxhash_rust::xxh3::xxh3_128(&key)
        };
        let mut lake: HashMap<u128, (Pick, Sums), ahash::RandomState> = HashMap::default();
        for e in events {
            let (src, i) = (sources[e.src as usize], e.row as usize);
            let g = digest(&mut view.group_by.iter().map(|f| value(src, i, prov, f)));
            let (_, s) = lake.entry(g).or_insert_with(|| (*e, Sums::default()));
            add(s, sums_of(src, i));
        }
        let mut held: HashMap<u128, (&RowKey, Sums), ahash::RandomState> = HashMap::default();
        for ((key, _), v) in store.iter().map(|x| (&x.0, &x.1)) {
            if key.view as usize == vi && key.size == WindowSize::LocalDay && key.start == day_start
            {
                let g = digest(&mut key.group.iter().map(|g| g.as_str()));
                held.insert(g, (key, v.sums));
            }
        }
        let mut differ: Vec<(Vec<String>, Sums, Sums)> = Vec::new();
        for (g, (key, a)) in &held {
            let b = lake.get(g).map(|l| l.1).unwrap_or_default();
            if *a != b {
                differ.push((key.group.iter().map(|v| v.to_string()).collect(), *a, b));
            }
        }
        for (g, (e, b)) in &lake {
            if !held.contains_key(g) && *b != Sums::default() {
                let (src, i) = (sources[e.src as usize], e.row as usize);
                let names = view
                    .group_by
                    .iter()
                    .map(|f| value(src, i, prov, f).to_owned());
                differ.push((names.collect(), Sums::default(), *b));
            }
        }
        // Reported by group, as a reader looks for them.
        differ.sort_unstable_by(|x, y| x.0.cmp(&y.0));
        for (g, a, b) in differ {
            let count = |x: i64| x.to_string();
            let money = |x: Sum| format_hundredths(x);
            for (figure, sv, lv) in [
                ("sales_count", count(a.sales), count(b.sales)),
                ("gross_amount", money(a.gross), money(b.gross)),
                ("refunds_count", count(a.refunds), count(b.refunds)),
                (
                    "refunds_amount",
                    money(a.refunds_amount),
                    money(b.refunds_amount),
                ),
            ] {
                if sv != lv {
                    diffs.push(Diff {
                        view: view.name.clone(),
                        group: g.clone(),
                        figure: figure.into(),
                        store: sv,
                        lake: lv,
                    });
                }
            }
        }
    }
    diffs
}

fn currency_sums(sources: &[&Cols], events: &[Pick]) -> BTreeMap<String, CurrencySums> {
    let mut by: BTreeMap<&str, Sums> = BTreeMap::new();
    for e in events {
        let (src, i) = (sources[e.src as usize], e.row as usize);
        add(
            by.entry(src.currency.value(i)).or_default(),
            sums_of(src, i),
        );
    }
    by.into_iter()
        .map(|(c, s)| {
            (
                c.to_owned(),
                CurrencySums {
                    sales_count: s.sales,
                    gross_amount: format_hundredths(s.gross),
                    refunds_count: s.refunds,
                    refunds_amount: format_hundredths(s.refunds_amount),
                    net_amount: format_hundredths(s.net()),
                },
            )
        })
        .collect()
}

/// A test's way to stop the process at a named step, as a crash would
/// (`TALLY_FAILPOINT=compact:<step>`; steps: `written`, `moved`, `published`).
fn failpoint(step: &str) {
    if std::env::var("TALLY_FAILPOINT").is_ok_and(|f| f == format!("compact:{step}")) {
        eprintln!("tally: failpoint compact:{step}: aborting");
        std::process::abort();
    }
}

/// Compacts `date` for every provider with staged facts, published files or store
/// rows that day, or for `only` (whose staging files are then kept: other providers
/// still need them). `store_rows` are the store's rows (any days).
pub fn compact_day(
    lake: &Lake,
    p: &Pipeline,
    store_rows: &[StoredRow],
    date: &str,
    only: Option<&str>,
    step: impl FnMut(Step<'_>),
) -> Result<DaySummary, CompactError> {
    compact_day_with(lake, p, store_rows, date, only, None, step)
}

/// The staging files of `date`, by name (epoch order).
pub fn staging_files(lake: &Lake, date: &str) -> Result<Vec<String>, LakeError> {
    Ok(lake
        .list(&format!("staging/date={date}"))?
        .into_iter()
        .map(|(path, _)| path)
        .filter(|path| path.ends_with(".parquet"))
        .collect())
}

/// [`compact_day`] on the given staging files (all of the day's when `None`): the
/// ones that were there when `store_rows` were read. A listed file gone since was
/// consumed by a compaction that published it.
pub fn compact_day_with(
    lake: &Lake,
    p: &Pipeline,
    store_rows: &[StoredRow],
    date: &str,
    only: Option<&str>,
    staging: Option<Vec<String>>,
    mut step: impl FnMut(Step<'_>),
) -> Result<DaySummary, CompactError> {
    let started = Instant::now();
    let day = parse_date(date)?;
    let settings = Settings::of(p);
    let listed = staging.is_some();
    let staging = match staging {
        Some(s) => s,
        None => staging_files(lake, date)?,
    };
    // The day's staged facts stay in their Arrow columns; each provider's are found
    // by (batch, row), in the order staged.
    let mut staged: Vec<Cols> = Vec::new();
    for path in &staging {
        if let Some(cols) = read_cols(lake, path, STAGING, listed)? {
            staged.extend(cols);
        }
    }
    let facts: u64 = staged.iter().map(|c| c.len() as u64).sum();
    let mut mine: HashMap<&str, Vec<(u32, u32)>, ahash::RandomState> = HashMap::default();
    for (b, cols) in staged.iter().enumerate() {
        for i in 0..cols.len() {
            let prov = cols.provider(i).expect("staging files have providers");
            if only.is_none_or(|o| o == prov) {
                mine.entry(prov).or_default().push((b as u32, i as u32));
            }
        }
    }
    let mut man = manifest(lake, date)?.unwrap_or_else(|| Manifest {
        date: date.to_owned(),
        providers: BTreeMap::new(),
    });
    // Store rows of the day, by provider.
    let mut day_rows: BTreeMap<String, Vec<&StoredRow>> = BTreeMap::new();
    let mut bounds: BTreeMap<String, (Millis, Millis)> = BTreeMap::new();
    for row in store_rows {
        let Some(prov) = row.0 .0.group.first() else {
            continue;
        };
        if only.is_some_and(|o| o != prov.as_str()) {
            continue;
        }
        let (s, e) = *bounds
            .entry(prov.to_string())
            .or_insert_with(|| day_bounds(p, prov, day));
        if (s..e).contains(&row.0 .0.start) {
            day_rows.entry(prov.to_string()).or_default().push(row);
        }
    }
    let mut providers: BTreeSet<String> = mine.keys().map(|p| p.to_string()).collect();
    providers.extend(day_rows.keys().cloned());
    providers.extend(
        man.providers
            .keys()
            .filter(|k| only.is_none_or(|o| o == k.as_str()))
            .cloned(),
    );
    if let Some(o) = only {
        if !providers.contains(o) {
            return Err(CompactError::Usage(format!(
                "provider '{o}' has nothing on {date}: no staged facts, no published version, no rows in the store"
            )));
        }
    }
    step(Step::Start(providers.len()));
    // Providers are compacted on up to one thread per core, biggest first (by
    // staged facts), so the busiest provider does not start last; the calling thread
    // takes the results as they come and applies them to the manifest. A failure
    // stops handing out providers; the day is then published by none (the manifest
    // is written only after every provider is done).
    let mut work: Vec<(String, Vec<(u32, u32)>)> = providers
        .into_iter()
        .map(|prov| {
            let m = mine.remove(prov.as_str()).unwrap_or_default();
            (prov, m)
        })
        .collect();
    work.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
    let threads = crate::cores().min(work.len()).max(1);
    let mut outcomes = Vec::new();
    let mut cleanups = Vec::new();
    let mut changed = false;
    let failed = |e| {
        metrics::counter!(crate::metrics::COMPACTIONS, "outcome" => "failed").increment(1);
        e
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let queue = std::sync::Mutex::new(std::collections::VecDeque::from(work));
    let mut error = None;
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..threads {
            let tx = tx.clone();
            let (queue, stop, man) = (&queue, &stop, &man);
            let (settings, staged, day_rows) = (&settings, &staged, &day_rows);
            scope.spawn(move || loop {
                use std::sync::atomic::Ordering::Relaxed;
                let taken = queue.lock().expect("no panic holds it").pop_front();
                let Some((prov, mine)) = taken.filter(|_| !stop.load(Relaxed)) else {
                    break;
                };
                let t = Instant::now();
                let o = compact_provider(
                    lake,
                    p,
                    settings,
                    date,
                    day,
                    &prov,
                    staged,
                    mine,
                    day_rows
                        .get(&prov)
                        .map(|v| v.as_slice())
                        .unwrap_or_default(),
                    man.providers.get(&prov),
                );
                if o.is_err() {
                    stop.store(true, Relaxed);
                }
                if tx.send((prov, o, t.elapsed())).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut entries = Vec::new();
        for (prov, o, took) in rx {
            let (o, cleanup, entry) = match o {
                Ok(done) => done,
                // The day failed once (one count), whichever providers failed in it.
                Err(e) if error.is_some() => {
                    tracing::error!(date, provider = %prov, error = %e, "compacting a provider failed");
                    continue;
                }
                Err(e) => {
                    error = Some(failed(e));
                    continue;
                }
            };
            metrics::histogram!(crate::metrics::COMPACTION_SECONDS).record(took.as_secs_f64());
            cleanups.extend(cleanup);
            match &o {
                Outcome::Published { .. } => changed = true,
                Outcome::Mismatch { report, diffs } => {
                    tracing::error!(
                        date,
                        provider = %prov,
                        differences = diffs.len(),
                        report = %report,
                        "compaction verification failed: the lake's figures differ from the store's; the previous version is kept"
                    );
                }
                Outcome::Unchanged { .. } => {}
            }
            step(Step::Done(&prov, &o));
            entries.extend(entry.map(|e| (prov.clone(), e)));
            outcomes.push((prov, o));
        }
        // Applied once every thread is done reading the manifest.
        entries
    })
    .into_iter()
    .for_each(|(prov, e)| {
        man.providers.insert(prov, e);
    });
    if let Some(e) = error {
        return Err(e);
    }
    outcomes.sort_by(|a, b| a.0.cmp(&b.0));
    // The publication: one write, every provider of the day at once.
    if changed {
        lake.put(
            &manifest_path(date),
            serde_json::to_vec_pretty(&man).expect("json"),
        )
        .map_err(|e| failed(e.into()))?;
        failpoint("published");
    }
    for (_, o) in &outcomes {
        metrics::counter!(crate::metrics::COMPACTIONS, "outcome" => o.label()).increment(1);
        if let Outcome::Published { rows, .. } = o {
            metrics::counter!(crate::metrics::COMPACTED_ROWS).increment(*rows);
            let midnight = day
                .and_hms_opt(0, 0, 0)
                .expect("midnight")
                .and_utc()
                .timestamp();
            metrics::gauge!(crate::metrics::COMPACTED_DATE).set(midnight as f64);
        }
    }
    for c in &cleanups {
        c.run(lake).map_err(failed)?;
    }
    let clean = outcomes
        .iter()
        .all(|(_, o)| !matches!(o, Outcome::Mismatch { .. }));
    let mut staging_deleted = 0;
    if clean && only.is_none() {
        for path in &staging {
            lake.delete(path)?;
            staging_deleted += 1;
        }
    }
    Ok(DaySummary {
        date: date.to_owned(),
        providers: outcomes,
        facts,
        staging_deleted,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[allow(clippy::too_many_arguments)]
fn compact_provider(
    lake: &Lake,
    p: &Pipeline,
    s: &Settings,
    date: &str,
    day: NaiveDate,
    prov: &str,
    staged: &[Cols],
    mine: Vec<(u32, u32)>,
    store: &[&StoredRow],
    published: Option<&ProviderDay>,
) -> Result<(Outcome, Option<Cleanup>, Option<ProviderDay>), CompactError> {
    // The sources, in the order their facts apply: the published events, the
    // published audit, then the staged facts.
    let mut read: Vec<(Cols, bool)> = Vec::new();
    if let Some(old) = published {
        for (files, layout) in [(&old.events, EVENTS), (&old.audit, AUDIT)] {
            for f in files {
                let cols = read_cols(lake, &f.path, layout, false)?.unwrap_or_default();
                read.extend(cols.into_iter().map(|c| (c, false)));
            }
        }
    }
    let base = read.len() as u32;
    let mut sources: Vec<&Cols> = read.iter().map(|(c, _)| c).collect();
    sources.extend(staged);
    let is_staging = |src: u32| src >= base;
    let order = read
        .iter()
        .enumerate()
        .flat_map(|(b, (c, _))| (0..c.len()).map(move |i| (b as u32, i as u32)))
        .chain(mine.into_iter().map(|(b, i)| (base + b, i)));
    // Applied as sets: an event by its id, a void by its target's id; the first
    // told wins.
    let mut seen: HashSet<&str, ahash::RandomState> = HashSet::default();
    let mut counted: Vec<Pick> = Vec::new();
    let mut voids: HashMap<&str, Pick, ahash::RandomState> = HashMap::default();
    for (src, row) in order {
        let c = sources[src as usize];
        let i = row as usize;
        // A staged `voided` fact is a void; in the audit, `voided` is the event it
        // cancelled and `void` the void.
        let void = match c.tag(i) {
            "void" => true,
            "voided" => is_staging(src),
            _ => false,
        };
        if void {
            voids
                .entry(c.ref_event_id(i).unwrap_or_default())
                .or_insert(Pick {
                    src,
                    row,
                    tag: "void",
                    target_ts: c.target_ts(i),
                });
        } else if seen.insert(c.id.value(i)) {
            counted.push(Pick {
                src,
                row,
                tag: "counted",
                target_ts: None,
            });
        }
    }
    drop(seen);
    let mut events = Vec::with_capacity(counted.len());
    let mut audit = Vec::new();
    for e in counted {
        if voids.contains_key(sources[e.src as usize].id.value(e.row as usize)) {
            audit.push(Pick { tag: "voided", ..e });
        } else {
            events.push(e);
        }
    }
    let voided = audit.len() as u64;
    audit.extend(voids.into_values());
    let ts = |e: &Pick| sources[e.src as usize].ts.value(e.row as usize);
    let id = |e: &Pick| sources[e.src as usize].id.value(e.row as usize);
    // Ids are unique among the events, so the order is total. Each key is read from
    // the columns once, not twice per comparison.
    events.sort_by_cached_key(|e| (ts(e), id(e)));
    audit.sort_unstable_by(|a, b| {
        let t = |r: &Pick| r.target_ts.unwrap_or_else(|| ts(r));
        (t(a), a.tag == "void", id(a)).cmp(&(t(b), b.tag == "void", id(b)))
    });

    let (day_start, _) = day_bounds(p, prov, day);
    let diffs = verify(p, prov, &sources, &events, store, day_start);
    if !diffs.is_empty() {
        let path = format!("reports/date={date}/provider_id={prov}.json");
        let report = serde_json::json!({
            "date": date,
            "provider_id": prov,
            "events": events.len(),
            "differences": diffs,
            "note": "the lake's figures (recomputed from the staged and published events) differ from the store's day windows; nothing was published",
        });
        lake.put(&path, serde_json::to_vec_pretty(&report).expect("json"))?;
        return Ok((
            Outcome::Mismatch {
                report: path,
                diffs,
            },
            None,
            None,
        ));
    }

    let parquet = |e: parquet::errors::ParquetError| CompactError::File {
        path: format!("{date}/{prov}"),
        reason: e.to_string(),
    };
    // name -> bytes, in the order they are moved.
    let mut files: Vec<(String, Vec<u8>, u64)> = Vec::new();
    let mut entry = ProviderDay {
        rows: events.len() as u64,
        voided,
        events: Vec::new(),
        audit: Vec::new(),
        aggregates: BTreeMap::new(),
        sums: currency_sums(&sources, &events),
        positions: BTreeMap::new(),
    };
    for e in events.iter().chain(&audit) {
        let c = sources[e.src as usize];
        let (name, offset) = (
            c.source.value(e.row as usize),
            c.offset.value(e.row as usize),
        );
        match entry.positions.get_mut(name) {
            Some(sp) => {
                sp.first = sp.first.min(offset);
                sp.last = sp.last.max(offset);
            }
            None => {
                entry.positions.insert(
                    name.to_owned(),
                    Span {
                        first: offset,
                        last: offset,
                    },
                );
            }
        }
    }
    let mut add = |dir: String, list: &mut Vec<FileEntry>, made: Vec<(Vec<u8>, u64)>| {
        for (i, (bytes, rows)) in made.into_iter().enumerate() {
            let digest = xxhash_rust::xxh3::xxh3_64(&bytes);
            let path = format!("{dir}/part-{i:05}-{digest:016x}.parquet");
            list.push(FileEntry {
                path: path.clone(),
                rows,
                bytes: bytes.len() as u64,
                sha256: sha256(&bytes),
            });
            files.push((path, bytes, rows));
        }
    };
    let events_dir = format!("events/date={date}/provider_id={prov}");
    let audit_dir = format!("audit/date={date}/provider_id={prov}");
    add(
        events_dir.clone(),
        &mut entry.events,
        write_files(EVENTS, &sources, &events, s).map_err(parquet)?,
    );
    add(
        audit_dir.clone(),
        &mut entry.audit,
        write_files(AUDIT, &sources, &audit, s).map_err(parquet)?,
    );
    let mut agg_dirs = Vec::new();
    for (vi, view) in p.views.iter().enumerate() {
        let mut rows: Vec<&StoredRow> = store
            .iter()
            .copied()
            .filter(|r| r.0 .0.view as usize == vi)
            .collect();
        let dir = format!(
            "aggregates/view={}/date={date}/provider_id={prov}",
            view.name
        );
        agg_dirs.push(dir.clone());
        if rows.is_empty() {
            continue;
        }
        // Each row's sort key is read once (not twice per comparison), its window's
        // label and group borrowed.
        let sizes: BTreeSet<WindowSize> = rows.iter().map(|r| r.0 .0.size).collect();
        let labels: BTreeMap<WindowSize, String> =
            sizes.into_iter().map(|w| (w, w.label())).collect();
        rows.sort_by_cached_key(|r| {
            let r: &StoredRow = r;
            let key: &RowKey = &r.0 .0;
            (labels[&key.size].as_str(), key.start, &key.group, r.0 .1)
        });
        let bytes = aggregates_file(view, &rows, s).map_err(parquet)?;
        let mut list = Vec::new();
        add(dir, &mut list, vec![(bytes, rows.len() as u64)]);
        entry.aggregates.insert(view.name.clone(), list);
    }
    let tmp = format!("_tmp/date={date}/provider_id={prov}");
    let mut dirs = vec![events_dir, audit_dir, tmp.clone()];
    dirs.extend(agg_dirs);
    let cleanup = Cleanup {
        dirs,
        keep: files.iter().map(|(p, _, _)| p.clone()).collect(),
        report: format!("reports/date={date}/provider_id={prov}.json"),
    };
    if published == Some(&entry) {
        return Ok((Outcome::Unchanged { rows: entry.rows }, Some(cleanup), None));
    }
    for (path, bytes, _) in &files {
        lake.put(&format!("{tmp}/{path}"), bytes.clone())?;
    }
    failpoint("written");
    for (path, _, _) in &files {
        lake.rename(&format!("{tmp}/{path}"), path)?;
    }
    failpoint("moved");
    let bytes = files.iter().map(|(_, b, _)| b.len() as u64).sum();
    Ok((
        Outcome::Published {
            rows: entry.rows,
            voided,
            bytes,
        },
        Some(cleanup),
        Some(entry),
    ))
}

/// What is left to delete once a provider-day's version is published (or found
/// published): files of other versions and of killed runs, and an old report.
struct Cleanup {
    dirs: Vec<String>,
    keep: BTreeSet<String>,
    report: String,
}

impl Cleanup {
    fn run(&self, lake: &Lake) -> Result<(), CompactError> {
        for dir in &self.dirs {
            for (path, _) in lake.list(dir)? {
                if !self.keep.contains(&path) {
                    lake.delete(&path)?;
                }
            }
            // A crash during a put (another provider's thread stopping the process,
            // or a kill) leaves a partial file listings do not show.
            lake.sweep_unfinished(dir)?;
        }
        lake.delete(&self.report)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_days_span_holds_every_zones_local_days_of_the_dates() {
        let p = Pipeline::parse(
            "t.toml",
            r#"
[[views]]
name = "v"
group_by = ["provider_id", "currency"]
windows = ["1d"]
metrics = ["sales_count"]

[time_zones.providers]
kiritimati = "Pacific/Kiritimati"
niue = "Pacific/Niue"
"#,
        )
        .unwrap();
        let dates = vec!["2026-11-18".to_owned(), "2026-11-20".to_owned()];
        let span = days_span(&dates).unwrap().unwrap();
        for prov in ["kiritimati", "niue", "utc"] {
            for d in &dates {
                let (s, e) = day_bounds(&p, prov, parse_date(d).unwrap());
                assert!(span.contains(&s) && span.contains(&(e - 1)), "{prov} {d}");
            }
        }
        assert_eq!(days_span(&Vec::<String>::new()).unwrap(), None);
        assert!(days_span(&vec!["18/11/2026".to_owned()]).is_err());
    }
}
