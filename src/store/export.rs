//! The export format: every row of every view as JSON Lines, sorted.
//!
//! One object per row, keys in this order: `view`, `window` (`"1m"`, `"1h"`, `"1d"`),
//! `window_start` (RFC 3339 UTC with `Z`; a provider-local day starts at its local
//! midnight), `provider_id`, the other group-by fields by name (`"attrs.region"` for
//! an attribute), then the view's metrics in the view's order: counts as JSON integers,
//! amounts as decimal strings with exactly two fraction digits, `min_ticket` and
//! `max_ticket` `null` in a row with no sale. A top-k row has `rank` (from 1), its key
//! field and its ranking metric. Rows are sorted by the byte order of view, window,
//! window_start and the group-by values in the view's order, then by rank.

use super::{Meta, StoredRow};
use crate::model::window::rfc3339;
use crate::model::{format_hundredths, Sum};
use crate::pipeline::{Metric, View};
use serde_json::Value;
use std::io::{self, Write};

/// Writes every row as JSON Lines; returns the number of rows.
pub fn write(meta: &Meta, rows: Vec<StoredRow>, out: &mut impl Write) -> io::Result<usize> {
    let mut lines: Vec<(Vec<String>, u32, String)> = rows
        .into_iter()
        .filter_map(|((key, rank), value)| {
            let view = meta.views.get(key.view as usize)?;
            let window = key.size.label();
            let start = rfc3339(key.start);
            let mut sort = vec![view.name.clone(), window.clone(), start.clone()];
            sort.extend(key.group.iter().map(|g| g.to_string()));
            Some((
                sort,
                rank,
                render(view, &window, &start, &key.group, rank, &value),
            ))
        })
        .collect();
    lines.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let n = lines.len();
    for (_, _, line) in lines {
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
    }
    Ok(n)
}

fn amount(v: Sum) -> Value {
    Value::String(format_hundredths(v))
}

/// One row as a JSON object, keys in export order.
pub fn render(
    view: &View,
    window: &str,
    start: &str,
    group: &[compact_str::CompactString],
    rank: u32,
    v: &crate::dataflow::RowValue,
) -> String {
    let mut fields: Vec<(String, Value)> = vec![
        ("view".into(), Value::from(view.name.as_str())),
        ("window".into(), Value::from(window)),
        ("window_start".into(), Value::from(start)),
    ];
    for (f, g) in view.group_by.iter().zip(group) {
        fields.push((f.name(), Value::from(g.as_str())));
    }
    match &view.top_k {
        Some(top) => {
            fields.push(("rank".into(), Value::from(rank)));
            fields.push((
                top.key.name(),
                Value::from(v.member.as_deref().unwrap_or("")),
            ));
            fields.push((top.by.name().into(), metric(top.by, v)));
        }
        None => {
            for m in &view.metrics {
                fields.push((m.name().into(), metric(*m, v)));
            }
        }
    }
    let mut s = String::with_capacity(256);
    s.push('{');
    for (i, (k, val)) in fields.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&serde_json::to_string(k).expect("strings serialize"));
        s.push(':');
        s.push_str(&serde_json::to_string(val).expect("values serialize"));
    }
    s.push('}');
    s
}

fn metric(m: Metric, v: &crate::dataflow::RowValue) -> Value {
    match m {
        Metric::SalesCount => Value::from(v.sums.sales),
        Metric::RefundsCount => Value::from(v.sums.refunds),
        Metric::GrossAmount | Metric::RefundsAmount | Metric::NetAmount => amount(v.sums.metric(m)),
        Metric::DistinctCustomers => Value::from(v.distinct_customers),
        Metric::MinTicket => v.min_ticket.map_or(Value::Null, |t| amount(Sum::from(t))),
        Metric::MaxTicket => v.max_ticket.map_or(Value::Null, |t| amount(Sum::from(t))),
    }
}
