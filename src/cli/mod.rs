//! The `tally` command line: argument parsing and the commands. `main.rs` only
//! dispatches here and maps errors to exit codes.

// Doc comments here are `--help` text, where `[[sources]]` means the TOML table.
#![allow(rustdoc::broken_intra_doc_links)]

mod client;
mod compact;
mod demo;
mod keys;
mod publish;
mod replay;
mod validate;

use crate::ingest::{self, RunConfig};
use crate::model::Millis;
use crate::pipeline::{Pipeline, SourceSpec, DEFAULT_PIPELINE};
use crate::source::gen::{GenOptions, Generator};
use crate::source::Input;
use crate::store::redis::RedisConfig;
use crate::store::{export, StoreConfig};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Tally: exact, windowed sales aggregates from a stream of events, committed exactly once.
#[derive(Parser, Debug)]
#[command(name = "tally", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a pipeline: read events, aggregate them, commit every epoch to the store.
    ///
    /// Reads the inputs (files, directories, `-` for stdin; by default the pipeline's
    /// [[sources]]), and commits each epoch atomically to the embedded store in
    /// --data-dir, or to Redis with --redis. Run it again on the same data directory
    /// and it resumes where it stopped: nothing lost, nothing counted twice. Stops on
    /// Ctrl-C or SIGTERM after committing what it has read (within
    /// --shutdown-timeout), or by itself with --until-eof.
    Run(Box<RunArgs>),
    /// Print every row of every view from a store, as sorted JSON Lines (see README).
    Export {
        #[arg(long, default_value = "tally-data")]
        data_dir: PathBuf,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Compact one provider-local day of the lake into Parquet, verified against the store.
    ///
    /// Reads the day's staged facts (written by `run`) and what was published
    /// before, writes the events (sorted by event time, voids resolved), the voids
    /// audit and every view's rows of the day as zstd Parquet in hive layout, checks
    /// the day's counts and sums against the store's day windows, and publishes by
    /// writing the day's manifest last. A rerun is a no-op. Exit code 1 when
    /// verification fails (nothing is published then; a report names the figures).
    Compact(compact::CompactArgs),
    /// Backfill: replay files, Kinesis streams or the lake's compacted days into a
    /// shadow store, verify it against the live store, and swap it in with --swap.
    ///
    /// The shadow is the Redis namespace --into (with --redis) or the embedded store
    /// in `--data-dir/replay/<into>/`; running the same command again resumes an
    /// interrupted replay. Windows inside [--since, --until) that the live store has
    /// sealed are compared row by row (report: `verify.json` there); --swap writes
    /// the shadow's rows over the live ones where they differ: on Redis in one
    /// transaction beside the running live writer, on the embedded store while the
    /// live run is stopped. Values are absolute, so nothing is counted twice. Exit
    /// code 1 when --swap finds differences without --accept-differences.
    Replay(Box<replay::ReplayArgs>),
    /// Generate realistic, deterministic events as JSON Lines (same seed, same bytes).
    Gen(GenArgs),
    /// Check a JSON Lines file: counts per dead-letter reason with the first examples.
    ///
    /// Runs the file through the pipeline's full rules (decode, duplicates, voids,
    /// lateness) in a scratch directory. Exit code 1 when any record is bad.
    Validate {
        file: PathBuf,
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Examples shown per reason.
        #[arg(long, default_value_t = 3)]
        examples: usize,
    },
    /// A live demo: a generated stream through the whole pipeline on the embedded store.
    Demo(demo::DemoArgs),
    /// Manage the API keys of the gRPC server (the keys file of `run --keys`).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Send JSON Lines events to a running Tally over gRPC, to a Kinesis stream or to a
    /// Fluvio topic.
    ///
    /// Over gRPC (Ingest.Publish, with an ingest key from TALLY_API_KEY) each event is
    /// acknowledged once committed: it prints what was committed and the dead letters
    /// by reason with their line numbers, and exits 1 when any record was a dead
    /// letter. To Kinesis (--to kinesis --stream S) each line is a record keyed by its
    /// provider_id. Publishing the same input again is safe: a redelivery counts once.
    Publish(publish::PublishArgs),
    /// Query a running server over gRPC (providers: windows, summaries, top products,
    /// watch; operators: status).
    ///
    /// The key comes from TALLY_API_KEY (never a flag, so it stays out of process lists).
    Query(client::QueryArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Inputs: JSON Lines files, directories, or `-` for stdin. Default: the pipeline's sources.
    pub inputs: Vec<PathBuf>,
    /// Pipeline file. Default: the built-in pipelines/sales.toml.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// Where the store, staging log and dead letters live.
    #[arg(long, default_value = "tally-data")]
    pub data_dir: PathBuf,
    /// Dataflow worker threads. Default: the number of cores.
    #[arg(long)]
    pub workers: Option<usize>,
    #[command(flatten)]
    pub kinesis: KinesisArgs,
    #[command(flatten)]
    pub fluvio: FluvioArgs,
    /// Keep reading files as they grow.
    #[arg(long)]
    pub follow: bool,
    /// Stop once every input is read and committed.
    #[arg(long, conflicts_with = "follow")]
    pub until_eof: bool,
    /// After stopping, write the export (JSON Lines) here.
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// Print one line per committed epoch.
    #[arg(long)]
    pub progress: bool,
    /// After Ctrl-C or SIGTERM, how long to drain and commit before exiting anyway
    /// (exit code 3; nothing is lost, the rest is read again at the next start).
    #[arg(long, default_value = "30s")]
    pub shutdown_timeout: String,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, env = "TALLY_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// The Parquet lake that counted events are staged to and closed days compacted
    /// into: a directory (relative to --data-dir) or s3://bucket/prefix (AWS settings
    /// from the environment; AWS_ENDPOINT_URL for an S3-compatible server). Default:
    /// the pipeline's [archive] lake, `lake` in the data directory.
    #[arg(long, env = "TALLY_LAKE")]
    pub lake: Option<String>,
    /// Stage nothing to the lake (and compact nothing).
    #[arg(long, conflicts_with = "lake")]
    pub no_archive: bool,
    #[command(flatten)]
    pub grpc: GrpcArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Kinesis streams to read (`run`, `replay`).
#[derive(Args, Debug, Clone, Default)]
pub struct KinesisArgs {
    /// Read every shard of this Kinesis stream (by name; repeat for several). With the
    /// file inputs, replaces the pipeline's sources. Credentials come from the
    /// standard AWS chain. Reading goes on until stopped; with --until-eof, until
    /// every shard has been read to its current end.
    #[arg(long = "kinesis", id = "kinesis", value_name = "STREAM")]
    pub streams: Vec<String>,
    /// Where a --kinesis stream's first run starts: trim_horizon (the oldest record
    /// kept), latest, or an RFC 3339 instant (AT_TIMESTAMP). Later runs resume from
    /// the committed sequence numbers.
    #[arg(long, default_value = "trim_horizon", requires = "kinesis")]
    pub kinesis_start: String,
    /// Read each shard only up to the records that arrived before this RFC 3339
    /// instant (ApproximateArrivalTimestamp), for a replay of a time range; a shard
    /// read up to it counts as read to its end. Default: no end.
    #[arg(long, requires = "kinesis", value_parser = rfc3339_millis)]
    pub kinesis_end: Option<crate::model::Millis>,
    /// The Kinesis endpoint, for a local server (default: AWS's for the region).
    #[arg(long, env = "TALLY_KINESIS_ENDPOINT", requires = "kinesis")]
    pub kinesis_endpoint: Option<String>,
    /// The AWS region of --kinesis (default: the standard chain, e.g. AWS_REGION).
    #[arg(long, requires = "kinesis")]
    pub kinesis_region: Option<String>,
}

impl KinesisArgs {
    /// The streams as inputs.
    pub fn inputs(&self) -> Result<Vec<Input>> {
        let start: crate::source::kinesis::StartAt = self
            .kinesis_start
            .parse()
            .map_err(|e| anyhow::anyhow!("--kinesis-start: {e}"))?;
        Ok(self
            .streams
            .iter()
            .map(|stream| {
                let mut k = crate::source::kinesis::KinesisSpec::new(stream);
                k.start = start;
                k.end = self.kinesis_end;
                k.endpoint.clone_from(&self.kinesis_endpoint);
                k.region.clone_from(&self.kinesis_region);
                Input::Kinesis(k)
            })
            .collect())
    }
}

/// An RFC 3339 instant as Unix milliseconds (a flag's value).
fn rfc3339_millis(s: &str) -> Result<crate::model::Millis, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("not an RFC 3339 instant ({e})"))
}

/// Fluvio topics to read (`run`, `replay`).
#[derive(Args, Debug, Clone, Default)]
pub struct FluvioArgs {
    /// Read every partition of this Fluvio topic (repeat for several). With the file
    /// inputs, replaces the pipeline's sources. Reading goes on until stopped; with
    /// --until-eof, until every partition has been read to its current end.
    #[arg(long = "fluvio", value_name = "TOPIC")]
    pub topics: Vec<String>,
    /// Where a --fluvio partition with nothing committed starts: beginning, end (its
    /// end at the first start, kept across restarts) or an offset. Later runs resume
    /// from the committed offsets.
    #[arg(long, default_value = "beginning", requires = "topics")]
    pub fluvio_start: String,
    /// The Fluvio cluster's SC address (host:port). Default: the current Fluvio
    /// profile (~/.fluvio/config).
    #[arg(long, env = "TALLY_FLUVIO_ENDPOINT", requires = "topics")]
    pub fluvio_endpoint: Option<String>,
}

impl FluvioArgs {
    /// The topics as inputs.
    pub fn inputs(&self) -> Result<Vec<Input>> {
        let start: crate::source::fluvio::FluvioStart = self
            .fluvio_start
            .parse()
            .map_err(|e| anyhow::anyhow!("--fluvio-start: {e}"))?;
        Ok(self
            .topics
            .iter()
            .map(|t| {
                let mut f = crate::source::fluvio::FluvioSpec::new(t);
                f.start = start;
                f.endpoint.clone_from(&self.fluvio_endpoint);
                Input::Fluvio(f)
            })
            .collect())
    }
}

/// One timely cluster across processes (scale-out). Process 0 reads the inputs,
/// commits and serves the gRPC API; the others run their share of the dataflow's
/// workers (--workers each), read the Kinesis shards and Fluvio partitions process
/// 0 gives them (round robin), ignore the inputs and store flags, and serve only
/// the gRPC health service on --grpc-addr. Start every process with the same pipeline,
/// --workers, hosts file and Tally version; they wait for each other. When one
/// dies, the others exit with code 4: start them all again.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Processes in the cluster.
    #[arg(long, env = "TALLY_PROCESSES", default_value_t = 1)]
    pub processes: usize,
    /// This process's index, from 0 to --processes - 1 (e.g. a StatefulSet pod's index).
    #[arg(long, env = "TALLY_PROCESS", default_value_t = 0)]
    pub process: usize,
    /// The cluster's hosts file: one host:port per line, process i's on line i
    /// (blank lines and # comments skipped). Each process listens on its own.
    #[arg(long, env = "TALLY_HOSTS")]
    pub hosts: Option<PathBuf>,
    /// How long to wait for every process of the cluster to connect.
    #[arg(long, default_value = "5m")]
    pub cluster_timeout: String,
}

impl ClusterArgs {
    /// The cluster these flags describe; `None` for one process.
    fn cluster(&self) -> Result<Option<crate::dataflow::Cluster>> {
        if self.processes <= 1 {
            anyhow::ensure!(
                self.process == 0,
                "--process {} needs --processes above it (and --hosts)",
                self.process
            );
            return Ok(None);
        }
        let hosts = self
            .hosts
            .as_deref()
            .with_context(|| format!("--processes {} needs --hosts FILE", self.processes))?;
        let timeout = crate::pipeline::parse_duration(&self.cluster_timeout)
            .map_err(|e| anyhow::anyhow!("--cluster-timeout '{}': {e}", self.cluster_timeout))?;
        Ok(Some(crate::dataflow::Cluster::from_hosts_file(
            hosts,
            self.processes,
            self.process,
            timeout,
        )?))
    }
}

/// The gRPC API, served by `run` with --grpc-addr.
#[derive(Args, Debug, Clone, Default)]
pub struct GrpcArgs {
    /// Serve the gRPC API (Query, Ingest, Admin, health, reflection) on ADDR
    /// (e.g. 0.0.0.0:50051). Events published over Ingest are one more input, `grpc`.
    #[arg(long, env = "TALLY_GRPC_ADDR")]
    pub grpc_addr: Option<String>,
    /// The API keys file (see `tally keys`); reloaded when it changes.
    #[arg(long, env = "TALLY_KEYS", default_value = "tally-keys.json")]
    pub keys: PathBuf,
    /// Serve TLS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Requests per second per key (also the burst); 0 for no limit.
    #[arg(long, default_value_t = 1000)]
    pub rate_limit: u32,
    /// The longest range of ListWindows and of a Watch snapshot.
    #[arg(long, default_value = "31d")]
    pub max_range: String,
    /// The longest range of Summarize.
    #[arg(long, default_value = "400d")]
    pub max_summary_range: String,
    /// The longest a unary call may take.
    #[arg(long, default_value = "30s")]
    pub request_timeout: String,
    /// Changed rows of past epochs kept for Watch to resume from.
    #[arg(long, default_value_t = 1_000_000)]
    pub watch_history: usize,
}

impl GrpcArgs {
    fn config(&self, addr: &str) -> Result<crate::query::ServeConfig> {
        let dur = |flag: &str, v: &str| {
            crate::pipeline::parse_duration(v).map_err(|e| anyhow::anyhow!("--{flag} '{v}': {e}"))
        };
        let limits = crate::query::Limits {
            max_range: dur("max-range", &self.max_range)?.as_millis() as i64,
            max_summary_range: dur("max-summary-range", &self.max_summary_range)?.as_millis()
                as i64,
            rate_per_key: self.rate_limit,
            request_timeout: dur("request-timeout", &self.request_timeout)?,
            ..Default::default()
        };
        Ok(crate::query::ServeConfig {
            history: None,
            replay: None,
            addr: addr.to_owned(),
            keys: self.keys.clone(),
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
            limits,
        })
    }
}

/// Which store: the embedded one in --data-dir, or Redis with --redis. The ACL user
/// and password come from TALLY_REDIS_USERNAME and TALLY_REDIS_PASSWORD (never flags,
/// so they stay out of process lists).
#[derive(Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// Commit to Redis at this URL (`redis://host:port/db`, `rediss://` for TLS)
    /// instead of the embedded store. With --redis-cluster: comma-separated seed nodes.
    #[arg(long, env = "TALLY_REDIS_URL")]
    pub redis: Option<String>,
    /// The --redis URLs are Redis Cluster seed nodes.
    #[arg(long, requires = "redis")]
    pub redis_cluster: bool,
    /// Prefix of every Redis key: one per deployment (a backfill writes its own).
    #[arg(long, env = "TALLY_REDIS_NAMESPACE", default_value = "tally")]
    pub redis_namespace: String,
    /// PEM file of the CA that signed the server's certificate (rediss://).
    #[arg(long, env = "TALLY_REDIS_CA")]
    pub redis_ca: Option<PathBuf>,
    /// Connect timeout.
    #[arg(long, default_value = "5s")]
    pub redis_connect_timeout: String,
    /// Longest wait for one reply.
    #[arg(long, default_value = "30s")]
    pub redis_timeout: String,
    /// How long to keep retrying when Redis is unreachable at start.
    #[arg(long, default_value = "60s")]
    pub redis_start_timeout: String,
    /// The longest pause between connection retries (backoff doubles from 100ms).
    #[arg(long, default_value = "5s")]
    pub redis_backoff_max: String,
    /// Also append each epoch's changed rows of a provider to the Redis stream
    /// `<ns>:{<provider>}:changes`, keeping about this many entries.
    #[arg(long)]
    pub redis_changes_stream: Option<u64>,
}

/// How Admin.Replay runs `tally replay` against this run's deployment.
fn replay_launcher(a: &RunArgs) -> Result<crate::query::admin::ReplayLauncher> {
    let exe = std::env::current_exe().context("finding the tally executable for Admin.Replay")?;
    let path = |p: &Path| p.display().to_string();
    let mut args = vec!["--data-dir".to_owned(), path(&a.data_dir)];
    if let Some(p) = &a.pipeline {
        args.extend(["--pipeline".to_owned(), path(p)]);
    }
    if let Some(l) = &a.lake {
        args.extend(["--lake".to_owned(), l.clone()]);
    }
    if a.no_archive {
        args.push("--no-archive".into());
    }
    if let Some(w) = a.workers {
        args.extend(["--workers".to_owned(), w.to_string()]);
    }
    args.extend(a.store.flags());
    let mut kinesis_args = Vec::new();
    if let Some(e) = &a.kinesis.kinesis_endpoint {
        kinesis_args.extend(["--kinesis-endpoint".to_owned(), e.clone()]);
    }
    if let Some(r) = &a.kinesis.kinesis_region {
        kinesis_args.extend(["--kinesis-region".to_owned(), r.clone()]);
    }
    Ok(crate::query::admin::ReplayLauncher {
        exe,
        args,
        kinesis_args,
        data_dir: a.data_dir.clone(),
    })
}

impl StoreArgs {
    /// These flags again, for a child process (credentials stay in the environment).
    pub fn flags(&self) -> Vec<String> {
        let Some(url) = &self.redis else {
            return Vec::new();
        };
        let mut f = vec![
            "--redis".to_owned(),
            url.clone(),
            "--redis-namespace".to_owned(),
            self.redis_namespace.clone(),
            "--redis-connect-timeout".to_owned(),
            self.redis_connect_timeout.clone(),
            "--redis-timeout".to_owned(),
            self.redis_timeout.clone(),
            "--redis-start-timeout".to_owned(),
            self.redis_start_timeout.clone(),
            "--redis-backoff-max".to_owned(),
            self.redis_backoff_max.clone(),
        ];
        if self.redis_cluster {
            f.push("--redis-cluster".into());
        }
        if let Some(ca) = &self.redis_ca {
            f.extend(["--redis-ca".to_owned(), ca.display().to_string()]);
        }
        f
    }

    /// The store these flags name; TTLs from the pipeline when given.
    pub fn config(&self, pipeline: Option<&Pipeline>) -> Result<StoreConfig> {
        let Some(url) = &self.redis else {
            return Ok(StoreConfig::Embedded);
        };
        let dur = |flag: &str, v: &str| {
            crate::pipeline::parse_duration(v).map_err(|e| anyhow::anyhow!("--{flag} '{v}': {e}"))
        };
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut c = RedisConfig::new(url.clone());
        c.urls = url.split(',').map(|u| u.trim().to_owned()).collect();
        c.cluster = self.redis_cluster;
        c.namespace = self.redis_namespace.clone();
        c.ca_file = self.redis_ca.clone();
        c.username = env("TALLY_REDIS_USERNAME");
        c.password = env("TALLY_REDIS_PASSWORD");
        c.connect_timeout = dur("redis-connect-timeout", &self.redis_connect_timeout)?;
        c.response_timeout = dur("redis-timeout", &self.redis_timeout)?;
        c.start_timeout = dur("redis-start-timeout", &self.redis_start_timeout)?;
        c.backoff_max = dur("redis-backoff-max", &self.redis_backoff_max)?;
        c.changes_stream = self.redis_changes_stream.filter(|n| *n > 0);
        if let Some(p) = pipeline {
            c.ttl = p.retention.clone();
        }
        Ok(StoreConfig::Redis(Box::new(c)))
    }
}

#[derive(Args, Debug, Clone)]
pub struct GenArgs {
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Number of records.
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    /// Event time of the first event (RFC 3339).
    #[arg(long, default_value = "2026-11-16T00:00:00Z")]
    pub start: String,
    /// Average events per second of event time (10M events at 40/s span about 3 days).
    #[arg(long, default_value_t = 50.0)]
    pub events_per_second: f64,
    #[arg(long, default_value_t = 12)]
    pub providers: usize,
    #[arg(long, default_value_t = 400)]
    pub products: usize,
    #[arg(long, default_value_t = 50_000)]
    pub customers: usize,
    /// Fraction of bad records, cycling through every dead-letter reason.
    #[arg(long, default_value_t = 0.0)]
    pub bad_rate: f64,
    /// Fraction of late events (hours behind).
    #[arg(long, default_value_t = 0.002)]
    pub late_rate: f64,
    /// Write here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl GenArgs {
    pub fn options(&self) -> Result<GenOptions> {
        let start = chrono::DateTime::parse_from_rfc3339(&self.start)
            .with_context(|| format!("--start '{}' is not RFC 3339", self.start))?
            .timestamp_millis();
        Ok(GenOptions {
            seed: self.seed,
            events: Some(self.events),
            start,
            events_per_second: self.events_per_second,
            providers: self.providers,
            products: self.products,
            customers: self.customers,
            bad_rate: self.bad_rate,
            late_rate: self.late_rate,
            rate: None,
        })
    }
}

/// What a command asks `main` to exit with.
pub enum Exit {
    Ok,
    /// `validate` found bad records.
    BadRecords,
    /// `compact` found the lake and the store disagreeing.
    Mismatch,
}

pub fn load_pipeline(path: Option<&Path>) -> Result<Pipeline> {
    Ok(match path {
        Some(p) => Pipeline::load(p)?,
        None => Pipeline::parse("pipelines/sales.toml (built in)", DEFAULT_PIPELINE)?,
    })
}

/// Installs Ctrl-C / SIGTERM handling: the first signal stops gracefully (stop
/// reading, drain, commit); a second one, or `deadline` passing first, exits at
/// once. Either way nothing is lost: what was not committed is read again at the
/// next start.
pub fn stop_on_signal(deadline: Option<std::time::Duration>) -> Arc<AtomicBool> {
    on_signal(
        deadline,
        "stopping: committing what was read (signal again to abort)",
    )
}

/// [`stop_on_signal`], saying `what` at the first signal.
fn on_signal(deadline: Option<std::time::Duration>, what: &'static str) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("{what}");
        if let Some(d) = deadline {
            let _ = std::thread::Builder::new()
                .name("tally-deadline".into())
                .spawn(move || {
                    std::thread::sleep(d);
                    eprintln!(
                        "tally: shutdown deadline of {d:?} passed before every epoch was committed; \
                         what was not committed is read again at the next start"
                    );
                    std::process::exit(3);
                });
        }
    });
    stop
}

pub fn dispatch(cli: Cli) -> Result<Exit> {
    match cli.command {
        Command::Run(a) => run(*a),
        Command::Export {
            data_dir,
            out,
            store,
        } => {
            export_store(&store.config(None)?, &data_dir, out.as_deref())?;
            Ok(Exit::Ok)
        }
        Command::Gen(a) => {
            let opts = a.options()?;
            let mut w: Box<dyn Write> = match &a.out {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut w);
            for line in Generator::new(opts) {
                w.write_all(&line)?;
                w.write_all(b"\n")?;
            }
            w.flush()?;
            Ok(Exit::Ok)
        }
        Command::Validate {
            file,
            pipeline,
            examples,
        } => validate::validate(&file, pipeline.as_deref(), examples),
        Command::Demo(a) => demo::demo(a),
        Command::Keys(k) => keys::keys(k),
        Command::Query(q) => client::query(q),
        Command::Publish(p) => publish::publish(p),
        Command::Compact(c) => compact::compact(c),
        Command::Replay(r) => replay::replay(*r),
    }
}

fn run(a: RunArgs) -> Result<Exit> {
    let mut pipeline = load_pipeline(a.pipeline.as_deref())?;
    if let Some(l) = &a.lake {
        pipeline.archive.lake = l.clone();
    }
    if a.no_archive {
        pipeline.archive.enabled = false;
    }
    let pipeline = Arc::new(pipeline);
    let cluster = a.cluster.cluster()?;
    if let Some(c) = cluster.as_ref().filter(|c| c.process > 0) {
        return follow(&a, pipeline, c);
    }
    let (mut inputs, follow) = if a.inputs.is_empty()
        && a.kinesis.streams.is_empty()
        && a.fluvio.topics.is_empty()
    {
        let mut inputs = Vec::new();
        let mut follow = a.follow;
        for s in &pipeline.sources {
            match s {
                SourceSpec::Stdin => inputs.push(Input::Stdin),
                SourceSpec::Files { paths, follow: f } => {
                    follow |= *f;
                    inputs.extend(paths.iter().cloned().map(Input::Path));
                }
                SourceSpec::Kinesis(k) => inputs.push(Input::Kinesis(k.clone())),
                SourceSpec::Fluvio(f) => inputs.push(Input::Fluvio(f.clone())),
            }
        }
        anyhow::ensure!(
            !inputs.is_empty() || a.grpc.grpc_addr.is_some(),
            "no inputs: name files (or - for stdin), add [[sources]] to {}, or take events over gRPC with --grpc-addr",
            pipeline.file
        );
        (inputs, follow)
    } else {
        let mut inputs: Vec<Input> = a
            .inputs
            .iter()
            .map(|p| {
                if p.as_os_str() == "-" {
                    Input::Stdin
                } else {
                    Input::Path(p.clone())
                }
            })
            .collect();
        inputs.extend(a.kinesis.inputs()?);
        inputs.extend(a.fluvio.inputs()?);
        (inputs, a.follow)
    };
    let store = a.store.config(Some(&pipeline))?;
    if let Some(addr) = &a.metrics_addr {
        crate::metrics::serve(addr).with_context(|| format!("--metrics-addr {addr}"))?;
    }
    // The gRPC API: a hub fed by the committer, an ingest source, the server.
    let mut server = None;
    let mut feed: Option<Arc<dyn ingest::Feed>> = None;
    if let Some(addr) = &a.grpc.grpc_addr {
        let mut serve = a.grpc.config(addr)?;
        serve.replay = Some(replay_launcher(&a)?);
        // Redis forgets windows past its retention: older ranges come from the lake.
        if matches!(store, StoreConfig::Redis(_)) && pipeline.archive.enabled {
            let lake = crate::archive::lake::Lake::open(&pipeline.archive.lake, &a.data_dir)?;
            serve.history = Some(Arc::new(crate::archive::history::History::new(
                lake,
                Arc::clone(&pipeline),
            )));
        }
        let feeder = crate::source::channel::Feeder::new("grpc");
        inputs.push(Input::Channel(feeder.clone()));
        let (backend, indexed, described) = match &store {
            StoreConfig::Embedded => (
                crate::query::Backend::Memory,
                true,
                ("embedded".to_owned(), "data directory".to_owned()),
            ),
            StoreConfig::Redis(c) => (
                crate::query::Backend::Redis(crate::store::redis::RedisReader::open_for(
                    c,
                    &pipeline.views,
                )?),
                false,
                ("redis".to_owned(), c.describe()),
            ),
        };
        let hub = Arc::new(crate::query::hub::Hub::new(
            indexed,
            a.grpc.watch_history,
            Some(a.data_dir.join("watch")),
        ));
        feed = Some(hub.clone());
        server = Some(crate::query::Server::start(
            &serve,
            Arc::clone(&pipeline),
            hub,
            backend,
            described,
            Some(feeder),
        )?);
    }
    let cfg = RunConfig {
        pipeline,
        data_dir: a.data_dir.clone(),
        store: store.clone(),
        workers: a.workers.unwrap_or_else(crate::cores),
        inputs,
        follow,
        until_eof: a.until_eof,
        stop: stop_on_signal(Some(
            crate::pipeline::parse_duration(&a.shutdown_timeout)
                .map_err(|e| anyhow::anyhow!("--shutdown-timeout '{}': {e}", a.shutdown_timeout))?,
        )),
        feed,
        cluster,
    };
    let progress = a.progress;
    let summary = ingest::run(cfg, move |r| {
        if progress {
            eprintln!(
                "epoch {}: {} records, {} accepted, {} dead letters, {} rows changed, committed in {:.1} ms",
                r.epoch,
                r.counters.records,
                r.counters.accepted,
                r.counters.dead_letter_total(),
                r.rows_changed,
                r.commit_latency.as_secs_f64() * 1e3
            );
        }
    });
    // Stop serving only after the last commit: publishers get their acknowledgements.
    if let Some(s) = server {
        s.stop();
    }
    let summary = summary?;
    tracing::info!(
        records = summary.records,
        epochs = summary.committed_epochs,
        replayed = summary.replayed_epochs,
        skipped = summary.skipped_epochs,
        "run finished"
    );
    if let Some(path) = &a.export {
        export_store(&store, &a.data_dir, Some(path))?;
    }
    Ok(Exit::Ok)
}

/// `run` on a cluster process other than 0: compute until the leader finishes.
fn follow(a: &RunArgs, pipeline: Arc<Pipeline>, c: &crate::dataflow::Cluster) -> Result<Exit> {
    if let Some(addr) = &a.metrics_addr {
        crate::metrics::serve(addr).with_context(|| format!("--metrics-addr {addr}"))?;
    }
    if !a.inputs.is_empty()
        || !a.kinesis.streams.is_empty()
        || !a.fluvio.topics.is_empty()
        || a.store.redis.is_some()
        || a.export.is_some()
    {
        tracing::info!(
            process = c.process,
            "inputs, the store, exports and the gRPC API belong to process 0: ignored here \
             (this process reads the broker partitions process 0 gives it and serves only \
             the gRPC health service on --grpc-addr)"
        );
    }
    // A signal does not stop a follower: the cluster ends when the leader has
    // committed what it read. The shutdown deadline still bounds the wait.
    let _ = on_signal(
        Some(
            crate::pipeline::parse_duration(&a.shutdown_timeout)
                .map_err(|e| anyhow::anyhow!("--shutdown-timeout '{}': {e}", a.shutdown_timeout))?,
        ),
        "stopping once process 0 has committed what it read (signal again to abort)",
    );
    let workers = a.workers.unwrap_or_else(crate::cores);
    // The same readiness probe as process 0's: SERVING while in the cluster.
    let health = a
        .grpc
        .grpc_addr
        .as_deref()
        .map(crate::query::HealthServer::start)
        .transpose()?;
    let result = ingest::follow(pipeline, workers, c, || {
        if let Some(h) = &health {
            h.set(true);
        }
    });
    if let Some(h) = health {
        h.stop();
    }
    result?;
    tracing::info!(process = c.process, "the cluster finished");
    Ok(Exit::Ok)
}

/// Writes the export of a store (the embedded one in `data_dir`, or Redis) to `out`
/// (stdout when `None`).
pub fn export_store(store: &StoreConfig, data_dir: &Path, out: Option<&Path>) -> Result<usize> {
    if let StoreConfig::Embedded = store {
        anyhow::ensure!(
            data_dir.join("store").is_dir(),
            "no store in {}: run `tally run --data-dir {}` first",
            data_dir.display(),
            data_dir.display()
        );
    }
    let mut opened = store.open_reader(data_dir)?;
    if let StoreConfig::Redis(c) = store {
        anyhow::ensure!(
            opened.meta().epoch > 0,
            "{} holds no commits: check --redis and --redis-namespace",
            c.describe()
        );
    }
    let rows = opened.rows()?;
    let mut w: Box<dyn Write> = match out {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut w = std::io::BufWriter::new(&mut w);
    let n = export::write(opened.meta(), rows, &mut w)?;
    w.flush()?;
    Ok(n)
}

/// Now, in event-time milliseconds.
pub fn now_ms() -> Millis {
    chrono::Utc::now().timestamp_millis()
}
