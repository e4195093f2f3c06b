//! `tally query`: a command-line gRPC client for providers (windows, summarize, top,
//! watch) and operators (status). A readable table by default; `--json` prints one
//! JSON object per row (amounts as decimal strings, instants as RFC 3339), in the
//! export's key order without `provider_id` (always the key's own).

use super::{now_ms, Exit};
use crate::query::pb;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

/// A JSON object that keeps its keys in insertion order (serde_json's map sorts them).
#[derive(Default)]
pub struct Map(Vec<(String, Value)>);

impl Map {
    fn new() -> Map {
        Map::default()
    }
    fn insert(&mut self, k: String, v: Value) {
        match self.0.iter_mut().find(|(x, _)| *x == k) {
            Some(slot) => slot.1 = v,
            None => self.0.push((k, v)),
        }
    }
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.iter().find(|(x, _)| x == k).map(|(_, v)| v)
    }
    fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }
    fn extend(&mut self, other: Map) {
        for (k, v) in other.0 {
            self.insert(k, v);
        }
    }
    /// One line of JSON, keys in order.
    pub fn to_json(&self) -> String {
        let mut s = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&Value::from(k.as_str()).to_string());
            s.push(':');
            s.push_str(&v.to_string());
        }
        s.push('}');
        s
    }
}

impl IntoIterator for Map {
    type Item = (String, Value);
    type IntoIter = std::vec::IntoIter<(String, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}
use std::path::PathBuf;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Args, Debug)]
pub struct QueryArgs {
    /// The server: http://HOST:PORT, or https://HOST:PORT for TLS.
    #[arg(long, env = "TALLY_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// PEM file of the CA that signed the server's certificate (https).
    #[arg(long, env = "TALLY_CA")]
    pub ca: Option<PathBuf>,
    /// One JSON object per line instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub what: What,
}

#[derive(Subcommand, Debug)]
pub enum What {
    /// The windows of a view whose start lies in [--from, --to), every page.
    Windows {
        #[arg(long)]
        view: String,
        #[arg(long)]
        window: String,
        /// FIELD=VALUE (repeatable): only rows with these group values.
        #[arg(long = "filter", value_name = "FIELD=VALUE")]
        filters: Vec<String>,
        /// RFC 3339, Unix milliseconds, `now` or `now-DURATION` (now-1h).
        #[arg(long)]
        from: String,
        #[arg(long, default_value = "now")]
        to: String,
        #[arg(long, default_value_t = 1000)]
        page_size: u32,
    },
    /// Totals over any range, from the coarsest windows that tile it.
    Summarize {
        #[arg(long)]
        view: String,
        #[arg(long = "filter", value_name = "FIELD=VALUE")]
        filters: Vec<String>,
        #[arg(long)]
        from: String,
        #[arg(long, default_value = "now")]
        to: String,
    },
    /// The top products of the window that holds --at.
    Top {
        #[arg(long, default_value = "now")]
        at: String,
        #[arg(long, default_value = "")]
        window: String,
        #[arg(long, default_value_t = 0)]
        k: u32,
        #[arg(long, default_value = "")]
        currency: String,
    },
    /// Follow a view's rows as epochs commit (a snapshot first), until Ctrl-C or --count.
    Watch {
        #[arg(long)]
        view: String,
        #[arg(long)]
        window: String,
        #[arg(long = "filter", value_name = "FIELD=VALUE")]
        filters: Vec<String>,
        /// Only windows starting at or after this.
        #[arg(long)]
        from: Option<String>,
        /// Resume after this epoch.
        #[arg(long)]
        resume_after: Option<u64>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// The pipeline's status (admin key).
    Status,
    /// Every row as of one committed epoch, in the export format (admin key): the
    /// same lines `tally export` prints. The epoch goes to stderr.
    Snapshot {
        /// Only this view's rows.
        #[arg(long)]
        view: Option<String>,
    },
    /// A backfill run by the server (admin key): `tally replay` with the server's
    /// deployment. Prints what it prints; exits as it exits (0 done, 1 differences
    /// and nothing swapped). Ctrl-C stops it; the same command resumes it.
    Replay {
        /// The shadow's name.
        #[arg(long, default_value = "replay")]
        into: String,
        /// JSON Lines files or directories, as paths on the server's machine.
        paths: Vec<String>,
        /// A Kinesis stream to replay.
        #[arg(long)]
        kinesis: Option<String>,
        /// trim_horizon, latest or an RFC 3339 instant.
        #[arg(long, requires = "kinesis")]
        kinesis_start: Option<String>,
        /// Replay only records that arrived before this (RFC 3339, Unix ms, now-DURATION).
        #[arg(long, requires = "kinesis")]
        kinesis_end: Option<String>,
        /// The lake's compacted days: D or D1..D2.
        #[arg(long, conflicts_with_all = ["paths", "kinesis", "since", "until"])]
        from_archive: Option<String>,
        /// Only windows starting at or after this (RFC 3339, Unix ms, now-DURATION).
        #[arg(long)]
        since: Option<String>,
        /// ... and ending at or before this.
        #[arg(long)]
        until: Option<String>,
        /// Only these providers' windows (repeatable).
        #[arg(long = "provider")]
        providers: Vec<String>,
        /// Swap the shadow's windows in after verifying them.
        #[arg(long)]
        swap: bool,
        /// Swap even where the shadow differs.
        #[arg(long, requires = "swap")]
        accept_differences: bool,
    },
}

/// An instant: RFC 3339, Unix milliseconds, `now`, or `now-DURATION`.
fn instant(s: &str) -> Result<prost_types::Timestamp> {
    let ms = if s == "now" {
        now_ms()
    } else if let Some(d) = s.strip_prefix("now-") {
        let d = crate::pipeline::parse_duration(d).map_err(|e| anyhow::anyhow!("{e}"))?;
        now_ms() - d.as_millis() as i64
    } else if let Ok(ms) = s.parse::<i64>() {
        ms
    } else {
        chrono::DateTime::parse_from_rfc3339(s)
            .with_context(|| {
                format!("'{s}': expected RFC 3339, Unix milliseconds, now or now-DURATION")
            })?
            .timestamp_millis()
    };
    Ok(crate::query::timestamp(ms))
}

fn filters(f: &[String]) -> Result<std::collections::HashMap<String, String>> {
    f.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--filter '{kv}': expected FIELD=VALUE"))
        })
        .collect()
}

fn rfc3339(t: Option<&prost_types::Timestamp>) -> String {
    t.map(|t| crate::model::window::rfc3339(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000))
        .unwrap_or_default()
}

fn metrics_json(m: &pb::Metrics, o: &mut Map) {
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            o.insert(k.into(), v);
        }
    };
    put("sales_count", m.sales_count.map(Value::from));
    put("gross_amount", m.gross_amount.clone().map(Value::from));
    put("refunds_count", m.refunds_count.map(Value::from));
    put("refunds_amount", m.refunds_amount.clone().map(Value::from));
    put("net_amount", m.net_amount.clone().map(Value::from));
    put("distinct_customers", m.distinct_customers.map(Value::from));
    put("min_ticket", m.min_ticket.clone().map(Value::from));
    put("max_ticket", m.max_ticket.clone().map(Value::from));
}

/// A row as a JSON object in the export's key order (without provider_id).
pub fn row_json(r: &pb::Row) -> Map {
    let mut o = Map::new();
    o.insert("view".into(), r.view.clone().into());
    o.insert("window".into(), r.window.clone().into());
    o.insert(
        "window_start".into(),
        rfc3339(r.window_start.as_ref()).into(),
    );
    for g in &r.group {
        o.insert(g.field.clone(), g.value.clone().into());
    }
    if r.rank > 0 {
        o.insert("rank".into(), r.rank.into());
        o.insert("product_id".into(), r.member.clone().into());
    }
    if let Some(m) = &r.metrics {
        metrics_json(m, &mut o);
    }
    o
}

/// Prints objects as JSON Lines, or as a table with the union of their keys.
fn print(rows: &[Map], json: bool) {
    if json {
        for r in rows {
            println!("{}", r.to_json());
        }
        return;
    }
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        for k in r.keys() {
            if !cols.contains(k) {
                cols.push(k.clone());
            }
        }
    }
    let cell = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    };
    let widths: Vec<usize> = cols
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r.get(c)).len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(cols.clone()));
    for r in rows {
        println!("{}", line(cols.iter().map(|c| cell(r.get(c))).collect()));
    }
}

/// A channel to `addr` (`http://` or `https://`, checked against `ca` when given).
pub(super) async fn connect(addr: &str, ca: Option<&std::path::Path>) -> Result<Channel> {
    let mut ep = Endpoint::from_shared(addr.to_owned())
        .with_context(|| format!("--addr '{addr}'"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    if addr.starts_with("https://") {
        crate::install_crypto();
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        ep = ep.tls_config(tls)?;
    }
    ep.connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

fn authorized<T>(msg: T, key: &MetadataValue<tonic::metadata::Ascii>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", key.clone());
    r
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

pub fn query(a: QueryArgs) -> Result<Exit> {
    let key = std::env::var("TALLY_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .context("set TALLY_API_KEY to your API key")?;
    let key: MetadataValue<_> = format!("Bearer {key}")
        .parse()
        .context("TALLY_API_KEY is not a valid header value")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(a, key))
}

async fn run(a: QueryArgs, key: MetadataValue<tonic::metadata::Ascii>) -> Result<Exit> {
    let ch = connect(&a.addr, a.ca.as_deref()).await?;
    let mut q = pb::query_client::QueryClient::new(ch.clone());
    match &a.what {
        What::Windows {
            view,
            window,
            filters: f,
            from,
            to,
            page_size,
        } => {
            let mut req = pb::ListWindowsRequest {
                view: view.clone(),
                window: window.clone(),
                filter: filters(f)?,
                from: Some(instant(from)?),
                to: Some(instant(to)?),
                page_size: *page_size,
                page_token: String::new(),
            };
            let mut rows = Vec::new();
            loop {
                let r = q
                    .list_windows(authorized(req.clone(), &key))
                    .await
                    .map_err(status_err)?
                    .into_inner();
                rows.extend(r.rows.iter().map(row_json));
                if r.next_page_token.is_empty() {
                    break;
                }
                req.page_token = r.next_page_token;
            }
            print(&rows, a.json);
        }
        What::Summarize {
            view,
            filters: f,
            from,
            to,
        } => {
            let r = q
                .summarize(authorized(
                    pb::SummarizeRequest {
                        view: view.clone(),
                        filter: filters(f)?,
                        from: Some(instant(from)?),
                        to: Some(instant(to)?),
                    },
                    &key,
                ))
                .await
                .map_err(status_err)?
                .into_inner();
            let rows: Vec<_> = r
                .summaries
                .iter()
                .map(|s| {
                    let mut o = Map::new();
                    for g in &s.group {
                        o.insert(g.field.clone(), g.value.clone().into());
                    }
                    if let Some(m) = &s.metrics {
                        metrics_json(m, &mut o);
                    }
                    o
                })
                .collect();
            if !a.json {
                let mut used: Vec<_> = r.windows_used.iter().collect();
                used.sort();
                eprintln!(
                    "covered {} to {} with {} (epoch {})",
                    rfc3339(r.covered_from.as_ref()),
                    rfc3339(r.covered_to.as_ref()),
                    used.iter()
                        .map(|(s, n)| format!("{n} × {s}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    r.epoch
                );
            }
            print(&rows, a.json);
        }
        What::Top {
            at,
            window,
            k,
            currency,
        } => {
            let r = q
                .top_products(authorized(
                    pb::TopProductsRequest {
                        window: window.clone(),
                        at: Some(instant(at)?),
                        k: *k,
                        currency: currency.clone(),
                        view: String::new(),
                    },
                    &key,
                ))
                .await
                .map_err(status_err)?
                .into_inner();
            print(&r.rows.iter().map(row_json).collect::<Vec<_>>(), a.json);
        }
        What::Watch {
            view,
            window,
            filters: f,
            from,
            resume_after,
            count,
        } => {
            let mut s = q
                .watch(authorized(
                    pb::WatchRequest {
                        view: view.clone(),
                        window: window.clone(),
                        filter: filters(f)?,
                        resume_after_epoch: *resume_after,
                        from: from.as_deref().map(instant).transpose()?,
                    },
                    &key,
                ))
                .await
                .map_err(status_err)?
                .into_inner();
            let mut n = 0u64;
            while let Some(ev) = s.message().await.map_err(status_err)? {
                let kind = if ev.kind == pb::watch_event::Kind::Snapshot as i32 {
                    "snapshot"
                } else {
                    "changes"
                };
                for c in &ev.changes {
                    let mut o = Map::new();
                    o.insert("epoch".into(), ev.epoch.into());
                    o.insert("kind".into(), kind.into());
                    if c.deleted {
                        o.insert("deleted".into(), true.into());
                    }
                    if let Some(r) = &c.row {
                        o.extend(row_json(r));
                    }
                    println!("{}", o.to_json());
                }
                if !a.json {
                    eprintln!("epoch {} ({kind}): {} rows", ev.epoch, ev.changes.len());
                }
                n += 1;
                if count.is_some_and(|c| n >= c) {
                    break;
                }
            }
        }
        What::Status => {
            let mut c = pb::admin_client::AdminClient::new(ch);
            let s = c
                .status(authorized(pb::StatusRequest {}, &key))
                .await
                .map_err(status_err)?
                .into_inner();
            let store = s.store.clone().unwrap_or_default();
            let mut o = Map::new();
            o.insert("pipeline".into(), s.pipeline.clone().into());
            o.insert("epoch".into(), s.epoch.into());
            o.insert(
                "committed_at".into(),
                rfc3339(s.committed_at.as_ref()).into(),
            );
            o.insert("clock".into(), rfc3339(s.clock.as_ref()).into());
            o.insert("watermark".into(), rfc3339(s.watermark.as_ref()).into());
            o.insert("commit_lag_seconds".into(), s.commit_lag_seconds.into());
            o.insert("records".into(), s.records.into());
            o.insert("accepted".into(), s.accepted.into());
            o.insert("duplicates".into(), s.duplicates.into());
            let sorted = |m: &std::collections::HashMap<String, u64>| {
                m.iter()
                    .map(|(k, v)| (k.clone(), Value::from(*v)))
                    .collect::<std::collections::BTreeMap<_, _>>()
            };
            o.insert(
                "dead_letters".into(),
                Value::Object(sorted(&s.dead_letters).into_iter().collect()),
            );
            o.insert(
                "positions".into(),
                Value::Object(sorted(&s.positions).into_iter().collect()),
            );
            o.insert(
                "state_entries".into(),
                Value::Object(
                    s.state_entries
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::from(*v)))
                        .collect::<std::collections::BTreeMap<_, _>>()
                        .into_iter()
                        .collect(),
                ),
            );
            o.insert(
                "store".into(),
                serde_json::json!({"kind": store.kind, "location": store.location, "up": store.up}),
            );
            o.insert("processes".into(), s.processes.into());
            o.insert("workers_per_process".into(), s.workers_per_process.into());
            if a.json {
                println!("{}", o.to_json());
            } else {
                for (k, v) in o {
                    println!(
                        "{k:<20} {}",
                        match v {
                            Value::String(s) => s,
                            v => v.to_string(),
                        }
                    );
                }
            }
        }
        What::Snapshot { view } => {
            let mut c = pb::admin_client::AdminClient::new(ch);
            let mut s = c
                .snapshot(authorized(
                    pb::SnapshotRequest {
                        view: view.clone().unwrap_or_default(),
                    },
                    &key,
                ))
                .await
                .map_err(status_err)?
                .into_inner();
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let (mut epoch, mut rows) = (None, 0usize);
            while let Some(chunk) = s.message().await.map_err(status_err)? {
                epoch = Some(chunk.epoch);
                for l in &chunk.lines {
                    writeln!(out, "{l}")?;
                }
                rows += chunk.lines.len();
            }
            out.flush()?;
            eprintln!(
                "snapshot: {rows} rows as of epoch {}",
                epoch.context("the server sent no snapshot")?
            );
        }
        What::Replay {
            into,
            paths,
            kinesis,
            kinesis_start,
            kinesis_end,
            from_archive,
            since,
            until,
            providers,
            swap,
            accept_differences,
        } => {
            let mut c = pb::admin_client::AdminClient::new(ch);
            let r = pb::ReplayRequest {
                into: into.clone(),
                paths: paths.clone(),
                kinesis_stream: kinesis.clone().unwrap_or_default(),
                kinesis_start: kinesis_start.clone().unwrap_or_default(),
                kinesis_end: kinesis_end.as_deref().map(instant).transpose()?,
                from_archive: from_archive.clone().unwrap_or_default(),
                since: since.as_deref().map(instant).transpose()?,
                until: until.as_deref().map(instant).transpose()?,
                providers: providers.clone(),
                swap: *swap,
                accept_differences: *accept_differences,
            };
            let mut s = c
                .replay(authorized(r, &key))
                .await
                .map_err(status_err)?
                .into_inner();
            while let Some(p) = s.message().await.map_err(status_err)? {
                if !p.line.is_empty() {
                    println!("{}", p.line);
                }
                if let Some(d) = p.done {
                    if !d.report.is_empty() {
                        eprintln!(
                            "replay: {} windows compared, {} identical, {} not sealed yet, {} past retention; report {}",
                            d.compared, d.identical, d.unsealed, d.expired, d.report
                        );
                    }
                    return match d.exit_code {
                        0 => Ok(Exit::Ok),
                        1 => Ok(Exit::Mismatch),
                        n => {
                            anyhow::bail!("the replay failed (exit code {n}): see the lines above")
                        }
                    };
                }
            }
            anyhow::bail!("the server ended the replay's stream without saying how it ended");
        }
    }
    Ok(Exit::Ok)
}
