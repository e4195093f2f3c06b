//! The hub: what the API knows of the run loop, fed by the committer
//! ([`crate::ingest::Feed`]).
//!
//! - The status of the last commit (epoch, clock, positions, counters, commit time),
//!   store health and the lag of the epoch being committed.
//! - With the embedded store, an in-memory index of every row by provider (ordered by
//!   view, window size, window start, group and rank) that queries read; it is updated
//!   under the same lock as the epoch, so a read sees exactly one epoch. With Redis,
//!   queries read Redis and no rows are held here.
//! - The history of the last epochs' changes by provider (bounded by a number of rows),
//!   which `Watch` streams from and resumes from; a watcher is woken through a `watch`
//!   channel of the last committed epoch. The history is also appended to
//!   `<data dir>/watch/history.bin` (checksummed frames, not fsynced) and read back at
//!   the next start, so a watcher resumes across a restart of the server. It is used
//!   only when it ends exactly at the store's epoch (a crash between a commit and its
//!   append loses it: watchers then get a snapshot), and it is rewritten from memory
//!   when it holds twice the rows kept.
//! - The acknowledgements of `Ingest.Publish`: a publisher registers the positions of
//!   its events, and the hub acknowledges them as the epochs that hold them commit.

use crate::dataflow::{Epoch, RowKey, RowUpdate, RowValue};
use crate::model::Millis;
use crate::store::{Commit, Counters, Meta, StoredRow};
use compact_str::CompactString;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

/// The rows of one provider, in (view, size, start, group, rank) order.
pub type ProviderRows = BTreeMap<(RowKey, u32), RowValue>;

/// One committed epoch's changes, by provider.
pub struct EpochChanges {
    pub epoch: Epoch,
    pub by_provider: HashMap<CompactString, Vec<RowUpdate>, ahash::RandomState>,
}

/// The last commit, as Admin.Status reports it.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub epoch: Epoch,
    pub clock: Millis,
    pub positions: BTreeMap<String, u64>,
    pub counters: Counters,
    pub committed_at: Option<SystemTime>,
    pub store_up: bool,
    /// When the epoch being committed closed; `None` when none is being committed.
    pub committing_since: Option<Instant>,
}

/// Alerts kept for WatchAlerts to resume from.
pub const ALERTS_KEPT: usize = 100_000;

struct State {
    status: Status,
    /// The last alerts, oldest first, and their (provider, event_id) to drop
    /// redeliveries of an alerted event.
    alerts: VecDeque<Arc<crate::ingest::Alert>>,
    alerted: std::collections::HashSet<(CompactString, CompactString), ahash::RandomState>,
    /// By provider; `None` unless the hub indexes rows (embedded store).
    index: Option<HashMap<CompactString, ProviderRows, ahash::RandomState>>,
    history: VecDeque<Arc<EpochChanges>>,
    history_rows: usize,
}

/// A publisher's event waiting for its commit.
pub struct Waiting {
    /// Its position in the ingest source.
    pub offset: u64,
    /// The client's sequence number.
    pub sequence: u64,
}

/// What a publisher learns of one of its events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub sequence: u64,
    pub epoch: Epoch,
    /// The dead-letter reason, `None` when committed.
    pub reason: Option<&'static str>,
}

/// A registered publisher: its waiting events (in offset order) and where acks go.
pub struct Publisher {
    pub source: String,
    pub waiting: VecDeque<Waiting>,
    pub tx: tokio::sync::mpsc::UnboundedSender<Ack>,
}

pub struct Hub {
    state: RwLock<State>,
    epoch_tx: tokio::sync::watch::Sender<Epoch>,
    /// True once the store is open: before, nothing can be answered.
    ready: tokio::sync::watch::Sender<bool>,
    history_limit: usize,
    indexed: bool,
    publishers: Mutex<Vec<Arc<Mutex<Publisher>>>>,
    log: Mutex<Option<HistoryLog>>,
    log_dir: Option<PathBuf>,
    /// Admin.Snapshot calls waiting for the committer's next pass between commits.
    snapshots: Mutex<Vec<SnapshotReply>>,
}

/// What a snapshot read gives: the store's last commit and every row it holds (or the
/// store's error, as text).
pub type Snapshot = Result<(Meta, Vec<StoredRow>), String>;
type SnapshotReply = tokio::sync::oneshot::Sender<Snapshot>;

/// The history on disk: frames of `bincode((epoch, changes))`.
struct HistoryLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    rows: usize,
}

impl HistoryLog {
    fn append(&mut self, epoch: Epoch, changes: &[RowUpdate]) -> std::io::Result<()> {
        let body = bincode::serialize(&(epoch, changes)).map_err(std::io::Error::other)?;
        let mut head = [0u8; 12];
        head[..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
        head[4..].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
        self.file.write_all(&head)?;
        self.file.write_all(&body)?;
        self.file.flush()?;
        self.rows += changes.len();
        Ok(())
    }

    /// A new file holding `history`, renamed over the old one.
    fn rewrite(
        path: PathBuf,
        history: &VecDeque<Arc<EpochChanges>>,
    ) -> std::io::Result<HistoryLog> {
        let tmp = path.with_extension("tmp");
        let mut log = HistoryLog {
            path: path.clone(),
            file: std::io::BufWriter::new(std::fs::File::create(&tmp)?),
            rows: 0,
        };
        for c in history {
            let flat: Vec<RowUpdate> = c.by_provider.values().flatten().cloned().collect();
            log.append(c.epoch, &flat)?;
        }
        std::fs::rename(&tmp, &path)?;
        Ok(log)
    }
}

/// The frames of a history file, up to the first torn or unreadable one.
fn read_history(path: &std::path::Path) -> Vec<(Epoch, Vec<RowUpdate>)> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut r = std::io::BufReader::new(f);
    let mut out = Vec::new();
    while let Ok(Some(body)) = crate::store::frame::read(&mut r) {
        match bincode::deserialize(&body) {
            Ok(x) => out.push(x),
            Err(_) => break,
        }
    }
    out
}

fn by_provider(epoch: Epoch, changes: &[RowUpdate]) -> EpochChanges {
    let mut by_provider: HashMap<CompactString, Vec<RowUpdate>, ahash::RandomState> =
        HashMap::default();
    for u in changes {
        by_provider
            .entry(u.key.group[0].clone())
            .or_default()
            .push(u.clone());
    }
    EpochChanges { epoch, by_provider }
}

impl Hub {
    /// `indexed`: keep every row in memory (the embedded store). `history_rows`: how
    /// many changed rows of past epochs Watch can resume from. `dir`: where the history
    /// is kept across restarts (`None`: in memory only).
    pub fn new(indexed: bool, history_rows: usize, dir: Option<PathBuf>) -> Hub {
        Hub {
            state: RwLock::new(State {
                status: Status {
                    store_up: true,
                    ..Status::default()
                },
                index: indexed.then(HashMap::default),
                alerts: VecDeque::new(),
                alerted: Default::default(),
                history: VecDeque::new(),
                history_rows: 0,
            }),
            epoch_tx: tokio::sync::watch::channel(0).0,
            ready: tokio::sync::watch::channel(false).0,
            history_limit: history_rows,
            indexed,
            publishers: Mutex::new(Vec::new()),
            log: Mutex::new(None),
            log_dir: dir,
            snapshots: Mutex::new(Vec::new()),
        }
    }

    /// Asks the committer for every row as of one committed epoch: answered at its
    /// next pass between commits (within about 100 ms when idle).
    pub fn snapshot(&self) -> tokio::sync::oneshot::Receiver<Snapshot> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.snapshots.lock().expect("lock").push(tx);
        rx
    }

    /// Waits up to `limit` for the store to be open; false if it is not.
    pub async fn wait_ready(&self, limit: std::time::Duration) -> bool {
        let mut rx = self.ready.subscribe();
        let ok = tokio::time::timeout(limit, async {
            let _ = rx.wait_for(|r| *r).await;
        })
        .await
        .is_ok();
        ok && *self.ready.borrow()
    }

    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    pub fn status(&self) -> Status {
        self.state.read().expect("lock").status.clone()
    }

    pub fn epoch(&self) -> Epoch {
        self.state.read().expect("lock").status.epoch
    }

    /// Wakes on every commit.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Epoch> {
        self.epoch_tx.subscribe()
    }

    pub fn indexed(&self) -> bool {
        self.indexed
    }

    /// With the index: `f` over the provider's rows, and the epoch they are at.
    pub fn with_rows<T>(
        &self,
        provider: &str,
        f: impl FnOnce(Option<&ProviderRows>) -> T,
    ) -> (T, Epoch) {
        let s = self.state.read().expect("lock");
        let rows = s.index.as_ref().and_then(|i| i.get(provider));
        (f(rows), s.status.epoch)
    }

    /// The changes of every epoch after `after`, when the history still holds them all
    /// (`None` when some were dropped or never seen by this process).
    pub fn changes_after(&self, after: Epoch) -> Option<Vec<Arc<EpochChanges>>> {
        let s = self.state.read().expect("lock");
        if after >= s.status.epoch {
            return Some(Vec::new());
        }
        let first = s.history.front()?.epoch;
        if first > after + 1 {
            return None;
        }
        Some(
            s.history
                .iter()
                .filter(|c| c.epoch > after)
                .cloned()
                .collect(),
        )
    }

    /// The provider's alerts of epochs after `after`, oldest first, and the epoch
    /// they go up to.
    pub fn alerts_after(
        &self,
        provider: &str,
        after: Epoch,
    ) -> (Vec<Arc<crate::ingest::Alert>>, Epoch) {
        let s = self.state.read().expect("lock");
        let alerts = s
            .alerts
            .iter()
            .filter(|a| a.epoch > after && a.provider_id == provider)
            .cloned()
            .collect();
        (alerts, s.status.epoch)
    }

    /// Registers a publisher; acks reach it through its channel.
    pub fn register(&self, p: Arc<Mutex<Publisher>>) {
        self.publishers.lock().expect("lock").push(p);
    }
}

/// The rows of `rows` with key in `[lo, hi)` by (view, size, start).
pub fn range(
    rows: &ProviderRows,
    view: u16,
    size: crate::model::window::WindowSize,
    from: Millis,
    to: Millis,
) -> impl Iterator<Item = (&(RowKey, u32), &RowValue)> {
    let key = |start| {
        (
            RowKey {
                view,
                size,
                start,
                group: Vec::new(),
            },
            0u32,
        )
    };
    rows.range((Bound::Included(key(from)), Bound::Excluded(key(to))))
}

impl crate::ingest::Feed for Hub {
    fn wants_rows(&self) -> bool {
        self.indexed
    }

    fn between(&self, store: &mut dyn crate::store::Store) {
        let waiting = std::mem::take(&mut *self.snapshots.lock().expect("lock"));
        for reply in waiting {
            if reply.is_closed() {
                continue;
            }
            let read = store
                .rows()
                .map(|rows| (store.meta().clone(), rows))
                .map_err(|e| e.to_string());
            let _ = reply.send(read);
        }
    }

    fn opened(&self, meta: &Meta, rows: Vec<StoredRow>) {
        let mut s = self.state.write().expect("lock");
        s.status.epoch = meta.epoch;
        s.status.clock = meta.clock;
        s.status.positions = meta.positions.clone();
        s.status.counters = meta.counters.clone();
        if let Some(index) = &mut s.index {
            for ((key, rank), value) in rows {
                let p = key.group[0].clone();
                index.entry(p).or_default().insert((key, rank), value);
            }
        }
        if let Some(dir) = &self.log_dir {
            let path = dir.join("history.bin");
            let mut frames = read_history(&path);
            frames.retain(|(e, _)| *e <= meta.epoch);
            // Only a history that reaches the store's epoch says what changed since.
            if frames.last().map(|(e, _)| *e) != Some(meta.epoch) {
                frames.clear();
            }
            let mut rows: usize = frames.iter().map(|(_, c)| c.len()).sum();
            let mut skip = 0;
            while rows > self.history_limit && skip + 1 < frames.len() {
                rows -= frames[skip].1.len();
                skip += 1;
            }
            s.history = frames[skip..]
                .iter()
                .map(|(e, c)| Arc::new(by_provider(*e, c)))
                .collect();
            s.history_rows = rows;
            let log =
                std::fs::create_dir_all(dir).and_then(|()| HistoryLog::rewrite(path, &s.history));
            match log {
                Ok(l) => *self.log.lock().expect("lock") = Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "Watch history not kept on disk: resuming after a restart sends a snapshot")
                }
            }
            if !s.history.is_empty() {
                tracing::info!(epochs = s.history.len(), rows, "Watch history read back");
            }
        }
        drop(s);
        self.epoch_tx.send_replace(meta.epoch);
        self.ready.send_replace(true);
    }

    fn committing(&self, _epoch: Epoch, closed_at: Instant) {
        self.state.write().expect("lock").status.committing_since = Some(closed_at);
    }

    fn store_up(&self, up: bool) {
        self.state.write().expect("lock").status.store_up = up;
    }

    fn committed(
        &self,
        c: &Commit,
        dead: &[(String, u64, &'static str)],
        alerts: &[crate::ingest::Alert],
    ) {
        let changes = Arc::new(by_provider(c.epoch, &c.changes));
        {
            let mut s = self.state.write().expect("lock");
            let st = &mut s.status;
            st.epoch = c.epoch;
            st.clock = c.clock;
            st.positions
                .extend(c.positions.iter().map(|(k, v)| (k.clone(), *v)));
            st.counters.add(&c.counters);
            st.committed_at = Some(SystemTime::now());
            st.committing_since = None;
            st.store_up = true;
            if let Some(index) = &mut s.index {
                for u in &c.changes {
                    let rows = index.entry(u.key.group[0].clone()).or_default();
                    let k = (u.key.clone(), u.rank);
                    match &u.value {
                        Some(v) => {
                            rows.insert(k, v.clone());
                        }
                        None => {
                            rows.remove(&k);
                        }
                    }
                }
            }
            for a in alerts {
                let id = (a.provider_id.clone(), a.event_id.clone());
                if s.alerted.insert(id) {
                    s.alerts.push_back(Arc::new(a.clone()));
                    if s.alerts.len() > ALERTS_KEPT {
                        let old = s.alerts.pop_front().expect("non-empty");
                        s.alerted
                            .remove(&(old.provider_id.clone(), old.event_id.clone()));
                    }
                }
            }
            s.history_rows += c.changes.len();
            s.history.push_back(changes);
            while s.history_rows > self.history_limit && s.history.len() > 1 {
                let old = s.history.pop_front().expect("non-empty");
                s.history_rows -= old.by_provider.values().map(Vec::len).sum::<usize>();
            }
            let mut log = self.log.lock().expect("lock");
            if let Some(l) = log.as_mut() {
                let res = if l.rows + c.changes.len() > 2 * self.history_limit.max(1) {
                    HistoryLog::rewrite(l.path.clone(), &s.history).map(|n| *l = n)
                } else {
                    l.append(c.epoch, &c.changes)
                };
                if let Err(e) = res {
                    // A gap would make the file lie: drop it; resuming sends a snapshot.
                    tracing::warn!(error = %e, "Watch history no longer kept on disk");
                    let _ = std::fs::remove_file(&l.path);
                    *log = None;
                }
            }
        }
        self.epoch_tx.send_replace(c.epoch);
        self.acknowledge(c, dead);
    }
}

impl Hub {
    /// Acknowledges the publishers' events that this commit covers.
    fn acknowledge(&self, c: &Commit, dead: &[(String, u64, &'static str)]) {
        let dead: HashMap<(&str, u64), &'static str> = dead
            .iter()
            .map(|(s, o, r)| ((s.as_str(), *o), *r))
            .collect();
        let mut pubs = self.publishers.lock().expect("lock");
        pubs.retain(|p| {
            let mut p = p.lock().expect("lock");
            if p.tx.is_closed() {
                return false;
            }
            let Some(&end) = c.positions.get(&p.source) else {
                return true;
            };
            while p.waiting.front().is_some_and(|w| w.offset < end) {
                let w = p.waiting.pop_front().expect("non-empty");
                let reason = dead.get(&(p.source.as_str(), w.offset)).copied();
                let _ = p.tx.send(Ack {
                    sequence: w.sequence,
                    epoch: c.epoch,
                    reason,
                });
            }
            true
        });
    }
}
