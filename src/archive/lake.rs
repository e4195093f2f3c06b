//! The lake: where staged facts and compacted Parquet live, through `object_store`.
//!
//! A lake is a directory (the default: `lake` under the data directory) or an
//! `s3://bucket[/prefix]` URL. S3 takes the standard AWS settings from the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, and `AWS_ENDPOINT_URL`
//! for an S3-compatible server; an `http://` endpoint is allowed as such).
//!
//! Every call blocks the calling thread (the committer and the compactor are plain
//! threads) on a small runtime of the lake's own. A put is atomic on both kinds: a
//! reader sees the whole object or none of it.

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::path::Path;
use std::sync::Arc;

/// A lake operation that failed: which object, and why.
#[derive(Debug, thiserror::Error)]
#[error("lake {lake}: {what}: {reason}")]
pub struct LakeError {
    pub lake: String,
    pub what: String,
    pub reason: String,
}

pub struct Lake {
    store: Arc<dyn ObjectStore>,
    /// How the lake was named, for errors and logs.
    name: String,
    /// A local lake's directory.
    local: Option<std::path::PathBuf>,
    rt: tokio::runtime::Runtime,
}

impl Lake {
    /// Opens `spec`: an `s3://` URL, or a path (relative paths are under `data_dir`).
    pub fn open(spec: &str, data_dir: &Path) -> Result<Lake, LakeError> {
        let fail = |what: &str, reason: String| LakeError {
            lake: spec.to_owned(),
            what: what.to_owned(),
            reason,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tally-lake")
            .enable_all()
            .build()
            .map_err(|e| fail("runtime", e.to_string()))?;
        let mut local = None;
        let (store, name): (Arc<dyn ObjectStore>, String) =
            if let Some(rest) = spec.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(fail("url", "no bucket named (s3://bucket/prefix)".into()));
                }
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    // Retries are the caller's: a failed flush is tried again later.
                    .with_retry(object_store::RetryConfig {
                        max_retries: 2,
                        ..Default::default()
                    });
                if std::env::var("AWS_ENDPOINT_URL").is_ok_and(|e| e.starts_with("http://")) {
                    b = b.with_allow_http(true);
                }
                let s3 = b.build().map_err(|e| fail("S3 settings", e.to_string()))?;
                let store: Arc<dyn ObjectStore> = if prefix.trim_matches('/').is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(
                        s3,
                        prefix.trim_matches('/'),
                    ))
                };
                (store, spec.to_owned())
            } else {
                let dir = data_dir.join(spec.strip_prefix("file://").unwrap_or(spec));
                std::fs::create_dir_all(&dir)
                    .map_err(|e| fail(&dir.display().to_string(), e.to_string()))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| fail(&dir.display().to_string(), e.to_string()))?
                    .with_automatic_cleanup(true);
                let name = dir.display().to_string();
                local = Some(dir);
                (Arc::new(store), name)
            };
        Ok(Lake {
            store,
            name,
            local,
            rt,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> LakeError {
        LakeError {
            lake: self.name.clone(),
            what: what.to_owned(),
            reason: e.to_string(),
        }
    }

    /// Writes `bytes` at `path`, replacing what was there, atomically.
    pub fn put(&self, path: &str, bytes: Vec<u8>) -> Result<(), LakeError> {
        let p = ObjPath::from(path);
        self.rt
            .block_on(self.store.put(&p, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| self.err(path, e))
    }

    /// The object at `path`, or `None` when there is none.
    pub fn get(&self, path: &str) -> Result<Option<Bytes>, LakeError> {
        let p = ObjPath::from(path);
        self.rt
            .block_on(async {
                match self.store.get(&p).await {
                    Ok(r) => r.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .map_err(|e| self.err(path, e))
    }

    /// Every object under `prefix` (a folder, without its trailing slash), with its
    /// size, sorted by path.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, LakeError> {
        let p = ObjPath::from(prefix);
        let mut out = self
            .rt
            .block_on(async {
                let mut s = self.store.list(Some(&p));
                let mut out = Vec::new();
                while let Some(m) = s.next().await {
                    let m = m?;
                    out.push((m.location.to_string(), m.size));
                }
                Ok::<_, object_store::Error>(out)
            })
            .map_err(|e| self.err(prefix, e))?;
        out.sort();
        Ok(out)
    }

    /// Removes `path`; nothing there is not an error.
    pub fn delete(&self, path: &str) -> Result<(), LakeError> {
        let p = ObjPath::from(path);
        match self.rt.block_on(self.store.delete(&p)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(path, e)),
        }
    }

    /// Removes, under `prefix`, what puts cut short by a crash left on a local lake,
    /// and returns how many. A local put writes `<name>#<n>` and renames it into
    /// place; listings hide such files, so nothing else would ever remove them. S3
    /// has none (an upload that never completed is no object). Call it only where no
    /// put can be in flight: on a compaction's own folders, once it is done.
    pub fn sweep_unfinished(&self, prefix: &str) -> Result<usize, LakeError> {
        fn walk(dir: &Path, removed: &mut usize) -> std::io::Result<()> {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    walk(&entry.path(), removed)?;
                    continue;
                }
                let name = entry.file_name();
                let unfinished = name
                    .to_str()
                    .and_then(|n| n.rsplit_once('#'))
                    .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                if unfinished {
                    std::fs::remove_file(entry.path())?;
                    *removed += 1;
                }
            }
            Ok(())
        }
        let Some(root) = &self.local else {
            return Ok(0);
        };
        let mut removed = 0;
        walk(&root.join(prefix), &mut removed).map_err(|e| self.err(prefix, e))?;
        Ok(removed)
    }

    /// Moves `from` to `to` (replacing it).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), LakeError> {
        let (f, t) = (ObjPath::from(from), ObjPath::from(to));
        self.rt
            .block_on(self.store.rename(&f, &t))
            .map_err(|e| self.err(&format!("{from} -> {to}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_removes_only_the_partial_files_of_puts_cut_short() {
        let tmp = tempfile::tempdir().unwrap();
        let lake = Lake::open("lake", tmp.path()).unwrap();
        lake.put("events/date=D/provider_id=p/part-1.parquet", vec![1])
            .unwrap();
        lake.put("events/date=D/provider_id=p/a#b", vec![2])
            .unwrap();
        let dir = tmp.path().join("lake/events/date=D/provider_id=p");
        // What a put cut short leaves (object_store's staging name), and one elsewhere.
        std::fs::write(dir.join("part-2.parquet#1"), b"partial").unwrap();
        std::fs::create_dir_all(tmp.path().join("lake/audit")).unwrap();
        std::fs::write(tmp.path().join("lake/audit/x#7"), b"partial").unwrap();
        assert_eq!(
            lake.list("events").unwrap().len(),
            2,
            "listings hide the partial file"
        );
        let before = lake.list("events").unwrap();
        assert_eq!(lake.sweep_unfinished("events").unwrap(), 1);
        assert!(!dir.join("part-2.parquet#1").exists());
        // Objects stay, the one with '#' in its name too (stored escaped).
        assert_eq!(lake.list("events").unwrap(), before);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        assert!(
            tmp.path().join("lake/audit/x#7").exists(),
            "outside the prefix"
        );
        assert_eq!(lake.sweep_unfinished("nothing/here").unwrap(), 0);
    }
}
