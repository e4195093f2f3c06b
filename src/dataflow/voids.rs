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

use super::{epochs, keyed, route, DeadLetter, Epoch, Expiry, Out, Record, Rules};
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

enum Target {
    Void,
    /// A sale or refund; `counted` holds it while it counts, so a later void can uncount it.
    Sale {
        provider: CompactString,
        counted: Option<Event>,
    },
}

struct Waiting {
    provider: CompactString,
    ts: Millis,
    pos: Position,
    raw: String,
}

#[derive(Default)]
struct Slot {
    target: Option<(Millis, Target)>,
    waiting: Vec<Waiting>,
}

/// A change to the set of counted events.
pub type Counted = (Event, i64);

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
    let mut slots: HashMap<CompactString, Slot> = HashMap::new();
    let mut expiry: Expiry<CompactString> = Expiry::default();
    let resolved = epochs(
        visits,
        clock,
        keyed(|v: &Visit| route(v.key().as_bytes())),
        "Voids",
        move |_epoch, mut batch: Vec<Visit>, clock, out: &mut Vec<Result<Counted, Out>>| {
            batch.sort_unstable_by_key(Visit::order);
            for v in batch {
                let key = CompactString::from(v.key());
                let slot = slots.entry(key.clone()).or_default();
                match v {
                    Visit::Register(r) => {
                        let ts = r.event.ts;
                        expiry.at(ts.saturating_add(rules.horizon), key);
                        let target = register(slot, r.event, out);
                        slot.target = Some((ts, target));
                    }
                    Visit::Cancel(r) => {
                        if slot.target.is_none() {
                            expiry.at(r.event.ts.saturating_add(rules.horizon), key);
                        }
                        cancel(slot, r, out);
                    }
                }
            }
            for key in expiry.due(clock) {
                if let Some(slot) = slots.get_mut(&key) {
                    let gone = |ts: Millis| ts.saturating_add(rules.horizon) < clock;
                    if slot.target.as_ref().is_some_and(|(ts, _)| gone(*ts)) {
                        slot.target = None;
                    }
                    slot.waiting.retain(|w| {
                        let keep = !gone(w.ts);
                        if !keep {
                            out.push(Err(Out::Orphan {
                                provider: w.provider.to_string(),
                            }));
                        }
                        keep
                    });
                    if slot.target.is_none() && slot.waiting.is_empty() {
                        slots.remove(&key);
                    }
                }
            }
        },
    );
    resolved.ok_err(|x| x)
}

/// A record arrives as a possible target: settle the voids waiting for it.
fn register(slot: &mut Slot, event: Event, out: &mut Vec<Result<Counted, Out>>) -> Target {
    let waiting = std::mem::take(&mut slot.waiting);
    if event.kind == Kind::Void {
        for w in waiting {
            out.push(Err(dead(Reason::VoidTargetsVoid, w)));
        }
        return Target::Void;
    }
    let mut cancelled = false;
    for w in waiting {
        if w.provider != event.provider_id {
            out.push(Err(dead(Reason::VoidProviderMismatch, w)));
        } else {
            cancelled = true;
        }
    }
    let provider = event.provider_id.clone();
    if cancelled {
        Target::Sale {
            provider,
            counted: None,
        }
    } else {
        out.push(Ok((event.clone(), 1)));
        Target::Sale {
            provider,
            counted: Some(event),
        }
    }
}

/// A void visits its target.
fn cancel(slot: &mut Slot, void: Record, out: &mut Vec<Result<Counted, Out>>) {
    let w = Waiting {
        provider: void.event.provider_id,
        ts: void.event.ts,
        pos: void.pos,
        raw: void.raw,
    };
    match &mut slot.target {
        None => slot.waiting.push(w),
        Some((_, Target::Void)) => out.push(Err(dead(Reason::VoidTargetsVoid, w))),
        Some((_, Target::Sale { provider, .. })) if *provider != w.provider => {
            out.push(Err(dead(Reason::VoidProviderMismatch, w)))
        }
        Some((_, Target::Sale { counted, .. })) => {
            if let Some(e) = counted.take() {
                out.push(Ok((e, -1)));
            }
        }
    }
}

fn dead(reason: Reason, w: Waiting) -> Out {
    Out::Dead(DeadLetter {
        reason,
        pos: w.pos,
        provider: w.provider.to_string(),
        raw: w.raw,
    })
}
