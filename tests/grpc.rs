//! The gRPC API against a real server on 127.0.0.1:0 with the generated tonic client,
//! on the embedded store and on a real redis-server: every RPC against every kind of
//! key, answers equal to the export, Summarize's tiling, Publish acknowledgements,
//! Watch in epoch order with resume (also across a restart).

mod common;

use common::grpc::{channel, export_line, ms, req, ts, Keys, Tally};
use common::redis::RedisServer;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use tally::query::pb;
use tally::query::pb::admin_client::AdminClient;
use tally::query::pb::ingest_client::IngestClient;
use tally::query::pb::query_client::QueryClient;
use tally::query::Limits;
use tally::source::Input;
use tally::store::redis::RedisConfig;
use tally::store::StoreConfig;
use tonic::Code;

/// 2026-11-16T00:00:00Z, the generator's start in these tests.
const START: i64 = 1_794_787_200_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// About 2.3 days of events from 12 providers, with bad records of every reason.
fn events(dir: &Path) -> std::path::PathBuf {
    let f = dir.join("events.jsonl");
    common::gen_to(
        &f,
        &[
            "--events",
            "20000",
            "--events-per-second",
            "0.1",
            "--start",
            "2026-11-16T00:00:00Z",
            "--bad-rate",
            "0.01",
        ],
    );
    f
}

/// The export of a stopped run, by provider.
fn export_by_provider(store: &StoreConfig, data: &Path) -> BTreeMap<String, Vec<String>> {
    let out = data.join("export.jsonl");
    tally::cli::export_store(store, data, Some(&out)).unwrap();
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in std::fs::read_to_string(out).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        by.entry(v["provider_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(l.to_owned());
    }
    by
}

/// Every row of `provider`'s views through ListWindows, paged, as export lines.
async fn list_everything(t: &Tally, key: &str, provider: &str, page: u32) -> Vec<String> {
    let mut q = QueryClient::new(channel(&t.addr).await);
    let mut lines = Vec::new();
    for view in &t.pipeline.views {
        for size in &view.windows {
            let mut r = pb::ListWindowsRequest {
                view: view.name.clone(),
                window: size.label(),
                from: Some(ts(START - 2 * DAY)),
                to: Some(ts(START + 5 * DAY)),
                page_size: page,
                ..Default::default()
            };
            loop {
                let resp = q
                    .list_windows(req(r.clone(), Some(key)))
                    .await
                    .unwrap()
                    .into_inner();
                assert!(resp.rows.len() <= page as usize);
                lines.extend(resp.rows.iter().map(|row| export_line(view, provider, row)));
                if resp.next_page_token.is_empty() {
                    break;
                }
                r.page_token = resp.next_page_token;
            }
        }
    }
    lines
}

/// The export's rows of `provider` in ListWindows order.
fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Reads, isolation, Summarize and TopProducts on one store.
fn queries_equal_the_export(store: StoreConfig) {
    let dir = tempfile::tempdir().unwrap();
    let input = events(dir.path());
    let len = std::fs::metadata(&input).unwrap().len();
    let keys = Keys::create(dir.path());
    let data = dir.path().join("data");
    let t = Tally::start(
        &data,
        vec![Input::Path(input.clone())],
        store.clone(),
        &keys.path,
        Limits {
            rate_per_key: 0,
            ..Limits::default()
        },
    );
    t.wait_position(input.to_str().unwrap(), len);
    let rt = rt();
    let (claro, tigo) = rt.block_on(async {
        (
            list_everything(&t, &keys.claro, "claro", 37).await,
            list_everything(&t, &keys.tigo, "tigo", 1000).await,
        )
    });
    let summary_checks = rt.block_on(summaries(&t, &keys.claro));
    let top = rt.block_on(top_products(&t, &keys.claro));
    let (snapshot_epoch, snapshot, top_only) = rt.block_on(async {
        let mut a = AdminClient::new(channel(&t.addr).await);
        let mut read = async |view: &str| {
            let mut s = a
                .snapshot(req(
                    pb::SnapshotRequest { view: view.into() },
                    Some(&keys.admin),
                ))
                .await
                .unwrap()
                .into_inner();
            let (mut epochs, mut lines) = (BTreeSet::new(), Vec::new());
            while let Some(c) = s.message().await.unwrap() {
                epochs.insert(c.epoch);
                lines.extend(c.lines);
            }
            assert_eq!(epochs.len(), 1, "one epoch in every chunk: {epochs:?}");
            (epochs.pop_first().unwrap(), lines)
        };
        let (epoch, all) = read("").await;
        let (_, top) = read("top_products").await;
        (epoch, all, top)
    });
    assert_eq!(snapshot_epoch, t.hub.status().epoch);
    t.stop();
    // Admin.Snapshot is the export, line for line, and a view's snapshot its lines.
    let export = export_by_provider(&store, &data);
    let exported_lines: Vec<String> = std::fs::read_to_string(data.join("export.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(snapshot.len() > 1000, "{} snapshot rows", snapshot.len());
    assert_eq!(
        snapshot, exported_lines,
        "Admin.Snapshot differs from the export"
    );
    let want_top: Vec<&String> = exported_lines
        .iter()
        .filter(|l| l.starts_with("{\"view\":\"top_products\""))
        .collect();
    assert!(!want_top.is_empty());
    assert_eq!(top_only.iter().collect::<Vec<_>>(), want_top);
    assert!(claro.len() > 1000, "{} rows", claro.len());
    assert_eq!(sorted(claro), sorted(export["claro"].clone()));
    assert_eq!(sorted(tigo), sorted(export["tigo"].clone()));

    // Summarize: the totals equal the sums of the export's minute rows over the
    // covered range.
    for (from, to, totals, used, covered) in summary_checks {
        let (cf, ct) = covered;
        assert!(from <= cf && ct <= to && ct - cf > to - from - 2 * 60_000);
        assert!(
            used.contains_key("1d") && used.contains_key("1h") && used.contains_key("1m"),
            "{used:?}"
        );
        let mut want: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for l in &export["claro"] {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            if v["view"] != "provider_window" || v["window"] != "1m" {
                continue;
            }
            let start = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
            if start < cf || start >= ct {
                continue;
            }
            let cents = |s: &str| -> i64 { s.replace('.', "").parse().unwrap() };
            let e = want
                .entry(v["currency"].as_str().unwrap().to_owned())
                .or_default();
            e.0 += v["sales_count"].as_i64().unwrap();
            e.1 += cents(v["net_amount"].as_str().unwrap());
        }
        assert!(!want.is_empty());
        assert_eq!(totals, want, "summary of [{from}, {to})");
    }
    // TopProducts: the export's top_products rows of that day.
    let want: Vec<String> = export["claro"]
        .iter()
        .filter(|l| l.contains("\"top_products\"") && l.contains(&top.0))
        .cloned()
        .collect();
    assert!(!want.is_empty());
    assert_eq!(sorted(top.1), sorted(want));
}

type SummaryCheck = (
    i64,
    i64,
    BTreeMap<String, (i64, i64)>,
    std::collections::HashMap<String, u32>,
    (i64, i64),
);

async fn summaries(t: &Tally, key: &str) -> Vec<SummaryCheck> {
    let mut q = QueryClient::new(channel(&t.addr).await);
    let mut out = Vec::new();
    // Edges off every boundary; claro's days start at 05:00 UTC (Bogota).
    for (from, to) in [
        (
            START + 3 * HOUR + 61_500,
            START + 2 * DAY + 7 * HOUR + 15 * 60_000 + 10,
        ),
        (START + 20 * HOUR + 30_000, START + 2 * DAY + 6 * HOUR + 1),
    ] {
        let r = q
            .summarize(req(
                pb::SummarizeRequest {
                    view: "provider_window".into(),
                    filter: Default::default(),
                    from: Some(ts(from)),
                    to: Some(ts(to)),
                },
                Some(key),
            ))
            .await
            .unwrap()
            .into_inner();
        let mut totals = BTreeMap::new();
        for s in &r.summaries {
            let m = s.metrics.clone().unwrap();
            assert!(
                m.distinct_customers.is_none(),
                "distinct customers do not add up"
            );
            let net: i64 = m.net_amount.unwrap().replace('.', "").parse().unwrap();
            totals.insert(s.group[0].value.clone(), (m.sales_count.unwrap(), net));
        }
        out.push((
            from,
            to,
            totals,
            r.windows_used,
            (ms(&r.covered_from.unwrap()), ms(&r.covered_to.unwrap())),
        ));
    }
    out
}

/// Claro's top products of its day holding START + 1 day, as export lines, and that
/// day's start.
async fn top_products(t: &Tally, key: &str) -> (String, Vec<String>) {
    let mut q = QueryClient::new(channel(&t.addr).await);
    let r = q
        .top_products(req(
            pb::TopProductsRequest {
                at: Some(ts(START + DAY)),
                ..Default::default()
            },
            Some(key),
        ))
        .await
        .unwrap()
        .into_inner();
    let view = t.pipeline.view("top_products").unwrap();
    let start = tally::model::window::rfc3339(ms(r.rows[0].window_start.as_ref().unwrap()));
    (
        start,
        r.rows
            .iter()
            .map(|x| export_line(view, "claro", x))
            .collect(),
    )
}

#[test]
fn queries_equal_the_export_embedded() {
    queries_equal_the_export(StoreConfig::Embedded);
}

#[test]
fn queries_equal_the_export_redis() {
    let redis = RedisServer::start();
    let mut cfg = RedisConfig::new(redis.url());
    // The events are a week old: keep their minute windows (3 days by default).
    cfg.ttl = vec![(
        tally::model::window::WindowSize::parse("1m").unwrap(),
        std::time::Duration::from_secs(400 * 86_400),
    )];
    queries_equal_the_export(StoreConfig::Redis(Box::new(cfg)));
}

/// Every RPC against {no key, bad key, revoked key, another provider's key, a key of
/// the wrong role}, and what a provider may not ask.
fn keys_and_roles(store: StoreConfig) {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::create(dir.path());
    let t = Tally::start(
        &dir.path().join("data"),
        vec![],
        store,
        &keys.path,
        Limits::default(),
    );
    let rt = rt();
    rt.block_on(async {
        let ch = channel(&t.addr).await;
        let mut q = QueryClient::new(ch.clone());
        let mut a = AdminClient::new(ch.clone());
        let mut i = IngestClient::new(ch.clone());
        let list = || pb::ListWindowsRequest {
            view: "provider_window".into(),
            window: "1h".into(),
            from: Some(ts(START)),
            to: Some(ts(START + DAY)),
            ..Default::default()
        };
        let summarize = || pb::SummarizeRequest {
            view: "provider_window".into(),
            from: Some(ts(START)),
            to: Some(ts(START + DAY)),
            ..Default::default()
        };
        let top = || pb::TopProductsRequest {
            at: Some(ts(START)),
            ..Default::default()
        };
        let watch = || pb::WatchRequest {
            view: "provider_window".into(),
            window: "1m".into(),
            ..Default::default()
        };
        let bad = "tly_0123456789ab_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        // (key, Query's answer, Admin's answer, Ingest's answer)
        let cases: Vec<(Option<&str>, Code, Code, Code)> = vec![
            (
                None,
                Code::Unauthenticated,
                Code::Unauthenticated,
                Code::Unauthenticated,
            ),
            (
                Some(bad),
                Code::Unauthenticated,
                Code::Unauthenticated,
                Code::Unauthenticated,
            ),
            (
                Some("garbage"),
                Code::Unauthenticated,
                Code::Unauthenticated,
                Code::Unauthenticated,
            ),
            (
                Some(&keys.revoked),
                Code::Unauthenticated,
                Code::Unauthenticated,
                Code::Unauthenticated,
            ),
            (
                Some(&keys.claro),
                Code::Ok,
                Code::PermissionDenied,
                Code::PermissionDenied,
            ),
            (
                Some(&keys.tigo),
                Code::Ok,
                Code::PermissionDenied,
                Code::PermissionDenied,
            ),
            (
                Some(&keys.ingest),
                Code::PermissionDenied,
                Code::PermissionDenied,
                Code::Ok,
            ),
            (
                Some(&keys.admin),
                Code::PermissionDenied,
                Code::Ok,
                Code::PermissionDenied,
            ),
        ];
        let code = |r: Result<tonic::Code, tonic::Status>| match r {
            Ok(c) => c,
            Err(s) => s.code(),
        };
        for (key, query, admin, ingest) in cases {
            let got = [
                code(q.list_windows(req(list(), key)).await.map(|_| Code::Ok)),
                code(q.summarize(req(summarize(), key)).await.map(|_| Code::Ok)),
                code(q.top_products(req(top(), key)).await.map(|_| Code::Ok)),
                code(q.watch(req(watch(), key)).await.map(|_| Code::Ok)),
                code(
                    q.watch_alerts(req(pb::WatchAlertsRequest::default(), key))
                        .await
                        .map(|_| Code::Ok),
                ),
            ];
            assert_eq!(got, [query; 5], "Query with {key:?}");
            assert_eq!(
                code(
                    a.status(req(pb::StatusRequest {}, key))
                        .await
                        .map(|_| Code::Ok)
                ),
                admin,
                "Admin with {key:?}"
            );
            let snapshot = match a.snapshot(req(pb::SnapshotRequest::default(), key)).await {
                Ok(s) => code(s.into_inner().message().await.map(|_| Code::Ok)),
                Err(e) => e.code(),
            };
            assert_eq!(snapshot, admin, "Admin.Snapshot with {key:?}");
            // This server was not started by `tally run`: it has no deployment to
            // replay into, which only an admin key gets to learn.
            let replay = pb::ReplayRequest {
                into: "bf".into(),
                paths: vec!["events.jsonl".into()],
                ..Default::default()
            };
            let replayed = code(a.replay(req(replay, key)).await.map(|_| Code::Ok));
            let want = if admin == Code::Ok {
                Code::FailedPrecondition
            } else {
                admin
            };
            assert_eq!(replayed, want, "Admin.Replay with {key:?}");
            let events = tokio_stream::iter(vec![pb::PublishRequest {
                sequence: 1,
                event: b"{}".to_vec(),
            }]);
            let r = match i.publish(req(events, key)).await {
                Ok(s) => {
                    let mut s = s.into_inner();
                    code(s.message().await.map(|_| Code::Ok))
                }
                Err(e) => e.code(),
            };
            assert_eq!(r, ingest, "Ingest with {key:?}");
        }
        // A provider cannot name another provider, and the answer does not depend on
        // whether that provider exists.
        for other in ["tigo", "no-such-provider"] {
            let mut r = list();
            r.filter.insert("provider_id".into(), other.into());
            let e = q.list_windows(req(r, Some(&keys.claro))).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument);
            assert_eq!(
                e.message(),
                "provider_id cannot be filtered: a key reads only its own provider"
            );
        }
        // Wrong requests say what is wrong.
        let mut r = list();
        r.view = "nope".into();
        let e = q.list_windows(req(r, Some(&keys.claro))).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().contains("unknown view 'nope'"),
            "{}",
            e.message()
        );
        let mut r = list();
        r.to = Some(ts(START + 40 * DAY));
        let e = q.list_windows(req(r, Some(&keys.claro))).await.unwrap_err();
        assert!(
            e.message().contains("maximum of 31 days"),
            "{}",
            e.message()
        );
        let mut r = list();
        r.page_size = 100_000;
        assert_eq!(
            q.list_windows(req(r, Some(&keys.claro)))
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        let mut r = list();
        r.page_token = "x".into();
        assert_eq!(
            q.list_windows(req(r, Some(&keys.claro)))
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
    });
    t.stop();
}

#[test]
fn keys_and_roles_embedded() {
    keys_and_roles(StoreConfig::Embedded);
}

#[test]
fn keys_and_roles_redis() {
    let redis = RedisServer::start();
    keys_and_roles(StoreConfig::Redis(Box::new(RedisConfig::new(redis.url()))));
}

/// A revoked key is refused from the next reload, without a restart; the rate limit
/// answers RESOURCE_EXHAUSTED.
#[test]
fn revocation_reloads_and_rate_limits() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::create(dir.path());
    let t = Tally::start(
        &dir.path().join("data"),
        vec![],
        StoreConfig::Embedded,
        &keys.path,
        Limits {
            rate_per_key: 20,
            ..Limits::default()
        },
    );
    let rt = rt();
    rt.block_on(async {
        let mut a = AdminClient::new(channel(&t.addr).await);
        a.status(req(pb::StatusRequest {}, Some(&keys.admin)))
            .await
            .unwrap();
        // 20 per second: well over 20 calls at once hit the limit.
        let mut refused = 0;
        for _ in 0..60 {
            if let Err(e) = a.status(req(pb::StatusRequest {}, Some(&keys.admin))).await {
                assert_eq!(e.code(), Code::ResourceExhausted);
                refused += 1;
            }
        }
        assert!(refused > 0, "no call was over the limit");
        let id = tally::query::keys::list(&keys.path)
            .unwrap()
            .into_iter()
            .find(|k| k.role == tally::query::keys::Role::Admin)
            .unwrap()
            .id;
        tally::query::keys::revoke(&keys.path, &id).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            match a.status(req(pb::StatusRequest {}, Some(&keys.admin))).await {
                Err(e) if e.code() == Code::Unauthenticated => break,
                _ => assert!(
                    std::time::Instant::now() < deadline,
                    "revoked key still accepted"
                ),
            }
        }
    });
    t.stop();
}

fn event(id: &str, provider: &str, product: &str, amount: &str, ts: &str) -> Vec<u8> {
    format!(
        r#"{{"event_id":"{id}","provider_id":"{provider}","product_id":"{product}","customer_id":"c-{id}","kind":"sale","amount":"{amount}","currency":"COP","ts":"{ts}"}}"#
    )
    .into_bytes()
}

/// A row's identity as a watcher sees it: window start, group values, rank.
type WatchedKey = (i64, Vec<(String, String)>, u32);

/// The rows a watcher holds after applying what it received.
#[derive(Default)]
struct Watcher {
    rows: BTreeMap<WatchedKey, String>,
    epochs: Vec<u64>,
    snapshots: usize,
}

impl Watcher {
    fn apply(&mut self, view: &tally::pipeline::View, ev: &pb::WatchEvent) {
        let snapshot = ev.kind == pb::watch_event::Kind::Snapshot as i32;
        if snapshot {
            if self.epochs.last() != Some(&ev.epoch) || self.snapshots == 0 {
                self.rows.clear();
            }
            if ev.end_of_snapshot {
                self.snapshots += 1;
            }
        } else {
            if let Some(last) = self.epochs.last() {
                assert_eq!(ev.epoch, last + 1, "epochs in order, each once");
            }
        }
        for c in &ev.changes {
            let r = c.row.as_ref().unwrap();
            let k = (
                ms(r.window_start.as_ref().unwrap()),
                r.group
                    .iter()
                    .map(|g| (g.field.clone(), g.value.clone()))
                    .collect(),
                r.rank,
            );
            if c.deleted {
                self.rows.remove(&k);
            } else {
                self.rows.insert(k, export_line(view, "claro", r));
            }
        }
        if self.epochs.last() != Some(&ev.epoch) {
            self.epochs.push(ev.epoch);
        }
    }
}

/// Publish acknowledgements, Watch in order with resume, and resume across a restart.
fn publish_and_watch(store: StoreConfig) {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::create(dir.path());
    let data = dir.path().join("data");
    let rt = rt();
    let view = common::grpc::pipeline()
        .view("product_window")
        .unwrap()
        .clone();
    let t = Tally::start(&data, vec![], store.clone(), &keys.path, Limits::default());
    let watch_req = |resume: Option<u64>| pb::WatchRequest {
        view: "product_window".into(),
        window: "1h".into(),
        filter: [("currency".to_owned(), "COP".to_owned())].into(),
        resume_after_epoch: resume,
        from: Some(ts(START - DAY)),
    };
    let mut w = Watcher::default();
    let acks = rt.block_on(async {
        let ch = channel(&t.addr).await;
        let mut q = QueryClient::new(ch.clone());
        let mut stream = q.watch(req(watch_req(None), Some(&keys.claro))).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.kind, pb::watch_event::Kind::Snapshot as i32);
        assert!(first.end_of_snapshot && first.changes.is_empty());
        w.apply(&view, &first);

        // Three batches, each waiting for its acknowledgements (so three epochs or more).
        let mut i = IngestClient::new(ch.clone());
        let mut acks = Vec::new();
        let batches: Vec<Vec<Vec<u8>>> = vec![
            vec![
                event("e1", "claro", "p1", "100.00", "2026-11-16T10:00:00Z"),
                event("e2", "claro", "p2", "50.50", "2026-11-16T10:05:00Z"),
                b"{not json".to_vec(),
                event("t1", "tigo", "p1", "7.00", "2026-11-16T10:05:00Z"),
            ],
            vec![
                event("e1", "claro", "p1", "100.00", "2026-11-16T10:00:00Z"), // redelivery
                event("e3", "claro", "p1", "1.00", "2026-11-16T11:00:00Z"),
                event("e1", "claro", "p1", "999.00", "2026-11-16T10:00:00Z"), // conflicting
            ],
            vec![
                br#"{"event_id":"v1","provider_id":"claro","product_id":"p2","customer_id":"c","kind":"void","currency":"COP","ref_event_id":"e2","ts":"2026-11-16T11:01:00Z"}"#.to_vec(),
                event("e4", "claro", "p3", "2.00", "2026-11-16T09:00:00Z"), // late
            ],
        ];
        let mut seq = 0;
        for b in batches {
            let msgs: Vec<_> = b
                .into_iter()
                .map(|e| {
                    seq += 1;
                    pb::PublishRequest { sequence: seq, event: e }
                })
                .collect();
            let mut s = i
                .publish(req(tokio_stream::iter(msgs), Some(&keys.ingest)))
                .await
                .unwrap()
                .into_inner();
            while let Some(a) = s.message().await.unwrap() {
                acks.push(a);
            }
        }
        // Read the watch up to the last epoch, then drop it, resume, and compare.
        let last = t.hub.epoch();
        while w.epochs.last() != Some(&last) {
            let ev = stream.message().await.unwrap().unwrap();
            w.apply(&view, &ev);
        }
        drop(stream);
        acks
    });
    let got: Vec<(u64, i32, String)> = acks
        .iter()
        .map(|a| (a.sequence, a.status, a.reason.clone()))
        .collect();
    let ok = pb::publish_ack::Status::Committed as i32;
    let dead = pb::publish_ack::Status::DeadLetter as i32;
    assert_eq!(
        got,
        vec![
            (1, ok, "".into()),
            (2, ok, "".into()),
            (3, dead, "line:invalid_json".into()),
            (4, ok, "".into()),
            (5, ok, "".into()),
            (6, ok, "".into()),
            (7, dead, "conflicting_duplicate".into()),
            (8, ok, "".into()),
            (9, dead, "late".into()),
        ]
    );
    assert!(acks.windows(2).all(|p| p[0].epoch <= p[1].epoch));
    // The watcher's rows are the store's: p1 at 10:00 (e1) and 11:00 (e3); p2 voided.
    let watched: Vec<String> = w.rows.values().cloned().collect();
    assert_eq!(watched.len(), 2, "{watched:?}");
    assert!(
        watched[0].contains("\"p1\"") && watched[0].contains("\"100.00\""),
        "{watched:?}"
    );
    assert!(w.epochs.len() >= 3);

    // Resume after an epoch the server still holds: changes only, no snapshot.
    let resume_at = w.epochs[w.epochs.len() - 2];
    rt.block_on(async {
        let mut q = QueryClient::new(channel(&t.addr).await);
        let mut s = q
            .watch(req(watch_req(Some(resume_at)), Some(&keys.claro)))
            .await
            .unwrap()
            .into_inner();
        let ev = s.message().await.unwrap().unwrap();
        assert_eq!(ev.kind, pb::watch_event::Kind::Changes as i32);
        assert_eq!(ev.epoch, resume_at + 1);
    });
    let before_restart = w.epochs.last().copied().unwrap();
    t.stop();

    // A restart, then more events: resuming sends only the epochs after the last seen.
    let t = Tally::start(&data, vec![], store.clone(), &keys.path, Limits::default());
    rt.block_on(async {
        let ch = channel(&t.addr).await;
        let mut q = QueryClient::new(ch.clone());
        let mut s = q
            .watch(req(watch_req(Some(before_restart)), Some(&keys.claro)))
            .await
            .unwrap()
            .into_inner();
        let mut i = IngestClient::new(ch);
        let msgs = vec![pb::PublishRequest {
            sequence: 1,
            event: event("e5", "claro", "p1", "3.00", "2026-11-16T11:02:00Z"),
        }];
        let mut p = i
            .publish(req(tokio_stream::iter(msgs), Some(&keys.ingest)))
            .await
            .unwrap()
            .into_inner();
        let a = p.message().await.unwrap().unwrap();
        assert_eq!(a.status, ok);
        let ev = s.message().await.unwrap().unwrap();
        assert_eq!(
            ev.kind,
            pb::watch_event::Kind::Changes as i32,
            "resumed, not a snapshot"
        );
        assert_eq!(ev.epoch, before_restart + 1);
        w.apply(&view, &ev);
        while w.epochs.last() != Some(&a.epoch) {
            let ev = s.message().await.unwrap().unwrap();
            w.apply(&view, &ev);
        }
    });
    assert_eq!(w.snapshots, 1, "one snapshot, at the start");
    t.stop();
    // What the watcher holds is what the store holds.
    let export = export_by_provider(&store, &data);
    let want: BTreeSet<String> = export["claro"]
        .iter()
        .filter(|l| l.contains("\"product_window\"") && l.contains("\"1h\""))
        .cloned()
        .collect();
    let got: BTreeSet<String> = w.rows.values().cloned().collect();
    assert_eq!(got, want);
}

#[test]
fn publish_and_watch_embedded() {
    publish_and_watch(StoreConfig::Embedded);
}

#[test]
fn publish_and_watch_redis() {
    let redis = RedisServer::start();
    publish_and_watch(StoreConfig::Redis(Box::new(RedisConfig::new(redis.url()))));
}

/// A Python grpcio client generated from proto/ runs a scripted session (health,
/// reflection, publish, list, summarize, watch); what it saw equals the export.
#[test]
fn python_client_session() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::create(dir.path());
    let data = dir.path().join("data");
    let events = dir.path().join("events.jsonl");
    common::gen_to(
        &events,
        &[
            "--events",
            "3000",
            "--events-per-second",
            "0.05",
            "--start",
            "2026-11-16T00:00:00Z",
            "--bad-rate",
            "0.02",
            "--providers",
            "3",
        ],
    );
    // The claro key reads the first generated provider's data: find its name.
    let bytes = std::fs::read(&events).unwrap();
    let first: serde_json::Value = bytes
        .split(|b| *b == b'\n')
        .find_map(|l| {
            serde_json::from_slice::<serde_json::Value>(l)
                .ok()
                .filter(|v| v["provider_id"].is_string())
        })
        .unwrap();
    let provider = first["provider_id"].as_str().unwrap().to_owned();
    let (pkey, _) = tally::query::keys::add(
        &keys.path,
        tally::query::keys::Role::Provider {
            provider: provider.clone(),
        },
        "py",
    )
    .unwrap();
    let t = Tally::start(
        &data,
        vec![],
        StoreConfig::Embedded,
        &keys.path,
        Limits::default(),
    );
    let (from, to) = (START - DAY, START + 3 * DAY);
    let out = std::process::Command::new(common::python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/session.py"))
        .arg(t.addr.trim_start_matches("http://"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("proto"))
        .arg(&events)
        .arg(from.to_string())
        .arg(to.to_string())
        .env("TALLY_PROVIDER_KEY", &pkey)
        .env("TALLY_INGEST_KEY", &keys.ingest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python session failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    t.stop();

    assert_eq!(got["health"], "SERVING");
    let services: Vec<&str> = got["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for s in [
        "tally.v1.Query",
        "tally.v1.Ingest",
        "tally.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(&s), "{services:?}");
    }
    // Every event acknowledged, in order; the dead letters are the file's.
    assert_eq!(got["acks_in_order"], true);
    let acks = got["acks"].as_object().unwrap();
    let total: u64 = acks.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 3000);
    let dead_file = std::fs::read_to_string(data.join("dead-letters.jsonl")).unwrap();
    let mut want_dead: BTreeMap<String, u64> = BTreeMap::new();
    for l in dead_file.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        *want_dead
            .entry(format!("DEAD_LETTER:{}", v["reason"].as_str().unwrap()))
            .or_default() += 1;
    }
    let got_dead: BTreeMap<String, u64> = acks
        .iter()
        .filter(|(k, _)| k.starts_with("DEAD_LETTER"))
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    assert!(want_dead.len() > 10, "{want_dead:?}");
    assert_eq!(got_dead, want_dead);

    // Rows, summary and watched rows against the export (unset metrics left out).
    let export = export_by_provider(&StoreConfig::Embedded, &data);
    let strip = |l: &String| {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("provider_id");
        o.retain(|_, x| !x.is_null());
        v
    };
    let in_range = |v: &serde_json::Value| {
        let s = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        from <= s && s < to
    };
    let want: Vec<serde_json::Value> = export[&provider]
        .iter()
        .filter(|l| l.contains("\"provider_window\"") && l.contains("\"window\":\"1h\""))
        .map(strip)
        .filter(in_range)
        .collect();
    assert!(want.len() > 10);
    assert_eq!(got["rows"].as_array().unwrap(), &want);
    let mut want_w: Vec<serde_json::Value> = export[&provider]
        .iter()
        .filter(|l| l.contains("\"product_window\"") && l.contains("\"window\":\"1h\""))
        .map(strip)
        .collect();
    want_w.sort_by_key(|v| v.to_string());
    let mut got_w = got["watched"].as_array().unwrap().clone();
    got_w.sort_by_key(|v| v.to_string());
    assert_eq!(got["watch_order_ok"], true);
    assert!(got["watch_epoch"].as_u64() >= got["last_ack_epoch"].as_u64());
    assert_eq!(got_w, want_w);
    // The summary: per currency, the sum of the 1h rows inside the covered range
    // (the range's edges are day boundaries in UTC, so hours tile what days do not).
    let (cf, ct) = (
        got["covered"][0].as_i64().unwrap(),
        got["covered"][1].as_i64().unwrap(),
    );
    let mut sums: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for v in &want {
        let s = chrono::DateTime::parse_from_rfc3339(v["window_start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        if cf <= s && s < ct {
            let e = sums
                .entry(v["currency"].as_str().unwrap().to_owned())
                .or_default();
            e.0 += v["sales_count"].as_i64().unwrap();
            e.1 += v["net_amount"]
                .as_str()
                .unwrap()
                .replace('.', "")
                .parse::<i64>()
                .unwrap();
        }
    }
    let got_s: BTreeMap<String, (i64, i64)> = got["summary"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["currency"].as_str().unwrap().to_owned(),
                (
                    x["sales_count"].as_i64().unwrap(),
                    x["net_amount"]
                        .as_str()
                        .unwrap()
                        .replace('.', "")
                        .parse()
                        .unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got_s, sums);
}

fn sale(id: &str, provider: &str, kind: &str, amount: &str, ts: &str) -> Vec<u8> {
    format!(
        r#"{{"event_id":"{id}","provider_id":"{provider}","product_id":"p","customer_id":"c","kind":"{kind}","amount":"{amount}","currency":"COP","ts":"{ts}"}}"#
    )
    .into_bytes()
}

/// WatchAlerts: each provider sees its own sales and refunds at or above its threshold
/// (claro's own 50000.00 COP, tigo the default 60000.00), once, in order; not voids,
/// dead letters or redeliveries; and again when resuming from an earlier epoch.
#[test]
fn watch_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::create(dir.path());
    let t = Tally::start(
        &dir.path().join("data"),
        vec![],
        StoreConfig::Embedded,
        &keys.path,
        Limits::default(),
    );
    let rt = rt();
    rt.block_on(async {
        let ch = channel(&t.addr).await;
        let mut q = QueryClient::new(ch.clone());
        let mut claro = q
            .watch_alerts(req(pb::WatchAlertsRequest::default(), Some(&keys.claro)))
            .await
            .unwrap()
            .into_inner();
        let mut tigo = q
            .watch_alerts(req(pb::WatchAlertsRequest::default(), Some(&keys.tigo)))
            .await
            .unwrap()
            .into_inner();
        let events = vec![
            sale("c1", "claro", "sale", "50000.00", "2026-11-16T10:00:00Z"),
            sale("c2", "claro", "sale", "49999.99", "2026-11-16T10:00:01Z"),
            sale("c3", "claro", "refund", "70000", "2026-11-16T10:00:02Z"),
            sale("c1", "claro", "sale", "50000.00", "2026-11-16T10:00:00Z"), // redelivery
            sale("c4", "claro", "sale", "90000.00", "2026-11-16T09:00:00Z"), // late
            sale("t1", "tigo", "sale", "55000.00", "2026-11-16T10:00:03Z"),
            sale("t2", "tigo", "sale", "60000.00", "2026-11-16T10:00:04Z"),
            sale("c5", "claro", "sale", "1.00", "2026-11-16T10:00:05Z"),
        ];
        let mut i = IngestClient::new(ch);
        let msgs: Vec<_> = events
            .into_iter()
            .enumerate()
            .map(|(n, e)| pb::PublishRequest {
                sequence: n as u64,
                event: e,
            })
            .collect();
        let mut acks = i
            .publish(req(tokio_stream::iter(msgs), Some(&keys.ingest)))
            .await
            .unwrap()
            .into_inner();
        let mut last = 0;
        while let Some(a) = acks.message().await.unwrap() {
            last = a.epoch;
        }
        let mut got_claro = Vec::new();
        for _ in 0..2 {
            got_claro.push(claro.message().await.unwrap().unwrap());
        }
        let got_tigo = tigo.message().await.unwrap().unwrap();
        let ids: Vec<(&str, &str, &str, &str)> = got_claro
            .iter()
            .map(|a| {
                (
                    a.event_id.as_str(),
                    a.kind.as_str(),
                    a.amount.as_str(),
                    a.threshold.as_str(),
                )
            })
            .collect();
        assert_eq!(
            ids,
            vec![
                ("c1", "sale", "50000.00", "50000.00"),
                ("c3", "refund", "70000.00", "50000.00")
            ]
        );
        assert_eq!(
            (got_tigo.event_id.as_str(), got_tigo.threshold.as_str()),
            ("t2", "60000.00")
        );
        assert!(got_claro
            .iter()
            .all(|a| a.epoch <= last && a.currency == "COP"));
        // Nothing more comes for claro (c4 was late, c5 small): the next message is
        // not an alert within a second.
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(1), claro.message())
                .await
                .is_err()
        );
        // Resuming from before sends the same alerts again.
        let mut again = q
            .watch_alerts(req(
                pb::WatchAlertsRequest {
                    resume_after_epoch: Some(0),
                },
                Some(&keys.claro),
            ))
            .await
            .unwrap()
            .into_inner();
        for want in &got_claro {
            assert_eq!(&again.message().await.unwrap().unwrap(), want);
        }
    });
    t.stop();
}

/// The built binary end to end: `tally keys`, `tally run --grpc-addr` with TLS,
/// `tally query` (status, windows as JSON equal to the export), a revoked key
/// refused by the running server, plain HTTP refused by a TLS server, and SIGTERM
/// stopping serving after the last commit (exit 0).
#[test]
fn the_binary_serves_tls_and_tally_query_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::tls_files(d);
    let p = |n: &str| d.join(n).to_str().unwrap().to_owned();
    let keys = p("keys.json");
    let key = |role: &[&str]| {
        let mut args = vec!["keys", "add", "--keys", &keys];
        args.extend_from_slice(role);
        String::from_utf8(common::ok(&args).stdout)
            .unwrap()
            .trim()
            .to_owned()
    };
    let claro = key(&["--provider", "claro"]);
    let admin = key(&["--admin", "--name", "ops"]);
    let list = String::from_utf8(common::ok(&["keys", "list", "--keys", &keys]).stdout).unwrap();
    assert!(
        list.contains("provider claro") && list.contains("admin") && list.contains("ops"),
        "{list}"
    );
    assert!(
        !list.contains(&claro) && !list.contains(&admin),
        "keys are never listed"
    );
    let events = p("events.jsonl");
    common::gen_to(
        Path::new(&events),
        &[
            "--events",
            "5000",
            "--events-per-second",
            "0.2",
            "--start",
            "2026-11-16T00:00:00Z",
        ],
    );
    let len = std::fs::metadata(&events).unwrap().len();
    let port = common::redis::free_port();
    let mut child = common::tally()
        .args(["run", &events, "--data-dir", &p("data"), "--keys", &keys])
        .args(["--grpc-addr", &format!("127.0.0.1:{port}")])
        .args([
            "--tls-cert",
            &p("server.crt"),
            "--tls-key",
            &p("server.key"),
        ])
        .spawn()
        .unwrap();
    let addr = format!("https://127.0.0.1:{port}");
    let query = |key: &str, args: &[&str]| {
        common::tally()
            .args(["query", "--addr", &addr, "--ca", &p("ca.crt"), "--json"])
            .args(args)
            .env("TALLY_API_KEY", key)
            .output()
            .unwrap()
    };
    common::wait_for("the input committed", Duration::from_secs(60), || {
        let out = query(&admin, &["status"]);
        out.status.success() && {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["positions"][&events].as_u64() == Some(len)
        }
    });
    let status: serde_json::Value =
        serde_json::from_slice(&query(&admin, &["status"]).stdout).unwrap();
    assert_eq!(status["records"], 5000);
    assert_eq!(status["store"]["kind"], "embedded");
    let out = query(
        &claro,
        &[
            "windows",
            "--view",
            "provider_window",
            "--window",
            "1h",
            "--from",
            "2026-11-15T00:00:00Z",
            "--to",
            "2026-11-20T00:00:00Z",
            "--page-size",
            "7",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Plain HTTP to the TLS port fails, and says where.
    let out = common::tally()
        .args([
            "query",
            "--addr",
            &format!("http://127.0.0.1:{port}"),
            "status",
        ])
        .env("TALLY_API_KEY", &admin)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    // A revoked key is refused by the running server within a few seconds.
    let id = &list
        .lines()
        .find(|l| l.contains("admin"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    common::ok(&["keys", "revoke", id, "--keys", &keys]);
    common::wait_for("the revoked key refused", Duration::from_secs(10), || {
        let out = query(&admin, &["status"]);
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Unauthenticated")
    });
    // SIGTERM: stop reading, commit, stop serving, exit 0.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let st = child.wait().unwrap();
    assert!(st.success(), "{st:?}");
    let export = export_by_provider(&StoreConfig::Embedded, &d.join("data"));
    let want: Vec<serde_json::Value> = export["claro"]
        .iter()
        .filter(|l| l.contains("\"provider_window\"") && l.contains("\"window\":\"1h\""))
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("provider_id");
            o.retain(|_, x| !x.is_null());
            v
        })
        .collect();
    assert!(want.len() > 5, "{want:?}");
    assert_eq!(rows, want);
}

/// `tally publish` sends a generated file (with bad records of every reason) to a
/// running `tally run --grpc-addr`: every line acknowledged, the dead letters
/// reported by reason and line with exit code 1, the counts equal to the server's
/// dead-letter file. Published twice, the export equals one plain run over the file.
#[test]
fn tally_publish_sends_a_file_and_a_second_time_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_owned();
    let keys = p("keys.json");
    let ingest =
        String::from_utf8(common::ok(&["keys", "add", "--keys", &keys, "--ingest"]).stdout)
            .unwrap()
            .trim()
            .to_owned();
    let events = p("events.jsonl");
    common::gen_to(
        Path::new(&events),
        &["--events", "20000", "--bad-rate", "0.02"],
    );
    let port = common::redis::free_port();
    let mut server = common::tally()
        .args(["run", "--data-dir", &p("data"), "--keys", &keys])
        .args(["--grpc-addr", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    common::wait_for("the gRPC port", Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let publish = || {
        let out = common::tally()
            .args(["publish", &events, "--to", "grpc"])
            .args(["--addr", &format!("http://127.0.0.1:{port}")])
            .env("TALLY_API_KEY", &ingest)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "dead letters were sent: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let first = text.lines().next().unwrap().to_owned();
        // "N events sent to ADDR: C committed, D dead letters"
        let n = |word: &str| -> u64 {
            let before = first.split(word).next().unwrap();
            before
                .split_whitespace()
                .last()
                .unwrap()
                .trim_end_matches(',')
                .parse()
                .unwrap()
        };
        (n(" events sent"), n(" committed"), n(" dead letters"), text)
    };
    let (sent, committed, dead, text) = publish();
    assert_eq!(sent, 20000, "{text}");
    assert_eq!(committed + dead, sent, "{text}");
    let file = std::fs::read_to_string(d.join("data/dead-letters.jsonl")).unwrap();
    assert_eq!(file.lines().count() as u64, dead, "{text}");
    for reason in ["line:invalid_json", "amount:invalid", "late"] {
        assert!(
            text.contains(&format!("  {reason}: ")),
            "{reason} in {text}"
        );
    }
    // An example names its line, which holds a record with that reason.
    let example = text.lines().find(|l| l.starts_with("  line ")).unwrap();
    let (line, reason) = example["  line ".len()..].split_once(": ").unwrap();
    let line: usize = line.parse().unwrap();
    let raw = std::fs::read(&events).unwrap();
    let record = raw.split(|b| *b == b'\n').nth(line - 1).unwrap();
    assert!(
        file.lines().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["reason"] == reason
                && (v["raw"].as_str().map(str::as_bytes) == Some(record)
                    || v["raw_base64"].as_bool() == Some(true))
        }),
        "{example}"
    );
    let (sent2, committed2, dead2, text2) = publish();
    assert_eq!((sent2, committed2 + dead2), (20000, 20000), "{text2}");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    assert!(server.wait().unwrap().success());
    let export =
        |data: &str| String::from_utf8(common::ok(&["export", "--data-dir", data]).stdout).unwrap();
    common::run_until_eof(Path::new(&events), &d.join("plain"), Some(2), None, None);
    let want = export(&p("plain"));
    assert!(want.lines().count() > 1000);
    assert_eq!(
        export(&p("data")),
        want,
        "published twice: the aggregates differ from one plain run over the file"
    );
}

/// The standard health service follows the store: SERVING, NOT_SERVING while Redis
/// is down and a commit waits, SERVING again once it commits; a query during the
/// outage is UNAVAILABLE, not an internal error.
#[test]
fn health_follows_the_store() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::create(dir.path());
    let mut redis = RedisServer::start();
    let mut cfg = RedisConfig::new(redis.url());
    cfg.response_timeout = std::time::Duration::from_secs(2);
    cfg.connect_timeout = std::time::Duration::from_secs(1);
    let t = Tally::start(
        &dir.path().join("data"),
        vec![],
        StoreConfig::Redis(Box::new(cfg)),
        &keys.path,
        Limits::default(),
    );
    let rt = rt();
    rt.block_on(async {
        let ch = channel(&t.addr).await;
        let mut h = HealthClient::new(ch.clone());
        let status = |h: &mut HealthClient<tonic::transport::Channel>| {
            let mut h = h.clone();
            async move {
                h.check(HealthCheckRequest {
                    service: "tally.v1.Query".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
            }
        };
        let wait = |want: ServingStatus, h: &mut HealthClient<tonic::transport::Channel>| {
            let h = h.clone();
            async move {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                let mut h = h;
                while status(&mut h).await != want as i32 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "health never became {want:?}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        };
        wait(ServingStatus::Serving, &mut h).await;
        let publish = |id: &str| {
            let mut i = IngestClient::new(ch.clone());
            let key = keys.ingest.clone();
            let e = event(id, "claro", "p1", "1.00", "2026-11-16T10:00:00Z");
            async move {
                let msgs = vec![pb::PublishRequest {
                    sequence: 1,
                    event: e,
                }];
                let mut s = i
                    .publish(req(tokio_stream::iter(msgs), Some(&key)))
                    .await
                    .unwrap()
                    .into_inner();
                s.message().await
            }
        };
        publish("h1").await.unwrap().unwrap();
        redis.stop(true);
        let pending = tokio::spawn(publish("h2"));
        wait(ServingStatus::NotServing, &mut h).await;
        let mut q = QueryClient::new(ch.clone());
        let r = q
            .list_windows(req(
                pb::ListWindowsRequest {
                    view: "provider_window".into(),
                    window: "1h".into(),
                    from: Some(ts(START)),
                    to: Some(ts(START + DAY)),
                    ..Default::default()
                },
                Some(&keys.claro),
            ))
            .await;
        assert_eq!(r.unwrap_err().code(), Code::Unavailable);
        redis.start_again();
        wait(ServingStatus::Serving, &mut h).await;
        let ack = pending.await.unwrap().unwrap().unwrap();
        assert_eq!(ack.status, pb::publish_ack::Status::Committed as i32);
    });
    t.stop();
}
