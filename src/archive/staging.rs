//! The staging log: every decoded record that entered the dataflow, per committed epoch,
//! with its position, watermark and the epoch's clock. Replaying it through the
//! dataflow (same epochs, same order, same clocks) rebuilds every operator's state as it
//! was, which is how a restart resumes without losing or double counting. Epochs whose
//! effects have all expired by the committed clock are skipped (see `ingest`): they
//! could only rebuild state that would be dropped again.
//!
//! File `<data dir>/staging/log.bin`: one frame per epoch,
//! `len u32 | xxh3 u64 | zstd(bincode(StagedEpoch))` (see `store::frame`; logs written
//! before compression hold plain `bincode(StagedEpoch)` frames, and still read). The committer appends and fsyncs an
//! epoch's frame before committing the epoch to the store, and the store records the
//! log's length; at open, anything past that length (an epoch that never committed) is cut.

use crate::dataflow::Epoch;
use crate::model::{Millis, Position};
use crate::store::frame;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// One record as staged: where it was read, its watermark, and its bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StagedRecord {
    /// Index into [`StagedEpoch::sources`].
    pub source: u32,
    pub offset: u64,
    pub wm: Millis,
    pub raw: std::sync::Arc<str>,
}

/// One epoch of dataflow input.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StagedEpoch {
    pub epoch: Epoch,
    pub clock: Millis,
    /// Names of the sources the records came from.
    pub sources: Vec<String>,
    pub records: Vec<StagedRecord>,
}

impl StagedEpoch {
    /// Adds a record, naming its source in the epoch's table.
    pub fn push(&mut self, source: &str, pos: Position, wm: Millis, raw: std::sync::Arc<str>) {
        let idx = match self.sources.iter().position(|s| s == source) {
            Some(i) => i,
            None => {
                self.sources.push(source.to_owned());
                self.sources.len() - 1
            }
        };
        self.records.push(StagedRecord {
            source: idx as u32,
            offset: pos.offset,
            wm,
            raw,
        });
    }
}

pub struct StagingLog {
    path: PathBuf,
    file: File,
    len: u64,
    /// The frame body being written, kept between epochs: a busy epoch's frame is over
    /// 10 MB (about 13 MB in the 10M benchmark), and a new buffer each time was faulted
    /// in afresh.
    body: Vec<u8>,
    /// Compresses each frame: the records' JSON shrinks about 8 times, so the log
    /// writes (and keeps on disk) that much less.
    zstd: frame::Zstd,
}

/// Refuses a log shorter than what the store says is committed: the store's
/// commits came from another data directory.
fn check_len(path: &Path, actual: u64, committed_len: u64) -> io::Result<()> {
    if actual < committed_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is shorter ({actual} bytes) than the store's committed length \
                 ({committed_len}): the store's commits came from another data directory; \
                 run with that one, or commit to a new store (another --redis-namespace)",
                path.display()
            ),
        ));
    }
    Ok(())
}

impl StagingLog {
    /// Checks, without changing anything, that `data_dir` holds a log at least
    /// `committed_len` long (before a writer takes over a store it cannot resume).
    pub fn check(data_dir: &Path, committed_len: u64) -> io::Result<()> {
        let path = data_dir.join("staging").join("log.bin");
        let actual = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        check_len(&path, actual, committed_len)
    }

    /// Opens the log, cutting it to `committed_len` (what the store says is committed).
    pub fn open(data_dir: &Path, committed_len: u64) -> io::Result<StagingLog> {
        let dir = data_dir.join("staging");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("log.bin");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        check_len(&path, file.metadata()?.len(), committed_len)?;
        file.set_len(committed_len)?;
        file.seek(SeekFrom::Start(committed_len))?;
        Ok(StagingLog {
            path,
            file,
            len: committed_len,
            body: Vec::new(),
            zstd: frame::Zstd::new()?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one epoch durably; returns the log's new length.
    pub fn append(&mut self, e: &StagedEpoch) -> io::Result<u64> {
        self.body.clear();
        bincode::serialize_into(&mut self.body, e).map_err(io::Error::other)?;
        self.zstd
            .append(&mut self.file, &mut self.len, &self.body)?;
        Ok(self.len)
    }

    /// Reads the committed epochs back, in order.
    pub fn read(&self) -> io::Result<impl Iterator<Item = io::Result<StagedEpoch>>> {
        let mut r = BufReader::new(File::open(&self.path)?.take(self.len));
        let path = self.path.clone();
        Ok(std::iter::from_fn(move || {
            let corrupt = |what: &str| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {what} inside the committed length", path.display()),
                )
            };
            let body = match frame::read(&mut r) {
                Ok(None) => return None,
                Ok(Some(b)) => b,
                Err(e) => return Some(Err(corrupt(&e.to_string()))),
            };
            Some(bincode::deserialize(&body).map_err(|e| corrupt(&e.to_string())))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(n: Epoch, records: usize) -> StagedEpoch {
        let mut e = StagedEpoch {
            epoch: n,
            clock: 1_700_000_000_000 + n as Millis,
            ..StagedEpoch::default()
        };
        for i in 0..records {
            let raw = format!(
                r#"{{"event_id":"e-{n}-{i}","provider_id":"p-{}","kind":"sale","amount":"{i}.25"}}"#,
                i % 3
            );
            e.push(
                "in.jsonl",
                Position {
                    source: 0,
                    offset: (i * 80) as u64,
                },
                e.clock,
                raw.into(),
            );
        }
        e
    }

    fn same(a: &StagedEpoch, b: &StagedEpoch) -> bool {
        a.epoch == b.epoch
            && a.clock == b.clock
            && a.sources == b.sources
            && a.records.len() == b.records.len()
            && a.records.iter().zip(&b.records).all(|(x, y)| {
                x.source == y.source && x.offset == y.offset && x.wm == y.wm && x.raw == y.raw
            })
    }

    /// A log written before frames were compressed (plain bincode frames) is resumed
    /// by this version: its epochs and the new, compressed ones read back alike, and a
    /// new epoch takes a fraction of its plain size.
    #[test]
    fn a_log_from_before_compression_is_resumed_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let first = epoch(1, 500);
        let path = dir.path().join("staging").join("log.bin");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut len = 0;
        let plain = bincode::serialize(&first).unwrap();
        frame::append(&mut file, &mut len, &plain).unwrap();
        drop(file);

        let mut log = StagingLog::open(dir.path(), len).unwrap();
        let second = epoch(2, 500);
        let after = log.append(&second).unwrap();
        assert!(
            after - len < (plain.len() / 4) as u64,
            "epoch 2 took {} bytes; epoch 1, plain, {}",
            after - len,
            plain.len()
        );
        let got: Vec<StagedEpoch> = log.read().unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(got.len(), 2);
        assert!(same(&got[0], &first) && same(&got[1], &second));
        // Reopened at the committed length, it reads the same.
        let log = StagingLog::open(dir.path(), after).unwrap();
        assert_eq!(log.read().unwrap().count(), 2);
    }
}
