//! Admission, keyed by `event_id`: redeliveries count once, conflicting duplicates
//! and late events are dead letters.
//!
//! For each record of an epoch, in source-position order:
//! - `event_id` unseen: remember its fingerprint; a sale or refund older than the
//!   record's watermark is `late` (and stays remembered, so its redeliveries are
//!   silent); anything else is accepted. Voids are never late: corrections land.
//! - seen with the same fingerprint: a redelivery, dropped silently.
//! - seen with another fingerprint: `conflicting_duplicate`; the first copy stands.
//!
//! Ids are held as 128-bit digests, in the table the voids stage keeps its slots in
//! (`voids::Ids`). An id is forgotten once its event time is more than the dedup horizon
//! behind the clock; the voids stage forgets its slot at the same epoch. Forgetting runs
//! at the end of an epoch, but a record finds an id only if the id is not past the
//! horizon for the clock the record was read at ([`Record::clock`]): the ids this
//! epoch's clock forgets are kept apart, with their times, while the epoch runs. So
//! whether a copy read after its first copy's horizon is a silent redelivery or a new
//! event (late, most often) does not depend on where epochs were cut.

use super::voids::{Seen, SharedIds};
use super::{
    epochs, id_digest, keyed, route, DeadLetter, Digest, Epoch, Expiry, Out, Record, Rules,
};
use crate::decode::Reason;
use crate::model::{Kind, Millis};
use std::collections::HashMap;
use timely::dataflow::Stream;

pub(super) fn admit<'s>(
    records: Stream<'s, Epoch, Vec<Record>>,
    clock: Stream<'s, Epoch, Vec<Millis>>,
    rules: Rules,
    ids: SharedIds,
) -> (Stream<'s, Epoch, Vec<Record>>, Stream<'s, Epoch, Vec<Out>>) {
    let mut expiry: Expiry<super::Digest> = Expiry::default();
    let mut ending = Ending::default();
    let decided = epochs(
        records,
        clock,
        keyed(|r: &Record| route(r.event.event_id.as_bytes())),
        "Admit",
        move |epoch, batch: &mut Vec<Record>, clock, out: &mut Vec<Result<Record, Out>>| {
            let mut ids = ids.borrow_mut();
            let held = ids.remembered();
            expiry.due_with(clock, |at, id| ending.push(id, at));
            batch.sort_unstable_by_key(|r| r.pos);
            for r in batch.drain(..) {
                let id = id_digest(&r.event.event_id);
                let fp = r.event.fingerprint();
                let mut schedule = |id, ending: &mut Ending| {
                    let at = r.event.ts.saturating_add(rules.horizon);
                    if at < clock {
                        ending.push(id, at);
                    } else {
                        expiry.at(at, id);
                    }
                };
                // A remembered id past the horizon for this record is forgotten for it,
                // as an earlier end of epoch would have forgotten it.
                match ids.admit(id, fp) {
                    Seen::New => schedule(id, &mut ending),
                    // The same fields, so the first copy's event time is this one's. As
                    // new: admitted again it would be remembered as it is, and it is due
                    // at this epoch's end already.
                    Seen::Same if r.outlived(r.event.ts, &rules) => {}
                    Seen::Same => {
                        out.push(Err(Out::Duplicate));
                        continue;
                    }
                    Seen::Other if ending.outlived(&id, r.clock(rules.lateness)) => {
                        ids.forget(epoch, vec![id]);
                        let again = ids.admit(id, fp);
                        debug_assert!(matches!(again, Seen::New));
                        schedule(id, &mut ending);
                    }
                    Seen::Other => {
                        out.push(Err(dead(Reason::ConflictingDuplicate, r)));
                        continue;
                    }
                }
                if r.event.kind != Kind::Void && r.event.ts < r.wm {
                    out.push(Err(dead(Reason::Late, r)));
                } else {
                    out.push(Ok(r));
                }
            }
            ids.forget(epoch, ending.drain());
            super::track_state("admit", held, ids.remembered());
        },
    );
    use timely::dataflow::operators::core::OkErr;
    decided.ok_err(|x| x)
}

/// In [`Ending::due`], an id already forgotten (no id is due at the end of time).
const GONE: Millis = Millis::MAX;

/// The remembered ids the clock of the epoch being admitted forgets at its end, with
/// when. A conflicting copy needs its first copy's time, which only this list has; it is
/// indexed by id the first time one is looked up in an epoch (conflicts are rare).
#[derive(Default)]
struct Ending {
    due: Vec<(Digest, Millis)>,
    /// Where each id is in `due`, once looked up in this epoch.
    index: Option<HashMap<Digest, usize, ahash::RandomState>>,
}

impl Ending {
    fn push(&mut self, id: Digest, at: Millis) {
        if let Some(index) = &mut self.index {
            index.insert(id, self.due.len());
        }
        self.due.push((id, at));
    }

    /// Whether this epoch's end forgets `id` at a time before `clock`; if so it is no
    /// longer listed (it is forgotten now, and a copy admitted in its place is listed on
    /// its own time).
    fn outlived(&mut self, id: &Digest, clock: Millis) -> bool {
        let due = &self.due;
        let index = self.index.get_or_insert_with(|| {
            due.iter()
                .enumerate()
                .map(|(i, (id, _))| (*id, i))
                .collect()
        });
        match index.get(id) {
            Some(&i) if self.due[i].1 < clock => {
                index.remove(id);
                self.due[i].1 = GONE;
                true
            }
            _ => false,
        }
    }

    /// The ids to forget at the end of the epoch.
    fn drain(&mut self) -> Vec<Digest> {
        self.index = None;
        self.due
            .drain(..)
            .filter(|(_, at)| *at != GONE)
            .map(|(id, _)| id)
            .collect()
    }
}

fn dead(reason: Reason, r: Record) -> Out {
    Out::Dead(Box::new(DeadLetter {
        reason,
        pos: r.pos,
        provider: r.event.provider_id.to_string(),
        raw: r.raw,
    }))
}
