//! A Tally run with its gRPC server, in process, on 127.0.0.1:0; generated tonic
//! clients; rows in the export's format for comparisons.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tally::ingest::{self, RunConfig, RunError, RunSummary};
use tally::pipeline::{Metric, Pipeline, View, DEFAULT_PIPELINE};
use tally::query::hub::Hub;
use tally::query::keys::{self, Role};
use tally::query::{pb, Backend, Limits, ServeConfig, Server};
use tally::source::channel::Feeder;
use tally::source::Input;
use tally::store::StoreConfig;
use tonic::metadata::MetadataValue;

pub fn pipeline() -> Arc<Pipeline> {
    Arc::new(Pipeline::parse("sales.toml", DEFAULT_PIPELINE).unwrap())
}

/// A running pipeline serving gRPC.
pub struct Tally {
    pub addr: String,
    pub hub: Arc<Hub>,
    pub pipeline: Arc<Pipeline>,
    stop: Arc<AtomicBool>,
    run: Option<JoinHandle<Result<RunSummary, RunError>>>,
    server: Option<Server>,
}

impl Tally {
    /// Starts `inputs` (plus the gRPC ingest source) on `store`, serving on a free port.
    pub fn start(
        data: &Path,
        inputs: Vec<Input>,
        store: StoreConfig,
        keys: &Path,
        limits: Limits,
    ) -> Tally {
        Tally::start_with(data, inputs, store, keys, limits, 1_000_000)
    }

    pub fn start_with(
        data: &Path,
        mut inputs: Vec<Input>,
        store: StoreConfig,
        keys: &Path,
        limits: Limits,
        history: usize,
    ) -> Tally {
        let pipeline = pipeline();
        let feeder = Feeder::new("grpc");
        inputs.push(Input::Channel(feeder.clone()));
        let (backend, indexed, described) = match &store {
            StoreConfig::Embedded => (
                Backend::Memory,
                true,
                ("embedded".into(), "data directory".into()),
            ),
            StoreConfig::Redis(c) => (
                Backend::Redis(
                    tally::store::redis::RedisReader::open_for(c, &pipeline.views).unwrap(),
                ),
                false,
                ("redis".into(), c.describe()),
            ),
        };
        let hub = Arc::new(Hub::new(indexed, history, Some(data.join("watch"))));
        let server = Server::start(
            &ServeConfig {
                history: None,
                replay: None,
                addr: "127.0.0.1:0".into(),
                keys: keys.to_owned(),
                tls: None,
                limits,
            },
            Arc::clone(&pipeline),
            Arc::clone(&hub),
            backend,
            described,
            Some(feeder),
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let cfg = RunConfig {
            pipeline: Arc::clone(&pipeline),
            data_dir: data.to_owned(),
            store,
            workers: 2,
            inputs,
            follow: false,
            until_eof: false,
            stop: Arc::clone(&stop),
            feed: Some(hub.clone()),
            cluster: None,
        };
        let run = std::thread::spawn(move || ingest::run(cfg, |_| {}));
        Tally {
            addr: format!("http://{}", server.addr),
            hub,
            pipeline,
            stop,
            run: Some(run),
            server: Some(server),
        }
    }

    /// Waits until the store holds `offset` bytes of the input `name`.
    pub fn wait_position(&self, name: &str, offset: u64) {
        super::wait_for(
            &format!("{name} committed to {offset}"),
            Duration::from_secs(60),
            || self.hub.status().positions.get(name).copied() == Some(offset),
        );
    }

    /// Stops reading, commits, stops serving.
    pub fn stop(mut self) -> RunSummary {
        self.stop.store(true, Ordering::SeqCst);
        let r = self.run.take().unwrap().join().unwrap().unwrap();
        self.server.take().unwrap().stop();
        r
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(r) = self.run.take() {
            let _ = r.join();
        }
    }
}

/// The keys a test uses, by name.
pub struct Keys {
    pub path: PathBuf,
    pub claro: String,
    pub tigo: String,
    pub ingest: String,
    pub admin: String,
    pub revoked: String,
}

impl Keys {
    pub fn create(dir: &Path) -> Keys {
        let path = dir.join("keys.json");
        let add = |role: Role| keys::add(&path, role, "test").unwrap();
        let provider = |p: &str| Role::Provider { provider: p.into() };
        let (claro, _) = add(provider("claro"));
        let (tigo, _) = add(provider("tigo"));
        let (ingest, _) = add(Role::Ingest);
        let (admin, _) = add(Role::Admin);
        let (revoked, e) = add(provider("claro"));
        keys::revoke(&path, &e.id).unwrap();
        Keys {
            path,
            claro,
            tigo,
            ingest,
            admin,
            revoked,
        }
    }
}

/// `msg` with `authorization: Bearer <key>` (no header for `None`).
pub fn req<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(k) = key {
        let v: MetadataValue<_> = format!("Bearer {k}").parse().unwrap();
        r.metadata_mut().insert("authorization", v);
    }
    r
}

pub async fn channel(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(addr.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub fn ts(ms: i64) -> prost_types::Timestamp {
    tally::query::timestamp(ms)
}

pub fn ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

fn metric_json(m: Metric, x: &pb::Metrics) -> serde_json::Value {
    use serde_json::Value;
    let s = |v: &Option<String>| v.clone().map_or(Value::Null, Value::from);
    match m {
        Metric::SalesCount => x.sales_count.map_or(Value::Null, Value::from),
        Metric::GrossAmount => s(&x.gross_amount),
        Metric::RefundsCount => x.refunds_count.map_or(Value::Null, Value::from),
        Metric::RefundsAmount => s(&x.refunds_amount),
        Metric::NetAmount => s(&x.net_amount),
        Metric::DistinctCustomers => x.distinct_customers.map_or(Value::Null, Value::from),
        Metric::MinTicket => s(&x.min_ticket),
        Metric::MaxTicket => s(&x.max_ticket),
    }
}

/// A row of `provider` as `tally export` writes it.
pub fn export_line(view: &View, provider: &str, r: &pb::Row) -> String {
    use serde_json::Value;
    let mut f: Vec<(String, Value)> = vec![
        ("view".into(), r.view.clone().into()),
        ("window".into(), r.window.clone().into()),
        (
            "window_start".into(),
            tally::model::window::rfc3339(ms(r.window_start.as_ref().unwrap())).into(),
        ),
        ("provider_id".into(), provider.into()),
    ];
    for g in &r.group {
        f.push((g.field.clone(), g.value.clone().into()));
    }
    let m = r.metrics.clone().unwrap_or_default();
    match &view.top_k {
        Some(t) => {
            f.push(("rank".into(), r.rank.into()));
            f.push((t.key.name(), r.member.clone().into()));
            f.push((t.by.name().into(), metric_json(t.by, &m)));
        }
        None => {
            for x in &view.metrics {
                f.push((x.name().into(), metric_json(*x, &m)));
            }
        }
    }
    let body: Vec<String> = f
        .iter()
        .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), v))
        .collect();
    format!("{{{}}}", body.join(","))
}
