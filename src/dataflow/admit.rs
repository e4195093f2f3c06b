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
//! behind the clock; the voids stage forgets its slot at the same epoch.

use super::voids::{Seen, SharedIds};
use super::{epochs, id_digest, keyed, route, DeadLetter, Epoch, Expiry, Out, Record, Rules};
use crate::decode::Reason;
use crate::model::{Kind, Millis};
use timely::dataflow::Stream;

pub(super) fn admit<'s>(
    records: Stream<'s, Epoch, Vec<Record>>,
    clock: Stream<'s, Epoch, Vec<Millis>>,
    rules: Rules,
    ids: SharedIds,
) -> (Stream<'s, Epoch, Vec<Record>>, Stream<'s, Epoch, Vec<Out>>) {
    let mut expiry: Expiry<super::Digest> = Expiry::default();
    let decided = epochs(
        records,
        clock,
        keyed(|r: &Record| route(r.event.event_id.as_bytes())),
        "Admit",
        move |epoch, batch: &mut Vec<Record>, clock, out: &mut Vec<Result<Record, Out>>| {
            let mut ids = ids.borrow_mut();
            let held = ids.remembered();
            batch.sort_unstable_by_key(|r| r.pos);
            for r in batch.drain(..) {
                let id = id_digest(&r.event.event_id);
                match ids.admit(id, r.event.fingerprint()) {
                    Seen::Same => out.push(Err(Out::Duplicate)),
                    Seen::Other => out.push(Err(dead(Reason::ConflictingDuplicate, r))),
                    Seen::New => {
                        expiry.at(r.event.ts.saturating_add(rules.horizon), id);
                        if r.event.kind != Kind::Void && r.event.ts < r.wm {
                            out.push(Err(dead(Reason::Late, r)));
                        } else {
                            out.push(Ok(r));
                        }
                    }
                }
            }
            ids.forget(epoch, expiry.due(clock));
            super::track_state("admit", held, ids.remembered());
        },
    );
    use timely::dataflow::operators::core::OkErr;
    decided.ok_err(|x| x)
}

fn dead(reason: Reason, r: Record) -> Out {
    Out::Dead(Box::new(DeadLetter {
        reason,
        pos: r.pos,
        provider: r.event.provider_id.to_string(),
        raw: r.raw,
    }))
}
