//! Backfill: a shadow store that `tally replay` built with the same pipeline,
//! compared with the live store over a range of windows and swapped into it.
//!
//! Which windows take part. A window does when it lies inside the replay's range
//! `[since, until)` and the live store has sealed it: its end plus the larger of the
//! allowed lateness and the dedup horizon is at or before the live clock, so the live
//! dataflow can never write it again and a swapped-in value stays. On Redis it must
//! also still be inside the live retention (an expired window is not written back).
//! Windows the live store has not sealed yet are counted and left alone: replay them
//! again once the live clock has passed them.
//!
//! The swap writes, for every taking-part window where the two stores differ, the
//! shadow's rows over the live ones and deletes the live rows the shadow lacks.
//! Values are absolute, so an event both counted still counts once, and a second
//! swap of the same shadow changes nothing. How the changes reach the live store
//! atomically is the store's business: one Redis transaction beside the live
//! writer ([`super::redis::RedisStore::patch`]), or one commit of the embedded store
//! while its run is stopped (see `cli::replay`).

use super::{StoreError, StoredRow};
use crate::dataflow::{RowKey, RowUpdate, RowValue};
use crate::model::window::{local_day, rfc3339, WindowSize};
use crate::model::Millis;
use crate::pipeline::Pipeline;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Event times `[since, until)`; windows must lie wholly inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub since: Millis,
    pub until: Millis,
}

/// A window: provider, view index, size, start.
type WindowId = (String, u16, WindowSize, Millis);

/// One row that differs, as export lines (`None`: the store lacks the row).
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    pub provider: String,
    pub view: String,
    pub window: String,
    pub window_start: String,
    pub shadow: Option<String>,
    pub live: Option<String>,
}

/// What the comparison found, and the changes a swap writes.
#[derive(Debug, Default, Serialize)]
pub struct Comparison {
    /// Windows that take part (in range, sealed live, inside retention).
    pub compared: usize,
    /// Of those, the ones whose rows are the same in both stores.
    pub identical: usize,
    /// Windows in range the live store has not sealed yet (left alone).
    pub unsealed: usize,
    /// Windows in range already past the live retention (left alone).
    pub expired: usize,
    /// Rows that differ, in window order; every one of them.
    pub differences: Vec<Difference>,
    /// What a swap writes to the live store.
    #[serde(skip)]
    pub changes: Vec<RowUpdate>,
}

impl Comparison {
    /// Windows that differ.
    pub fn differing(&self) -> usize {
        self.compared - self.identical
    }
}

/// The end of a window of `provider` that starts at `start`.
pub fn window_end(pipeline: &Pipeline, provider: &str, size: WindowSize, start: Millis) -> Millis {
    match size {
        WindowSize::Fixed(len) => start.saturating_add(len),
        WindowSize::LocalDay => local_day(pipeline.time_zone(provider), start).end,
    }
}

/// Compares the shadow's rows with the live store's over each provider's `range`
/// (`None`: the provider takes no part). `live_clock` is
/// the live store's clock; `retention` the live store's row TTL per window size
/// (`None`: it keeps every window, as the embedded store does).
pub fn compare(
    pipeline: &Pipeline,
    live_clock: Millis,
    retention: Option<&dyn Fn(WindowSize) -> Duration>,
    live: Vec<StoredRow>,
    shadow: Vec<StoredRow>,
    range: &dyn Fn(&str) -> Option<Range>,
) -> Comparison {
    let ms = |d: Duration| d.as_millis().min(i64::MAX as u128) as i64;
    let seal = ms(pipeline.allowed_lateness.max(pipeline.dedup_horizon));
    type Rows = BTreeMap<(Vec<compact_str::CompactString>, u32), RowValue>;
    let mut windows: BTreeMap<WindowId, (Rows, Rows)> = BTreeMap::new();
    let id = |k: &RowKey| (k.group[0].to_string(), k.view, k.size, k.start);
    for (side, rows) in [(0, live), (1, shadow)] {
        for ((key, rank), value) in rows {
            let w = windows.entry(id(&key)).or_default();
            let group = key.group;
            if side == 0 {
                w.0.insert((group, rank), value);
            } else {
                w.1.insert((group, rank), value);
            }
        }
    }
    let mut c = Comparison::default();
    for ((provider, view, size, start), (live, shadow)) in windows {
        let end = window_end(pipeline, &provider, size, start);
        let Some(range) = range(&provider) else {
            continue;
        };
        if start < range.since || end > range.until {
            continue;
        }
        if live_clock == Millis::MIN || end.saturating_add(seal) > live_clock {
            c.unsealed += 1;
            continue;
        }
        if let Some(ttl) = retention {
            if end.saturating_add(ms(ttl(size))) <= live_clock {
                c.expired += 1;
                continue;
            }
        }
        c.compared += 1;
        if live == shadow {
            c.identical += 1;
            continue;
        }
        let Some(v) = pipeline.views.get(view as usize) else {
            continue;
        };
        let (label, at) = (size.label(), rfc3339(start));
        let line = |(g, r): &(Vec<compact_str::CompactString>, u32), x: Option<&RowValue>| {
            x.map(|x| super::export::render(v, &label, &at, g, *r, x))
        };
        let key = |group: Vec<compact_str::CompactString>| RowKey {
            view,
            size,
            start,
            group,
        };
        for (k, l) in &live {
            let s = shadow.get(k);
            if s == Some(l) {
                continue;
            }
            c.differences.push(Difference {
                provider: provider.clone(),
                view: v.name.clone(),
                window: label.clone(),
                window_start: at.clone(),
                shadow: line(k, s),
                live: line(k, Some(l)),
            });
            if s.is_none() {
                c.changes.push(RowUpdate {
                    key: key(k.0.clone()),
                    rank: k.1,
                    value: None,
                });
            }
        }
        for (k, s) in shadow {
            if live.get(&k) == Some(&s) {
                continue;
            }
            if !live.contains_key(&k) {
                c.differences.push(Difference {
                    provider: provider.clone(),
                    view: v.name.clone(),
                    window: label.clone(),
                    window_start: at.clone(),
                    shadow: line(&k, Some(&s)),
                    live: None,
                });
            }
            c.changes.push(RowUpdate {
                key: key(k.0),
                rank: k.1,
                value: Some(s),
            });
        }
    }
    c
}

/// The views of a shadow store must be the live store's: rows of other views
/// cannot be swapped in.
pub fn check_views(
    live: &[crate::pipeline::View],
    shadow: &[crate::pipeline::View],
) -> Result<(), StoreError> {
    if live == shadow {
        return Ok(());
    }
    let names = |v: &[crate::pipeline::View]| {
        v.iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(StoreError::ViewsChanged(format!(
        "live: {}; shadow: {}",
        names(live),
        names(shadow)
    )))
}
