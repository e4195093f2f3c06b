//! The Query service: ListWindows, Summarize, TopProducts and Watch, each bound to the
//! caller's [`Tenant`] (the provider of its key).

use super::auth::tenant;
use super::keys::Tenant;
use super::pb::{self, query_server::Query};
use super::{find_size, find_view, millis, row, timestamp, Api, Filter, QueryError};
use crate::dataflow::{RowKey, RowValue};
use crate::model::window::WindowSize;
use crate::model::Millis;
use base64::Engine;
use compact_str::CompactString;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct QueryService {
    api: Arc<Api>,
}

impl QueryService {
    pub fn new(api: Arc<Api>) -> QueryService {
        QueryService { api }
    }
}

/// Where the next page starts: after this row, for the request with this fingerprint.
#[derive(serde::Serialize, serde::Deserialize)]
struct PageToken {
    fp: u64,
    start: Millis,
    group: Vec<String>,
    rank: u32,
}

fn fingerprint(r: &pb::ListWindowsRequest) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    r.view.hash(&mut h);
    r.window.hash(&mut h);
    let filter: BTreeMap<_, _> = r.filter.iter().collect();
    filter.hash(&mut h);
    r.from.map(|t| (t.seconds, t.nanos)).hash(&mut h);
    r.to.map(|t| (t.seconds, t.nanos)).hash(&mut h);
    r.page_size.hash(&mut h);
    h.finish()
}

fn encode_token(t: &PageToken) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(t).expect("token serializes"))
}

fn decode_token(s: &str, fp: u64) -> Result<PageToken, QueryError> {
    let bad = || QueryError::Invalid("page_token is not one this listing returned".into());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad())?;
    let t: PageToken = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if t.fp != fp {
        return Err(QueryError::Invalid(
            "page_token belongs to a listing with other request fields".into(),
        ));
    }
    Ok(t)
}

/// A checked range: both ends given, `from <= to`, not longer than `max`.
fn range(
    from: Option<&prost_types::Timestamp>,
    to: Option<&prost_types::Timestamp>,
    max: Millis,
) -> Result<(Millis, Millis), QueryError> {
    let (f, t) = (millis(from, "from")?, millis(to, "to")?);
    if f > t {
        return Err(QueryError::Invalid("from is after to".into()));
    }
    if t - f > max {
        return Err(QueryError::Invalid(format!(
            "the range is longer than the server's maximum of {} days",
            max / 86_400_000
        )));
    }
    Ok((f, t))
}

impl QueryService {
    async fn list_windows(
        &self,
        tenant: &Tenant,
        r: pb::ListWindowsRequest,
    ) -> Result<pb::ListWindowsResponse, QueryError> {
        let api = &self.api;
        let (vi, view) = find_view(&api.pipeline, &r.view)?;
        let size = find_size(view, &r.window)?;
        let filter = Filter::parse(view, &r.filter)?;
        let (from, to) = range(r.from.as_ref(), r.to.as_ref(), api.limits.max_range)?;
        let page = match r.page_size {
            0 => api.limits.default_page,
            n if n > api.limits.max_page => {
                return Err(QueryError::Invalid(format!(
                    "page_size {n} is over the maximum of {}",
                    api.limits.max_page
                )))
            }
            n => n,
        } as usize;
        let fp = fingerprint(&r);
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(decode_token(&r.page_token, fp)?)
        };
        let read_from = after.as_ref().map_or(from, |t| t.start.max(from));
        let after_key = after.map(|t| {
            let mut g: Vec<CompactString> = vec![tenant.provider().into()];
            g.extend(t.group.into_iter().map(CompactString::from));
            (t.start, g, t.rank)
        });
        // One more than the page: whether there is a next page.
        let (rows, epoch) = api
            .read_page(
                tenant,
                vi,
                size,
                read_from,
                to,
                &filter,
                after_key.as_ref(),
                page + 1,
            )
            .await?;
        let more = rows.len() > page;
        let out: Vec<pb::Row> = rows
            .iter()
            .take(page)
            .map(|((k, rank), v)| row(&api.pipeline, view, k, *rank, Some(v)))
            .collect();
        let next = match rows.get(page.saturating_sub(1)) {
            Some(((k, rank), _)) if more => encode_token(&PageToken {
                fp,
                start: k.start,
                group: k.group.iter().skip(1).map(|g| g.to_string()).collect(),
                rank: *rank,
            }),
            _ => String::new(),
        };
        Ok(pb::ListWindowsResponse {
            rows: out,
            next_page_token: next,
            epoch,
        })
    }

    async fn summarize(
        &self,
        tenant: &Tenant,
        r: pb::SummarizeRequest,
    ) -> Result<pb::SummarizeResponse, QueryError> {
        let api = &self.api;
        let (vi, view) = find_view(&api.pipeline, &r.view)?;
        if view.top_k.is_some() {
            return Err(QueryError::Invalid(format!(
                "view '{}' is a top-k view: use TopProducts",
                view.name
            )));
        }
        let filter = Filter::parse(view, &r.filter)?;
        let (from, to) = range(r.from.as_ref(), r.to.as_ref(), api.limits.max_summary_range)?;
        let tz = api.pipeline.time_zone(tenant.provider());
        let tiles = super::tiling::tile(&view.windows, tz, from, to);
        // One read per run of consecutive tiles of one size.
        let mut runs: Vec<(WindowSize, Millis, Millis)> = Vec::new();
        for t in &tiles {
            match runs.last_mut() {
                Some((s, _, e)) if *s == t.size && *e == t.start => *e = t.end,
                _ => runs.push((t.size, t.start, t.end)),
            }
        }
        let mut totals: BTreeMap<Vec<CompactString>, RowValue> = BTreeMap::new();
        let mut epoch = u64::MAX;
        let single = tiles.len() == 1;
        for (size, start, end) in runs {
            // Windows of this size starting in [start, end) lie inside the run.
            let (rows, e) = api.read(tenant, vi, size, start, end, &filter).await?;
            epoch = epoch.min(e);
            for ((k, _), v) in rows {
                let t = totals.entry(k.group).or_insert_with(|| RowValue {
                    sums: Default::default(),
                    distinct_customers: 0,
                    min_ticket: None,
                    max_ticket: None,
                    member: None,
                });
                combine(t, &v);
            }
        }
        if epoch == u64::MAX {
            epoch = api.hub.epoch();
        }
        let metrics: Vec<_> = view
            .metrics
            .iter()
            .copied()
            .filter(|m| single || *m != crate::pipeline::Metric::DistinctCustomers)
            .collect();
        let summaries = totals
            .into_iter()
            .map(|(g, v)| pb::Summary {
                group: view
                    .group_by
                    .iter()
                    .skip(1)
                    .zip(g.iter().skip(1))
                    .map(|(f, x)| pb::GroupValue {
                        field: f.name(),
                        value: x.to_string(),
                    })
                    .collect(),
                metrics: Some(super::metrics_of(&metrics, &v)),
            })
            .collect();
        let mut used: std::collections::HashMap<String, u32> = Default::default();
        for t in &tiles {
            *used.entry(t.size.label()).or_default() += 1;
        }
        let (cf, ct) = match (tiles.first(), tiles.last()) {
            (Some(a), Some(b)) => (a.start, b.end),
            _ => (from, from),
        };
        Ok(pb::SummarizeResponse {
            summaries,
            covered_from: Some(timestamp(cf)),
            covered_to: Some(timestamp(ct)),
            windows_used: used,
            epoch,
        })
    }

    async fn top_products(
        &self,
        tenant: &Tenant,
        r: pb::TopProductsRequest,
    ) -> Result<pb::TopProductsResponse, QueryError> {
        let api = &self.api;
        let (vi, view) = if r.view.is_empty() {
            api.pipeline
                .views
                .iter()
                .enumerate()
                .find(|(_, v)| v.top_k.is_some())
                .map(|(i, v)| (i as u16, v))
                .ok_or_else(|| QueryError::Invalid("the pipeline has no top-k view".into()))?
        } else {
            find_view(&api.pipeline, &r.view)?
        };
        let top = view.top_k.as_ref().ok_or_else(|| {
            QueryError::Invalid(format!("view '{}' is not a top-k view", view.name))
        })?;
        let size = if r.window.is_empty() {
            view.windows[0]
        } else {
            find_size(view, &r.window)?
        };
        let k = match r.k as usize {
            0 => top.k,
            n if n > top.k => {
                return Err(QueryError::Invalid(format!(
                    "k {n} is more than view '{}' keeps ({})",
                    view.name, top.k
                )))
            }
            n => n,
        };
        let at = millis(r.at.as_ref(), "at")?;
        let tz = api.pipeline.time_zone(tenant.provider());
        let start = crate::model::window::Assigner::default()
            .window(size, tz, at)
            .start;
        let mut filter = std::collections::HashMap::new();
        if !r.currency.is_empty() {
            if !view
                .group_by
                .contains(&crate::pipeline::GroupField::Currency)
            {
                return Err(QueryError::Invalid(format!(
                    "view '{}' is not grouped by currency",
                    view.name
                )));
            }
            filter.insert("currency".to_owned(), r.currency.clone());
        }
        let filter = Filter::parse(view, &filter)?;
        let (rows, epoch) = api
            .read(tenant, vi, size, start, start + 1, &filter)
            .await?;
        let rows = rows
            .iter()
            .filter(|((_, rank), _)| (*rank as usize) <= k)
            .map(|((key, rank), v)| row(&api.pipeline, view, key, *rank, Some(v)))
            .collect();
        Ok(pb::TopProductsResponse { rows, epoch })
    }
}

/// Adds a window's row to a total: sums add, tickets take the extremes, distinct
/// customers add (only reported when one window covers the range).
fn combine(t: &mut RowValue, v: &RowValue) {
    t.sums.add(&v.sums);
    t.distinct_customers += v.distinct_customers;
    t.min_ticket = match (t.min_ticket, v.min_ticket) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    t.max_ticket = match (t.max_ticket, v.max_ticket) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
}

/// Which rows a watcher wants.
struct Watched {
    provider: CompactString,
    view: u16,
    size: WindowSize,
    from: Millis,
    filter: Filter,
}

impl Watched {
    fn wants(&self, k: &RowKey) -> bool {
        k.view == self.view
            && k.size == self.size
            && k.start >= self.from
            && self.filter.matches(&k.group)
    }
}

const SNAPSHOT_CHUNK: usize = 500;

/// Waits for the next commit. False when the stream is over: the client left, or
/// the server is stopping (the client is then told UNAVAILABLE).
async fn next_commit<T>(
    epochs: &mut tokio::sync::watch::Receiver<u64>,
    closing: &mut tokio::sync::watch::Receiver<bool>,
    tx: &tokio::sync::mpsc::Sender<Result<T, Status>>,
) -> bool {
    tokio::select! {
        r = epochs.changed() => r.is_ok(),
        _ = async { let _ = closing.wait_for(|c| *c).await; } => {
            let _ = tx.send(Err(QueryError::ShuttingDown.into())).await;
            false
        }
        _ = tx.closed() => false,
    }
}

impl QueryService {
    /// Sends a snapshot; returns its epoch.
    async fn snapshot(
        api: &Api,
        tenant: &Tenant,
        w: &Watched,
        tx: &tokio::sync::mpsc::Sender<Result<pb::WatchEvent, Status>>,
    ) -> Result<Option<u64>, QueryError> {
        let view = &api.pipeline.views[w.view as usize];
        let (rows, epoch) = api
            .read(tenant, w.view, w.size, w.from, Millis::MAX, &w.filter)
            .await?;
        let mut chunks: Vec<Vec<pb::RowChange>> = rows
            .chunks(SNAPSHOT_CHUNK)
            .map(|c| {
                c.iter()
                    .map(|((k, rank), v)| pb::RowChange {
                        row: Some(row(&api.pipeline, view, k, *rank, Some(v))),
                        deleted: false,
                    })
                    .collect()
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        let n = chunks.len();
        for (i, changes) in chunks.into_iter().enumerate() {
            let ev = pb::WatchEvent {
                kind: pb::watch_event::Kind::Snapshot as i32,
                epoch,
                changes,
                end_of_snapshot: i + 1 == n,
            };
            if tx.send(Ok(ev)).await.is_err() {
                return Ok(None);
            }
        }
        Ok(Some(epoch))
    }

    async fn watch_loop(
        api: Arc<Api>,
        tenant: Tenant,
        w: Watched,
        resume: Option<u64>,
        tx: tokio::sync::mpsc::Sender<Result<pb::WatchEvent, Status>>,
    ) {
        let view = &api.pipeline.views[w.view as usize];
        let mut epochs = api.hub.subscribe();
        let mut closing = api.closing.clone();
        let mut last = match resume.filter(|e| *e > 0) {
            // An epoch ahead of the store's (a store rebuilt since) gets a snapshot.
            Some(e) if e <= api.hub.epoch() && api.hub.changes_after(e).is_some() => e,
            _ => match Self::snapshot(&api, &tenant, &w, &tx).await {
                Ok(Some(e)) => e,
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            },
        };
        loop {
            epochs.mark_unchanged();
            match api.hub.changes_after(last) {
                Some(list) => {
                    for c in list {
                        let changes = c
                            .by_provider
                            .get(&w.provider)
                            .map(|us| {
                                us.iter()
                                    .filter(|u| w.wants(&u.key))
                                    .map(|u| pb::RowChange {
                                        row: Some(row(
                                            &api.pipeline,
                                            view,
                                            &u.key,
                                            u.rank,
                                            u.value.as_ref(),
                                        )),
                                        deleted: u.value.is_none(),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        let ev = pb::WatchEvent {
                            kind: pb::watch_event::Kind::Changes as i32,
                            epoch: c.epoch,
                            changes,
                            end_of_snapshot: false,
                        };
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                        last = c.epoch;
                    }
                }
                // Fell behind the history: start over from a snapshot.
                None => match Self::snapshot(&api, &tenant, &w, &tx).await {
                    Ok(Some(e)) => last = e,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                },
            }
            if api.hub.epoch() <= last && !next_commit(&mut epochs, &mut closing, &tx).await {
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn list_windows(
        &self,
        req: Request<pb::ListWindowsRequest>,
    ) -> Result<Response<pb::ListWindowsResponse>, Status> {
        let t = tenant(&req)?;
        self.api.ready().await?;
        Ok(Response::new(
            QueryService::list_windows(self, &t, req.into_inner()).await?,
        ))
    }

    async fn summarize(
        &self,
        req: Request<pb::SummarizeRequest>,
    ) -> Result<Response<pb::SummarizeResponse>, Status> {
        let t = tenant(&req)?;
        self.api.ready().await?;
        Ok(Response::new(
            QueryService::summarize(self, &t, req.into_inner()).await?,
        ))
    }

    async fn top_products(
        &self,
        req: Request<pb::TopProductsRequest>,
    ) -> Result<Response<pb::TopProductsResponse>, Status> {
        let t = tenant(&req)?;
        self.api.ready().await?;
        Ok(Response::new(
            QueryService::top_products(self, &t, req.into_inner()).await?,
        ))
    }

    type WatchAlertsStream = ReceiverStream<Result<pb::Alert, Status>>;

    async fn watch_alerts(
        &self,
        req: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let t = tenant(&req)?;
        self.api.ready().await?;
        let r = req.into_inner();
        let api = Arc::clone(&self.api);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut epochs = api.hub.subscribe();
            let mut closing = api.closing.clone();
            let mut last = r.resume_after_epoch.unwrap_or_else(|| api.hub.epoch());
            loop {
                epochs.mark_unchanged();
                let (alerts, now) = api.hub.alerts_after(t.provider(), last);
                for a in alerts {
                    let money = |h: i64| crate::model::format_hundredths(h.into());
                    let msg = pb::Alert {
                        event_id: a.event_id.to_string(),
                        kind: a.kind.as_str().to_owned(),
                        amount: money(a.amount),
                        currency: a.currency.clone(),
                        ts: Some(timestamp(a.ts)),
                        product_id: a.product_id.to_string(),
                        customer_id: a.customer_id.to_string(),
                        threshold: money(a.threshold),
                        epoch: a.epoch,
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                last = last.max(now);
                if api.hub.epoch() <= last && !next_commit(&mut epochs, &mut closing, &tx).await {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type WatchStream = ReceiverStream<Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let t = tenant(&req)?;
        self.api.ready().await?;
        let r = req.into_inner();
        let api = &self.api;
        let (vi, view) = find_view(&api.pipeline, &r.view)?;
        let size = find_size(view, &r.window)?;
        let filter = Filter::parse(view, &r.filter)?;
        let from = match &r.from {
            Some(f) => millis(Some(f), "from")?,
            None => crate::cli::now_ms().saturating_sub(api.limits.max_range),
        };
        let w = Watched {
            provider: t.provider().into(),
            view: vi,
            size,
            from,
            filter,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(QueryService::watch_loop(
            Arc::clone(&self.api),
            t,
            w,
            r.resume_after_epoch,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
