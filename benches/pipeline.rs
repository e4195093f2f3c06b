//! Benchmarks of the whole pipeline (see benches/README.md for the commands and numbers).
//!
//! - `throughput --events N --workers W [--processes P] [--runs R]`: JSON Lines from
//!   `tally gen` (cached under the target directory) to committed aggregates with the
//!   default pipeline, on the embedded store; prints seconds, events/s, peak RSS
//!   (of process 0) and the store's files at the end (WAL and snapshot) per run. With `--processes P`, as process 0 of a timely cluster on
//!   loopback whose other processes are the `tally` binary, W workers each.
//!   With `--no-archive` (any mode that runs the pipeline), nothing is staged to the
//!   lake, to show what staging costs.
//! - `decode --events N`: decoding alone, one thread.
//! - `rss --events N [--customers C] [--workers W]`: a generated stream straight into
//!   the pipeline, sampling RSS every million records, with the event time reached.
//! - `store --events N --workers W [--runs R] [--redis [--changes-stream]]`: like
//!   `throughput`, with the per-epoch commit latency (close to commit, and inside
//!   the store alone), on the embedded store or (with `--redis`) on a
//!   `redis-server` this harness starts on a free loopback port (AOF on,
//!   `appendfsync everysec`), with `--changes-stream` also appending every epoch's
//!   changes to the providers' streams; then Redis memory per row, by view
//!   (`MEMORY USAGE` of the window and index keys).
//! - `kinesis --events N --shards S --workers W [--processes P] [--runs R]`: the
//!   same file put to an S-shard stream on a kinesalite this harness starts, then
//!   read from it to committed aggregates (`--until-eof`), in one process or in a
//!   cluster of P (the shards then read over every process); prints the put rate
//!   and, per run, seconds and events/s.

use std::io::BufRead;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally::ingest::{self, RunConfig};
use tally::pipeline::{Pipeline, DEFAULT_PIPELINE};
use tally::source::gen::GenOptions;
use tally::source::Input;
use tally::store::redis::{RedisConfig, RedisStore};
use tally::store::StoreConfig;

mod common;
use common::Redis;

/// A store config for a namespace of `r`.
fn redis_config(r: &Redis, namespace: &str) -> RedisConfig {
    let mut c = RedisConfig::new(r.url());
    c.namespace = namespace.to_owned();
    c
}

/// The p-th percentile (0..=100) of sorted milliseconds.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn status(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        * 1024
}

fn run(
    inputs: Vec<Input>,
    workers: usize,
    observe: impl FnMut(&ingest::EpochReport) + Send + 'static,
) -> f64 {
    run_on(StoreConfig::Embedded, inputs, workers, observe)
}

fn run_on(
    store: StoreConfig,
    inputs: Vec<Input>,
    workers: usize,
    observe: impl FnMut(&ingest::EpochReport) + Send + 'static,
) -> f64 {
    run_in(store, inputs, workers, None, observe)
}

/// A free loopback port (the listener closes before the cluster binds it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Like [`run`], as process 0 of a cluster of `processes` on loopback: the others are
/// the built `tally` binary (`run --processes P --process I`), started first.
fn run_cluster(inputs: Vec<Input>, workers: usize, processes: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let lines: Vec<String> = (0..processes)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    std::fs::write(&hosts, lines.join("\n")).unwrap();
    let followers: Vec<std::process::Child> = (1..processes)
        .map(|i| {
            std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
                .args(["run", "--processes", &processes.to_string()])
                .args([
                    "--process",
                    &i.to_string(),
                    "--workers",
                    &workers.to_string(),
                ])
                .arg("--hosts")
                .arg(&hosts)
                .env("TALLY_LOG", "warn")
                .spawn()
                .expect("the tally binary")
        })
        .collect();
    let cluster =
        tally::dataflow::Cluster::from_hosts_file(&hosts, processes, 0, Duration::from_secs(60))
            .unwrap();
    let secs = run_in(
        StoreConfig::Embedded,
        inputs,
        workers,
        Some(cluster),
        |_| {},
    );
    for mut f in followers {
        assert!(f.wait().unwrap().success(), "a follower failed");
    }
    secs
}

/// [`run`] in one process, or [`run_cluster`] over `processes`: seconds.
fn run_shape(inputs: Vec<Input>, workers: usize, processes: usize) -> f64 {
    if processes > 1 {
        run_cluster(inputs, workers, processes)
    } else {
        run(inputs, workers, |_| {})
    }
}

fn run_in(
    store: StoreConfig,
    inputs: Vec<Input>,
    workers: usize,
    cluster: Option<tally::dataflow::Cluster>,
    observe: impl FnMut(&ingest::EpochReport) + Send + 'static,
) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    *DATA_DIR.lock().unwrap() = Some(dir.path().to_owned());
    let mut pipeline = Pipeline::parse("sales.toml", DEFAULT_PIPELINE).unwrap();
    pipeline.archive.enabled = !NO_ARCHIVE.load(std::sync::atomic::Ordering::Relaxed);
    let pipeline = Arc::new(pipeline);
    let cfg = RunConfig {
        pipeline,
        store,
        data_dir: dir.path().to_owned(),
        workers,
        inputs,
        follow: false,
        until_eof: true,
        stop: Arc::new(AtomicBool::new(false)),
        feed: None,
        cluster,
    };
    let start = Instant::now();
    ingest::run(cfg, observe).unwrap();
    let secs = start.elapsed().as_secs_f64();
    STORE_BYTES.store(
        dir_bytes(&dir.path().join("store")),
        std::sync::atomic::Ordering::Relaxed,
    );
    secs
}

/// The bytes in the embedded store's files (`store/`: WAL and snapshot) at the end of
/// the last run.
static STORE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The data directory of the run in progress (`rss` reports its staging log's size).
static DATA_DIR: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);

/// Bytes in the files of `<data dir>/staging` (the staging log).
fn staging_bytes() -> u64 {
    let Some(dir) = DATA_DIR.lock().unwrap().clone() else {
        return 0;
    };
    dir_bytes(&dir.join("staging"))
}

/// Bytes in the files directly in `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// `--no-archive`: runs without staging counted events to the lake.
static NO_ARCHIVE: AtomicBool = AtomicBool::new(false);

fn main() {
    tally::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    NO_ARCHIVE.store(
        args.iter().any(|a| a == "--no-archive"),
        std::sync::atomic::Ordering::Relaxed,
    );
    let mode = args
        .iter()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .cloned()
        .unwrap_or_default();
    match mode.as_str() {
        "throughput" => {
            let events = arg(&args, "--events", 10_000_000);
            let workers = arg(&args, "--workers", 1) as usize;
            let runs = arg(&args, "--runs", 1);
            let processes = arg(&args, "--processes", 1) as usize;
            let file = common::data_file(events);
            for _ in 0..runs {
                let secs = run_shape(vec![Input::Path(file.clone())], workers, processes);
                println!(
                    "throughput processes={processes} workers={workers} events={events} seconds={secs:.2} events_per_s={:.0} per_worker={:.0} peak_rss_mb={} store_mb={:.1}",
                    events as f64 / secs,
                    events as f64 / secs / (workers * processes) as f64,
                    status("VmHWM:") >> 20,
                    STORE_BYTES.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
                );
            }
        }
        "kinesis" => {
            let events = arg(&args, "--events", 500_000);
            let shards = arg(&args, "--shards", 4);
            let workers = arg(&args, "--workers", 1) as usize;
            let processes = arg(&args, "--processes", 1) as usize;
            let runs = arg(&args, "--runs", 1);
            // Credentials kinesalite accepts, for this process and the cluster's others.
            for (k, v) in [
                ("AWS_ACCESS_KEY_ID", "bench"),
                ("AWS_SECRET_ACCESS_KEY", "bench"),
                ("AWS_REGION", "us-east-1"),
            ] {
                std::env::set_var(k, v);
            }
            let file = common::data_file(events);
            let k = common::Kinesalite::start();
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let c = tally::source::kinesis::client(None, Some(&k.endpoint()), true)
                    .await
                    .unwrap();
                c.create_stream()
                    .stream_name("bench")
                    .shard_count(shards as i32)
                    .send()
                    .await
                    .unwrap();
                while tally::source::kinesis::check_stream(&c, "bench").await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // ACTIVE after kinesalite's 50 ms.
                tokio::time::sleep(Duration::from_millis(200)).await;
            });
            let start = Instant::now();
            let put = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
                .arg("publish")
                .arg(&file)
                .args(["--to", "kinesis", "--stream", "bench", "--quiet"])
                .args(["--endpoint", &k.endpoint()])
                .status()
                .unwrap();
            assert!(put.success(), "publish failed");
            println!(
                "kinesis put events={events} shards={shards} seconds={:.2} events_per_s={:.0}",
                start.elapsed().as_secs_f64(),
                events as f64 / start.elapsed().as_secs_f64()
            );
            let mut spec = tally::source::kinesis::KinesisSpec::new("bench");
            spec.endpoint = Some(k.endpoint());
            for _ in 0..runs {
                let secs = run_shape(vec![Input::Kinesis(spec.clone())], workers, processes);
                println!(
                    "kinesis read processes={processes} workers={workers} shards={shards} events={events} seconds={secs:.2} events_per_s={:.0}",
                    events as f64 / secs
                );
            }
        }
        "store" => {
            let events = arg(&args, "--events", 2_000_000);
            let workers = arg(&args, "--workers", 1) as usize;
            let runs = arg(&args, "--runs", 1);
            let use_redis = args.iter().any(|a| a == "--redis");
            let file = common::data_file(events);
            let redis = use_redis.then(|| Redis::start(true));
            for run_ix in 0..runs {
                let ns = format!("bench{run_ix}");
                let streams = args.iter().any(|a| a == "--changes-stream");
                let store = match &redis {
                    Some(r) => {
                        let mut c = redis_config(r, &ns);
                        c.changes_stream = streams.then_some(10_000);
                        StoreConfig::Redis(Box::new(c))
                    }
                    None => StoreConfig::Embedded,
                };
                let lat = Arc::new(Mutex::new((Vec::new(), Vec::new())));
                let l = Arc::clone(&lat);
                let secs = run_on(store, vec![Input::Path(file.clone())], workers, move |r| {
                    let mut g = l.lock().unwrap();
                    g.0.push(r.commit_latency.as_secs_f64() * 1e3);
                    g.1.push(r.store_latency.as_secs_f64() * 1e3);
                });
                let (mut close, mut inside) = std::mem::take(&mut *lat.lock().unwrap());
                close.sort_by(f64::total_cmp);
                inside.sort_by(f64::total_cmp);
                println!(
                    "store={} workers={workers} events={events} seconds={secs:.2} events_per_s={:.0} epochs={} commit_ms_p50={:.1} commit_ms_p99={:.1} store_ms_p50={:.1} store_ms_p99={:.1}",
                    if use_redis { "redis" } else { "embedded" },
                    events as f64 / secs,
                    close.len(),
                    pct(&close, 50.0),
                    pct(&close, 99.0),
                    pct(&inside, 50.0),
                    pct(&inside, 99.0),
                );
                if let Some(r) = &redis {
                    let mut s = RedisStore::open_reader(redis_config(r, &ns)).unwrap();
                    for (view, (bytes, rows, keys)) in s.memory_usage().unwrap() {
                        println!(
                            "redis_memory view={view} rows={rows} window_keys={keys} bytes={bytes} bytes_per_row={:.0}",
                            bytes as f64 / rows.max(1) as f64
                        );
                    }
                }
            }
        }
        "decode" => {
            let events = arg(&args, "--events", 2_000_000);
            let file = common::data_file(events);
            let lines: Vec<Vec<u8>> = std::io::BufReader::new(std::fs::File::open(file).unwrap()).split(b'\n').map(Result::unwrap).collect();
            let bytes: usize = lines.iter().map(Vec::len).sum();
            for _ in 0..3 {
                let start = Instant::now();
                let ok = lines.iter().filter(|l| tally::decode::decode(l).is_ok()).count();
                let secs = start.elapsed().as_secs_f64();
                println!(
                    "decode records={} ok={ok} seconds={secs:.3} records_per_s={:.0} ns_per_record={:.0} mb_per_s={:.0}",
                    lines.len(),
                    lines.len() as f64 / secs,
                    secs * 1e9 / lines.len() as f64,
                    bytes as f64 / secs / 1e6
                );
            }
        }
        "rss" => {
            let events = arg(&args, "--events", 30_000_000);
            let customers = arg(&args, "--customers", 5_000) as usize;
            let workers = arg(&args, "--workers", 2) as usize;
            let g = GenOptions { seed: 2, events: Some(events), customers, ..GenOptions::default() };
            let start_ts = g.start;
            let started = Instant::now();
            let seen = Arc::new(Mutex::new((0u64, 0u64)));
            let s = Arc::clone(&seen);
            println!("| records | event time reached (days) | elapsed (s) | RSS (MB) | staging log (MB) |");
            println!("|---:|---:|---:|---:|---:|");
            let secs = run(vec![Input::Generated(g)], workers, move |r| {
                let mut g = s.lock().unwrap();
                g.0 += r.counters.records;
                if g.0 >= g.1 + 1_000_000 {
                    g.1 = g.0 / 1_000_000 * 1_000_000;
                    println!(
                        "| {} | {:.2} | {:.0} | {} | {} |",
                        g.0,
                        (r.clock - start_ts) as f64 / 86_400_000.0,
                        started.elapsed().as_secs_f64(),
                        status("VmRSS:") >> 20,
                        staging_bytes() >> 20
                    );
                }
            });
            println!("rss events={events} seconds={secs:.1} events_per_s={:.0} peak_rss_mb={}", events as f64 / secs, status("VmHWM:") >> 20);
        }
        _ => eprintln!("usage: cargo bench --bench pipeline -- throughput|decode|rss [--events N] [--workers W] [--runs R]"),
    }
}
