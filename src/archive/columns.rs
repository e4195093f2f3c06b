//! Events as Arrow columns and Parquet files: the one schema of the lake's event
//! files (staging, compacted events, the voids audit), and the way back.
//!
//! Columns, in this order (a file kind leaves out what it does not hold):
//!
//! | column | type | in |
//! |---|---|---|
//! | `fact` / `role` | string | staging (`counted`, `voided`) / audit (`voided`, `void`) |
//! | `event_id` | string | all |
//! | `provider_id` | string | staging (compacted files have it in their path) |
//! | `product_id`, `customer_id`, `kind` | string | all |
//! | `amount` | decimal(18,2), null on a void without one | all |
//! | `currency` | string | all |
//! | `ts` | timestamp(ms, UTC) | all |
//! | `ref_event_id` | string, nullable | all |
//! | `attrs` | map(string, string) | all |
//! | `source`, `offset` | string, uint64: where the event was read | all |
//! | `target_ts` | timestamp(ms, UTC), nullable: a void's target's event time | staging, audit |

use crate::model::{Currency, Event, Kind, Millis, Money};
use arrow_array::builder::{
    Decimal128Builder, MapBuilder, StringBuilder, TimestampMillisecondBuilder, UInt64Builder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, TimestampMillisecondType, UInt64Type};
use arrow_array::{
    Array, ArrayRef, Decimal128Array, MapArray, RecordBatch, StringArray,
    TimestampMillisecondArray, UInt64Array,
};
use std::sync::Arc;

/// One event row: the event, a tag (fact or role), where it was read, and a void's
/// target's event time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub tag: &'static str,
    pub event: Event,
    pub source: String,
    pub offset: u64,
    pub target_ts: Option<Millis>,
}

/// A row to write, borrowed: what [`to_batch_of`] takes.
#[derive(Clone, Copy)]
pub struct RowRef<'a> {
    pub tag: &'static str,
    pub event: &'a Event,
    pub source: &'a str,
    pub offset: u64,
    pub target_ts: Option<Millis>,
}

impl Row {
    pub fn as_ref(&self) -> RowRef<'_> {
        RowRef {
            tag: self.tag,
            event: &self.event,
            source: &self.source,
            offset: self.offset,
            target_ts: self.target_ts,
        }
    }
}

/// Which columns a file kind has.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// The tag column's name (`fact`, `role`), if any.
    pub tag: Option<&'static str>,
    pub provider: bool,
    pub target_ts: bool,
}

pub const STAGING: Layout = Layout {
    tag: Some("fact"),
    provider: true,
    target_ts: true,
};
pub const EVENTS: Layout = Layout {
    tag: None,
    provider: false,
    target_ts: false,
};
pub const AUDIT: Layout = Layout {
    tag: Some("role"),
    provider: false,
    target_ts: true,
};

/// The tags a file may hold, so reading back gives `&'static str`s.
const TAGS: [&str; 3] = ["counted", "voided", "void"];

fn ts_builder(n: usize) -> TimestampMillisecondBuilder {
    TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC")
}

/// Rows to one record batch of `layout`.
pub fn to_batch(layout: Layout, rows: &[Row]) -> RecordBatch {
    to_batch_of(layout, rows.len(), rows.iter().map(Row::as_ref))
}

/// `n` borrowed rows to one record batch of `layout`.
pub fn to_batch_of<'a>(
    layout: Layout,
    n: usize,
    rows: impl Iterator<Item = RowRef<'a>>,
) -> RecordBatch {
    let strings = || StringBuilder::with_capacity(n, n * 16);
    let (mut tag, mut id, mut provider, mut product, mut customer, mut kind) = (
        strings(),
        strings(),
        strings(),
        strings(),
        strings(),
        strings(),
    );
    let mut amount = Decimal128Builder::with_capacity(n)
        .with_precision_and_scale(18, 2)
        .expect("18,2 is a valid decimal");
    let (mut currency, mut refs, mut source) = (strings(), strings(), strings());
    let mut ts = ts_builder(n);
    let mut target = ts_builder(n);
    let mut offset = UInt64Builder::with_capacity(n);
    let mut attrs = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    for r in rows {
        let e = r.event;
        tag.append_value(r.tag);
        id.append_value(&e.event_id);
        provider.append_value(&e.provider_id);
        product.append_value(&e.product_id);
        customer.append_value(&e.customer_id);
        kind.append_value(e.kind.as_str());
        amount.append_option(e.amount.map(|m| i128::from(m.hundredths())));
        currency.append_value(e.currency.as_str());
        ts.append_value(e.ts);
        refs.append_option(e.ref_event_id.as_deref());
        for (k, v) in &e.attrs {
            attrs.keys().append_value(k);
            attrs.values().append_value(v);
        }
        attrs.append(true).expect("keys and values match");
        source.append_value(r.source);
        offset.append_value(r.offset);
        target.append_option(r.target_ts);
    }
    let mut cols: Vec<(&str, ArrayRef, bool)> = Vec::with_capacity(14);
    if let Some(name) = layout.tag {
        cols.push((name, Arc::new(tag.finish()), false));
    }
    cols.push(("event_id", Arc::new(id.finish()), false));
    if layout.provider {
        cols.push(("provider_id", Arc::new(provider.finish()), false));
    }
    cols.push(("product_id", Arc::new(product.finish()), false));
    cols.push(("customer_id", Arc::new(customer.finish()), false));
    cols.push(("kind", Arc::new(kind.finish()), false));
    cols.push(("amount", Arc::new(amount.finish()), true));
    cols.push(("currency", Arc::new(currency.finish()), false));
    cols.push(("ts", Arc::new(ts.finish()), false));
    cols.push(("ref_event_id", Arc::new(refs.finish()), true));
    cols.push(("attrs", Arc::new(attrs.finish()), false));
    cols.push(("source", Arc::new(source.finish()), false));
    cols.push(("offset", Arc::new(offset.finish()), false));
    if layout.target_ts {
        cols.push(("target_ts", Arc::new(target.finish()), true));
    }
    RecordBatch::try_from_iter_with_nullable(cols).expect("columns of one length")
}

/// A file the lake cannot read back: which column, and why.
#[derive(Debug, thiserror::Error)]
#[error("column '{column}': {reason}")]
pub struct ColumnError {
    pub column: String,
    pub reason: String,
}

/// A record batch of any layout with its columns typed and checked once, so its rows
/// are read in place (and copied out column by column with [`gather`]) instead of
/// becoming [`Row`]s one by one.
pub struct Cols {
    pub batch: RecordBatch,
    /// Each row's tag (`counted` when the layout has none).
    tags: Vec<&'static str>,
    kinds: Vec<Kind>,
    pub id: StringArray,
    provider: Option<StringArray>,
    pub product: StringArray,
    pub customer: StringArray,
    amount: Decimal128Array,
    pub currency: StringArray,
    pub ts: TimestampMillisecondArray,
    pub refs: StringArray,
    attrs: MapArray,
    pub source: StringArray,
    pub offset: UInt64Array,
    target: Option<TimestampMillisecondArray>,
}

impl Cols {
    /// Types and checks the columns of `layout` in `b`: every tag, kind, currency and
    /// amount is valid after this.
    pub fn of(layout: Layout, b: RecordBatch) -> Result<Cols, ColumnError> {
        let bad = |name: &str, why: &str| ColumnError {
            column: name.into(),
            reason: why.into(),
        };
        let col = |name: &str| -> Result<ArrayRef, ColumnError> {
            b.column_by_name(name)
                .cloned()
                .ok_or_else(|| bad(name, "missing"))
        };
        let string = |name: &str| -> Result<StringArray, ColumnError> {
            col(name)?
                .as_string_opt::<i32>()
                .cloned()
                .ok_or_else(|| bad(name, "not a string column"))
        };
        let stamps = |name: &str| -> Result<TimestampMillisecondArray, ColumnError> {
            col(name)?
                .as_primitive_opt::<TimestampMillisecondType>()
                .cloned()
                .ok_or_else(|| bad(name, "not a millisecond timestamp column"))
        };
        let n = b.num_rows();
        let tags = match layout.tag {
            Some(name) => {
                let t = string(name)?;
                (0..n)
                    .map(|i| {
                        let v = t.value(i);
                        TAGS.iter()
                            .find(|x| **x == v)
                            .copied()
                            .ok_or_else(|| bad(name, &format!("row {i}: unknown tag '{v}'")))
                    })
                    .collect::<Result<_, _>>()?
            }
            None => vec!["counted"; n],
        };
        let kind = string("kind")?;
        let kinds = (0..n)
            .map(|i| match kind.value(i) {
                "sale" => Ok(Kind::Sale),
                "refund" => Ok(Kind::Refund),
                "void" => Ok(Kind::Void),
                k => Err(bad("kind", &format!("row {i}: unknown kind '{k}'"))),
            })
            .collect::<Result<_, _>>()?;
        let amount = col("amount")?
            .as_primitive_opt::<Decimal128Type>()
            .cloned()
            .ok_or_else(|| bad("amount", "not a decimal column"))?;
        for i in 0..n {
            if !amount.is_null(i)
                && i64::try_from(amount.value(i))
                    .ok()
                    .and_then(Money::from_hundredths)
                    .is_none()
            {
                return Err(bad("amount", &format!("row {i}: out of range")));
            }
        }
        let currency = string("currency")?;
        for i in 0..n {
            if Currency::parse(currency.value(i)).is_none() {
                return Err(bad("currency", &format!("row {i}: not a currency code")));
            }
        }
        let attrs = col("attrs")?
            .as_map_opt()
            .cloned()
            .ok_or_else(|| bad("attrs", "not a map column"))?;
        for (i, name) in ["keys", "values"].into_iter().enumerate() {
            if attrs.entries().column(i).as_string_opt::<i32>().is_none() {
                return Err(bad("attrs", &format!("its {name} are not strings")));
            }
        }
        Ok(Cols {
            tags,
            kinds,
            id: string("event_id")?,
            provider: if layout.provider {
                Some(string("provider_id")?)
            } else {
                None
            },
            product: string("product_id")?,
            customer: string("customer_id")?,
            amount,
            currency,
            ts: stamps("ts")?,
            refs: string("ref_event_id")?,
            attrs,
            source: string("source")?,
            offset: col("offset")?
                .as_primitive_opt::<UInt64Type>()
                .cloned()
                .ok_or_else(|| bad("offset", "not a uint64 column"))?,
            target: if layout.target_ts {
                Some(stamps("target_ts")?)
            } else {
                None
            },
            batch: b,
        })
    }

    pub fn len(&self) -> usize {
        self.tags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    pub fn tag(&self, i: usize) -> &'static str {
        self.tags[i]
    }

    pub fn kind(&self, i: usize) -> Kind {
        self.kinds[i]
    }

    /// The provider column's value (`None` for a layout without one).
    pub fn provider(&self, i: usize) -> Option<&str> {
        self.provider.as_ref().map(|p| p.value(i))
    }

    /// The amount in hundredths (0 when absent).
    pub fn hundredths(&self, i: usize) -> i64 {
        if self.amount.is_null(i) {
            0
        } else {
            self.amount.value(i) as i64
        }
    }

    pub fn ref_event_id(&self, i: usize) -> Option<&str> {
        (!self.refs.is_null(i)).then(|| self.refs.value(i))
    }

    pub fn target_ts(&self, i: usize) -> Option<Millis> {
        self.target
            .as_ref()
            .and_then(|t| (!t.is_null(i)).then(|| t.value(i)))
    }

    /// Row `i`'s attributes, in the order written (by key).
    pub fn attrs(&self, i: usize) -> impl Iterator<Item = (&str, &str)> {
        let offsets = self.attrs.value_offsets();
        let (from, to) = (offsets[i] as usize, offsets[i + 1] as usize);
        let entries = self.attrs.entries();
        let keys = entries.column(0).as_string::<i32>();
        let values = entries.column(1).as_string::<i32>();
        (from..to).map(move |j| (keys.value(j), values.value(j)))
    }

    /// The value of attribute `name` in row `i`, empty when absent.
    pub fn attr(&self, i: usize, name: &str) -> &str {
        self.attrs(i)
            .find(|(k, _)| *k == name)
            .map_or("", |(_, v)| v)
    }

    /// Row `i` as a [`Row`]; `provider` is the provider of a layout without the column.
    pub fn row(&self, i: usize, provider: Option<&str>) -> Result<Row, ColumnError> {
        let provider_id = match (self.provider(i), provider) {
            (Some(p), _) | (None, Some(p)) => p.into(),
            (None, None) => {
                return Err(ColumnError {
                    column: "provider_id".into(),
                    reason: "missing, and not in the path".into(),
                })
            }
        };
        Ok(Row {
            tag: self.tag(i),
            event: Event {
                event_id: self.id.value(i).into(),
                provider_id,
                product_id: self.product.value(i).into(),
                customer_id: self.customer.value(i).into(),
                kind: self.kind(i),
                amount: (!self.amount.is_null(i))
                    .then(|| Money::from_hundredths(self.amount.value(i) as i64))
                    .flatten(),
                currency: Currency::parse(self.currency.value(i)).expect("checked in `of`"),
                ts: self.ts.value(i),
                ref_event_id: self.ref_event_id(i).map(Into::into),
                attrs: self.attrs(i).map(|(k, v)| (k.into(), v.into())).collect(),
            },
            source: self.source.value(i).to_owned(),
            offset: self.offset.value(i),
            target_ts: self.target_ts(i),
        })
    }
}

/// A record batch of `layout` back to rows; `provider` fills in the provider of a
/// file whose path holds it.
pub fn from_batch(
    layout: Layout,
    b: &RecordBatch,
    provider: Option<&str>,
) -> Result<Vec<Row>, ColumnError> {
    let c = Cols::of(layout, b.clone())?;
    (0..c.len()).map(|i| c.row(i, provider)).collect()
}

/// One output row of [`gather`]: row `row` of source `src`, with the tag and target
/// time it is written with.
#[derive(Clone, Copy, Debug)]
pub struct Pick {
    pub src: u32,
    pub row: u32,
    pub tag: &'static str,
    pub target_ts: Option<Millis>,
}

/// The rows `picks` of `sources` as one record batch of `layout` (which has no
/// provider column: the sources are one provider's), copied column by column.
pub fn gather(
    layout: Layout,
    sources: &[&Cols],
    picks: &[Pick],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    assert!(!layout.provider, "gathered files hold one provider");
    let at: Vec<(usize, usize)> = picks
        .iter()
        .map(|p| (p.src as usize, p.row as usize))
        .collect();
    let column = |get: fn(&Cols) -> &dyn Array| -> Result<ArrayRef, arrow_schema::ArrowError> {
        let arrays: Vec<&dyn Array> = sources.iter().map(|c| get(c)).collect();
        arrow_select::interleave::interleave(&arrays, &at)
    };
    let mut cols: Vec<(&str, ArrayRef, bool)> = Vec::with_capacity(14);
    if let Some(name) = layout.tag {
        let tags: StringArray = picks.iter().map(|p| Some(p.tag)).collect();
        cols.push((name, Arc::new(tags), false));
    }
    cols.push(("event_id", column(|c| &c.id)?, false));
    cols.push(("product_id", column(|c| &c.product)?, false));
    cols.push(("customer_id", column(|c| &c.customer)?, false));
    cols.push((
        "kind",
        Arc::new(
            picks
                .iter()
                .map(|p| Some(sources[p.src as usize].kind(p.row as usize).as_str()))
                .collect::<StringArray>(),
        ),
        false,
    ));
    cols.push(("amount", column(|c| &c.amount)?, true));
    cols.push(("currency", column(|c| &c.currency)?, false));
    cols.push(("ts", column(|c| &c.ts)?, false));
    cols.push(("ref_event_id", column(|c| &c.refs)?, true));
    cols.push(("attrs", column(|c| &c.attrs)?, false));
    cols.push(("source", column(|c| &c.source)?, false));
    cols.push(("offset", column(|c| &c.offset)?, false));
    if layout.target_ts {
        let mut t = ts_builder(picks.len());
        for p in picks {
            t.append_option(p.target_ts);
        }
        cols.push(("target_ts", Arc::new(t.finish()), true));
    }
    RecordBatch::try_from_iter_with_nullable(cols)
}

/// Writer settings: zstd at `level`, statistics on, a fixed `created_by` so the same
/// rows always give the same bytes.
pub fn props(level: i32, row_group_rows: usize) -> parquet::file::properties::WriterProperties {
    use parquet::basic::{Compression, ZstdLevel};
    parquet::file::properties::WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(level).expect("a valid zstd level"),
        ))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_created_by(format!("tally {}", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Record batches to one Parquet file's bytes.
pub fn write_parquet(
    batches: &[RecordBatch],
    props: parquet::file::properties::WriterProperties,
) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    write_parquet_from(batches.iter().cloned(), props)
}

/// Record batches made one at a time, each dropped once written, to one Parquet
/// file's bytes: only one batch's arrays are in memory at once.
pub fn write_parquet_from(
    mut batches: impl Iterator<Item = RecordBatch>,
    props: parquet::file::properties::WriterProperties,
) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let first = batches
        .next()
        .ok_or_else(|| parquet::errors::ParquetError::General("no batch to write".into()))?;
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, first.schema(), Some(props))?;
    w.write(&first)?;
    drop(first);
    for b in batches {
        w.write(&b)?;
    }
    w.close()?;
    Ok(buf)
}

/// A Parquet file's record batches.
pub fn read_parquet(
    bytes: bytes::Bytes,
) -> Result<Vec<RecordBatch>, parquet::errors::ParquetError> {
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?
        .with_batch_size(64 * 1024)
        .build()?;
    r.map(|b| b.map_err(|e| parquet::errors::ParquetError::General(e.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, kind: Kind, amount: Option<i64>, attrs: &[(&str, &str)]) -> Event {
        Event {
            event_id: id.into(),
            provider_id: "claro".into(),
            product_id: "recarga".into(),
            customer_id: "c-1".into(),
            kind,
            amount: amount.and_then(Money::from_hundredths),
            currency: Currency::parse("COP").unwrap(),
            ts: 1_764_000_000_123,
            ref_event_id: (kind == Kind::Void).then(|| "s-1".into()),
            attrs: attrs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    #[test]
    fn rows_survive_every_layout_through_parquet() {
        let rows = vec![
            Row {
                tag: "counted",
                event: event("s-1", Kind::Sale, Some(500_050), &[("region", "andina")]),
                source: "a.jsonl".into(),
                offset: 7,
                target_ts: None,
            },
            Row {
                tag: "voided",
                event: event("v-1", Kind::Void, None, &[]),
                source: "kinesis:s/shardId-0".into(),
                offset: 8,
                target_ts: Some(1_764_000_000_000),
            },
        ];
        for layout in [STAGING, EVENTS, AUDIT] {
            let batch = to_batch(layout, &rows);
            let bytes = write_parquet(&[batch], props(3, 1024)).unwrap();
            let back: Vec<Row> = read_parquet(bytes.into())
                .unwrap()
                .iter()
                .flat_map(|b| from_batch(layout, b, Some("claro")).unwrap())
                .collect();
            let expect: Vec<Row> = rows
                .iter()
                .map(|r| Row {
                    tag: if layout.tag.is_some() {
                        r.tag
                    } else {
                        "counted"
                    },
                    target_ts: if layout.target_ts { r.target_ts } else { None },
                    ..r.clone()
                })
                .collect();
            assert_eq!(back, expect, "{layout:?}");
        }
    }

    #[test]
    fn batches_written_one_at_a_time_read_back_as_one_file_of_every_row_in_order() {
        let rows: Vec<Row> = (0..5)
            .map(|i| Row {
                tag: if i % 2 == 0 { "counted" } else { "voided" },
                event: event(&format!("e-{i}"), Kind::Sale, Some(100 + i), &[]),
                source: "a.jsonl".into(),
                offset: i as u64,
                target_ts: (i % 2 == 1).then_some(1_764_000_000_000 + i),
            })
            .collect();
        let bytes = write_parquet_from(
            rows.chunks(2).map(|c| to_batch(STAGING, c)),
            props(1, 1 << 20),
        )
        .unwrap();
        let back: Vec<Row> = read_parquet(bytes.into())
            .unwrap()
            .iter()
            .flat_map(|b| from_batch(STAGING, b, None).unwrap())
            .collect();
        assert_eq!(back, rows);
        assert!(write_parquet_from(std::iter::empty(), props(1, 1024)).is_err());
    }

    #[test]
    fn gather_copies_picked_rows_of_several_files_with_their_new_tags() {
        let row = |id: &str, tag, target_ts| Row {
            tag,
            event: event(id, Kind::Sale, Some(100), &[("region", id)]),
            source: format!("src-{id}"),
            offset: id.len() as u64,
            target_ts,
        };
        let staged = vec![row("a", "counted", None), row("bb", "voided", Some(5))];
        let published = vec![row("ccc", "counted", None)];
        let read = |layout, rows: &[Row]| {
            let bytes = write_parquet(&[to_batch(layout, rows)], props(1, 1024)).unwrap();
            let b = read_parquet(bytes.into()).unwrap().remove(0);
            Cols::of(layout, b).unwrap()
        };
        let (s, p) = (read(STAGING, &staged), read(EVENTS, &published));
        assert_eq!(
            (s.tag(1), s.target_ts(1), s.provider(0)),
            ("voided", Some(5), Some("claro"))
        );
        assert_eq!(
            (p.tag(0), p.target_ts(0), p.provider(0)),
            ("counted", None, None)
        );
        assert_eq!(s.attr(1, "region"), "bb");
        assert_eq!(s.attr(1, "channel"), "");
        let picks = [
            Pick {
                src: 1,
                row: 0,
                tag: "voided",
                target_ts: None,
            },
            Pick {
                src: 0,
                row: 1,
                tag: "void",
                target_ts: Some(5),
            },
        ];
        let b = gather(AUDIT, &[&s, &p], &picks).unwrap();
        let back = from_batch(AUDIT, &b, Some("claro")).unwrap();
        let expect = vec![
            Row {
                tag: "voided",
                ..published[0].clone()
            },
            Row {
                tag: "void",
                ..staged[1].clone()
            },
        ];
        assert_eq!(back, expect);
    }

    #[test]
    fn a_bad_value_names_its_column_and_row() {
        let mut rows = vec![Row {
            tag: "counted",
            event: event("s-1", Kind::Sale, Some(1), &[]),
            source: "a".into(),
            offset: 0,
            target_ts: None,
        }];
        rows.push(rows[0].clone());
        let b = to_batch(EVENTS, &rows);
        let mut cols: Vec<ArrayRef> = b.columns().to_vec();
        let kind = b.schema().index_of("kind").unwrap();
        cols[kind] = Arc::new(StringArray::from(vec!["sale", "gift"]));
        let b = RecordBatch::try_new(b.schema(), cols).unwrap();
        let err = Cols::of(EVENTS, b).err().unwrap();
        assert_eq!(err.column, "kind");
        assert!(
            err.reason.contains("row 1") && err.reason.contains("gift"),
            "{err}"
        );
    }

    #[test]
    fn the_same_rows_give_the_same_bytes() {
        let rows = vec![Row {
            tag: "counted",
            event: event("s-1", Kind::Sale, Some(1), &[]),
            source: "a".into(),
            offset: 0,
            target_ts: None,
        }];
        let a = write_parquet(&[to_batch(EVENTS, &rows)], props(3, 1024)).unwrap();
        let b = write_parquet(&[to_batch(EVENTS, &rows)], props(3, 1024)).unwrap();
        assert_eq!(a, b);
    }
}
