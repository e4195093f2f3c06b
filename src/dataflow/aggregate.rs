//! Windows and metrics: counted deltas in, absolute row values out.
//!
//! `explode` (no exchange) turns each counted delta into per-view, per-window row
//! deltas and pre-aggregates them for the epoch on the worker that holds them, so a
//! busy row crosses the exchange once per epoch, not once per event. `rows` (keyed by
//! row) applies them to row state and emits, per epoch, the new absolute value of every
//! row that changed (or its deletion when its counted events were all voided).
//!
//! Row state: the sums; for `distinct_customers` a multiset of 128-bit customer
//! digests (once the window is past the lateness only voids can follow, so the row is
//! closed: customers with one event are counted instead of held); for min/max tickets
//! a multiset of sale amounts (both held only by rows of views with those metrics);
//! for a top-k, the sums per member. A window is sealed once the clock is past its end
//! plus the larger of the allowed lateness and the dedup horizon: no event can be
//! admitted into it and no void can reach its events any more, so its state is dropped
//! without output.

use super::table::Parted;
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
        Sums::of_parts(e.kind, e.hundredths(), diff)
    }

    /// [`Sums::of`] an event of `kind` and amount `hundredths`.
    pub fn of_parts(kind: Kind, hundredths: i64, diff: i64) -> Sums {
        let amount = Sum::from(hundredths) * Sum::from(diff);
        match kind {
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

impl Sums {
    /// Adds another window's or event's sums.
    pub fn add(&mut self, rhs: &Sums) {
        self.sales += rhs.sales;
        self.gross += rhs.gross;
        self.refunds += rhs.refunds;
        self.refunds_amount += rhs.refunds_amount;
    }
}

impl Semigroup for Sums {
    fn plus_equals(&mut self, rhs: &Self) {
        self.add(rhs);
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

/// An event's value for a group-by field ("" for an absent attribute).
pub fn value<'a>(e: &'a Event, f: &GroupField) -> &'a str {
    match f {
        GroupField::ProviderId => &e.provider_id,
        GroupField::ProductId => &e.product_id,
        GroupField::CustomerId => &e.customer_id,
        GroupField::Currency => e.currency.as_str(),
        GroupField::Attr(n) => e.attr(n),
    }
}

fn field(e: &Event, f: &GroupField) -> CompactString {
    CompactString::from(value(e, f))
}

fn customer_digest(e: &Event) -> super::Digest {
    super::id_digest(&e.customer_id)
}

/// A 128-bit digest of a row's identity (view, window, group values): rows are found
/// and routed by it without building their key.
pub type RowId = u128;

type Map<K, V> = HashMap<K, V, ahash::RandomState>;

/// A group value as row digests take it: its length, then its bytes, so that values
/// cannot run into each other.
#[inline]
pub fn put_value(buf: &mut Vec<u8>, v: &str) {
    buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
    buf.extend_from_slice(v.as_bytes());
}

/// Digests a row's identity; `buf` is scratch space reused across calls.
#[allow(clippy::too_many_arguments)]
fn row_id(
    buf: &mut Vec<u8>,
    view: u16,
    size: WindowSize,
    start: Millis,
    e: &Event,
    group: &[GroupField],
    member: Option<&GroupField>,
) -> RowId {
    buf.clear();
    buf.extend_from_slice(&view.to_le_bytes());
    let size = match size {
        WindowSize::Fixed(ms) => ms,
        WindowSize::LocalDay => -1,
    };
    buf.extend_from_slice(&size.to_le_bytes());
    buf.extend_from_slice(&start.to_le_bytes());
    let put = |buf: &mut Vec<u8>, f: &GroupField| put_value(buf, value(e, f));
    for f in group {
        put(buf, f);
    }
    if let Some(m) = member {
        buf.extend_from_slice(b"|member|");
        put(buf, m);
    }
    xxhash_rust::xxh3::xxh3_128(buf)
}

/// Row deltas of one epoch, pre-aggregated on one worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Partial {
    Row {
        id: RowId,
        key: RowKey,
        end: Millis,
        sums: Sums,
        customers: Vec<(super::Digest, i64)>,
        tickets: Vec<(i64, i64)>,
    },
    /// A top-k member's deltas; `id` is its group's row.
    Member {
        id: RowId,
        key: RowKey,
        end: Millis,
        member: CompactString,
        sums: Sums,
    },
}

impl Partial {
    fn route(&self) -> u64 {
        match self {
            Partial::Row { id, .. } | Partial::Member { id, .. } => *id as u64,
        }
    }
}

pub(super) fn explode<'s>(
    counted: Stream<'s, Epoch, Vec<(Box<Event>, i64)>>,
    clock: Stream<'s, Epoch, Vec<Millis>>,
    plan: Arc<Plan>,
) -> Stream<'s, Epoch, Vec<Partial>> {
    struct RowAcc {
        key: RowKey,
        end: Millis,
        sums: Sums,
        customers: Vec<(super::Digest, i64)>,
        tickets: Vec<(i64, i64)>,
    }
    let mut assigner = Assigner::default();
    // Kept across epochs so they do not grow from empty every time.
    let mut rows: Map<RowId, RowAcc> = Map::default();
    let mut members: Map<RowId, (RowId, RowKey, CompactString, Millis, Sums)> = Map::default();
    let mut windows = Vec::with_capacity(plan.sizes.len());
    let mut buf = Vec::with_capacity(256);
    epochs(
        counted,
        clock,
        Local,
        "Explode",
        move |_e, batch: &mut Vec<(Box<Event>, i64)>, _clock, out: &mut Vec<Partial>| {
            for (e, diff) in batch.iter() {
                let tz = plan.zone(&e.provider_id);
                windows.clear();
                windows.extend(
                    plan.sizes
                        .iter()
                        .map(|s| (*s, assigner.window(*s, tz, e.ts))),
                );
                let sums = Sums::of(e, *diff);
                // Digested once per event, for every row with distinct customers.
                let mut customer: Option<super::Digest> = None;
                for (vi, v) in plan.views.iter().enumerate() {
                    for size in &v.windows {
                        let w = windows.iter().find(|(s, _)| s == size).expect("planned").1;
                        let key = || RowKey {
                            view: vi as u16,
                            size: *size,
                            start: w.start,
                            group: v.group.iter().map(|f| field(e, f)).collect(),
                        };
                        if let Some(top) = &v.top {
                            let mid = row_id(
                                &mut buf,
                                vi as u16,
                                *size,
                                w.start,
                                e,
                                &v.group,
                                Some(&top.key),
                            );
                            let m = members.entry(mid).or_insert_with(|| {
                                // The group's row: only needed the first time a member shows up.
                                let id =
                                    row_id(&mut buf, vi as u16, *size, w.start, e, &v.group, None);
                                (id, key(), field(e, &top.key), w.end, Sums::default())
                            });
                            m.4.plus_equals(&sums);
                        } else {
                            let id = row_id(&mut buf, vi as u16, *size, w.start, e, &v.group, None);
                            let acc = rows.entry(id).or_insert_with(|| RowAcc {
                                key: key(),
                                end: w.end,
                                sums: Sums::default(),
                                customers: Vec::new(),
                                tickets: Vec::new(),
                            });
                            acc.sums.plus_equals(&sums);
                            if v.customers {
                                let c = *customer.get_or_insert_with(|| customer_digest(e));
                                acc.customers.push((c, *diff));
                            }
                            if v.tickets && e.kind == Kind::Sale {
                                acc.tickets.push((e.hundredths(), *diff));
                            }
                        }
                    }
                }
            }
            use differential_dataflow::consolidation::consolidate;
            for (id, mut acc) in rows.drain() {
                consolidate(&mut acc.customers);
                consolidate(&mut acc.tickets);
                out.push(Partial::Row {
                    id,
                    key: acc.key,
                    end: acc.end,
                    sums: acc.sums,
                    customers: acc.customers,
                    tickets: acc.tickets,
                });
            }
            for (_, (id, key, member, end, sums)) in members.drain() {
                out.push(Partial::Member {
                    id,
                    key,
                    end,
                    member,
                    sums,
                });
            }
        },
    )
}

/// A row's state: its sums and, only in views with `distinct_customers` or ticket
/// metrics, the multisets behind them (boxed: most rows have none, and holding an
/// empty pair inline made every row's state 160 bytes instead of 64).
#[derive(Default)]
struct RowState {
    sums: Sums,
    multisets: Option<Box<Multisets>>,
    /// The last pass of the rows stage (one per epoch) that listed this row as touched,
    /// with its value before the epoch (0: none). In what was the struct's padding.
    pass: u32,
}

impl RowState {
    fn value(&self) -> Option<RowValue> {
        let m = self.multisets.as_deref();
        (self.sums.events() > 0).then(|| RowValue {
            sums: self.sums,
            distinct_customers: m.map_or(0, |m| m.customers.len() as u64 + m.singles),
            min_ticket: m.and_then(|m| m.tickets.keys().next().copied()),
            max_ticket: m.and_then(|m| m.tickets.keys().next_back().copied()),
            member: None,
        })
    }

    fn close(&mut self) {
        if let Some(m) = &mut self.multisets {
            m.close();
        }
    }
}

#[derive(Default)]
struct Multisets {
    /// Counted events per customer. Once the row is closed (see `close`), customers
    /// with one event are not held: `singles` counts them.
    customers: Map<super::Digest, i64>,
    singles: u64,
    closed: bool,
    tickets: BTreeMap<i64, i64>,
}

impl Multisets {
    /// The window is past the lateness: no event can enter the row any more, only
    /// voids can take events out. To tell whether a removal drops a customer it is
    /// enough to hold the customers with two or more events and count the others.
    fn close(&mut self) {
        let before = self.customers.len();
        self.customers.retain(|_, n| *n > 1);
        self.customers.shrink_to_fit();
        self.singles += (before - self.customers.len()) as u64;
        self.closed = true;
    }

    fn customer(&mut self, c: super::Digest, d: i64) {
        if !self.closed {
            return bump(&mut self.customers, c, d);
        }
        match self.customers.get_mut(&c) {
            Some(n) => {
                *n += d;
                debug_assert!(*n >= 0, "a customer count went negative");
                if *n <= 1 {
                    self.singles += u64::from(*n == 1);
                    self.customers.remove(&c);
                }
            }
            // Held as a single: only its one event can leave.
            None if d == -1 && self.singles > 0 => self.singles -= 1,
            None => tracing::error!(
                d,
                "a closed row's customers changed in a way lateness rules out"
            ),
        }
    }
}

#[derive(Default)]
struct TopState {
    members: Map<CompactString, Sums>,
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
    let mut rows: Parted<RowId, (RowKey, RowState)> = Parted::default();
    let mut tops: Parted<RowId, (RowKey, TopState)> = Parted::default();
    let mut expiry: Expiry<RowId> = Expiry::default();
    // Rows with distinct customers close once their window is past the lateness.
    let mut closing: Expiry<RowId> = Expiry::default();
    let mut sealed_before = Millis::MIN;
    // Per epoch: the touched rows with their values before it, the touched top-k
    // groups (kept across epochs so they do not grow from empty every time). A row is
    // listed once: its state carries the pass that listed it last (see `RowState::pass`),
    // so no second map of the epoch's rows is needed.
    let mut before: Vec<(RowId, Option<RowValue>)> = Vec::new();
    let mut touched_tops: Vec<RowId> = Vec::new();
    let mut pass: u32 = 0;
    epochs(
        partial,
        clock,
        keyed(Partial::route),
        "Rows",
        move |epoch, batch: &mut Vec<Partial>, clock, out: &mut Vec<super::Out>| {
            let held = rows.len() + tops.len();
            // Never 0, the pass of a row no epoch has listed yet.
            pass = pass.wrapping_add(1).max(1);
            for p in batch.drain(..) {
                // A change to a sealed window cannot happen (see the module docs); if it
                // ever did, applying it would overwrite a committed row with a partial one.
                let (id, key, end) = match &p {
                    Partial::Row { id, key, end, .. } | Partial::Member { id, key, end, .. } => {
                        (*id, key, *end)
                    }
                };
                if end.saturating_add(keep) < sealed_before {
                    tracing::error!(
                        epoch,
                        view = key.view,
                        start = key.start,
                        "change to a sealed window dropped"
                    );
                    continue;
                }
                match p {
                    Partial::Row {
                        key,
                        sums,
                        customers,
                        tickets,
                        ..
                    } => {
                        let (state, new) =
                            slot(&mut rows, &mut expiry, id, key, end.saturating_add(keep));
                        if new && !customers.is_empty() {
                            closing.at(end.saturating_add(rules.lateness), id);
                        }
                        if state.pass != pass {
                            state.pass = pass;
                            before.push((id, state.value()));
                        }
                        state.sums.plus_equals(&sums);
                        if !customers.is_empty() || !tickets.is_empty() {
                            let m = state.multisets.get_or_insert_with(Default::default);
                            for (c, d) in customers {
                                m.customer(c, d);
                            }
                            for (t, d) in tickets {
                                bump(&mut m.tickets, t, d);
                            }
                        }
                    }
                    Partial::Member {
                        key, member, sums, ..
                    } => {
                        let (state, _) =
                            slot(&mut tops, &mut expiry, id, key, end.saturating_add(keep));
                        state.members.entry(member).or_default().plus_equals(&sums);
                        touched_tops.push(id);
                    }
                }
            }
            for (id, old) in before.drain(..) {
                let (key, state) = rows.get(&id).expect("touched rows exist");
                let new = state.value();
                let changed = new != old;
                // A row left with no counted event leaves the state, changed or not.
                let key = match new {
                    None => rows.remove(&id).expect("touched rows exist").0,
                    Some(_) if changed => key.clone(),
                    Some(_) => continue,
                };
                if changed {
                    out.push(super::Out::Row(Box::new(RowUpdate {
                        key,
                        rank: 0,
                        value: new,
                    })));
                }
            }
            touched_tops.sort_unstable();
            touched_tops.dedup();
            for id in touched_tops.drain(..) {
                let (key, state) = tops.get_mut(&id).expect("touched");
                let top = plan.views[key.view as usize]
                    .top
                    .as_ref()
                    .expect("top-k view");
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
                        out.push(super::Out::Row(Box::new(RowUpdate {
                            key: key.clone(),
                            rank: rank as u32 + 1,
                            value,
                        })));
                    }
                }
                state.shown = now;
                if state.members.is_empty() {
                    tops.remove(&id);
                }
            }
            for id in closing.due(clock) {
                if let Some((_, state)) = rows.get_mut(&id) {
                    state.close();
                }
            }
            for id in expiry.due(clock) {
                rows.remove(&id);
                tops.remove(&id);
            }
            super::track_state("rows", held, rows.len() + tops.len());
            sealed_before = sealed_before.max(clock);
        },
    )
}

/// A row's state, created (with its seal time) on first touch; whether it was.
fn slot<'a, S: Default>(
    map: &'a mut Parted<RowId, (RowKey, S)>,
    expiry: &mut Expiry<RowId>,
    id: RowId,
    key: RowKey,
    seal: Millis,
) -> (&'a mut S, bool) {
    use super::table::Entry;
    match map.entry(id) {
        Entry::Occupied(o) => (&mut o.into_mut().1, false),
        Entry::Vacant(v) => {
            expiry.at(seal, id);
            (&mut v.insert((key, S::default())).1, true)
        }
    }
}

fn bump<K>(map: &mut impl MultiSet<K>, k: K, d: i64) {
    map.bump(k, d);
}

/// A multiset: counts per key, with a key removed when its count reaches zero.
trait MultiSet<K> {
    fn bump(&mut self, k: K, d: i64);
}

impl<K: std::hash::Hash + Eq, S: std::hash::BuildHasher> MultiSet<K> for HashMap<K, i64, S> {
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_row_without_multisets_is_small() {
        // Sums (48 bytes, 16-aligned) and one pointer.
        assert_eq!(std::mem::size_of::<super::RowState>(), 64);
    }
}
