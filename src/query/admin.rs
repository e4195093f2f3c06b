//! The Admin service, for operators: Status (where the pipeline stands), Snapshot
//! (every row as of one committed epoch) and Replay (a backfill, run as a child
//! `tally replay` process).

use super::pb::{self, admin_server::Admin};
use super::{find_view, timestamp, Api};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Lines of export per Snapshot message.
const SNAPSHOT_CHUNK: usize = 1000;

/// How the server starts a `tally replay` against its own deployment (set by
/// `tally run`; without it Admin.Replay is refused).
#[derive(Clone, Debug)]
pub struct ReplayLauncher {
    /// The `tally` executable.
    pub exe: PathBuf,
    /// The flags after `replay` that name the live deployment: its pipeline, data
    /// directory, store and lake. Secrets are not among them: the child inherits the
    /// environment (TALLY_REDIS_PASSWORD, the AWS chain).
    pub args: Vec<String>,
    /// Flags for a Kinesis replay: the live run's endpoint and region.
    pub kinesis_args: Vec<String>,
    /// The live data directory: the replay's work directory is `replay/<into>/` in it.
    pub data_dir: PathBuf,
}

pub struct AdminService {
    api: Arc<Api>,
    /// Held while a replay runs: one at a time.
    replaying: Arc<tokio::sync::Mutex<()>>,
}

impl AdminService {
    pub fn new(api: Arc<Api>) -> AdminService {
        AdminService {
            api,
            replaying: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

/// The `tally replay` flags a request asks for (after the launcher's own).
fn replay_flags(r: &pb::ReplayRequest) -> Result<Vec<String>, Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    if r.into.is_empty()
        || !r
            .into
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return bad(format!(
            "into '{}' must be non-empty [A-Za-z0-9_.-]",
            r.into
        ));
    }
    let mut flags = vec!["--into".to_owned(), r.into.clone()];
    let sources = !r.paths.is_empty() || !r.kinesis_stream.is_empty();
    if !r.from_archive.is_empty() {
        if sources || r.since.is_some() || r.until.is_some() {
            return bad("from_archive replays whole days: name no paths, kinesis_stream, since or until with it".into());
        }
        flags.extend(["--from-archive".to_owned(), r.from_archive.clone()]);
    } else if !sources {
        return bad("nothing to replay: name paths, a kinesis_stream, or from_archive".into());
    }
    if r.paths.iter().any(|p| p.is_empty() || p.starts_with('-')) {
        return bad("a path is empty or starts with '-'".into());
    }
    if !r.kinesis_stream.is_empty() {
        flags.extend(["--kinesis".to_owned(), r.kinesis_stream.clone()]);
        if !r.kinesis_start.is_empty() {
            flags.extend(["--kinesis-start".to_owned(), r.kinesis_start.clone()]);
        }
        if let Some(t) = &r.kinesis_end {
            // To the millisecond: window boundaries (since, until) are whole seconds, an
            // arrival instant need not be.
            let ms = super::millis(Some(t), "kinesis_end")?;
            let end = chrono::DateTime::from_timestamp_millis(ms)
                .expect("millis() bounds the range")
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            flags.extend(["--kinesis-end".to_owned(), end]);
        }
    } else if r.kinesis_end.is_some() {
        return bad("kinesis_end needs a kinesis_stream".into());
    }
    for (flag, t) in [("--since", &r.since), ("--until", &r.until)] {
        if let Some(t) = t {
            let ms = super::millis(Some(t), &flag[2..])?;
            flags.extend([flag.to_owned(), crate::model::window::rfc3339(ms)]);
        }
    }
    for p in &r.providers {
        flags.extend(["--provider".to_owned(), p.clone()]);
    }
    if r.swap {
        flags.push("--swap".into());
    }
    if r.accept_differences {
        if !r.swap {
            return bad("accept_differences needs swap".into());
        }
        flags.push("--accept-differences".into());
    }
    if !r.paths.is_empty() {
        flags.push("--".into());
        flags.extend(r.paths.iter().cloned());
    }
    Ok(flags)
}

/// The counts of the comparison the replay wrote to `report` (`verify.json`).
fn comparison_counts(report: &std::path::Path) -> Option<[u64; 4]> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(report).ok()?).ok()?;
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
    Some([
        n("compared")?,
        n("identical")?,
        n("unsealed")?,
        n("expired")?,
    ])
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.api.ready().await?;
        let s = self.api.hub.status();
        let lateness = self.api.pipeline.allowed_lateness.as_millis() as i64;
        let known = s.clock != crate::model::Millis::MIN && s.epoch > 0;
        let (processes, workers) = crate::dataflow::shape();
        Ok(Response::new(pb::StatusResponse {
            pipeline: self.api.pipeline.name.clone(),
            epoch: s.epoch,
            committed_at: s.committed_at.map(prost_types::Timestamp::from),
            positions: s.positions.into_iter().collect(),
            clock: known.then(|| timestamp(s.clock)),
            watermark: known.then(|| timestamp(s.clock.saturating_sub(lateness))),
            commit_lag_seconds: s
                .committing_since
                .map_or(0.0, |t| t.elapsed().as_secs_f64()),
            records: s.counters.records,
            accepted: s.counters.accepted,
            duplicates: s.counters.duplicates,
            dead_letters: s.counters.dead_letters.into_iter().collect(),
            state_entries: crate::dataflow::state_entries()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            store: Some(pb::Store {
                kind: self.api.store.0.clone(),
                location: self.api.store.1.clone(),
                up: s.store_up,
            }),
            processes: processes as u32,
            workers_per_process: workers as u32,
        }))
    }

    type SnapshotStream = ReceiverStream<Result<pb::SnapshotChunk, Status>>;

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.api.ready().await?;
        let r = req.into_inner();
        if !r.view.is_empty() {
            find_view(&self.api.pipeline, &r.view)?;
        }
        let read = tokio::time::timeout(self.api.limits.request_timeout, self.api.hub.snapshot());
        let (meta, rows) = match read.await {
            Ok(Ok(Ok(read))) => read,
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "Admin.Snapshot: reading the store failed");
                return Err(Status::unavailable(
                    "the store could not be read; the server log has the details",
                ));
            }
            Ok(Err(_)) | Err(_) => {
                return Err(Status::unavailable(
                    "no pass of the committer between commits came within the request timeout: the store is down or the run has stopped",
                ))
            }
        };
        let epoch = meta.epoch;
        let text = tokio::task::spawn_blocking(move || {
            let rows = rows
                .into_iter()
                .filter(|((k, _), _)| {
                    r.view.is_empty()
                        || meta
                            .views
                            .get(k.view as usize)
                            .is_some_and(|v| v.name == r.view)
                })
                .collect();
            let mut out = Vec::new();
            crate::store::export::write(&meta, rows, &mut out).map(|_| out)
        })
        .await
        .map_err(|e| super::QueryError::Internal(e.to_string()))?
        .map_err(|e| super::QueryError::Internal(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let text = String::from_utf8(text).expect("export lines are UTF-8");
            let mut lines = text.lines().map(str::to_owned).peekable();
            // At least one message, so an empty store still tells its epoch.
            let mut first = true;
            while first || lines.peek().is_some() {
                first = false;
                let msg = pb::SnapshotChunk {
                    epoch,
                    lines: lines.by_ref().take(SNAPSHOT_CHUNK).collect(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ReplayStream = ReceiverStream<Result<pb::ReplayProgress, Status>>;

    async fn replay(
        &self,
        req: Request<pb::ReplayRequest>,
    ) -> Result<Response<Self::ReplayStream>, Status> {
        let Some(launch) = self.api.replay.clone() else {
            return Err(Status::failed_precondition(
                "this server has no live deployment to replay into (Replay is served by `tally run`)",
            ));
        };
        let r = req.into_inner();
        let flags = replay_flags(&r)?;
        let kinesis: &[String] = if r.kinesis_stream.is_empty() {
            &[]
        } else {
            &launch.kinesis_args
        };
        let Ok(running) = Arc::clone(&self.replaying).try_lock_owned() else {
            return Err(Status::failed_precondition("a replay is already running"));
        };
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(&launch.exe)
            .arg("replay")
            .args(&launch.args)
            .arg("--quiet")
            .args(kinesis)
            .args(&flags)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                super::QueryError::Internal(format!("starting {}: {e}", launch.exe.display()))
            })?;
        tracing::info!(into = %r.into, ?flags, "Admin.Replay: started");
        let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(64);
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = lines_tx.clone();
            tokio::spawn(async move {
                let mut l = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(line)) = l.next_line().await {
                    if tx.send(line).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(lines_tx);
        let report = launch
            .data_dir
            .join("replay")
            .join(&r.into)
            .join("verify.json");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let _running = running;
            // The caller going away (cancelled, or its connection lost) stops the
            // replay, also while it prints nothing; asked again, it resumes.
            let cancelled = loop {
                tokio::select! {
                    line = lines.recv() => match line {
                        Some(line) => {
                            let msg = pb::ReplayProgress { line, done: None };
                            if tx.send(Ok(msg)).await.is_err() {
                                break true;
                            }
                        }
                        None => break false,
                    },
                    () = tx.closed() => break true,
                }
            };
            if cancelled {
                tracing::info!("Admin.Replay: the caller went away; stopping the replay");
                let _ = child.start_kill();
                let _ = child.wait().await;
                return;
            }
            let code = match child.wait().await {
                Ok(s) => s.code().unwrap_or(3),
                Err(e) => {
                    tracing::error!(error = %e, "Admin.Replay: waiting for the replay");
                    3
                }
            };
            tracing::info!(code, "Admin.Replay: finished");
            let counts = if code <= 1 {
                comparison_counts(&report)
            } else {
                None
            };
            let [compared, identical, unsealed, expired] = counts.unwrap_or_default();
            let done = pb::ReplayDone {
                exit_code: code,
                compared,
                identical,
                unsealed,
                expired,
                report: if counts.is_some() {
                    report.display().to_string()
                } else {
                    String::new()
                },
            };
            let _ = tx
                .send(Ok(pb::ReplayProgress {
                    line: String::new(),
                    done: Some(done),
                }))
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::ReplayRequest {
        pb::ReplayRequest {
            into: "bf1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn replay_requests_become_the_flags_of_tally_replay() {
        let r = pb::ReplayRequest {
            kinesis_stream: "sales".into(),
            kinesis_start: "latest".into(),
            kinesis_end: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 250_000_000,
            }),
            providers: vec!["claro".into()],
            swap: true,
            ..request()
        };
        assert_eq!(
            replay_flags(&r).unwrap(),
            [
                "--into",
                "bf1",
                "--kinesis",
                "sales",
                "--kinesis-start",
                "latest",
                "--kinesis-end",
                "2023-11-14T22:13:20.250Z",
                "--provider",
                "claro",
                "--swap"
            ]
        );
        let files = pb::ReplayRequest {
            paths: vec!["a.jsonl".into(), "dir".into()],
            ..request()
        };
        assert_eq!(
            replay_flags(&files).unwrap(),
            ["--into", "bf1", "--", "a.jsonl", "dir"]
        );

        let refused = |r: pb::ReplayRequest, why: &str| {
            let e = replay_flags(&r).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(why), "{}", e.message());
        };
        refused(
            pb::ReplayRequest {
                paths: vec!["a".into()],
                kinesis_end: Some(prost_types::Timestamp::default()),
                ..request()
            },
            "kinesis_end needs a kinesis_stream",
        );
        refused(
            pb::ReplayRequest {
                paths: vec!["--swap".into()],
                ..request()
            },
            "starts with '-'",
        );
        refused(
            pb::ReplayRequest {
                into: "../x".into(),
                paths: vec!["a".into()],
                ..Default::default()
            },
            "must be non-empty",
        );
        refused(request(), "nothing to replay");
    }
}
