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
//! They leave at the end of an epoch, but a visit already finds nothing that is past
//! the horizon for the clock its record was read at (a waiting void so passed over is
//! an orphan then), so what a void cancels does not depend on where epochs were cut.
//!
//! The slots live in one table with admission's ids ([`Ids`]): both stages key an event
//! by its id, on the same worker.

use super::table::Parted;
use super::{
    epochs, id_digest, keyed, route, DeadLetter, Digest, Epoch, Expiry, Fact, Out, Record, Rules,
    BUCKET,
};
use crate::decode::Reason;
use crate::model::{Event, Kind, Millis, Position};
use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU64;
use std::rc::Rc;
use timely::dataflow::Stream;

/// What one worker knows under an event id, for admission and for the voids stage.
///
/// Both stages key an event by its id with the same route, so on each worker they share
/// one table: an admitted sale's id is held once, with its fingerprint and its slot side
/// by side, instead of once in each stage's table (measured in benches/README, session
/// 16). Each stage reads and writes only its own part. Admission can run ahead of the
/// voids stage by some epochs (the voids stage waits for every worker's admission), but
/// never behind it; since the voids stage's part is its own, what it sees does not
/// depend on how far ahead admission is.
#[derive(Default)]
pub(super) struct Ids {
    table: Parted<Digest, Known>,
    /// Entries admission remembers (`first` set): the `admit` state gauge.
    remembered: usize,
    /// Entries with a slot (not an empty `Waiting`): the `voids` state gauge.
    slots: usize,
    /// The ids admission forgot, by epoch, for the voids stage to forget at that epoch.
    forgotten: BTreeMap<Epoch, Vec<Digest>>,
}

/// [`Ids`], shared by the two stages of one worker (timely runs them on its thread).
pub(super) type SharedIds = Rc<RefCell<Ids>>;

/// One entry of [`Ids`]: 56 bytes with its key (40 + 16), against 24 and 48 in two tables.
#[derive(Default)]
struct Known {
    /// Admission's part: the fingerprint of the first copy, while the id is remembered.
    first: Option<NonZeroU64>,
    /// The voids stage's part; an empty `Waiting` when it has none.
    slot: Slot,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot::Waiting(Vec::new())
    }
}

impl Slot {
    fn is_empty(&self) -> bool {
        matches!(self, Slot::Waiting(list) if list.is_empty())
    }
}

/// What admission found under an id.
pub(super) enum Seen {
    /// Not remembered: now it is, with this copy's fingerprint.
    New,
    /// Remembered with the same fingerprint: a redelivery.
    Same,
    /// Remembered with another fingerprint.
    Other,
}

impl Ids {
    /// Admission: whether `id` is remembered and how `fp` compares with its first copy's
    /// fingerprint; remembers it with `fp` when it was not.
    pub(super) fn admit(&mut self, id: Digest, fp: u64) -> Seen {
        // 0 stands for "none": a fingerprint of 0 is taken as 1 (a 2^-64 chance that
        // a conflicting copy passes for a redelivery).
        let fp = NonZeroU64::new(fp).unwrap_or(NonZeroU64::MIN);
        let known = self.table.entry(id).or_default();
        match known.first {
            Some(first) if first == fp => Seen::Same,
            Some(_) => Seen::Other,
            None => {
                known.first = Some(fp);
                self.remembered += 1;
                Seen::New
            }
        }
    }

    /// Admission forgets the ids `due` at `epoch` (at its end, or on the way for an id
    /// read again past its horizon); an entry leaves once the voids stage holds nothing
    /// under it either, which that stage checks at the end of `epoch`.
    pub(super) fn forget(&mut self, epoch: Epoch, due: Vec<Digest>) {
        for id in &due {
            use super::table::Entry;
            if let Entry::Occupied(mut o) = self.table.entry(*id) {
                if o.get_mut().first.take().is_some() {
                    self.remembered -= 1;
                }
                if o.get().slot.is_empty() {
                    o.remove();
                }
            }
        }
        if !due.is_empty() {
            self.forgotten.entry(epoch).or_default().extend(due);
        }
    }

    /// The ids admission forgot at `epoch` (and at any earlier epoch not yet taken).
    fn take_forgotten(&mut self, epoch: Epoch) -> Vec<Digest> {
        let later = self.forgotten.split_off(&(epoch + 1));
        let due = std::mem::replace(&mut self.forgotten, later);
        due.into_values().flatten().collect()
    }

    /// Entries admission remembers.
    pub(super) fn remembered(&self) -> usize {
        self.remembered
    }
}

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

    fn record(&self) -> &Record {
        match self {
            Visit::Register(r) | Visit::Cancel(r) => r,
        }
    }

    fn order(&self) -> (Position, u8) {
        match self {
            Visit::Register(r) => (r.pos, 0),
            Visit::Cancel(r) => (r.pos, 1),
        }
    }
}

/// What is known under one id. 32 bytes; a counted target adds its packed event (in
/// the [`Arena`]).
enum Slot {
    /// Voids waiting for a target that has not come.
    Waiting(Vec<Waiting>),
    /// A void, as a possible target (of another void).
    Void { ts: Millis },
    /// A sale or refund: its provider (digest) and, while it counts, where its packed
    /// event is, so a later void can uncount it.
    Sale {
        ts: Millis,
        provider: u64,
        counted: Option<Loc>,
    },
}

/// Where a packed event is in the [`Arena`].
#[derive(Clone, Copy, Debug)]
struct Loc {
    offset: u32,
    len: u32,
}

/// The packed events of counted targets, in one buffer per minute of the time they are
/// forgotten at (event time plus the dedup horizon, the minute the expiry queue forgets
/// their slots in): no allocation per event, and a minute's leave together once the
/// clock has passed it. A buffer is shrunk to fit once no event can be written to it
/// any more (counted events are never late: see `close`).
#[derive(Default)]
struct Arena {
    minutes: BTreeMap<i64, Vec<u8>>,
    /// Minutes below this one have been shrunk.
    open_from: i64,
    /// Events that did not fit a minute's buffer (4 GiB): by their id.
    overflow: HashMap<super::Digest, Box<[u8]>, ahash::RandomState>,
}

/// `Loc::len` of an event kept in `Arena::overflow`.
const OVERFLOW: u32 = u32::MAX;

impl Arena {
    fn minute(forget_at: Millis) -> i64 {
        forget_at.div_euclid(BUCKET)
    }

    /// Appends what `write` writes to the buffer of the minute `forget_at` is in.
    fn put(
        &mut self,
        id: super::Digest,
        forget_at: Millis,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Loc {
        let buf = self.minutes.entry(Self::minute(forget_at)).or_default();
        let start = buf.len();
        write(buf);
        match (u32::try_from(start), u32::try_from(buf.len() - start)) {
            (Ok(offset), Ok(len)) if len < OVERFLOW && offset.checked_add(len).is_some() => {
                Loc { offset, len }
            }
            _ => {
                let bytes = buf.split_off(start);
                self.overflow.insert(id, bytes.into_boxed_slice());
                Loc {
                    offset: 0,
                    len: OVERFLOW,
                }
            }
        }
    }

    fn get(&self, id: &super::Digest, forget_at: Millis, at: Loc) -> &[u8] {
        let bytes = if at.len == OVERFLOW {
            self.overflow.get(id).map(|b| &b[..])
        } else {
            let start = at.offset as usize;
            self.minutes
                .get(&Self::minute(forget_at))
                .and_then(|buf| buf.get(start..start + at.len as usize))
        };
        bytes.expect("a counted target's packed event is kept until it is forgotten")
    }

    /// The event at `at` is no longer needed (uncounted, or forgotten). Bytes in a
    /// minute's buffer stay until the minute leaves.
    fn release(&mut self, id: &super::Digest, at: Loc) {
        if at.len == OVERFLOW {
            self.overflow.remove(id);
        }
    }

    /// After an epoch whose clock is `clock`: drops the minutes the clock has passed
    /// (their slots are forgotten by now), and shrinks those no event can be written to
    /// any more. A counted event is not late, so its time is at least the clock minus
    /// the allowed lateness, and it is forgotten at that plus the horizon or later.
    fn close(&mut self, clock: Millis, rules: &Rules) {
        while let Some(e) = self.minutes.first_entry() {
            if e.key().saturating_add(1).saturating_mul(BUCKET) > clock {
                break;
            }
            e.remove();
        }
        let first_open = Self::minute(
            clock
                .saturating_sub(rules.lateness)
                .saturating_add(rules.horizon),
        );
        if first_open > self.open_from {
            for (_, buf) in self.minutes.range_mut(self.open_from..first_open) {
                buf.shrink_to_fit();
            }
            self.open_from = first_open;
        }
    }
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

/// Packs what rows read of a counted event onto `buf`: of its attributes only those in
/// `attrs`.
fn pack(e: &Event, attrs: &[String], buf: &mut Vec<u8>) {
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
            .filter(|(k, _)| attrs.iter().any(|a| a == k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
    };
    bincode::DefaultOptions::new()
        .serialize_into(buf, &p)
        .expect("events encode");
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
    ids: SharedIds,
) -> (Stream<'s, Epoch, Vec<Counted>>, Stream<'s, Epoch, Vec<Out>>) {
    use timely::dataflow::operators::core::{Map, OkErr};
    let visits = accepted.flat_map(|r: Record| {
        let cancel = (r.event.kind == Kind::Void).then(|| Visit::Cancel(r.clone()));
        std::iter::once(Visit::Register(r)).chain(cancel)
    });
    // Waiting voids leave by this queue; registered ids by admission's (`Ids::forget`).
    let mut expiry: Expiry<Digest> = Expiry::default();
    let mut arena = Arena::default();
    let resolved = epochs(
        visits,
        clock,
        keyed(|v: &Visit| route(v.key().as_bytes())),
        "Voids",
        move |epoch, batch: &mut Vec<Visit>, clock, out: &mut Vec<Result<Counted, Out>>| {
            let mut ids = ids.borrow_mut();
            let ids = &mut *ids;
            let held = ids.slots;
            batch.sort_unstable_by_key(Visit::order);
            for v in batch.drain(..) {
                let key = id_digest(v.key());
                let slot = &mut ids.table.entry(key).or_default().slot;
                // Registering and cancelling both leave a slot.
                ids.slots += usize::from(slot.is_empty());
                let r = v.record();
                // What is past the horizon for this record is gone for it, though the
                // end of the epoch forgets it (see `outlived`).
                match slot {
                    Slot::Waiting(list) => list.retain(|w| {
                        let gone = r.outlived(w.ts, &rules);
                        if gone {
                            out.push(Err(Out::Orphan {
                                provider: w.provider.to_string(),
                            }));
                        }
                        !gone
                    }),
                    Slot::Void { ts } | Slot::Sale { ts, .. } if r.outlived(*ts, &rules) => {
                        if let Slot::Sale {
                            counted: Some(at), ..
                        } = slot
                        {
                            arena.release(&key, *at);
                        }
                        *slot = Slot::default();
                    }
                    _ => {}
                }
                match v {
                    Visit::Register(r) => {
                        // Admission lets a record through only for an id forgotten for
                        // it, so a target slot under it is past its horizon: reset above.
                        debug_assert!(matches!(slot, Slot::Waiting(_)), "a live target again");
                        *slot = register(slot, key, r.event, r.pos, &rules, &mut arena, out);
                    }
                    Visit::Cancel(r) => {
                        if matches!(slot, Slot::Waiting(_)) {
                            expiry.at(r.event.ts.saturating_add(rules.horizon), key);
                        }
                        cancel(slot, key, r, &rules, &mut arena, out);
                    }
                }
            }
            let mut due = expiry.due(clock);
            due.extend(ids.take_forgotten(epoch));
            for key in due {
                use super::table::Entry;
                let Entry::Occupied(mut known) = ids.table.entry(key) else {
                    continue;
                };
                let slot = &mut known.get_mut().slot;
                let had = !slot.is_empty();
                let gone = |ts: Millis| ts.saturating_add(rules.horizon) < clock;
                let empty = match slot {
                    Slot::Void { ts } => gone(*ts),
                    Slot::Sale { ts, counted, .. } => {
                        if let (true, Some(at)) = (gone(*ts), counted) {
                            arena.release(&key, *at);
                        }
                        gone(*ts)
                    }
                    Slot::Waiting(list) => {
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
                    ids.slots -= usize::from(had);
                    *slot = Slot::default();
                    if known.get().first.is_none() {
                        known.remove();
                    }
                }
            }
            arena.close(clock, &rules);
            super::track_state("voids", held, ids.slots);
        },
    );
    resolved.ok_err(|x| x)
}

/// A record arrives as a possible target: settle the voids waiting for it. With
/// `archive`, a counted event and the void that cancels it are also told as facts.
fn register(
    slot: &mut Slot,
    key: super::Digest,
    event: Box<Event>,
    pos: Position,
    rules: &Rules,
    arena: &mut Arena,
    out: &mut Vec<Result<Counted, Out>>,
) -> Slot {
    let archive = rules.archive;
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
        let packed = arena.put(key, ts.saturating_add(rules.horizon), |buf| {
            pack(&event, &rules.attrs, buf)
        });
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
fn cancel(
    slot: &mut Slot,
    key: super::Digest,
    void: Record,
    rules: &Rules,
    arena: &mut Arena,
    out: &mut Vec<Result<Counted, Out>>,
) {
    if rules.archive {
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
        Slot::Sale { counted, ts, .. } => {
            if let Some(at) = counted.take() {
                let e = unpack(arena.get(&key, ts.saturating_add(rules.horizon), at));
                arena.release(&key, at);
                out.push(Ok((Box::new(e), -1)));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            lateness: 15 * 60_000,
            horizon: 48 * 3_600_000,
            archive: false,
            attrs: std::sync::Arc::from(vec!["region".to_owned()]),
        }
    }

    #[test]
    fn a_slot_is_32_bytes_and_an_entry_40() {
        assert_eq!(std::mem::size_of::<Slot>(), 32);
        assert_eq!(std::mem::size_of::<Known>(), 40);
    }

    #[test]
    fn the_arena_keeps_packed_events_until_their_minute_is_past() {
        let r = rules();
        let mut a = Arena::default();
        let (x, y) = ([1, 1], [2, 2]);
        // Forgotten in minute 10 and in minute 11.
        let at_x = a.put(x, 10 * BUCKET + 5, |b| b.extend_from_slice(b"first"));
        let at_y = a.put(y, 11 * BUCKET, |b| b.extend_from_slice(b"second"));
        let at_z = a.put(x, 10 * BUCKET + 7, |b| b.extend_from_slice(b"third"));
        assert_eq!(a.get(&x, 10 * BUCKET + 5, at_x), b"first");
        assert_eq!(a.get(&x, 10 * BUCKET + 7, at_z), b"third");
        assert_eq!(a.get(&y, 11 * BUCKET, at_y), b"second");
        // A clock inside minute 10 keeps it; past it, minute 10 leaves and 11 stays.
        a.close(10 * BUCKET + 30_000, &r);
        assert_eq!(a.minutes.len(), 2);
        a.close(11 * BUCKET, &r);
        assert_eq!(a.minutes.keys().copied().collect::<Vec<_>>(), vec![11]);
        assert_eq!(a.get(&y, 11 * BUCKET, at_y), b"second");
    }

    #[test]
    fn packing_keeps_only_the_attributes_views_read() {
        let e = crate::decode::decode(
            br#"{"event_id":"e1","provider_id":"p","product_id":"x","customer_id":"c","kind":"sale","amount":"1.50","currency":"USD","ts":1000,"attrs":{"region":"north","channel":"pos"}}"#,
        )
        .unwrap();
        let mut buf = Vec::new();
        pack(&e, &rules().attrs, &mut buf);
        let back = unpack(&buf);
        assert_eq!(back.attr("region"), "north");
        assert_eq!(back.attr("channel"), "");
        assert_eq!(
            (
                back.provider_id.as_str(),
                back.product_id.as_str(),
                back.customer_id.as_str()
            ),
            ("p", "x", "c")
        );
        assert_eq!((back.amount, back.ts, back.kind), (e.amount, e.ts, e.kind));
    }
}
