//! The gRPC API (proto/tally/v1, package `tally.v1`): Query for providers, Ingest for
//! upstream systems, Admin for operators, plus the standard health and reflection
//! services.
//!
//! - [`keys`]: API keys and the [`keys::Tenant`] a provider key grants.
//! - [`auth`]: the tower layer in front of every service: checks the key and its role,
//!   applies the per-key rate limit, and records each call's latency and status code.
//! - [`hub`]: what the API knows of the run loop (status, the embedded store's rows,
//!   the recent changes Watch streams, publishers' acknowledgements).
//! - [`service`]: the Query service; [`admin`]: Admin; [`ingest`]: Ingest.Publish.
//! - [`tiling`]: the windows Summarize combines.
//!
//! Reads go to the hub's index with the embedded store and to Redis (a pool of
//! connections, on blocking threads) with Redis; Watch and Publish are served from the
//! hub in both cases. The server runs on its own tokio runtime beside the run loop's
//! threads ([`Server::start`]); `tally run --grpc-addr` starts it before reading and
//! stops it after the last commit (stop reading, drain, commit, then stop serving).
//!
//! Errors: [`QueryError`] is the one conversion to `tonic::Status`: the caller's
//! mistakes keep their message; internal failures are logged and answered with a
//! generic message.

pub mod admin;
pub mod auth;
pub mod hub;
pub mod ingest;
pub mod keys;
pub mod service;
pub mod tiling;

/// The generated messages and services of `tally.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tally.v1");

    /// The encoded descriptors of proto/, for the reflection service.
    pub const DESCRIPTOR: &[u8] = tonic::include_file_descriptor_set!("tally_descriptor");
}

use crate::dataflow::{RowKey, RowValue};
use crate::model::window::{local_day, WindowSize};
use crate::model::{format_hundredths, Millis, Sum};
use crate::pipeline::{Metric, Pipeline, View};
use crate::store::redis::RedisReader;
use crate::store::StoreError;
use hub::Hub;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A request that cannot be answered, and whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The caller asked for something wrong; the message says what.
    #[error("{0}")]
    Invalid(String),
    /// The store cannot be reached now.
    #[error("the store is unavailable; retry later")]
    Unavailable,
    /// The server is stopping.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The store is not open yet (the run is starting, or waiting for Redis).
    #[error("the server is starting; retry shortly")]
    Starting,
    /// Ours: logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for QueryError {
    fn from(e: StoreError) -> Self {
        if e.is_transient() {
            tracing::warn!(error = %e, "query: store unavailable");
            QueryError::Unavailable
        } else {
            QueryError::Internal(e.to_string())
        }
    }
}

impl From<QueryError> for tonic::Status {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Invalid(m) => tonic::Status::invalid_argument(m),
            QueryError::Unavailable => tonic::Status::unavailable(e.to_string()),
            QueryError::ShuttingDown | QueryError::Starting => {
                tonic::Status::unavailable(e.to_string())
            }
            QueryError::Internal(detail) => {
                tracing::error!(error = %detail, "query failed");
                tonic::Status::internal("internal error; the server log has the details")
            }
        }
    }
}

/// Limits on what one request may ask.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest range of ListWindows and of Watch's snapshot.
    pub max_range: Millis,
    /// Longest range of Summarize.
    pub max_summary_range: Millis,
    pub default_page: u32,
    pub max_page: u32,
    /// Requests per second per key (also the burst); 0: no limit.
    pub rate_per_key: u32,
    /// Longest a unary call may take (a client's shorter grpc-timeout wins).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_range: 31 * 86_400_000,
            max_summary_range: 400 * 86_400_000,
            default_page: 1000,
            max_page: 10_000,
            rate_per_key: 1000,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Where queries read rows.
#[derive(Clone)]
pub enum Backend {
    /// The hub's index (the embedded store).
    Memory,
    /// Redis, through a pool of connections.
    Redis(RedisReader),
}

/// Everything the services share.
pub struct Api {
    pub pipeline: Arc<Pipeline>,
    pub hub: Arc<Hub>,
    pub backend: Backend,
    pub limits: Limits,
    /// ("embedded" | "redis", where).
    pub store: (String, String),
    /// The ingest source Publish feeds, when the run has one.
    pub ingest: Option<ingest::IngestHandle>,
    /// Becomes true when the server stops: streams end.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// The lake's rows, for ranges past the Redis retention.
    pub history: Option<Arc<crate::archive::history::History>>,
    /// How Admin.Replay starts `tally replay` (served by `tally run` only).
    pub replay: Option<admin::ReplayLauncher>,
}

/// How the server is set up.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub addr: String,
    /// The keys file.
    pub keys: PathBuf,
    /// PEM certificate chain and private key: serve TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub limits: Limits,
    /// With Redis: the lake, for ranges older than the retention (see `archive::history`).
    pub history: Option<Arc<crate::archive::history::History>>,
    /// How Admin.Replay starts `tally replay`; `None`: Replay is refused.
    pub replay: Option<admin::ReplayLauncher>,
}

/// A view of the pipeline by name, as the API names it.
pub(crate) fn find_view<'a>(p: &'a Pipeline, name: &str) -> Result<(u16, &'a View), QueryError> {
    p.views
        .iter()
        .enumerate()
        .find(|(_, v)| v.name == name)
        .map(|(i, v)| (i as u16, v))
        .ok_or_else(|| {
            let names: Vec<_> = p.views.iter().map(|v| v.name.as_str()).collect();
            QueryError::Invalid(format!(
                "unknown view '{name}'; the views are: {}",
                names.join(", ")
            ))
        })
}

pub(crate) fn find_size(v: &View, label: &str) -> Result<WindowSize, QueryError> {
    v.windows
        .iter()
        .copied()
        .find(|w| w.label() == label)
        .ok_or_else(|| {
            let sizes: Vec<_> = v.windows.iter().map(|w| w.label()).collect();
            QueryError::Invalid(format!(
                "view '{}' has no window '{label}'; its windows are: {}",
                v.name,
                sizes.join(", ")
            ))
        })
}

/// A group-key filter: per group-by field after provider_id, the value wanted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Filter(Vec<Option<String>>);

impl Filter {
    pub(crate) fn parse(
        v: &View,
        m: &std::collections::HashMap<String, String>,
    ) -> Result<Filter, QueryError> {
        let names: Vec<String> = v.group_by.iter().skip(1).map(|f| f.name()).collect();
        let mut want = vec![None; names.len()];
        for (k, val) in m {
            if k == "provider_id" {
                return Err(QueryError::Invalid(
                    "provider_id cannot be filtered: a key reads only its own provider".into(),
                ));
            }
            let i = names.iter().position(|n| n == k).ok_or_else(|| {
                QueryError::Invalid(format!(
                    "view '{}' has no group-by field '{k}' to filter on; its fields are: {}",
                    v.name,
                    names.join(", ")
                ))
            })?;
            want[i] = Some(val.clone());
        }
        Ok(Filter(want))
    }

    /// Every field has a value: one group key.
    pub(crate) fn exact(&self) -> Option<Vec<&str>> {
        self.0.iter().map(|v| v.as_deref()).collect()
    }

    /// Whether a row's group (provider first) matches.
    pub(crate) fn matches(&self, group: &[compact_str::CompactString]) -> bool {
        self.0
            .iter()
            .zip(group.iter().skip(1))
            .all(|(w, g)| w.as_deref().is_none_or(|w| w == g.as_str()))
    }
}

/// The end of a window (a local day lasts 23, 24 or 25 h).
pub(crate) fn window_end(size: WindowSize, tz: chrono_tz::Tz, start: Millis) -> Millis {
    match size {
        WindowSize::Fixed(len) => start + len,
        WindowSize::LocalDay => local_day(tz, start).end,
    }
}

/// Milliseconds as a protobuf timestamp.
pub fn timestamp(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A required timestamp field, in milliseconds.
pub(crate) fn millis(
    t: Option<&prost_types::Timestamp>,
    field: &str,
) -> Result<Millis, QueryError> {
    let t = t.ok_or_else(|| QueryError::Invalid(format!("{field} is required")))?;
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(QueryError::Invalid(format!("{field}: nanos out of range")));
    }
    t.seconds
        .checked_mul(1000)
        .and_then(|s| s.checked_add(i64::from(t.nanos) / 1_000_000))
        .filter(|ms| (-8_000_000_000_000..8_000_000_000_000).contains(ms))
        .ok_or_else(|| QueryError::Invalid(format!("{field}: out of range")))
}

fn money(v: Sum) -> String {
    format_hundredths(v)
}

/// A view's metrics of a row.
pub(crate) fn metrics_of(metrics: &[Metric], v: &RowValue) -> pb::Metrics {
    let mut m = pb::Metrics::default();
    for metric in metrics {
        match metric {
            Metric::SalesCount => m.sales_count = Some(v.sums.sales),
            Metric::GrossAmount => m.gross_amount = Some(money(v.sums.gross)),
            Metric::RefundsCount => m.refunds_count = Some(v.sums.refunds),
            Metric::RefundsAmount => m.refunds_amount = Some(money(v.sums.refunds_amount)),
            Metric::NetAmount => m.net_amount = Some(money(v.sums.net())),
            Metric::DistinctCustomers => m.distinct_customers = Some(v.distinct_customers),
            Metric::MinTicket => m.min_ticket = v.min_ticket.map(|t| money(t.into())),
            Metric::MaxTicket => m.max_ticket = v.max_ticket.map(|t| money(t.into())),
        }
    }
    m
}

/// A row as the API sends it; `value` `None` for a deleted row's identity.
pub(crate) fn row(
    p: &Pipeline,
    view: &View,
    key: &RowKey,
    rank: u32,
    value: Option<&RowValue>,
) -> pb::Row {
    let group = view
        .group_by
        .iter()
        .skip(1)
        .zip(key.group.iter().skip(1))
        .map(|(f, g)| pb::GroupValue {
            field: f.name(),
            value: g.to_string(),
        })
        .collect();
    let metrics = value.map(|v| match &view.top_k {
        Some(t) => metrics_of(&[t.by], v),
        None => metrics_of(&view.metrics, v),
    });
    pb::Row {
        view: view.name.clone(),
        window: key.size.label(),
        window_start: Some(timestamp(key.start)),
        window_end: Some(timestamp(match key.size {
            WindowSize::Fixed(len) => key.start + len,
            WindowSize::LocalDay => window_end(key.size, p.time_zone(&key.group[0]), key.start),
        })),
        group,
        metrics,
        rank: if view.top_k.is_some() { rank } else { 0 },
        member: value
            .and_then(|v| v.member.as_deref())
            .unwrap_or_default()
            .to_owned(),
    }
}

impl Api {
    /// Waits (a few seconds at most) until the store is open.
    pub(crate) async fn ready(&self) -> Result<(), QueryError> {
        if self.hub.is_ready() || self.hub.wait_ready(Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(QueryError::Starting)
        }
    }

    /// The rows of the tenant's windows of `view`/`size` starting in `[from, to)` that
    /// match `filter`, sorted by (start, group, rank), and the epoch read (with Redis,
    /// the last epoch committed before the read began).
    pub(crate) async fn read(
        &self,
        tenant: &keys::Tenant,
        view: u16,
        size: WindowSize,
        from: Millis,
        to: Millis,
        filter: &Filter,
    ) -> Result<(Vec<crate::store::StoredRow>, u64), QueryError> {
        self.read_page(tenant, view, size, from, to, filter, None, usize::MAX)
            .await
    }

    /// As [`Api::read`], only the rows after `after` (window start, group, rank),
    /// at most `limit` of them. The embedded store's index is walked only that far.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn read_page(
        &self,
        tenant: &keys::Tenant,
        view: u16,
        size: WindowSize,
        from: Millis,
        to: Millis,
        filter: &Filter,
        after: Option<&(Millis, Vec<compact_str::CompactString>, u32)>,
        limit: usize,
    ) -> Result<(Vec<crate::store::StoredRow>, u64), QueryError> {
        if from >= to {
            return Ok((Vec::new(), self.hub.epoch()));
        }
        let past = |k: &RowKey, rank: u32| match after {
            Some((s, g, r)) => (k.start, &k.group, rank) > (*s, g, *r),
            None => true,
        };
        match &self.backend {
            Backend::Memory => {
                let (rows, epoch) = self.hub.with_rows(tenant.provider(), |rows| {
                    rows.map(|r| {
                        hub::range(r, view, size, from, to)
                            .filter(|((k, rank), _)| filter.matches(&k.group) && past(k, *rank))
                            .take(limit)
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
                });
                Ok((rows, epoch))
            }
            Backend::Redis(reader) => {
                let epoch = self.hub.epoch();
                let reader = reader.clone();
                let provider = tenant.provider().to_owned();
                let vname = self.pipeline.views[view as usize].name.clone();
                let filter = filter.clone();
                // Windows that ended more than the retention before the clock may be
                // gone from Redis: those come from the lake, where Redis has none.
                let history = self.history.clone().filter(|_| {
                    let ttl = self
                        .pipeline
                        .retention
                        .iter()
                        .find(|(s, _)| *s == size)
                        .map_or_else(|| crate::store::redis::default_ttl(size), |(_, d)| *d);
                    let cutoff = self.hub.status().clock - ttl.as_millis() as Millis;
                    from < cutoff
                });
                let rows = tokio::task::spawn_blocking(move || {
                    let q = crate::store::redis::WindowQuery {
                        provider: &provider,
                        view: &vname,
                        size,
                        group: &[],
                        from,
                        to: to - 1,
                    };
                    let mut rows = match filter.exact() {
                        Some(group) => {
                            let q = crate::store::redis::WindowQuery {
                                group: &group,
                                ..q.clone()
                            };
                            let mut full = vec![compact_str::CompactString::from(&*provider)];
                            full.extend(group.iter().map(|g| compact_str::CompactString::from(*g)));
                            reader
                                .windows(&q)?
                                .into_iter()
                                .map(|(start, rank, v)| {
                                    let key = RowKey {
                                        view,
                                        size,
                                        start,
                                        group: full.clone(),
                                    };
                                    ((key, rank), v)
                                })
                                .collect::<Vec<_>>()
                        }
                        None => {
                            let mut rows = reader.window_rows(&q)?;
                            rows.retain(|((k, _), _)| filter.matches(&k.group));
                            rows
                        }
                    };
                    if let Some(h) = history {
                        let held: std::collections::HashSet<(RowKey, u32)> =
                            rows.iter().map(|r| r.0.clone()).collect();
                        let old = h
                            .rows(&provider, view, size, from, to)
                            .map_err(|e| StoreError::Unavailable(format!("the lake: {e}")))?;
                        rows.extend(old.into_iter().filter(|((k, rank), _)| {
                            filter.matches(&k.group) && !held.contains(&(k.clone(), *rank))
                        }));
                    }
                    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                    Ok::<_, StoreError>(rows)
                })
                .await
                .map_err(|e| QueryError::Internal(e.to_string()))??;
                let rows = rows
                    .into_iter()
                    .filter(|((k, rank), _)| past(k, *rank))
                    .take(limit)
                    .collect();
                Ok((rows, epoch))
            }
        }
    }
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    close: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `cfg.addr`, then serves on a runtime of its own threads until [`Server::stop`].
    pub fn start(
        cfg: &ServeConfig,
        pipeline: Arc<Pipeline>,
        hub: Arc<Hub>,
        backend: Backend,
        store: (String, String),
        ingest: Option<ingest::IngestHandle>,
    ) -> anyhow::Result<Server> {
        use anyhow::Context;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tally-grpc")
            .enable_all()
            .build()
            .context("starting the gRPC runtime")?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(&cfg.addr))
            .with_context(|| format!("binding the gRPC address {}", cfg.addr))?;
        let addr = listener.local_addr()?;
        let ring = keys::KeyRing::open(&cfg.keys)?;
        let tls = match &cfg.tls {
            Some((cert, key)) => {
                crate::install_crypto();
                let read = |p: &PathBuf| {
                    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
                };
                Some(tonic::transport::ServerTlsConfig::new().identity(
                    tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
                ))
            }
            None => None,
        };
        let (close, closing) = tokio::sync::watch::channel(false);
        let api = Arc::new(Api {
            pipeline,
            hub,
            backend,
            limits: cfg.limits.clone(),
            store,
            ingest,
            closing,
            history: cfg.history.clone(),
            replay: cfg.replay.clone(),
        });
        let thread = std::thread::Builder::new()
            .name("tally-grpc".into())
            .spawn(move || {
                rt.block_on(async move {
                    let r = serve(listener, api, ring, tls).await;
                    if let Err(e) = &r {
                        tracing::error!(error = %e, "gRPC server failed");
                    }
                });
            })
            .context("spawning the gRPC thread")?;
        tracing::info!(%addr, tls = cfg.tls.is_some(), "serving gRPC");
        Ok(Server {
            addr,
            close,
            thread: Some(thread),
        })
    }

    /// Stops serving: health turns NOT_SERVING, streams end, calls in flight finish.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.close.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The standard health service alone, plain text: what a cluster process other than 0
/// serves on the gRPC address (the API itself is process 0's), so that every pod of
/// a StatefulSet has the same readiness probe. NOT_SERVING until [`HealthServer::set`].
pub struct HealthServer {
    reporter: tonic_health::server::HealthReporter,
    rt: tokio::runtime::Handle,
    server: Server,
}

impl HealthServer {
    pub fn start(addr: &str) -> anyhow::Result<HealthServer> {
        use anyhow::Context;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the gRPC runtime")?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .with_context(|| format!("binding the gRPC address {addr}"))?;
        let bound = listener.local_addr()?;
        let (reporter, svc) = tonic_health::server::health_reporter();
        rt.block_on(reporter.set_service_status("", tonic_health::ServingStatus::NotServing));
        let handle = rt.handle().clone();
        let (close, mut closing) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("tally-grpc".into())
            .spawn(move || {
                rt.block_on(async move {
                    let r = tonic::transport::Server::builder()
                        .add_service(svc)
                        .serve_with_incoming_shutdown(
                            tonic::transport::server::TcpIncoming::from(listener),
                            async move {
                                let _ = closing.wait_for(|c| *c).await;
                            },
                        )
                        .await;
                    if let Err(e) = r {
                        tracing::error!(error = %e, "gRPC health server failed");
                    }
                });
            })
            .context("spawning the gRPC thread")?;
        tracing::info!(addr = %bound, "serving the gRPC health service alone");
        Ok(HealthServer {
            reporter,
            rt: handle,
            server: Server {
                addr: bound,
                close,
                thread: Some(thread),
            },
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// SERVING or NOT_SERVING, for the whole server ("").
    pub fn set(&self, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.rt
            .block_on(self.reporter.set_service_status("", status));
    }

    pub fn stop(self) {
        self.server.stop();
    }
}

/// Serves every service on `listener` until `api.closing` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    ring: keys::KeyRing,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> anyhow::Result<()> {
    ring.watch(Duration::from_secs(1));
    let (health, health_svc) = tonic_health::server::health_reporter();
    let names = ["", "tally.v1.Query", "tally.v1.Ingest", "tally.v1.Admin"];
    // Health follows the store: NOT_SERVING while commits fail.
    {
        let hub = Arc::clone(&api.hub);
        let mut closing = api.closing.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let up = hub.is_ready() && hub.status().store_up && !*closing.borrow();
                if last != Some(up) {
                    let status = if up {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    for n in names {
                        health.set_service_status(n, status).await;
                    }
                    last = Some(up);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = closing.changed() => {}
                }
            }
        });
    }
    // Both reflection protocols: grpcurl and grpc_cli speak v1alpha, newer tools v1.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::DESCRIPTOR)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let layer = auth::AuthLayer::new(ring, api.limits.rate_per_key);
    let mut builder = tonic::transport::Server::builder()
        .timeout(api.limits.request_timeout)
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    if let Some(t) = tls {
        builder = builder.tls_config(t)?;
    }
    let mut closing = api.closing.clone();
    builder
        .layer(layer)
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(pb::query_server::QueryServer::from_arc(Arc::new(
            service::QueryService::new(Arc::clone(&api)),
        )))
        .add_service(pb::admin_server::AdminServer::from_arc(Arc::new(
            admin::AdminService::new(Arc::clone(&api)),
        )))
        .add_service(pb::ingest_server::IngestServer::from_arc(Arc::new(
            ingest::IngestService::new(Arc::clone(&api)),
        )))
        .serve_with_incoming_shutdown(
            // No Nagle: a response's last segment would otherwise wait for the
            // client's delayed ACK (40 ms per call, measured).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = closing.wait_for(|c| *c).await;
            },
        )
        .await?;
    Ok(())
}
