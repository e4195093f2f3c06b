//! A plain, obviously-correct reference model of EVENTS.md: one sequential fold over
//! the records in reading order, with `BTreeMap`s, no dataflow. The dataflow must agree.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use tally::dataflow::{RowKey, RowValue, Sums};
use tally::decode::Reason;
use tally::model::window::local_day;
use tally::model::window::WindowSize;
use tally::model::{Event, Kind, Millis, Position};
use tally::pipeline::{GroupField, Metric, Pipeline};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub rows: BTreeMap<(RowKey, u32), RowValue>,
    pub dead: BTreeSet<(Position, &'static str)>,
    pub orphans: BTreeMap<String, u64>,
    pub duplicates: u64,
    /// The counted events at the end, by (event id, event time): what the archive's
    /// facts must add up to.
    pub counted: BTreeSet<(String, Millis)>,
}

enum Target {
    Void,
    /// A sale or refund, and where it was read (ids are reused after the horizon).
    Sale {
        provider: String,
        pos: Position,
    },
}

/// Folds the records of every epoch in reading order. Where the epochs were cut does
/// not enter: what a record finds depends only on the records read before it. An id,
/// a target or a waiting void is forgotten for a record once its event time plus the
/// dedup horizon is before the clock when that record was read (the largest event time
/// read before it), and a waiting void forgotten so is an orphan; so is one still
/// waiting and forgotten by the clock at the end.
pub fn reference(p: &Pipeline, epochs: &[Vec<(Event, Position)>]) -> Outcome {
    let lateness = p.allowed_lateness.as_millis() as Millis;
    let horizon = p.dedup_horizon.as_millis() as Millis;
    let mut out = Outcome::default();
    let mut max_ts: Option<Millis> = None;
    let mut seen: HashMap<String, (Event, Millis)> = HashMap::new();
    let mut targets: HashMap<String, (Target, Millis)> = HashMap::new();
    let mut waiting: HashMap<String, Vec<(Event, Position)>> = HashMap::new();
    let mut counted: BTreeMap<(String, Position), Event> = BTreeMap::new();
    fn orphan(v: &Event, out: &mut Outcome) {
        *out.orphans.entry(v.provider_id.to_string()).or_default() += 1;
    }
    for (e, pos) in epochs.iter().flatten() {
        let clock = max_ts.unwrap_or(Millis::MIN);
        let alive = |ts: Millis| ts + horizon >= clock;
        let wm = max_ts.map(|m| m - lateness);
        max_ts = Some(max_ts.map_or(e.ts, |m| m.max(e.ts)));
        let id = e.event_id.to_string();
        if let Some((first, _)) = seen.get(&id).filter(|(_, ts)| alive(*ts)) {
            if first == e {
                out.duplicates += 1;
            } else {
                out.dead.insert((*pos, Reason::ConflictingDuplicate.code()));
            }
            continue;
        }
        seen.insert(id.clone(), (e.clone(), e.ts));
        if e.kind != Kind::Void && wm.is_some_and(|w| e.ts < w) {
            out.dead.insert((*pos, Reason::Late.code()));
            continue;
        }
        // The voids waiting for this record that are not forgotten yet.
        let mut waited = Vec::new();
        for (v, wpos) in waiting.remove(&id).unwrap_or_default() {
            if alive(v.ts) {
                waited.push((v, wpos));
            } else {
                orphan(&v, &mut out);
            }
        }
        if e.kind == Kind::Void {
            targets.insert(id.clone(), (Target::Void, e.ts));
            for (_, wpos) in waited {
                out.dead.insert((wpos, Reason::VoidTargetsVoid.code()));
            }
            let target = e.ref_event_id.as_deref().unwrap().to_string();
            match targets.get(&target).filter(|(_, ts)| alive(*ts)) {
                None => waiting.entry(target).or_default().push((e.clone(), *pos)),
                Some((Target::Void, _)) => {
                    out.dead.insert((*pos, Reason::VoidTargetsVoid.code()));
                }
                Some((Target::Sale { provider, .. }, _))
                    if provider.as_str() != e.provider_id.as_str() =>
                {
                    out.dead.insert((*pos, Reason::VoidProviderMismatch.code()));
                }
                Some((Target::Sale { pos: tpos, .. }, _)) => {
                    counted.remove(&(target.clone(), *tpos));
                }
            }
        } else {
            let mut cancelled = false;
            for (v, wpos) in waited {
                if v.provider_id != e.provider_id {
                    out.dead.insert((wpos, Reason::VoidProviderMismatch.code()));
                } else {
                    cancelled = true;
                }
            }
            targets.insert(
                id.clone(),
                (
                    Target::Sale {
                        provider: e.provider_id.to_string(),
                        pos: *pos,
                    },
                    e.ts,
                ),
            );
            if !cancelled {
                counted.insert((id, *pos), e.clone());
            }
        }
    }
    let clock = max_ts.unwrap_or(Millis::MIN);
    for (v, _) in waiting.values().flatten() {
        if v.ts + horizon < clock {
            orphan(v, &mut out);
        }
    }
    out.rows = rows(p, counted.values());
    out.counted = counted
        .values()
        .map(|e| (e.event_id.to_string(), e.ts))
        .collect();
    out
}

fn field(e: &Event, f: &GroupField) -> String {
    match f {
        GroupField::ProviderId => e.provider_id.to_string(),
        GroupField::ProductId => e.product_id.to_string(),
        GroupField::CustomerId => e.customer_id.to_string(),
        GroupField::Currency => e.currency.as_str().to_string(),
        GroupField::Attr(n) => e
            .attrs
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.to_string())
            .unwrap_or_default(),
    }
}

fn start(p: &Pipeline, size: WindowSize, e: &Event) -> Millis {
    match size {
        WindowSize::Fixed(len) => e.ts.div_euclid(len) * len,
        WindowSize::LocalDay => local_day(p.time_zone(&e.provider_id), e.ts).start,
    }
}

/// Aggregates the counted events, from scratch.
fn rows<'a>(
    p: &Pipeline,
    counted: impl Iterator<Item = &'a Event> + Clone,
) -> BTreeMap<(RowKey, u32), RowValue> {
    let mut out = BTreeMap::new();
    for (vi, v) in p.views.iter().enumerate() {
        for size in &v.windows {
            let mut groups: BTreeMap<(Millis, Vec<String>), Vec<&Event>> = BTreeMap::new();
            for e in counted.clone() {
                let g = v.group_by.iter().map(|f| field(e, f)).collect();
                groups.entry((start(p, *size, e), g)).or_default().push(e);
            }
            for ((st, g), events) in groups {
                let key = RowKey {
                    view: vi as u16,
                    size: *size,
                    start: st,
                    group: g.iter().map(|s| s.as_str().into()).collect(),
                };
                let sums = |evs: &[&Event]| {
                    let mut s = Sums::default();
                    for e in evs {
                        let a = i128::from(e.amount.map_or(0, |m| m.hundredths()));
                        match e.kind {
                            Kind::Sale => {
                                s.sales += 1;
                                s.gross += a;
                            }
                            Kind::Refund => {
                                s.refunds += 1;
                                s.refunds_amount += a;
                            }
                            Kind::Void => unreachable!(),
                        }
                    }
                    s
                };
                if let Some(top) = &v.top_k {
                    let mut members: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
                    for e in &events {
                        members.entry(field(e, &top.key)).or_default().push(e);
                    }
                    let mut ranked: Vec<(String, Sums)> = members
                        .into_iter()
                        .map(|(m, evs)| (m, sums(&evs)))
                        .collect();
                    ranked.sort_by(|a, b| {
                        b.1.metric(top.by)
                            .cmp(&a.1.metric(top.by))
                            .then(a.0.as_bytes().cmp(b.0.as_bytes()))
                    });
                    for (i, (m, s)) in ranked.into_iter().take(top.k).enumerate() {
                        out.insert(
                            (key.clone(), i as u32 + 1),
                            RowValue {
                                sums: s,
                                distinct_customers: 0,
                                min_ticket: None,
                                max_ticket: None,
                                member: Some(m.as_str().into()),
                            },
                        );
                    }
                } else {
                    let customers: BTreeSet<&str> =
                        events.iter().map(|e| e.customer_id.as_str()).collect();
                    let tickets: Vec<i64> = events
                        .iter()
                        .filter(|e| e.kind == Kind::Sale)
                        .map(|e| e.amount.unwrap().hundredths())
                        .collect();
                    let wants = |m: Metric| v.metrics.contains(&m);
                    out.insert(
                        (key, 0),
                        RowValue {
                            sums: sums(&events),
                            distinct_customers: if wants(Metric::DistinctCustomers) {
                                customers.len() as u64
                            } else {
                                0
                            },
                            min_ticket: if wants(Metric::MinTicket) || wants(Metric::MaxTicket) {
                                tickets.iter().min().copied()
                            } else {
                                None
                            },
                            max_ticket: if wants(Metric::MinTicket) || wants(Metric::MaxTicket) {
                                tickets.iter().max().copied()
                            } else {
                                None
                            },
                            member: None,
                        },
                    );
                }
            }
        }
    }
    out
}
