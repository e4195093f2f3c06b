//! `tally demo`: a live generated stream published over gRPC (Ingest.Publish, as an
//! upstream system would) through the whole pipeline on the embedded store, served
//! over gRPC to providers (Query) and operators (Admin), narrated once a second, with
//! keys and `tally query` commands to try while it runs, and a summary at the end.

use super::{load_pipeline, now_ms, Exit};
use crate::ingest::{self, EpochReport, RunConfig};
use crate::query::keys::{self, Role};
use crate::query::pb;
use crate::source::gen::{GenOptions, Generator};
use crate::source::Input;
use crate::store::embedded::EmbeddedStore;
use crate::store::{export, Counters, Store};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How long to run (0: until Ctrl-C).
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Events per second in the generated stream.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Keep the store here (default: a scratch directory, removed at the end).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub workers: Option<usize>,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Serve the gRPC API here (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc_addr: String,
}

pub fn demo(a: DemoArgs) -> Result<Exit> {
    let pipeline = Arc::new(load_pipeline(None)?);
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| scratch.path().to_owned());
    let workers = a.workers.unwrap_or_else(crate::cores);
    println!(
        "Tally demo: {} events/s of generated sales, refunds and voids from 12 providers,",
        a.rate
    );
    println!("with redeliveries, voids sent before their sale, late events and 0.5% bad records.");
    println!(
        "Pipeline: {} views ({}), {workers} workers, embedded store in {}.",
        pipeline.views.len(),
        pipeline
            .views
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        data_dir.display()
    );
    println!();

    // The API: keys made for the demo, a hub fed by the committer, the server.
    let keys_path = data_dir.join("demo-keys.json");
    let (provider_key, _) = keys::add(
        &keys_path,
        Role::Provider {
            provider: "claro".into(),
        },
        "demo",
    )?;
    let (ingest_key, _) = keys::add(&keys_path, Role::Ingest, "demo")?;
    let (admin_key, _) = keys::add(&keys_path, Role::Admin, "demo")?;
    let hub = Arc::new(crate::query::hub::Hub::new(
        true,
        1_000_000,
        Some(data_dir.join("watch")),
    ));
    let feeder = crate::source::channel::Feeder::new("grpc");
    let server = crate::query::Server::start(
        &crate::query::ServeConfig {
            history: None,
            replay: None,
            addr: a.grpc_addr.clone(),
            keys: keys_path.clone(),
            tls: None,
            limits: Default::default(),
        },
        Arc::clone(&pipeline),
        Arc::clone(&hub),
        crate::query::Backend::Memory,
        ("embedded".into(), data_dir.display().to_string()),
        Some(feeder.clone()),
    )?;
    let addr = format!("http://{}", server.addr);
    println!("gRPC API on {addr}. While it runs, from another terminal:");
    println!("  export TALLY_ADDR={addr} TALLY_API_KEY={provider_key}   # claro's key");
    println!("  tally query windows --view provider_window --window 1m --from now-10m");
    println!("  tally query top --currency COP");
    println!("  tally query watch --view provider_window --window 1m --count 5");
    println!("  TALLY_API_KEY={admin_key} tally query status");
    println!();

    let stop = super::stop_on_signal(None);
    if a.seconds > 0 {
        let s = Arc::clone(&stop);
        let secs = a.seconds;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            s.store(true, Ordering::SeqCst);
        });
    }
    let gen = GenOptions {
        seed: a.seed,
        events: None,
        start: now_ms() - 3_600_000,
        events_per_second: a.rate,
        bad_rate: 0.005,
        rate: Some(a.rate),
        ..GenOptions::default()
    };
    let started = Instant::now();
    let window = Arc::new(Mutex::new((
        Counters::default(),
        0usize,
        0u64,
        Duration::ZERO,
        Instant::now(),
    )));
    let w = Arc::clone(&window);
    let report = move |r: &EpochReport| {
        let mut g = w.lock().expect("demo state");
        g.0.add(&r.counters);
        g.1 += r.rows_changed;
        g.2 += 1;
        g.3 = g.3.max(r.commit_latency);
        if g.4.elapsed() >= Duration::from_secs(1) {
            let c = &g.0;
            let mut reasons: Vec<_> = c.dead_letters.iter().collect();
            reasons.sort_by(|x, y| y.1.cmp(x.1));
            let top: Vec<String> = reasons
                .iter()
                .take(3)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!(
                "t+{:>3}s  epoch {:>4}  {:>6} read  {:>6} counted  {:>4} redelivered  {:>3} dead letters ({})  {:>6} rows updated  commit ≤ {:.0} ms",
                started.elapsed().as_secs(), r.epoch, c.records, c.accepted, c.duplicates, c.dead_letter_total(), top.join(", "), g.1, g.3.as_secs_f64() * 1e3
            );
            *g = (Counters::default(), 0, 0, Duration::ZERO, Instant::now());
        }
    };
    let cfg = RunConfig {
        pipeline,
        store: Default::default(),
        data_dir: data_dir.clone(),
        workers,
        inputs: vec![Input::Channel(feeder)],
        follow: false,
        until_eof: false,
        stop: Arc::clone(&stop),
        feed: Some(hub.clone()),
        cluster: None,
    };
    // The upstream system: generated events published over gRPC at the rate.
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publisher = {
        let (addr, key, stop) = (addr.clone(), ingest_key.clone(), Arc::clone(&stop));
        let acked = Arc::clone(&acked);
        std::thread::Builder::new()
            .name("tally-demo-publisher".into())
            .spawn(move || publish(&addr, &key, gen, &stop, &acked))?
    };
    let summary = ingest::run(cfg, report);
    // Every committed event is acknowledged before the server stops: give the
    // publisher the acks still on their way (a loaded machine is slow to deliver).
    if let Ok(s) = &summary {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while acked.load(Ordering::Relaxed) < s.records && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Queries over gRPC before the server stops, as claro would ask them.
    let answers = ask(&addr, &provider_key);
    // Stopping the server ends the publisher's stream (events queued but not read
    // are never acknowledged).
    server.stop();
    let acks = publisher.join().unwrap_or_default();
    let summary = summary?;
    println!();
    println!(
        "Published over gRPC: {} events acknowledged as committed, {} as dead letters.",
        acks.0, acks.1
    );
    match answers {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
        }
        Err(e) => println!("(queries failed: {e:#})"),
    }

    let mut store = EmbeddedStore::open(&data_dir)?;
    let meta = store.meta().clone();
    let c = &meta.counters;
    println!();
    println!("Stopped after {} epochs: {} records read, {} counted, {} redeliveries dropped, {} dead letters.",
        summary.committed_epochs, c.records, c.accepted, c.duplicates, c.dead_letter_total());
    let rows = store.rows()?;
    let n = rows.len();
    let mut out = Vec::new();
    export::write(&meta, rows, &mut out)?;
    let text = String::from_utf8(out).expect("export is UTF-8");
    println!("The store holds {n} rows. Today's top products of the busiest provider:");
    let busiest = text
        .lines()
        .filter(|l| l.contains("\"view\":\"provider_window\"") && l.contains("\"window\":\"1d\""))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .max_by_key(|v| v["sales_count"].as_i64().unwrap_or(0));
    if let Some(b) = busiest {
        let (p, d) = (
            b["provider_id"].as_str().unwrap_or(""),
            b["window_start"].as_str().unwrap_or(""),
        );
        println!(
            "  {p} on the day starting {d}: {} sales, net {} {}, {} customers",
            b["sales_count"],
            b["net_amount"].as_str().unwrap_or(""),
            b["currency"].as_str().unwrap_or(""),
            b["distinct_customers"]
        );
        for l in text.lines().filter(|l| {
            l.contains("\"view\":\"top_products\"")
                && l.contains(&format!("\"provider_id\":\"{p}\""))
                && l.contains(d)
        }) {
            let v: serde_json::Value = serde_json::from_str(l)?;
            println!(
                "    #{} {:<10} net {}",
                v["rank"],
                v["product_id"].as_str().unwrap_or(""),
                v["net_amount"].as_str().unwrap_or("")
            );
        }
    }
    println!();
    println!("Try next (from the source tree, `cargo run --release --` in place of `tally`):");
    println!(
        "  tally demo --seconds 0                      # until Ctrl-C, then query it as above"
    );
    println!("  tally gen --events 100000 --bad-rate 0.01 --out events.jsonl");
    println!("  tally validate events.jsonl                 # data-quality report per reason");
    println!("  tally run events.jsonl --until-eof --data-dir d --export out.jsonl");
    println!("  # kill it mid-run (kill -9) and run it again: the export is the same");
    println!("  tally export --data-dir d | head");
    Ok(Exit::Ok)
}

/// Publishes the generator's records over Ingest.Publish until `stop`, at the
/// generator's rate; returns (committed, dead letters) acknowledged.
fn publish(
    addr: &str,
    key: &str,
    gen: GenOptions,
    stop: &Arc<std::sync::atomic::AtomicBool>,
    acked: &std::sync::atomic::AtomicU64,
) -> (u64, u64) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return (0, 0),
    };
    let rate = gen.rate.unwrap_or(1000.0).max(1.0);
    let stop = Arc::clone(stop);
    rt.block_on(async move {
        let Ok(ch) =
            tonic::transport::Endpoint::from_shared(addr.to_owned()).map(|e| e.connect_lazy())
        else {
            return (0, 0);
        };
        let mut client = pb::ingest_client::IngestClient::new(ch);
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::PublishRequest>(1024);
        let feeder = tokio::spawn(async move {
            let mut g = Generator::new(GenOptions { rate: None, ..gen });
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let per_tick = rate / 100.0;
            let (mut owed, mut seq) = (0.0, 0u64);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                owed += per_tick;
                while owed >= 1.0 {
                    owed -= 1.0;
                    let Some(event) = g.next() else { return };
                    seq += 1;
                    if tx
                        .send(pb::PublishRequest {
                            sequence: seq,
                            event,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Ok(v) = format!("Bearer {key}").parse() {
            req.metadata_mut().insert("authorization", v);
        }
        let (mut ok, mut dead) = (0, 0);
        if let Ok(resp) = client.publish(req).await {
            let mut acks = resp.into_inner();
            while let Ok(Some(a)) = acks.message().await {
                if a.status == pb::publish_ack::Status::Committed as i32 {
                    ok += 1;
                } else {
                    dead += 1;
                }
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }
        feeder.abort();
        (ok, dead)
    })
}

/// A few of claro's questions over gRPC, as printable lines.
fn ask(addr: &str, key: &str) -> Result<Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(addr.to_owned())?
            .connect()
            .await?;
        let mut q = pb::query_client::QueryClient::new(ch);
        let now = now_ms();
        let mut out = vec!["Asked over gRPC with claro's key:".to_owned()];
        let s = q
            .summarize(auth(
                key,
                pb::SummarizeRequest {
                    view: "provider_window".into(),
                    filter: Default::default(),
                    from: Some(crate::query::timestamp(now - 2 * 3_600_000)),
                    to: Some(crate::query::timestamp(now)),
                },
            ))
            .await?
            .into_inner();
        let mut used: Vec<_> = s
            .windows_used
            .iter()
            .map(|(k, v)| format!("{v} × {k}"))
            .collect();
        used.sort();
        for x in &s.summaries {
            let m = x.metrics.clone().unwrap_or_default();
            out.push(format!(
                "  Summarize, last 2 hours ({}): {} {} sales, net {}",
                used.join(", "),
                m.sales_count.unwrap_or(0),
                x.group
                    .iter()
                    .map(|g| g.value.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                m.net_amount.unwrap_or_default()
            ));
        }
        let t = q
            .top_products(auth(
                key,
                pb::TopProductsRequest {
                    // The day of the generated events, which run an hour behind the
                    // wall clock (in the first hour after a provider's midnight, now is
                    // already in a day without events).
                    at: Some(crate::query::timestamp(now - 3_600_000)),
                    k: 3,
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        for r in &t.rows {
            let net = r
                .metrics
                .as_ref()
                .and_then(|m| m.net_amount.clone())
                .unwrap_or_default();
            out.push(format!(
                "  TopProducts today: #{} {} net {}",
                r.rank, r.member, net
            ));
        }
        Ok(out)
    })
}

fn auth<T>(key: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {key}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}
