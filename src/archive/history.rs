//! Rows older than the store keeps, from the lake's daily aggregates: what the gRPC
//! queries read for the part of a range past the Redis retention.
//!
//! A provider-day's aggregates files hold every row of each view in that day as the
//! store held it when the day was compacted (verified then). A file's name carries a
//! digest of its bytes, so a decoded file never goes stale and is cached; a day's
//! manifest can be republished (a late void), so it is read again after a minute.

use super::compact::{self, CompactError, Manifest};
use super::lake::Lake;
use crate::dataflow::{RowKey, RowValue, Sums};
use crate::model::window::WindowSize;
use crate::model::{Millis, Sum};
use crate::pipeline::Pipeline;
use crate::store::StoredRow;
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Decimal128Type, Int64Type, TimestampMillisecondType, UInt32Type, UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Decoded files kept, at most.
const CACHED_FILES: usize = 4096;
/// How long a manifest read stands.
const MANIFEST_TTL: Duration = Duration::from_secs(60);
/// The most days one read looks at.
const MAX_DAYS: i64 = 800;

type Manifests = HashMap<String, (Instant, Option<Arc<Manifest>>)>;

pub struct History {
    lake: Lake,
    pipeline: Arc<Pipeline>,
    files: Mutex<HashMap<String, Arc<Vec<StoredRow>>>>,
    manifests: Mutex<Manifests>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "History({})", self.lake.name())
    }
}

impl History {
    pub fn new(lake: Lake, pipeline: Arc<Pipeline>) -> History {
        History {
            lake,
            pipeline,
            files: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
        }
    }

    fn manifest(&self, date: &str) -> Result<Option<Arc<Manifest>>, CompactError> {
        if let Some((at, m)) = self.manifests.lock().expect("lock").get(date) {
            if at.elapsed() < MANIFEST_TTL {
                return Ok(m.clone());
            }
        }
        let m = compact::manifest(&self.lake, date)?.map(Arc::new);
        self.manifests
            .lock()
            .expect("lock")
            .insert(date.to_owned(), (Instant::now(), m.clone()));
        Ok(m)
    }

    fn file(
        &self,
        path: &str,
        view: u16,
        provider: &str,
    ) -> Result<Arc<Vec<StoredRow>>, CompactError> {
        if let Some(rows) = self.files.lock().expect("lock").get(path) {
            return Ok(Arc::clone(rows));
        }
        let bad = |reason: String| CompactError::File {
            path: path.to_owned(),
            reason,
        };
        let bytes = self
            .lake
            .get(path)?
            .ok_or_else(|| bad("in the manifest but not in the lake".into()))?;
        let batches = super::columns::read_parquet(bytes).map_err(|e| bad(e.to_string()))?;
        let v = &self.pipeline.views[view as usize];
        let mut rows = Vec::new();
        for b in &batches {
            rows.extend(decode(b, view, v, provider).map_err(bad)?);
        }
        let rows = Arc::new(rows);
        let mut files = self.files.lock().expect("lock");
        if files.len() >= CACHED_FILES {
            files.clear();
        }
        files.insert(path.to_owned(), Arc::clone(&rows));
        Ok(rows)
    }

    /// The lake's rows of `provider`, view `view`, window `size`, starting in
    /// [`from`, `to`), sorted by key; days not compacted give none.
    pub fn rows(
        &self,
        provider: &str,
        view: u16,
        size: WindowSize,
        from: Millis,
        to: Millis,
    ) -> Result<Vec<StoredRow>, CompactError> {
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        let name = &self.pipeline.views[view as usize].name;
        let tz = self.pipeline.time_zone(provider);
        let date = |ms: Millis| {
            chrono::DateTime::from_timestamp_millis(ms)
                .expect("in range")
                .with_timezone(&tz)
                .date_naive()
        };
        // A day window starts at the local midnight: the date of `from` covers it.
        let (first, last) = (date(from), date(to - 1));
        let mut d = first;
        let mut n = 0;
        while d <= last && n < MAX_DAYS {
            if let Some(m) = self.manifest(&d.to_string())? {
                if let Some(files) = m
                    .providers
                    .get(provider)
                    .and_then(|p| p.aggregates.get(name))
                {
                    for f in files {
                        for r in self.file(&f.path, view, provider)?.iter() {
                            let k = &r.0 .0;
                            if k.size == size && (from..to).contains(&k.start) {
                                out.push(r.clone());
                            }
                        }
                    }
                }
            }
            d = d.succ_opt().expect("date in range");
            n += 1;
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// An aggregates file's batch back to rows (see `compact::aggregates_file`).
fn decode(
    b: &RecordBatch,
    vi: u16,
    view: &crate::pipeline::View,
    provider: &str,
) -> Result<Vec<StoredRow>, String> {
    let col = |name: &str| {
        b.column_by_name(name)
            .ok_or_else(|| format!("column '{name}' missing"))
    };
    let string = |name: &str| {
        col(name)?
            .as_string_opt::<i32>()
            .ok_or_else(|| format!("column '{name}' is not a string column"))
    };
    let dec = |name: &str| {
        col(name)?
            .as_primitive_opt::<Decimal128Type>()
            .ok_or_else(|| format!("column '{name}' is not a decimal column"))
    };
    let int = |name: &str| {
        col(name)?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| format!("column '{name}' is not an int64 column"))
    };
    let window = string("window")?;
    let start = col("window_start")?
        .as_primitive_opt::<TimestampMillisecondType>()
        .ok_or("column 'window_start' is not a millisecond timestamp")?;
    let groups = view
        .group_by
        .iter()
        .skip(1)
        .map(|f| string(&f.name()))
        .collect::<Result<Vec<_>, _>>()?;
    let rank = col("rank")?
        .as_primitive_opt::<UInt32Type>()
        .ok_or("column 'rank' is not a uint32 column")?;
    let member = string("member")?;
    let (sales, refunds) = (int("sales_count")?, int("refunds_count")?);
    let (gross, refunds_amount) = (dec("gross_amount")?, dec("refunds_amount")?);
    let distinct = col("distinct_customers")?
        .as_primitive_opt::<UInt64Type>()
        .ok_or("column 'distinct_customers' is not a uint64 column")?;
    let (min, max) = (dec("min_ticket")?, dec("max_ticket")?);
    let ticket = |a: &arrow_array::Decimal128Array, i: usize| -> Result<Option<i64>, String> {
        if a.is_null(i) {
            return Ok(None);
        }
        i64::try_from(a.value(i))
            .map(Some)
            .map_err(|_| format!("row {i}: a ticket out of range"))
    };
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let size = WindowSize::parse(window.value(i)).map_err(|e| format!("row {i}: {e}"))?;
        let mut group = vec![compact_str::CompactString::from(provider)];
        group.extend(
            groups
                .iter()
                .map(|g| compact_str::CompactString::from(g.value(i))),
        );
        let key = RowKey {
            view: vi,
            size,
            start: start.value(i),
            group,
        };
        let value = RowValue {
            sums: Sums {
                sales: sales.value(i),
                gross: gross.value(i) as Sum,
                refunds: refunds.value(i),
                refunds_amount: refunds_amount.value(i) as Sum,
            },
            distinct_customers: distinct.value(i),
            min_ticket: ticket(min, i)?,
            max_ticket: ticket(max, i)?,
            member: (!member.is_null(i)).then(|| member.value(i).into()),
        };
        out.push(((key, rank.value(i)), value));
    }
    Ok(out)
}
