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
use arrow_array::{Array, ArrayRef, RecordBatch};
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
    let n = rows.len();
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
        let e = &r.event;
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
        source.append_value(&r.source);
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

/// A record batch of `layout` back to rows; `provider` fills in the provider of a
/// file whose path holds it.
pub fn from_batch(
    layout: Layout,
    b: &RecordBatch,
    provider: Option<&str>,
) -> Result<Vec<Row>, ColumnError> {
    let col = |name: &str| -> Result<&ArrayRef, ColumnError> {
        b.column_by_name(name).ok_or_else(|| ColumnError {
            column: name.into(),
            reason: "missing".into(),
        })
    };
    let bad = |name: &str, why: &str| ColumnError {
        column: name.into(),
        reason: why.into(),
    };
    let string = |name: &str| {
        col(name)?
            .as_string_opt::<i32>()
            .ok_or_else(|| bad(name, "not a string column"))
    };
    let tag = match layout.tag {
        Some(t) => Some((t, string(t)?)),
        None => None,
    };
    let id = string("event_id")?;
    let prov = if layout.provider {
        Some(string("provider_id")?)
    } else {
        None
    };
    let (product, customer, kind, currency, refs, source) = (
        string("product_id")?,
        string("customer_id")?,
        string("kind")?,
        string("currency")?,
        string("ref_event_id")?,
        string("source")?,
    );
    let amount = col("amount")?
        .as_primitive_opt::<Decimal128Type>()
        .ok_or_else(|| bad("amount", "not a decimal column"))?;
    let ts = col("ts")?
        .as_primitive_opt::<TimestampMillisecondType>()
        .ok_or_else(|| bad("ts", "not a millisecond timestamp column"))?;
    let offset = col("offset")?
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(|| bad("offset", "not a uint64 column"))?;
    let target = if layout.target_ts {
        Some(
            col("target_ts")?
                .as_primitive_opt::<TimestampMillisecondType>()
                .ok_or_else(|| bad("target_ts", "not a millisecond timestamp column"))?,
        )
    } else {
        None
    };
    let attrs = col("attrs")?
        .as_map_opt()
        .ok_or_else(|| bad("attrs", "not a map column"))?;
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let tag = match &tag {
            Some((name, t)) => {
                let v = t.value(i);
                *TAGS
                    .iter()
                    .find(|x| **x == v)
                    .ok_or_else(|| bad(name, &format!("row {i}: unknown tag '{v}'")))?
            }
            None => "counted",
        };
        let kind = match kind.value(i) {
            "sale" => Kind::Sale,
            "refund" => Kind::Refund,
            "void" => Kind::Void,
            k => return Err(bad("kind", &format!("row {i}: unknown kind '{k}'"))),
        };
        let amount = if amount.is_null(i) {
            None
        } else {
            let h = i64::try_from(amount.value(i))
                .ok()
                .and_then(Money::from_hundredths)
                .ok_or_else(|| bad("amount", &format!("row {i}: out of range")))?;
            Some(h)
        };
        let currency = Currency::parse(currency.value(i))
            .ok_or_else(|| bad("currency", &format!("row {i}: not a currency code")))?;
        let entries = attrs.value(i);
        let keys = entries.column(0).as_string::<i32>();
        let values = entries.column(1).as_string::<i32>();
        let provider_id = match (&prov, provider) {
            (Some(p), _) => p.value(i).into(),
            (None, Some(p)) => p.into(),
            (None, None) => return Err(bad("provider_id", "missing, and not in the path")),
        };
        out.push(Row {
            tag,
            event: Event {
                event_id: id.value(i).into(),
                provider_id,
                product_id: product.value(i).into(),
                customer_id: customer.value(i).into(),
                kind,
                amount,
                currency,
                ts: ts.value(i),
                ref_event_id: (!refs.is_null(i)).then(|| refs.value(i).into()),
                attrs: (0..keys.len())
                    .map(|j| (keys.value(j).into(), values.value(j).into()))
                    .collect(),
            },
            source: source.value(i).to_owned(),
            offset: offset.value(i),
            target_ts: target.and_then(|t| (!t.is_null(i)).then(|| t.value(i))),
        });
    }
    Ok(out)
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
    let schema = batches
        .first()
        .map(|b| b.schema())
        .ok_or_else(|| parquet::errors::ParquetError::General("no batch to write".into()))?;
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, Some(props))?;
    for b in batches {
        w.write(b)?;
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
