//! Benchmarks of the gRPC API (see benches/README.md for the commands and numbers).
//!
//! - `load [--redis] [--events N] [--seconds S] [--clients 1,16,64]`: ingests N
//!   generated events (about an hour of event time per 200,000), serves them on
//!   127.0.0.1, and runs closed-loop clients (each on its own HTTP/2 connection, one
//!   call at a time) for S seconds per point: ListWindows of one hour of minute windows
//!   (provider_window 1m, claro, currency COP: 60 rows), then Summarize of a range
//!   with minute edges around whole hours. `ListWin.raw` is ListWindows from a client
//!   that takes the response as bytes without decoding its rows. Prints QPS and p50/p99/p99.9 latency per
//!   client count. With `--redis`, on a `redis-server` this harness starts (no
//!   persistence; reads only), else on the embedded store.
//! - `open [--redis] [--events N] [--seconds S] [--rates R1,R2] [--connections C]
//!   [--raw]`: an open loop of ListWindows (as `load`; `--raw` without decoding the
//!   rows) at each fixed rate for S seconds, over C HTTP/2 connections with any
//!   number of calls in flight; latency from each call's scheduled start, so a
//!   stall counts against every call it holds up.
//! - `freshness [--redis] [--events N] [--rate R] [--epoch MS]`: a publisher sends N
//!   events at R per second over Ingest.Publish while a Watch subscriber follows the
//!   window they land in; each event's freshness is from its send to the first Watch
//!   message that counts it. `--epoch` sets the pipeline's epoch length (200 ms by
//!   default).
//!
//! Client and server share the machine's two cores, so these are lower bounds of what
//! the server alone would do.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally::ingest::{self, RunConfig};
use tally::pipeline::{Pipeline, DEFAULT_PIPELINE};
use tally::query::hub::Hub;
use tally::query::keys::{self, Role};
use tally::query::{pb, Backend, Limits, ServeConfig, Server};
use tally::source::channel::Feeder;
use tally::source::gen::GenOptions;
use tally::source::Input;
use tally::store::redis::{RedisConfig, RedisReader};
use tally::store::StoreConfig;
use tonic::metadata::MetadataValue;

mod common;
use common::Redis;

struct Served {
    addr: String,
    key: String,
    ingest_key: String,
    hub: Arc<Hub>,
    stop: Arc<AtomicBool>,
    run: Option<std::thread::JoinHandle<()>>,
    server: Option<Server>,
    _redis: Option<Redis>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(r) = self.run.take() {
            let _ = r.join();
        }
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }
}

/// 2026-11-16T00:00:00Z: the generated events' start.
const START: i64 = 1_794_787_200_000;

fn serve(dir: &Path, redis: bool, events: u64, epoch: Option<Duration>) -> Served {
    let mut pipeline = Pipeline::parse("sales.toml", DEFAULT_PIPELINE).unwrap();
    if let Some(e) = epoch {
        pipeline.epoch_max_duration = e;
    }
    let pipeline = Arc::new(pipeline);
    let keys_path = dir.join("keys.json");
    let (key, _) = keys::add(
        &keys_path,
        Role::Provider {
            provider: "claro".into(),
        },
        "bench",
    )
    .unwrap();
    let (ingest_key, _) = keys::add(&keys_path, Role::Ingest, "bench").unwrap();
    let redis_server = redis.then(|| Redis::start(false));
    let (store, backend, indexed) = match &redis_server {
        Some(r) => {
            let mut c = RedisConfig::new(r.url());
            c.pool_size = 64;
            // The events are a week old: keep their minute windows.
            c.ttl = vec![(
                tally::model::window::WindowSize::parse("1m").unwrap(),
                Duration::from_secs(400 * 86_400),
            )];
            let reader = RedisReader::open_for(&c, &pipeline.views).unwrap();
            (
                StoreConfig::Redis(Box::new(c)),
                Backend::Redis(reader),
                false,
            )
        }
        None => (StoreConfig::Embedded, Backend::Memory, true),
    };
    let hub = Arc::new(Hub::new(indexed, 1_000_000, None));
    let feeder = Feeder::new("grpc");
    let server = Server::start(
        &ServeConfig {
            history: None,
            replay: None,
            addr: "127.0.0.1:0".into(),
            keys: keys_path,
            tls: None,
            limits: Limits {
                rate_per_key: 0,
                ..Limits::default()
            },
        },
        Arc::clone(&pipeline),
        Arc::clone(&hub),
        backend,
        ("bench".into(), "bench".into()),
        Some(feeder.clone()),
    )
    .unwrap();
    let mut inputs = vec![Input::Channel(feeder)];
    if events > 0 {
        inputs.push(Input::Generated(GenOptions {
            seed: 1,
            events: Some(events),
            start: START,
            ..GenOptions::default()
        }));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = RunConfig {
        pipeline,
        data_dir: dir.join("data"),
        store,
        workers: 2,
        inputs,
        follow: false,
        until_eof: false,
        stop: Arc::clone(&stop),
        feed: Some(hub.clone()),
        cluster: None,
    };
    let run = std::thread::spawn(move || {
        ingest::run(cfg, |_| {}).unwrap();
    });
    let t = Instant::now();
    while hub.status().counters.records < events {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "ingest did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Served {
        addr: format!("http://{}", server.addr),
        key,
        ingest_key,
        hub,
        stop,
        run: Some(run),
        server: Some(server),
        _redis: redis_server,
    }
}

fn req<T>(msg: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let v: MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
    r.metadata_mut().insert("authorization", v);
    r
}

fn ts(ms: i64) -> prost_types::Timestamp {
    tally::query::timestamp(ms)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

#[derive(Clone, Copy)]
enum Call {
    ListWindows,
    /// ListWindows with a client that does not decode the rows (counts their bytes):
    /// leaves more of the shared CPU to the server.
    ListWindowsRaw,
    Summarize,
}

/// Encodes requests with prost; takes responses as raw bytes.
struct RawCodec<E>(std::marker::PhantomData<E>);

struct ProstEncoder<E>(std::marker::PhantomData<E>);

struct RawDecoder;

impl<E: prost::Message + Send + 'static> tonic::codec::Codec for RawCodec<E> {
    type Encode = E;
    type Decode = usize;
    type Encoder = ProstEncoder<E>;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder(std::marker::PhantomData)
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl<E: prost::Message> tonic::codec::Encoder for ProstEncoder<E> {
    type Item = E;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: E,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        item.encode(dst)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = usize;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<usize>, tonic::Status> {
        use prost::bytes::Buf;
        let n = src.remaining();
        src.advance(n);
        Ok(Some(n))
    }
}

/// One hour of claro's COP minute windows: 60 rows.
fn list_request() -> pb::ListWindowsRequest {
    pb::ListWindowsRequest {
        view: "provider_window".into(),
        window: "1m".into(),
        filter: [("currency".to_owned(), "COP".to_owned())].into(),
        from: Some(ts(START)),
        to: Some(ts(START + 3_600_000)),
        ..Default::default()
    }
}

/// Closed loop: one call at a time on its own connection until `until`; the
/// latencies in microseconds.
async fn client(addr: String, key: String, call: Call, until: Instant) -> Vec<u64> {
    let ch = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut lat = Vec::new();
    while Instant::now() < until {
        let t = Instant::now();
        call_once(ch.clone(), &key, call).await.unwrap();
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat
}

/// The load generator's runtime: two threads, as many as the machine's cores.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn load(redis: bool, events: u64, seconds: u64, clients: &[usize]) {
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), redis, events, None);
    let rt = client_runtime();
    println!(
        "store: {}, {events} events ingested",
        if redis { "redis" } else { "embedded" }
    );
    println!(
        "{:<12} {:>7} {:>10} {:>9} {:>9} {:>9}",
        "rpc", "clients", "qps", "p50 ms", "p99 ms", "p99.9 ms"
    );
    for (name, call) in [
        ("ListWindows", Call::ListWindows),
        ("ListWin.raw", Call::ListWindowsRaw),
        ("Summarize", Call::Summarize),
    ] {
        for &n in clients {
            let until = Instant::now() + Duration::from_secs(seconds);
            let mut lat: Vec<u64> = rt.block_on(async {
                let tasks: Vec<_> = (0..n)
                    .map(|_| tokio::spawn(client(s.addr.clone(), s.key.clone(), call, until)))
                    .collect();
                let mut all = Vec::new();
                for t in tasks {
                    all.extend(t.await.unwrap());
                }
                all
            });
            lat.sort_unstable();
            println!(
                "{name:<12} {n:>7} {:>10.0} {:>9.3} {:>9.3} {:>9.3}",
                lat.len() as f64 / seconds as f64,
                pct(&lat, 0.50),
                pct(&lat, 0.99),
                pct(&lat, 0.999)
            );
        }
    }
}

fn freshness(redis: bool, events: u64, rate: f64, epoch: Option<Duration>) {
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), redis, 0, epoch);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let minute = now - now.rem_euclid(60_000);
    let mut lat: Vec<u64> = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(s.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut q = pb::query_client::QueryClient::new(ch.clone());
        let mut watch = q
            .watch(req(
                pb::WatchRequest {
                    view: "provider_window".into(),
                    window: "1m".into(),
                    filter: [("currency".to_owned(), "COP".to_owned())].into(),
                    resume_after_epoch: None,
                    from: Some(ts(minute)),
                },
                &s.key,
            ))
            .await
            .unwrap()
            .into_inner();
        let sent: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
        let sent2 = Arc::clone(&sent);
        let ikey = s.ingest_key.clone();
        let mut ingest = pb::ingest_client::IngestClient::new(ch);
        let publisher = tokio::spawn(async move {
            let gap = Duration::from_secs_f64(1.0 / rate);
            let stream = async_stream(events, minute, gap, sent2);
            let mut acks = ingest
                .publish(req(stream, &ikey))
                .await
                .unwrap()
                .into_inner();
            while acks.message().await.unwrap().is_some() {}
        });
        let mut seen = 0u64;
        let mut lat = Vec::new();
        while seen < events {
            let ev = watch.message().await.unwrap().unwrap();
            let at = Instant::now();
            for c in &ev.changes {
                let n = c
                    .row
                    .as_ref()
                    .and_then(|r| r.metrics.as_ref())
                    .and_then(|m| m.sales_count)
                    .unwrap_or(0) as u64;
                let times = sent.lock().unwrap();
                while seen < n.min(times.len() as u64) {
                    lat.push(at.duration_since(times[seen as usize]).as_micros() as u64);
                    seen += 1;
                }
            }
        }
        publisher.await.unwrap();
        lat
    });
    lat.sort_unstable();
    println!(
        "freshness, {} store, epoch {:?}, {events} events at {rate}/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        if redis { "redis" } else { "embedded" },
        epoch.unwrap_or(Duration::from_millis(200)),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    let _ = s.hub.epoch();
}

/// `n` sales of claro in the minute starting at `minute`, one every `gap`, noting
/// each one's send time.
fn async_stream(
    n: u64,
    minute: i64,
    gap: Duration,
    sent: Arc<std::sync::Mutex<Vec<Instant>>>,
) -> impl tokio_stream::Stream<Item = pb::PublishRequest> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(gap);
        for i in 0..n {
            tick.tick().await;
            let event = format!(
                r#"{{"event_id":"fresh-{i}","provider_id":"claro","product_id":"p","customer_id":"c-{i}","kind":"sale","amount":"1.00","currency":"COP","ts":{}}}"#,
                minute + (i as i64 % 50_000)
            );
            sent.lock().unwrap().push(Instant::now());
            if tx
                .send(pb::PublishRequest {
                    sequence: i,
                    event: event.into_bytes(),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// One call of `call` on `ch`: a failed call (the server refusing under overload) is
/// an error; a wrong answer panics.
async fn call_once(ch: tonic::transport::Channel, key: &str, call: Call) -> Result<(), String> {
    let list = list_request();
    match call {
        Call::ListWindows => {
            let r = pb::query_client::QueryClient::new(ch)
                .list_windows(req(list, key))
                .await
                .map_err(|e| e.code().to_string())?
                .into_inner();
            assert_eq!(r.rows.len(), 60, "one hour of minute windows");
        }
        Call::ListWindowsRaw => {
            let mut raw = tonic::client::Grpc::new(ch);
            raw.ready().await.map_err(|e| e.to_string())?;
            let n = raw
                .unary(
                    req(list, key),
                    http::uri::PathAndQuery::from_static("/tally.v1.Query/ListWindows"),
                    RawCodec::<pb::ListWindowsRequest>(std::marker::PhantomData),
                )
                .await
                .map_err(|e| e.code().to_string())?
                .into_inner();
            assert!(n > 60 * 40, "one hour of minute windows: {n} bytes");
        }
        Call::Summarize => {
            let summarize = pb::SummarizeRequest {
                view: "provider_window".into(),
                filter: [("currency".to_owned(), "COP".to_owned())].into(),
                from: Some(ts(START + 17 * 60_000)),
                to: Some(ts(START + 3 * 3_600_000 + 12 * 60_000)),
            };
            let r = pb::query_client::QueryClient::new(ch)
                .summarize(req(summarize, key))
                .await
                .map_err(|e| e.code().to_string())?
                .into_inner();
            assert!(!r.summaries.is_empty());
        }
    }
    Ok(())
}

/// Open loop: calls start at a fixed rate whatever the answers' latency (a pacer
/// thread spawns each at its scheduled instant, round robin over `connections`
/// HTTP/2 connections, any number in flight), and each latency runs from the
/// scheduled instant to the answer, so a stall counts against every call it delays
/// (no coordinated omission).
fn open_loop(
    redis: bool,
    events: u64,
    seconds: u64,
    rates: &[u64],
    connections: usize,
    call: Call,
) {
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), redis, events, None);
    let rt = client_runtime();
    let channels: Vec<tonic::transport::Channel> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..connections {
            let ch = tonic::transport::Endpoint::from_shared(s.addr.clone())
                .unwrap()
                .tcp_nodelay(true)
                .connect()
                .await
                .unwrap();
            v.push(ch);
        }
        v
    });
    // Warm up the connections and the server.
    rt.block_on(async {
        for ch in &channels {
            for _ in 0..50 {
                call_once(ch.clone(), &s.key, call).await.unwrap();
            }
        }
    });
    println!(
        "store: {}, {events} events ingested, {connections} connections, open loop",
        if redis { "redis" } else { "embedded" }
    );
    println!(
        "{:<12} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} {:>13}",
        "rpc",
        "asked qps",
        "done qps",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        "pacer p99 ms"
    );
    for &rate in rates {
        let (tx, rx) = std::sync::mpsc::channel::<Option<u64>>();
        let interval = Duration::from_nanos(1_000_000_000 / rate);
        let total = rate * seconds;
        let start = Instant::now() + Duration::from_millis(10);
        let handle = rt.handle().clone();
        // How late the pacer started each call (part of its latency).
        let mut late: Vec<u64> = Vec::with_capacity(total as usize);
        for i in 0..total {
            let at = start + interval * i as u32;
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            late.push(at.elapsed().as_micros() as u64);
            let ch = channels[i as usize % connections].clone();
            let (key, tx) = (s.key.clone(), tx.clone());
            handle.spawn(async move {
                let ok = call_once(ch, &key, call).await.is_ok();
                let _ = tx.send(ok.then(|| at.elapsed().as_micros() as u64));
            });
        }
        drop(tx);
        let answers: Vec<Option<u64>> = rx.iter().collect();
        let elapsed = start.elapsed().as_secs_f64();
        assert_eq!(answers.len() as u64, total);
        let mut lat: Vec<u64> = answers.iter().flatten().copied().collect();
        let errors = answers.len() - lat.len();
        lat.sort_unstable();
        late.sort_unstable();
        println!(
            "{:<12} {rate:>10} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {errors:>7} {:>13.3}",
            match call {
                Call::ListWindows => "ListWindows",
                Call::ListWindowsRaw => "ListWin.raw",
                Call::Summarize => "Summarize",
            },
            lat.len() as f64 / elapsed,
            pct(&lat, 0.50),
            pct(&lat, 0.99),
            pct(&lat, 0.999),
            lat.last().map_or(f64::NAN, |m| *m as f64 / 1000.0),
            pct(&late, 0.99)
        );
        if errors > 0 {
            break;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let redis = flag("--redis");
    match args.first().map(String::as_str) {
        Some("load") => {
            let clients: Vec<usize> = value("--clients")
                .unwrap_or_else(|| "1,16,64".into())
                .split(',')
                .map(|c| c.parse().unwrap())
                .collect();
            load(
                redis,
                value("--events").map_or(200_000, |v| v.parse().unwrap()),
                value("--seconds").map_or(5, |v| v.parse().unwrap()),
                &clients,
            );
        }
        Some("open") => open_loop(
            redis,
            value("--events").map_or(200_000, |v| v.parse().unwrap()),
            value("--seconds").map_or(5, |v| v.parse().unwrap()),
            &value("--rates")
                .unwrap_or_else(|| "1000,2000,5000,10000".into())
                .split(',')
                .map(|r| r.parse().unwrap())
                .collect::<Vec<u64>>(),
            value("--connections").map_or(4, |v| v.parse().unwrap()),
            if flag("--raw") {
                Call::ListWindowsRaw
            } else {
                Call::ListWindows
            },
        ),
        Some("freshness") => freshness(
            redis,
            value("--events").map_or(2000, |v| v.parse().unwrap()),
            value("--rate").map_or(200.0, |v| v.parse().unwrap()),
            value("--epoch").map(|v| Duration::from_millis(v.parse().unwrap())),
        ),
        _ => {
            eprintln!("usage: query (load|open|freshness) [--redis] [--events N] [--seconds S] [--clients 1,16,64] [--rates 1000,10000] [--connections C] [--raw] [--rate R] [--epoch MS]");
            std::process::exit(2);
        }
    }
}
