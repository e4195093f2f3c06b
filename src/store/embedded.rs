//! The embedded store: rows in memory, made durable by a write-ahead log of commits
//! and periodic snapshots in `<data dir>/store/`.
//!
//! - `wal.bin`: one framed record per commit: `len u32 | xxh3 u64 | bincode(Commit)`,
//!   the body zstd-compressed ([`super::frame::Zstd`]; a log written plain still
//!   reads), appended and fsynced before `commit` returns. A torn or corrupt tail (a
//!   crash mid-append) is cut off at open; a commit is therefore all there or not at
//!   all.
//! - `snapshot.bin`: the whole state, written to a temporary file, fsynced and renamed
//!   over the old one; after that the log is emptied. Commits in the log that the
//!   snapshot already holds (a crash between the two steps) are skipped at open.
//!
//! A snapshot is written once the commits in the log, counted before compression,
//! are larger than 64 MiB and than the last snapshot, so the bytes snapshots write
//! stay proportional to the bytes committed however large the state grows (as Redis
//! rewrites its append-only file once it has doubled).

use super::{apply, check_views, Commit, Meta, RowMap, Store, StoreError, StoredRow};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Write a snapshot once the log's commits are this large before compression (and
/// larger than the last snapshot).
const SNAPSHOT_AFTER: u64 = 64 << 20;

pub struct EmbeddedStore {
    dir: PathBuf,
    /// The writer's exclusive lock on `store/lock` (held while open); `None` for a reader.
    lock: Option<File>,
    meta: Meta,
    rows: RowMap,
    wal: File,
    wal_len: u64,
    /// The commits' bytes in the WAL before compression: what a snapshot is compared
    /// with (it is written plain).
    wal_plain: u64,
    /// The size of the last snapshot written or read.
    snapshot_len: u64,
    /// The WAL frame being written, kept between commits: a busy epoch's is several
    /// MB, and a new vector each time was written into freshly faulted pages.
    body: Vec<u8>,
    /// Compresses the WAL's frames (a WAL written plain still reads).
    zstd: super::frame::Zstd,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    meta: Meta,
    rows: Vec<StoredRow>,
}

/// A [`Snapshot`] serialized from the live state, without copying its rows: the same
/// bytes (a map entry serializes as the `(key, value)` pair a `StoredRow` is).
#[derive(Serialize)]
struct SnapshotOf<'a> {
    meta: &'a Meta,
    rows: RowsOf<'a>,
}

struct RowsOf<'a>(&'a RowMap);

impl Serialize for RowsOf<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store under `data_dir/store` as its one writer: refused
    /// while another process (or handle) has it open for writing.
    pub fn open(data_dir: &Path) -> Result<EmbeddedStore, StoreError> {
        Self::open_as(data_dir, true)
    }

    /// Opens the store to read what is committed, beside a writer that may be
    /// running: no lock, and a torn tail is skipped, not cut (it may be a commit
    /// being appended). Committing through it is refused.
    pub fn open_reader(data_dir: &Path) -> Result<EmbeddedStore, StoreError> {
        Self::open_as(data_dir, false)
    }

    fn open_as(data_dir: &Path, writer: bool) -> Result<EmbeddedStore, StoreError> {
        let dir = data_dir.join("store");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lock = if writer {
            let path = dir.join("lock");
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            // A lock just released can stay held for a moment: a child forked by this
            // process (a test's server, say) holds its descriptor until it execs. So a
            // busy lock is tried again for half a second before it counts as taken.
            let mut tries = 0;
            let taken = loop {
                match f.try_lock() {
                    Err(std::fs::TryLockError::WouldBlock) if tries < 25 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    other => break other,
                }
            };
            match taken {
                Ok(()) => Some(f),
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Config(format!(
                        "the store in {} is open for writing by another process (a running \
                         `tally run`?): stop it first",
                        data_dir.display()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
        } else {
            None
        };
        let snap_path = dir.join("snapshot.bin");
        let mut snapshot_len = 0;
        let (mut meta, mut rows) = match File::open(&snap_path) {
            Ok(f) => {
                snapshot_len = f.metadata().map_err(io(&snap_path))?.len();
                let s: Snapshot = bincode::deserialize_from(BufReader::new(f)).map_err(|e| {
                    StoreError::Corrupt {
                        path: snap_path.display().to_string(),
                        reason: e.to_string(),
                    }
                })?;
                (s.meta, s.rows.into_iter().collect())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (Meta::default(), RowMap::default())
            }
            Err(e) => return Err(io(&snap_path)(e)),
        };
        let wal_path = dir.join("wal.bin");
        let mut wal = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(writer)
            .append(!writer)
            .open(&wal_path)
            .map_err(io(&wal_path))?;
        let (mut good, mut plain) = (0u64, 0u64);
        {
            let mut r = BufReader::new(&mut wal);
            while let Some((c, stored, body)) = read_frame(&mut r) {
                if c.epoch > meta.epoch {
                    apply(&mut meta, &mut rows, &c)?;
                }
                good += stored;
                plain += body;
            }
        }
        if writer {
            wal.set_len(good).map_err(io(&wal_path))?;
            wal.seek(SeekFrom::Start(good)).map_err(io(&wal_path))?;
        }
        Ok(EmbeddedStore {
            dir,
            lock,
            meta,
            rows,
            wal,
            wal_len: good,
            wal_plain: plain,
            snapshot_len,
            body: Vec::new(),
            zstd: super::frame::Zstd::new().map_err(io(&wal_path))?,
        })
    }

    fn snapshot(&mut self) -> Result<(), StoreError> {
        let tmp = self.dir.join("snapshot.bin.tmp");
        let f = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let snap = SnapshotOf {
            meta: &self.meta,
            rows: RowsOf(&self.rows),
        };
        bincode::serialize_into(&mut w, &snap).map_err(|e| StoreError::Io {
            path: tmp.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let f = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
        self.snapshot_len = f.metadata().map_err(io(&tmp))?.len();
        let dest = self.dir.join("snapshot.bin");
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        self.wal.set_len(0).map_err(io(&self.dir))?;
        self.wal.seek(SeekFrom::Start(0)).map_err(io(&self.dir))?;
        self.wal_len = 0;
        self.wal_plain = 0;
        Ok(())
    }
}

/// Reads one commit; `None` at the end or at a torn/corrupt frame (the tail a crash
/// left). With the commit: the bytes its frame takes in the file, and its body's
/// length before compression.
fn read_frame(r: &mut impl Read) -> Option<(Commit, u64, u64)> {
    let (body, stored) = super::frame::read_sized(r).ok()??;
    let c = bincode::deserialize(&body).ok()?;
    Some((c, stored, body.len() as u64))
}

impl Store for EmbeddedStore {
    fn meta(&self) -> &Meta {
        &self.meta
    }

    fn bind_views(&mut self, views: &[crate::pipeline::View]) -> Result<(), StoreError> {
        if check_views(&mut self.meta, views)? {
            // Make the binding durable before anything depends on it.
            self.snapshot()?;
        }
        Ok(())
    }

    fn commit(&mut self, c: &Commit) -> Result<(), StoreError> {
        if self.lock.is_none() {
            return Err(StoreError::Config(format!(
                "the store in {} was opened for reading",
                self.dir.display()
            )));
        }
        if c.epoch <= self.meta.epoch {
            return Err(StoreError::Stale {
                offered: c.epoch,
                stored: self.meta.epoch,
            });
        }
        self.body.clear();
        bincode::serialize_into(&mut self.body, c).expect("commits serialize");
        let path = self.dir.join("wal.bin");
        self.zstd
            .append(&mut self.wal, &mut self.wal_len, &self.body)
            .map_err(io(&path))?;
        self.wal_plain += self.body.len() as u64;
        apply(&mut self.meta, &mut self.rows, c)?;
        // Counted before compression: replaying the WAL costs by what it holds, and the
        // snapshot it is weighed against is written plain.
        if self.wal_plain > SNAPSHOT_AFTER.max(self.snapshot_len) {
            self.snapshot()?;
        }
        Ok(())
    }

    fn rows(&mut self) -> Result<Vec<StoredRow>, StoreError> {
        Ok(self
            .rows
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn rows_starting(
        &mut self,
        starts: std::ops::Range<crate::model::Millis>,
    ) -> Result<Vec<StoredRow>, StoreError> {
        Ok(self
            .rows
            .iter()
            .filter(|(k, _)| starts.contains(&k.0.start))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::{RowKey, RowUpdate, RowValue, Sums};
    use crate::model::window::WindowSize;
    use std::io::Write;

    fn commit(epoch: u64, sales: i64) -> Commit {
        let key = RowKey {
            view: 0,
            size: WindowSize::LocalDay,
            start: 0,
            group: vec!["p".into(), "USD".into()],
        };
        let value = RowValue {
            sums: Sums {
                sales,
                gross: 100 * i128::from(sales),
                ..Sums::default()
            },
            distinct_customers: 1,
            min_ticket: Some(100),
            max_ticket: Some(100),
            member: None,
        };
        Commit {
            epoch,
            clock: 1_000 * epoch as i64,
            positions: [("in.jsonl".to_owned(), 10 * epoch)].into(),
            checkpoints: Default::default(),
            staging_len: 7 * epoch,
            dead_letters_len: 3 * epoch,
            counters: crate::store::Counters {
                records: 5,
                ..Default::default()
            },
            changes: vec![RowUpdate {
                key,
                rank: 0,
                value: Some(value),
            }],
        }
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_last_whole_commit_stands() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = EmbeddedStore::open(dir.path()).unwrap();
            s.commit(&commit(1, 1)).unwrap();
            s.commit(&commit(2, 2)).unwrap();
        }
        // A crash in the middle of the third append.
        let wal = dir.path().join("store/wal.bin");
        let mut f = OpenOptions::new().append(true).open(&wal).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let mut s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(s.meta().epoch, 2);
        assert_eq!(s.meta().positions["in.jsonl"], 20);
        assert_eq!(s.meta().counters.records, 10);
        assert_eq!(s.rows().unwrap()[0].1.sums.sales, 2);
        // The cut tail does not hide later commits.
        s.commit(&commit(3, 3)).unwrap();
        drop(s);
        let mut s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!((s.meta().epoch, s.rows().unwrap()[0].1.sums.sales), (3, 3));
    }

    #[test]
    fn a_stale_commit_is_refused_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = EmbeddedStore::open(dir.path()).unwrap();
        s.commit(&commit(5, 5)).unwrap();
        let err = s.commit(&commit(5, 9)).unwrap_err();
        assert!(matches!(
            err,
            StoreError::Stale {
                offered: 5,
                stored: 5
            }
        ));
        assert!(err.to_string().contains("refused"), "{err}");
        assert_eq!(
            s.rows().unwrap()[0].1.sums.sales,
            5,
            "the refused commit changed nothing"
        );
    }

    #[test]
    fn snapshot_and_log_together_restore_the_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = EmbeddedStore::open(dir.path()).unwrap();
            s.commit(&commit(1, 1)).unwrap();
            s.snapshot().unwrap();
            s.commit(&commit(2, 4)).unwrap();
        }
        let mut s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!((s.meta().epoch, s.rows().unwrap()[0].1.sums.sales), (2, 4));
        assert_eq!(s.meta().staging_len, 14);
    }

    #[test]
    fn a_log_written_plain_opens_and_goes_on_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let plain = |c: &Commit| bincode::serialize(c).unwrap();
        // A log from before compression: two plain frames.
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        let wal = dir.path().join("store/wal.bin");
        let mut f = File::create(&wal).unwrap();
        let mut len = 0;
        for c in [commit(1, 1), commit(2, 2)] {
            crate::store::frame::append(&mut f, &mut len, &plain(&c)).unwrap();
        }
        drop(f);
        {
            let mut s = EmbeddedStore::open(dir.path()).unwrap();
            assert_eq!((s.meta().epoch, s.rows().unwrap()[0].1.sums.sales), (2, 2));
            s.commit(&commit(3, 3)).unwrap();
        }
        let bytes = std::fs::read(&wal).unwrap();
        let third = &bytes[len as usize..];
        let sum = u64::from_le_bytes(third[4..12].try_into().unwrap());
        assert_ne!(
            sum,
            xxhash_rust::xxh3::xxh3_64(&third[12..]),
            "the third frame is stored compressed"
        );
        let mut s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!((s.meta().epoch, s.rows().unwrap()[0].1.sums.sales), (3, 3));
        // The snapshot trigger weighs the commits as they were, not as stored.
        let want: u64 = [commit(1, 1), commit(2, 2), commit(3, 3)]
            .iter()
            .map(|c| plain(c).len() as u64)
            .sum();
        assert_eq!(s.wal_plain, want);
        assert_eq!(s.wal_len, bytes.len() as u64);
    }
}
