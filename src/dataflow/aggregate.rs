//! Windows and metrics: counted deltas in, absolute row values out.
//!
//! `explode` (no exchange) turns each counted delta into per-view, per-window row
//! deltas and pre-aggregates them for the epoch on the worker that holds them, so a
//! busy row crosses the exchange once per epoch, not once per event. `rows` (keyed by
//! row) applies them to row state and emits, per epoch, the new absolute value of every
//! row that changed (or its deletion when its counted events were all voided).
//!
//! Row state: the sums; for `distinct_customers` a multiset of 128-bit customer
//! digests; for min/max tickets a multiset of sale amounts; for a top-k, the sums per
//! member. A window is sealed once the clock is past its end plus the larger of the
//! allowed lateness and the dedup horizon: no event can be admitted into it and no
//! void can reach its events any more, so its state is dropped without output.

use super::{epochs, keyed, Epoch, Expiry, Rules};
use crate::model::window::{Assigner, WindowSize};
use crate::model::{Event, Kind, Millis, Sum};
use crate::pipeline::{GroupField, Metric, Pipeline, TopK};
use chrono_tz::Tz;
use compact_str::CompactString;
use differential_dataflow::difference::{Abelian, IsZero, Monoid, Semigroup};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use timely::dataflow::channels::pact::Pipeline as Local;
use timely::dataflow::Stream;

/// The additive part of a row: a differential `Abelian` difference.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Sums {
    pub sales: i64,
    pub gross: Sum,
    pub refunds: i64,
    pub refunds_amount: Sum,
}

impl Sums {
    pub fn of(e: &Event, diff: i64) -> Sums {
        let amount = Sum::from(e.hundredths()) * Sum::from(diff);
        match e.kind {
            Kind::Sale => Sums {
                sales: diff,
                gross: amount,
                ..Sums::default()
            },
            Kind::Refund => Sums {
                refunds: diff,
                refunds_amount: amount,
                ..Sums::default()
            },
            Kind::Void => Sums::default(),
        }
    }

    pub fn net(&self) -> Sum {
        self.gross - self.refunds_amount
    }

    /// Counted events (sales and refunds) behind these sums.
    pub fn events(&self) -> i64 {
        self.sales + self.refunds
    }

    /// The value of a sum metric (counts as plain numbers).
    pub fn metric(&self, m: Metric) -> Sum {
        match m {
            Metric::SalesCount => Sum::from(self.sales),
            Metric::GrossAmount => self.gross,
            Metric::RefundsCount => Sum::from(self.refunds),
            Metric::RefundsAmount => self.refunds_amount,
            Metric::NetAmount => self.net(),
            _ => unreachable!("{} is not a sum", m.name()),
        }
    }
}

impl IsZero for Sums {
    fn is_zero(&self) -> bool {
        *self == Sums::default()
    }
}

impl Semigroup for Sums {
    fn plus_equals(&mut self, rhs: &Self) {
        self.sales += rhs.sales;
        self.gross += rhs.gross;
        self.refunds += rhs.refunds;
        self.refunds_amount += rhs.refunds_amount;
    }
}

impl Monoid for Sums {
    fn zero() -> Self {
        Sums::default()
    }
}

impl Abelian for Sums {
    fn negate(&mut self) {
        self.sales = -self.sales;
        self.gross = -self.gross;
        self.refunds = -self.refunds;
        self.refunds_amount = -self.refunds_amount;
    }
}

/// A row's identity: view (index in the pipeline), window, and group-by values in
/// the view's order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RowKey {
    pub view: u16,
    pub size: WindowSize,
    pub start: Millis,
    pub group: Vec<CompactString>,
}

impl RowKey {
    fn route(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&self.view.to_le_bytes());
        h.update(&self.start.to_le_bytes());
        for g in &self.group {
            h.update(&(g.len() as u32).to_le_bytes());
            h.update(g.as_bytes());
        }
        h.digest()
    }
}

/// A row's absolute value. A top-k row holds its member and the member's sums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowValue {
    pub sums: Sums,
    pub distinct_customers: u64,
    pub min_ticket: Option<i64>,
    pub max_ticket: Option<i64>,
    pub member: Option<CompactString>,
}

/// A change to one row (`rank` is 0 except in top-k views); `None` deletes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowUpdate {
    pub key: RowKey,
    pub rank: u32,
    pub value: Option<RowValue>,
}

/// The views, compiled for the hot path.
pub struct Plan {
    views: Vec<ViewPlan>,
    zones: HashMap<String, Tz>,
    default_zone: Tz,
    sizes: Vec<WindowSize>,
}

struct ViewPlan {
    group: Vec<GroupField>,
    windows: Vec<WindowSize>,
    customers: bool,
    tickets: bool,
    top: Option<TopK>,
}

impl Plan {
    pub fn new(p: &Pipeline) -> Plan {
        let views: Vec<ViewPlan> = p
            .views
            .iter()
            .map(|v| ViewPlan {
                group: v.group_by.clone(),
                windows: v.windows.clone(),
                customers: v.metrics.contains(&Metric::DistinctCustomers),
                tickets: v
                    .metrics
                    .iter()
                    .any(|m| matches!(m, Metric::MinTicket | Metric::MaxTicket)),
                top: v.top_k.clone(),
            })
            .collect();
        let mut sizes: Vec<WindowSize> = views
            .iter()
            .flat_map(|v| v.windows.iter().copied())
            .collect();
        sizes.sort();
        sizes.dedup();
        Plan {
            views,
            zones: p.time_zones.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            default_zone: p.default_time_zone,
            sizes,
        }
    }

    fn zone(&self, provider: &str) -> Tz {
        self.zones
            .get(provider)
            .copied()
            .unwrap_or(self.default_zone)
    }
}

fn field(e: &Event, f: &GroupField) -> CompactString {
    match f {
        GroupField::ProviderId => e.provider_id.clone(),
        GroupField::ProductId => e.product_id.clone(),
        GroupField::CustomerId => e.customer_id.clone(),
        GroupField::Currency => CompactString::from(e.currency.as_str()),
        GroupField::Attr(n) => CompactString::from(e.attr(n)),
    }
}

fn customer_digest(e: &Event) -> u128 {
    xxhash_rust::xxh3::xxh3_128(e.customer_id.as_bytes())
}

/// Row deltas of one epoch, pre-aggregated on one worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Partial {
    Row {
        key: RowKey,
        end: Millis,
        sums: Sums,
        customers: Vec<(u128, i64)>,
        tickets: Vec<(i64, i64)>,
    },
    Member {
        key: RowKey,
        end: Millis,
        member: CompactString,
        sums: Sums,
    },
}

impl Partial {
    fn route(&self) -> u64 {
        match self {
            Partial::Row { key, .. } | Partial::Member { key, .. } => key.route(),
        }
    }
}

pub(super) fn explode<'s>(
    counted: Stream<'s, Epoch, Vec<(Event, i64)>>,
    clock: Stream<'s, Epoch, Vec<Millis>>,
    plan: Arc<Plan>,
) -> Stream<'s, Epoch, Vec<Partial>> {
    let mut assigner = Assigner::default();
    epochs(
        counted,
        clock,
        Local,
        "Explode",
        move |_e, batch: Vec<(Event, i64)>, _clock, out: &mut Vec<Partial>| {
            type RowAcc = (Millis, Sums, Vec<(u128, i64)>, Vec<(i64, i64)>);
            let mut rows: HashMap<RowKey, RowAcc> = HashMap::new();
            let mut members: HashMap<(RowKey, CompactString), (Millis, Sums)> = HashMap::new();
            let mut windows = Vec::with_capacity(plan.sizes.len());
            for (e, diff) in &batch {
                let tz = plan.zone(&e.provider_id);
                windows.clear();
                windows.extend(
                    plan.sizes
                        .iter()
                        .map(|s| (*s, assigner.window(*s, tz, e.ts))),
                );
                let sums = Sums::of(e, *diff);
                for (vi, v) in plan.views.iter().enumerate() {
                    let group: Vec<CompactString> = v.group.iter().map(|f| field(e, f)).collect();
                    for size in &v.windows {
                        let w = windows.iter().find(|(s, _)| s == size).expect("planned").1;
                        let key = RowKey {
                            view: vi as u16,
                            size: *size,
                            start: w.start,
                            group: group.clone(),
                        };
                        if let Some(top) = &v.top {
                            let m = members
                                .entry((key, field(e, &top.key)))
                                .or_insert((w.end, Sums::default()));
                            m.1.plus_equals(&sums);
                        } else {
                            let acc = rows.entry(key).or_insert_with(|| {
                                (w.end, Sums::default(), Vec::new(), Vec::new())
                            });
                            acc.1.plus_equals(&sums);
                            if v.customers {
                                acc.2.push((customer_digest(e), *diff));
                            }
                            if v.tickets && e.kind == Kind::Sale {
                                acc.3.push((e.hundredths(), *diff));
                            }
                        }
                    }
                }
            }
            use differential_dataflow::consolidation::consolidate;
            for (key, (end, sums, mut customers, mut tickets)) in rows {
                consolidate(&mut customers);
                consolidate(&mut tickets);
                out.push(Partial::Row {
                    key,
                    end,
                    sums,
                    customers,
                    tickets,
                });
            }
            for ((key, member), (end, sums)) in members {
                out.push(Partial::Member {
                    key,
                    end,
                    member,
                    sums,
                });
            }
        },
    )
}

#[derive(Default)]
struct RowState {
    sums: Sums,
    customers: HashMap<u128, i64>,
    tickets: BTreeMap<i64, i64>,
}

impl RowState {
    fn value(&self) -> Option<RowValue> {
        (self.sums.events() > 0).then(|| RowValue {
            sums: self.sums,
            distinct_customers: self.customers.len() as u64,
            min_ticket: self.tickets.keys().next().copied(),
            max_ticket: self.tickets.keys().next_back().copied(),
            member: None,
        })
    }
}

#[derive(Default)]
struct TopState {
    members: HashMap<CompactString, Sums>,
    shown: Vec<(CompactString, Sums)>,
}

impl TopState {
    /// The k best members with counted events: by metric descending, then member bytes.
    fn ranking(&self, top: &TopK) -> Vec<(CompactString, Sums)> {
        let mut all: Vec<(&CompactString, &Sums)> = self
            .members
            .iter()
            .filter(|(_, s)| s.events() > 0)
            .collect();
        let order = |a: &(&CompactString, &Sums), b: &(&CompactString, &Sums)| {
            b.1.metric(top.by)
                .cmp(&a.1.metric(top.by))
                .then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
        };
        if all.len() > top.k {
            all.select_nth_unstable_by(top.k - 1, order);
            all.truncate(top.k);
        }
        all.sort_unstable_by(order);
        all.into_iter().map(|(m, s)| (m.clone(), *s)).collect()
    }
}

pub(super) fn rows<'s>(
    partial: Stream<'s, Epoch, Vec<Partial>>,
    clock: Stream<'s, Epoch, Vec<Millis>>,
    plan: Arc<Plan>,
    rules: Rules,
) -> Stream<'s, Epoch, Vec<super::Out>> {
    let keep = rules.lateness.max(rules.horizon);
    let mut rows: HashMap<RowKey, RowState> = HashMap::new();
    let mut tops: HashMap<RowKey, TopState> = HashMap::new();
    let mut expiry: Expiry<RowKey> = Expiry::default();
    let mut sealed_before = Millis::MIN;
    epochs(
        partial,
        clock,
        keyed(Partial::route),
        "Rows",
        move |epoch, batch: Vec<Partial>, clock, out: &mut Vec<super::Out>| {
            let mut before: HashMap<RowKey, Option<RowValue>> = HashMap::new();
            let mut touched_tops: Vec<RowKey> = Vec::new();
            for p in batch {
                match p {
                    Partial::Row {
                        key,
                        end,
                        sums,
                        customers,
                        tickets,
                    } => {
                        if end.saturating_add(keep) < sealed_before {
                            tracing::error!(
                                epoch,
                                view = key.view,
                                start = key.start,
                                "change to a sealed window dropped"
                            );
                            continue;
                        }
                        let state = match rows.get_mut(&key) {
                            Some(s) => s,
                            None => {
                                expiry.at(end.saturating_add(keep), key.clone());
                                rows.entry(key.clone()).or_default()
                            }
                        };
                        before.entry(key).or_insert_with(|| state.value());
                        state.sums.plus_equals(&sums);
                        for (c, d) in customers {
                            bump(&mut state.customers, c, d);
                        }
                        for (t, d) in tickets {
                            bump(&mut state.tickets, t, d);
                        }
                    }
                    Partial::Member {
                        key,
                        end,
                        member,
                        sums,
                    } => {
                        if end.saturating_add(keep) < sealed_before {
                            tracing::error!(
                                epoch,
                                view = key.view,
                                start = key.start,
                                "change to a sealed window dropped"
                            );
                            continue;
                        }
                        let state = match tops.get_mut(&key) {
                            Some(s) => s,
                            None => {
                                expiry.at(end.saturating_add(keep), key.clone());
                                tops.entry(key.clone()).or_default()
                            }
                        };
                        state.members.entry(member).or_default().plus_equals(&sums);
                        touched_tops.push(key);
                    }
                }
            }
            for (key, old) in before {
                let new = rows.get(&key).and_then(RowState::value);
                if new.is_none() {
                    rows.remove(&key);
                }
                if new != old {
                    out.push(super::Out::Row(RowUpdate {
                        key,
                        rank: 0,
                        value: new,
                    }));
                }
            }
            touched_tops.sort_unstable();
            touched_tops.dedup();
            for key in touched_tops {
                let top = plan.views[key.view as usize]
                    .top
                    .as_ref()
                    .expect("top-k view");
                let state = tops.get_mut(&key).expect("touched");
                state.members.retain(|_, s| !s.is_zero());
                let now = state.ranking(top);
                for rank in 0..now.len().max(state.shown.len()) {
                    let (old, new) = (state.shown.get(rank), now.get(rank));
                    if old != new {
                        let value = new.map(|(m, s)| RowValue {
                            sums: *s,
                            distinct_customers: 0,
                            min_ticket: None,
                            max_ticket: None,
                            member: Some(m.clone()),
                        });
                        out.push(super::Out::Row(RowUpdate {
                            key: key.clone(),
                            rank: rank as u32 + 1,
                            value,
                        }));
                    }
                }
                state.shown = now;
                if state.members.is_empty() {
                    tops.remove(&key);
                }
            }
            for key in expiry.due(clock) {
                rows.remove(&key);
                tops.remove(&key);
            }
            sealed_before = sealed_before.max(clock);
        },
    )
}

fn bump<K>(map: &mut impl MultiSet<K>, k: K, d: i64) {
    map.bump(k, d);
}

/// A multiset: counts per key, with a key removed when its count reaches zero.
trait MultiSet<K> {
    fn bump(&mut self, k: K, d: i64);
}

impl<K: std::hash::Hash + Eq> MultiSet<K> for HashMap<K, i64> {
    fn bump(&mut self, k: K, d: i64) {
        use std::collections::hash_map::Entry;
        match self.entry(k) {
            Entry::Occupied(mut o) => {
                *o.get_mut() += d;
                debug_assert!(*o.get() >= 0, "a multiset count went negative");
                if *o.get() == 0 {
                    o.remove();
                }
            }
            Entry::Vacant(v) => {
                debug_assert!(d > 0, "a multiset count went negative");
                v.insert(d);
            }
        }
    }
}

impl<K: Ord> MultiSet<K> for BTreeMap<K, i64> {
    fn bump(&mut self, k: K, d: i64) {
        use std::collections::btree_map::Entry;
        match self.entry(k) {
            Entry::Occupied(mut o) => {
                *o.get_mut() += d;
                debug_assert!(*o.get() >= 0, "a multiset count went negative");
                if *o.get() == 0 {
                    o.remove();
                }
            }
            Entry::Vacant(v) => {
                debug_assert!(d > 0, "a multiset count went negative");
                v.insert(d);
            }
        }
    }
}
