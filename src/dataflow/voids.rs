//! Voids, keyed by target id: a void cancels its target wherever it was counted, also
//! when the void comes first.
//!
//! Every accepted record registers itself as a possible target under its own id; a void
//! also visits its target's id. In source-position order (registration before the
//! visit for the same record):
//! - a sale or refund is counted (`+1`) unless a valid void already waits for it;
//! - a void whose target is counted uncounts it (`-1`); one whose target is a void is
//!   `void_targets_void`; one whose target has another provider is
//!   `void_provider_mismatch`; a second valid void of the same target does nothing;
//! - a void whose target has not come waits; if its target never comes within the
//!   dedup horizon it is dropped and counted as an orphan.
//!
//! Targets and waiting voids leave state once their event time is more than the dedup
//! horizon behind the clock. Leaving emits nothing: committed windows never change.

use super::{epochs, id_digest, keyed, route, DeadLetter, Epoch, Expiry, Fact, Out, Record, Rules};
use crate::decode::Reason;
use crate::model::{Event, Kind, Millis, Position};
use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use std::collections::HashMap;
use timely::dataflow::Stream;

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Visit {
    /// A record registering under its own id.
    Register(Record),
    /// A void visiting its target's id.
    Cancel(Record),
}

impl Visit {
    fn key(&self) -> &str {
        match self {
            Visit::Register(r) => &r.event.event_id,
            Visit::Cancel(r) => r.event.ref_event_id.as_deref().expect("voids have a ref"),
        }
    }

    fn order(&self) -> (Position, u8) {
        match self {
            Visit::Register(r) => (r.pos, 0),
            Visit::Cancel(r) => (r.pos, 1),
        }
    }
}

/// What is known under one id. 40 bytes; a counted target adds its packed event.
enum Slot {
    /// Voids waiting for a target that has not come.
    Waiting(Vec<Waiting>),
    /// A void, as a possible target (of another void).
    Void { ts: Millis },
    /// A sale or refund: its provider (digest) and, while it counts, its packed event
    /// so a later void can uncount it.
    Sale {
        ts: Millis,
        provider: u64,
        counted: Option<Box<[u8]>>,
    },
}

fn provider_digest(p: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(p.as_bytes())
}

/// The fields a counted event contributes to rows, without its ids.
#[derive(Serialize, Deserialize)]
struct Packed<'a> {
    #[serde(borrow)]
    provider: &'a str,
    product: &'a str,
    customer: &'a str,
    kind: Kind,
    amount: Option<crate::model::Money>,
    currency: crate::model::Currency,
    ts: Millis,
    attrs: Vec<(&'a str, &'a str)>,
}

fn pack(e: &Event) -> Box<[u8]> {
    use bincode::Options;
    let p = Packed {
        provider: &e.provider_id,
        product: &e.product_id,
        customer: &e.customer_id,
        kind: e.kind,
        amount: e.amount,
        currency: e.currency,
        ts: e.ts,
        attrs: e
            .attrs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
    };
    bincode::DefaultOptions::new()
        .serialize(&p)
        .expect("events encode")
        .into_boxed_slice()
}

/// The event back, with empty ids (rows do not use them).
fn unpack(b: &[u8]) -> Event {
    use bincode::Options;
    let p: Packed<'_> = bincode::DefaultOptions::new()
        .deserialize(b)
        .expect("encoded by pack");
    Event {
        event_id: CompactString::default(),
        provider_id: p.provider.into(),
        product_id: p.product.into(),
        customer_id: p.customer.into(),
        kind: p.kind,
        amount: p.amount,
        currency: p.currency,
        ts: p.ts,
        ref_event_id: None,
        attrs: p
            .attrs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
    }
}

struct Waiting {
    provider: CompactString,
    ts: Millis,
    pos: Position,
    raw: std::sync::Arc<str>,
}

/// A void that cancelled its target on the target's arrival, as an archive fact: its
/// event is decoded again from the record (it waited as its raw bytes only).
fn voided_on_arrival(w: &Waiting, target_ts: Millis) -> Option<Out> {
    let void = crate::decode::decode(w.raw.as_bytes()).ok()?;
    Some(Out::Fact(Box::new(Fact::Voided {
        void,
        pos: w.pos,
        target_ts,
    })))
}

/// A change to the set of counted events.
pub type Counted = (Box<Event>, i64);

pub(super) fn voids<'s>(
    accepted: Stream<'s, Epoch, Vec<Record>>,
    clock: Stream<'s, Epoch, Vec<Millis>>,
    rules: Rules,
) -> (Stream<'s, Epoch, Vec<Counted>>, Stream<'s, Epoch, Vec<Out>>) {
    use timely::dataflow::operators::core::{Map, OkErr};
    let visits = accepted.flat_map(|r: Record| {
        let cancel = (r.event.kind == Kind::Void).then(|| Visit::Cancel(r.clone()));
        std::iter::once(Visit::Register(r)).chain(cancel)
    });
    // Target id digest -> what is known under it.
    let mut slots: HashMap<super::Digest, Slot, ahash::RandomState> = HashMap::default();
    let mut expiry: Expiry<super::Digest> = Expiry::default();
    let resolved = epochs(
        visits,
        clock,
        keyed(|v: &Visit| route(v.key().as_bytes())),
        "Voids",
        move |_epoch, mut batch: Vec<Visit>, clock, out: &mut Vec<Result<Counted, Out>>| {
            let held = slots.len();
            batch.sort_unstable_by_key(Visit::order);
            for v in batch {
                let key = id_digest(v.key());
                let slot = slots
                    .entry(key)
                    .or_insert_with(|| Slot::Waiting(Vec::new()));
                match v {
                    Visit::Register(r) => {
                        expiry.at(r.event.ts.saturating_add(rules.horizon), key);
                        *slot = register(slot, r.event, r.pos, rules.archive, out);
                    }
                    Visit::Cancel(r) => {
                        if matches!(slot, Slot::Waiting(_)) {
                            expiry.at(r.event.ts.saturating_add(rules.horizon), key);
                        }
                        cancel(slot, r, rules.archive, out);
                    }
                }
            }
            for key in expiry.due(clock) {
                let gone = |ts: Millis| ts.saturating_add(rules.horizon) < clock;
                let empty = match slots.get_mut(&key) {
                    None => false,
                    Some(Slot::Void { ts }) | Some(Slot::Sale { ts, .. }) => gone(*ts),
                    Some(Slot::Waiting(list)) => {
                        list.retain(|w| {
                            if gone(w.ts) {
                                out.push(Err(Out::Orphan {
                                    provider: w.provider.to_string(),
                                }));
                            }
                            !gone(w.ts)
                        });
                        list.is_empty()
                    }
                };
                if empty {
                    slots.remove(&key);
                }
            }
            super::track_state("voids", held, slots.len());
        },
    );
    resolved.ok_err(|x| x)
}

/// A record arrives as a possible target: settle the voids waiting for it. With
/// `archive`, a counted event and the void that cancels it are also told as facts.
fn register(
    slot: &mut Slot,
    event: Box<Event>,
    pos: Position,
    archive: bool,
    out: &mut Vec<Result<Counted, Out>>,
) -> Slot {
    let waiting = match std::mem::replace(slot, Slot::Void { ts: 0 }) {
        Slot::Waiting(list) => list,
        // An id again after the horizon forgot it: a new event.
        _ => Vec::new(),
    };
    if event.kind == Kind::Void {
        for w in waiting {
            out.push(Err(dead(Reason::VoidTargetsVoid, w)));
        }
        return Slot::Void { ts: event.ts };
    }
    let mut cancelled = false;
    for w in waiting {
        if w.provider != event.provider_id {
            out.push(Err(dead(Reason::VoidProviderMismatch, w)));
        } else {
            if archive && !cancelled {
                // The target stands in the archive as counted, then voided.
                out.push(Err(Out::Fact(Box::new(Fact::Counted {
                    event: (*event).clone(),
                    pos,
                }))));
                out.extend(voided_on_arrival(&w, event.ts).map(Err));
            }
            cancelled = true;
        }
    }
    let (ts, provider) = (event.ts, provider_digest(&event.provider_id));
    if cancelled {
        Slot::Sale {
            ts,
            provider,
            counted: None,
        }
    } else {
        let packed = pack(&event);
        if archive {
            out.push(Err(Out::Fact(Box::new(Fact::Counted {
                event: (*event).clone(),
                pos,
            }))));
        }
        out.push(Ok((event, 1)));
        Slot::Sale {
            ts,
            provider,
            counted: Some(packed),
        }
    }
}

/// A void visits its target.
fn cancel(slot: &mut Slot, void: Record, archive: bool, out: &mut Vec<Result<Counted, Out>>) {
    if archive {
        if let Slot::Sale {
            ts,
            counted: Some(_),
            provider,
        } = slot
        {
            if *provider == provider_digest(&void.event.provider_id) {
                out.push(Err(Out::Fact(Box::new(Fact::Voided {
                    void: (*void.event).clone(),
                    pos: void.pos,
                    target_ts: *ts,
                }))));
            }
        }
    }
    let w = Waiting {
        provider: void.event.provider_id,
        ts: void.event.ts,
        pos: void.pos,
        raw: void.raw,
    };
    match slot {
        Slot::Waiting(list) => list.push(w),
        Slot::Void { .. } => out.push(Err(dead(Reason::VoidTargetsVoid, w))),
        Slot::Sale { provider, .. } if *provider != provider_digest(&w.provider) => {
            out.push(Err(dead(Reason::VoidProviderMismatch, w)))
        }
        Slot::Sale { counted, .. } => {
            if let Some(e) = counted.take() {
                out.push(Ok((Box::new(unpack(&e)), -1)));
            }
        }
    }
}

fn dead(reason: Reason, w: Waiting) -> Out {
    Out::Dead(Box::new(DeadLetter {
        reason,
        pos: w.pos,
        provider: w.provider.to_string(),
        raw: w.raw,
    }))
}
