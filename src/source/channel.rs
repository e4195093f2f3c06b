//! An in-process source: records handed over by the process itself (the gRPC
//! `Ingest.Publish` service). Its position is a record count: the record at offset
//! `o` ends at `o + 1`, and the committed position says how many records were
//! committed in all, so numbering continues after a restart.
//!
//! [`Feeder::submit`] numbers a batch and queues it under one lock, so offsets reach
//! the run loop in order; the queue is bounded, so a busy pipeline blocks submitters
//! (backpressure to the publishing clients). Records queued but not read when the run
//! stops are not committed: their publishers get no acknowledgement and send them
//! again. The source sends its end-of-input at once, so `--until-eof` waits only for
//! the other inputs.

use super::{decode, Line, SourceMsg};
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Refused: the run is not (or no longer) reading this source.
#[derive(Debug, thiserror::Error)]
#[error("the pipeline is not reading (starting or stopping)")]
pub struct Closed;

struct State {
    /// The next record's offset; `None` until the run loop starts reading.
    next: Option<u64>,
    closed: bool,
}

struct Inner {
    name: String,
    state: Mutex<State>,
    ready: Condvar,
    tx: Sender<Vec<Vec<u8>>>,
    rx: Receiver<Vec<Vec<u8>>>,
}

/// The handle submitters and the source share. Cheap to clone.
#[derive(Clone)]
pub struct Feeder {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Feeder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Feeder({})", self.inner.name)
    }
}

impl Feeder {
    /// A source named `name` (its key in the committed positions).
    pub fn new(name: &str) -> Feeder {
        let (tx, rx) = crossbeam_channel::bounded(16);
        Feeder {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                state: Mutex::new(State {
                    next: None,
                    closed: false,
                }),
                ready: Condvar::new(),
                tx,
                rx,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Numbers `records` and queues them for the run loop; `register(first)` runs
    /// first, under the same lock, with the first record's offset. Blocks while the
    /// queue is full, and up to `wait` for the run loop to start reading.
    pub fn submit(
        &self,
        records: Vec<Vec<u8>>,
        wait: Duration,
        register: impl FnOnce(u64),
    ) -> Result<(), Closed> {
        let i = &self.inner;
        let mut s = i.state.lock().expect("lock");
        let deadline = std::time::Instant::now() + wait;
        while s.next.is_none() && !s.closed {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Closed);
            }
            s = i.ready.wait_timeout(s, left).expect("lock").0;
        }
        if s.closed {
            return Err(Closed);
        }
        let first = s.next.expect("ready");
        let n = records.len() as u64;
        register(first);
        // Blocking here, under the lock, keeps offsets in queue order.
        i.tx.send(records).map_err(|_| Closed)?;
        s.next = Some(first + n);
        Ok(())
    }

    /// Stops taking records.
    pub fn close(&self) {
        self.inner.state.lock().expect("lock").closed = true;
        self.inner.ready.notify_all();
    }

    /// The reader: from the committed `offset` on, until `stop`.
    pub(crate) fn read(&self, idx: u32, offset: u64, tx: &Sender<SourceMsg>, stop: &AtomicBool) {
        let i = &self.inner;
        {
            let mut s = i.state.lock().expect("lock");
            s.next = Some(offset);
            s.closed = false;
            i.ready.notify_all();
        }
        let _ = tx.send(SourceMsg::Eof);
        let mut next = offset;
        while !stop.load(Ordering::Relaxed) {
            let batch = match i.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(b) => b,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let lines = batch
                .into_iter()
                .map(|raw| {
                    let decoded = decode(&raw);
                    next += 1;
                    Line {
                        offset: next - 1,
                        end: next,
                        raw,
                        decoded,
                    }
                })
                .collect();
            if tx
                .send(SourceMsg::Lines {
                    source: idx,
                    lines,
                    checkpoint: None,
                })
                .is_err()
            {
                break;
            }
        }
        self.close();
        // What is still queued was never read: dropped, never acknowledged.
        while i.rx.try_recv().is_ok() {}
    }
}
