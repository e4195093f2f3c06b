//! The embedded store: rows in memory, made durable by a write-ahead log of commits
//! and periodic snapshots in `<data dir>/store/`.
//!
//! - `wal.bin`: one framed record per commit: `len u32 | xxh3 u64 | bincode(Commit)`,
//!   appended and fsynced before `commit` returns. A torn or corrupt tail (a crash
//!   mid-append) is cut off at open; a commit is therefore all there or not at all.
//! - `snapshot.bin`: the whole state, written to a temporary file, fsynced and renamed
//!   over the old one; after that the log is emptied. Commits in the log that the
//!   snapshot already holds (a crash between the two steps) are skipped at open.

use super::{apply, check_views, Commit, Meta, RowMap, Store, StoreError, StoredRow};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Write a snapshot once the log is this large.
const SNAPSHOT_AFTER: u64 = 64 << 20;

pub struct EmbeddedStore {
    dir: PathBuf,
    meta: Meta,
    rows: RowMap,
    wal: File,
    wal_len: u64,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    meta: Meta,
    rows: Vec<StoredRow>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store under `data_dir/store`.
    pub fn open(data_dir: &Path) -> Result<EmbeddedStore, StoreError> {
        let dir = data_dir.join("store");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let snap_path = dir.join("snapshot.bin");
        let (mut meta, mut rows) = match File::open(&snap_path) {
            Ok(f) => {
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
            .write(true)
            .open(&wal_path)
            .map_err(io(&wal_path))?;
        let mut good = 0u64;
        {
            let mut r = BufReader::new(&mut wal);
            while let Some((c, len)) = read_frame(&mut r) {
                if c.epoch > meta.epoch {
                    apply(&mut meta, &mut rows, c)?;
                }
                good += len;
            }
        }
        wal.set_len(good).map_err(io(&wal_path))?;
        wal.seek(SeekFrom::Start(good)).map_err(io(&wal_path))?;
        Ok(EmbeddedStore {
            dir,
            meta,
            rows,
            wal,
            wal_len: good,
        })
    }

    fn snapshot(&mut self) -> Result<(), StoreError> {
        let tmp = self.dir.join("snapshot.bin.tmp");
        let f = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = BufWriter::new(f);
        let snap = Snapshot {
            meta: self.meta.clone(),
            rows: self
                .rows
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        bincode::serialize_into(&mut w, &snap).map_err(|e| StoreError::Io {
            path: tmp.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let f = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
        let dest = self.dir.join("snapshot.bin");
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        self.wal.set_len(0).map_err(io(&self.dir))?;
        self.wal.seek(SeekFrom::Start(0)).map_err(io(&self.dir))?;
        self.wal_len = 0;
        Ok(())
    }
}

/// Reads one log frame; `None` at the end or at a torn/corrupt frame.
fn read_frame(r: &mut impl Read) -> Option<(Commit, u64)> {
    let mut head = [0u8; 12];
    r.read_exact(&mut head).ok()?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(head[4..].try_into().ok()?);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    if xxhash_rust::xxh3::xxh3_64(&body) != sum {
        return None;
    }
    let c = bincode::deserialize(&body).ok()?;
    Some((c, 12 + len as u64))
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

    fn commit(&mut self, c: Commit) -> Result<(), StoreError> {
        if c.epoch <= self.meta.epoch {
            return Err(StoreError::Stale {
                offered: c.epoch,
                stored: self.meta.epoch,
            });
        }
        let body = bincode::serialize(&c).expect("commits serialize");
        let mut frame = Vec::with_capacity(12 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
        frame.extend_from_slice(&body);
        let path = self.dir.join("wal.bin");
        if let Err(e) = self
            .wal
            .write_all(&frame)
            .and_then(|()| self.wal.sync_data())
        {
            // Cut a partly written frame off, so later commits stay readable.
            let _ = self.wal.set_len(self.wal_len);
            let _ = self.wal.seek(SeekFrom::Start(self.wal_len));
            return Err(io(&path)(e));
        }
        self.wal_len += frame.len() as u64;
        apply(&mut self.meta, &mut self.rows, c)?;
        if self.wal_len > SNAPSHOT_AFTER {
            self.snapshot()?;
        }
        Ok(())
    }

    fn rows(&self) -> Vec<StoredRow> {
        self.rows
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
