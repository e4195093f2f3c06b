//! Store conformance: one suite of commits, updates, deletions, refusals and reopens,
//! run against the embedded store, a real single Redis and a real 3-master Redis
//! Cluster; then what only Redis has: the documented key layout, TTLs and trimming,
//! writer fencing, and finishing a Cluster epoch a writer left half applied.

mod common;

use common::redis::{RedisCluster, RedisServer};
use std::collections::BTreeMap;
use tally::dataflow::{RowKey, RowUpdate, RowValue, Sums};
use tally::model::window::WindowSize;
use tally::pipeline::{Pipeline, View, DEFAULT_PIPELINE};
use tally::store::redis::{RedisConfig, RedisStore, WindowQuery};
use tally::store::{Commit, Counters, Store, StoreConfig, StoreError, StoredRow};

const MIN: i64 = 60_000;
/// 2026-11-22T10:00:00Z
const T0: i64 = 1_795_341_600_000;
/// The UTC day holding T0.
const DAY0: i64 = T0 - 10 * 3_600_000;

fn views() -> Vec<View> {
    Pipeline::parse("sales.toml", DEFAULT_PIPELINE)
        .unwrap()
        .views
}

fn sums(sales: i64, gross: i128, refunds: i64, refunds_amount: i128) -> Sums {
    Sums {
        sales,
        gross,
        refunds,
        refunds_amount,
    }
}

/// A row of `view` (index in the default pipeline) with what that view keeps.
fn row(view: u16, size: &str, start: i64, group: &[&str], rank: u32, v: Sums) -> StoredRow {
    let full = view == 0;
    let value = RowValue {
        sums: v,
        distinct_customers: if full { 3 } else { 0 },
        min_ticket: full.then_some(150),
        max_ticket: full.then_some(99_999),
        member: (view == 4).then(|| format!("prod:{rank} ñ").into()),
    };
    (
        (
            RowKey {
                view,
                size: WindowSize::parse(size).unwrap(),
                start,
                group: group.iter().map(|g| (*g).into()).collect(),
            },
            rank,
        ),
        value,
    )
}

/// claro's first `n` minutes from T0 in COP, the i-th with i + 1 sales.
fn claro_minutes(n: i64) -> Vec<(StoredRow, bool)> {
    (0..n)
        .map(|i| {
            let r = row(
                0,
                "1m",
                T0 + i * MIN,
                &["claro", "COP"],
                0,
                sums(i + 1, 100, 0, 0),
            );
            (r, true)
        })
        .collect()
}

fn commit(epoch: u64, clock: i64, changes: Vec<(StoredRow, bool)>) -> Commit {
    let mut dead = BTreeMap::new();
    dead.insert("amount:invalid".to_owned(), epoch);
    Commit {
        epoch,
        clock,
        positions: [(format!("in-{}.jsonl", epoch % 2), 100 * epoch)].into(),
        checkpoints: [(
            format!("kinesis:s/shard-{}", epoch % 2),
            format!("after:{}", "4".repeat(56) + &epoch.to_string()),
        )]
        .into(),
        staging_len: 1000 * epoch,
        dead_letters_len: 10 * epoch,
        counters: Counters {
            records: 7,
            accepted: 6,
            duplicates: 1,
            dead_letters: dead,
            ..Default::default()
        },
        changes: changes
            .into_iter()
            .map(|(((key, rank), value), keep)| RowUpdate {
                key,
                rank,
                value: keep.then_some(value),
            })
            .collect(),
    }
}

fn sorted(mut rows: Vec<StoredRow>) -> Vec<StoredRow> {
    rows.sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
    rows
}

/// The suite every store passes. `open` opens the same store again as its writer.
fn conformance(open: &dyn Fn() -> Box<dyn Store>) {
    let v = views();
    let a = row(
        0,
        "1m",
        T0,
        &["claro", "COP"],
        0,
        sums(2, 1_000_000, 1, 50_000),
    );
    let b = row(
        2,
        "1d",
        DAY0,
        &["claro", "c:1|ñ {x}", "COP"],
        0,
        sums(1, 500, 0, 0),
    );
    let c = row(3, "1d", DAY0, &["tigo", "", "USD"], 0, sums(0, 0, 2, 7_05));
    let t1 = row(4, "1d", DAY0, &["tigo", "USD"], 1, sums(9, 900, 0, 0));
    let t2 = row(4, "1d", DAY0, &["tigo", "USD"], 2, sums(1, 100, 0, 0));
    let a_next = row(0, "1m", T0 + MIN, &["claro", "COP"], 0, sums(1, 1, 0, 0));

    let mut s = open();
    assert_eq!(s.meta().epoch, 0);
    assert!(s.rows().unwrap().is_empty());
    s.bind_views(&v).unwrap();

    s.commit(&commit(
        1,
        T0,
        vec![
            (a.clone(), true),
            (b.clone(), true),
            (c.clone(), true),
            (t1.clone(), true),
            (t2.clone(), true),
        ],
    ))
    .unwrap();
    assert_eq!(
        sorted(s.rows().unwrap()),
        sorted(vec![
            a.clone(),
            b.clone(),
            c.clone(),
            t1.clone(),
            t2.clone()
        ])
    );

    // An update (top-k rank 1 changes member and value), a deletion, a new window.
    let mut t1b = t1.clone();
    t1b.1.member = Some("other".into());
    t1b.1.sums = sums(12, 1200, 0, 0);
    s.commit(&commit(
        2,
        T0 + MIN,
        vec![
            (t1b.clone(), true),
            (c.clone(), false),
            (a_next.clone(), true),
        ],
    ))
    .unwrap();
    let expect = sorted(vec![
        a.clone(),
        b.clone(),
        t1b.clone(),
        t2.clone(),
        a_next.clone(),
    ]);
    assert_eq!(sorted(s.rows().unwrap()), expect);
    let m = s.meta().clone();
    assert_eq!(
        (m.epoch, m.clock, m.staging_len, m.dead_letters_len),
        (2, T0 + MIN, 2000, 20)
    );
    assert_eq!(
        m.positions,
        [
            ("in-0.jsonl".to_owned(), 200),
            ("in-1.jsonl".to_owned(), 100)
        ]
        .into()
    );
    // Sequence numbers too long for any integer come back as committed, the latest
    // per source.
    assert_eq!(
        m.checkpoints,
        [
            (
                "kinesis:s/shard-0".to_owned(),
                format!("after:{}2", "4".repeat(56))
            ),
            (
                "kinesis:s/shard-1".to_owned(),
                format!("after:{}1", "4".repeat(56))
            )
        ]
        .into()
    );
    assert_eq!(
        (
            m.counters.records,
            m.counters.accepted,
            m.counters.duplicates
        ),
        (14, 12, 2)
    );
    assert_eq!(m.counters.dead_letters["amount:invalid"], 3);

    // Not newer: refused, and nothing changes.
    for e in [2, 1] {
        let err = s
            .commit(&commit(e, T0, vec![(c.clone(), true)]))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Stale { offered, stored: 2 } if offered == e),
            "{err}"
        );
        assert!(err.to_string().contains("refused"), "{err}");
    }
    assert_eq!(sorted(s.rows().unwrap()), expect);
    drop(s);

    // Reopened: the same meta and rows; the views are fixed.
    let mut s = open();
    assert_eq!(s.meta(), &m);
    assert_eq!(sorted(s.rows().unwrap()), expect);
    s.bind_views(&v).unwrap();
    let err = s.bind_views(&v[..2]).unwrap_err();
    assert!(matches!(err, StoreError::ViewsChanged(_)), "{err}");
    s.commit(&commit(3, T0 + 2 * MIN, vec![(b.clone(), false)]))
        .unwrap();
    assert_eq!(s.meta().epoch, 3);
    assert_eq!(s.rows().unwrap().len(), 4);
}

fn redis_cfg(urls: String, cluster: bool) -> RedisConfig {
    let mut c = RedisConfig::new(urls.clone());
    c.urls = urls.split(',').map(str::to_owned).collect();
    c.cluster = cluster;
    c.namespace = "conf".into();
    c
}

#[test]
fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance(&|| StoreConfig::Embedded.open(dir.path()).unwrap());
}

#[test]
fn redis_store_conforms() {
    let r = RedisServer::start();
    let cfg = StoreConfig::Redis(Box::new(redis_cfg(r.url(), false)));
    let dir = tempfile::tempdir().unwrap();
    conformance(&|| cfg.open(dir.path()).unwrap());
}

#[test]
fn redis_cluster_store_conforms() {
    let c = RedisCluster::start();
    let cfg = StoreConfig::Redis(Box::new(redis_cfg(c.urls(), true)));
    let dir = tempfile::tempdir().unwrap();
    conformance(&|| cfg.open(dir.path()).unwrap());
    // Each provider's keys (indexes, windows, fence) all live on one master.
    for p in ["claro", "tigo"] {
        let pattern = format!("conf:{{{p}}}:*");
        let on: Vec<Vec<String>> = c
            .nodes
            .iter()
            .map(|n| {
                n.cli(&["KEYS", &pattern])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .filter(|k: &Vec<String>| !k.is_empty())
            .collect();
        assert_eq!(on.len(), 1, "{p}'s keys are spread: {on:?}");
        let keys = &on[0];
        assert!(keys.iter().any(|k| k.contains(":i:")), "{keys:?}");
        assert!(keys.iter().any(|k| k.contains(":w:")), "{keys:?}");
        assert!(keys.contains(&format!("conf:{{{p}}}:fence")), "{keys:?}");
    }
}

#[test]
fn one_round_trip_answers_a_range_of_windows_and_windows_carry_ttls() {
    let r = RedisServer::start();
    let mut s = RedisStore::open(redis_cfg(r.url(), false)).unwrap();
    s.bind_views(&views()).unwrap();
    let mut rows = claro_minutes(5);
    rows.push((
        row(0, "1m", T0 + MIN, &["claro", "USD"], 0, sums(50, 100, 0, 0)),
        true,
    ));
    rows.push((
        row(4, "1d", DAY0, &["claro", "COP"], 1, sums(9, 900, 0, 0)),
        true,
    ));
    rows.push((
        row(4, "1d", DAY0, &["claro", "COP"], 2, sums(1, 100, 0, 0)),
        true,
    ));
    s.commit(&commit(1, T0 + 5 * MIN, rows)).unwrap();

    let minute = WindowSize::parse("1m").unwrap();
    let q = |provider, view, size, from, to| WindowQuery {
        provider,
        view,
        size,
        group: &["COP"],
        from,
        to,
    };
    let got = s
        .windows(&q(
            "claro",
            "provider_window",
            minute,
            T0 + MIN,
            T0 + 3 * MIN,
        ))
        .unwrap();
    let starts: Vec<i64> = got.iter().map(|(st, _, _)| *st).collect();
    assert_eq!(starts, vec![T0 + MIN, T0 + 2 * MIN, T0 + 3 * MIN]);
    assert_eq!(
        got.iter().map(|(_, _, v)| v.sums.sales).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert_eq!(got[0].2.min_ticket, Some(150));
    let top = s
        .windows(&q(
            "claro",
            "top_products",
            WindowSize::LocalDay,
            DAY0,
            DAY0,
        ))
        .unwrap();
    assert_eq!(
        top.iter()
            .map(|(_, r, v)| (*r, v.sums.sales))
            .collect::<Vec<_>>(),
        vec![(1, 9), (2, 1)]
    );
    assert!(s
        .windows(&q("tigo", "provider_window", minute, T0, T0 + 9 * MIN))
        .unwrap()
        .is_empty());

    // The raw layout, as docs/redis.md gives it.
    let key = format!("conf:{{claro}}:w:provider_window:1m:{}", T0 + MIN);
    assert_eq!(
        r.cli(&["HGET", &key, "COP"]).trim(),
        r#"[2,"1.00",0,"0.00",3,"1.50","999.99"]"#
    );
    assert_eq!(
        r.cli(&["HGET", &key, "USD"]).trim(),
        r#"[50,"1.00",0,"0.00",3,"1.50","999.99"]"#
    );
    let top_key = format!("conf:{{claro}}:w:top_products:1d:{DAY0}");
    assert_eq!(
        r.cli(&["HGET", &top_key, "COP|1"]).trim(),
        r#"[9,"9.00",0,"0.00",null,null,null,"prod:1 ñ"]"#
    );
    let index = r.cli(&["ZRANGE", "conf:{claro}:i:provider_window:1m", "0", "-1"]);
    assert_eq!(index.lines().count(), 5, "{index}");
    // Minute windows expire 3 days after their last write.
    let ttl: i64 = r.cli(&["PTTL", &key]).trim().parse().unwrap();
    assert!(
        ttl > 3 * 86_400_000 - 60_000 && ttl <= 3 * 86_400_000,
        "{ttl}"
    );
    assert_eq!(
        r.cli(&["SMEMBERS", "conf:{conf}:providers"]).trim(),
        "claro"
    );
}

#[test]
fn windows_past_retention_are_trimmed_from_the_series_a_commit_touches() {
    let r = RedisServer::start();
    let mut cfg = redis_cfg(r.url(), false);
    cfg.ttl = vec![(
        WindowSize::parse("1m").unwrap(),
        std::time::Duration::from_secs(3600),
    )];
    let mut s = RedisStore::open(cfg).unwrap();
    s.bind_views(&views()).unwrap();
    let old = row(0, "1m", T0, &["claro", "COP"], 0, sums(1, 100, 0, 0));
    let day = row(0, "1d", DAY0, &["claro", "COP"], 0, sums(1, 100, 0, 0));
    s.commit(&commit(
        1,
        T0,
        vec![(old.clone(), true), (day.clone(), true)],
    ))
    .unwrap();
    // Two hours later a new minute: the old one ended 2 h before the clock, TTL 1 h.
    let new = row(
        0,
        "1m",
        T0 + 120 * MIN,
        &["claro", "COP"],
        0,
        sums(1, 100, 0, 0),
    );
    s.commit(&commit(2, T0 + 120 * MIN, vec![(new.clone(), true)]))
        .unwrap();
    assert_eq!(sorted(s.rows().unwrap()), sorted(vec![day, new]));
}

#[test]
fn an_older_writer_is_refused_and_says_so() {
    for cluster in [false, true] {
        let (_single, _cluster, urls);
        if cluster {
            let c = RedisCluster::start();
            urls = c.urls();
            _cluster = Some(c);
            _single = None;
        } else {
            let r = RedisServer::start();
            urls = r.url();
            _single = Some(r);
            _cluster = None;
        }
        let cfg = redis_cfg(urls, cluster);
        let a_row = row(0, "1m", T0, &["claro", "COP"], 0, sums(1, 100, 0, 0));
        let mut a = RedisStore::open(cfg.clone()).unwrap();
        a.bind_views(&views()).unwrap();
        a.commit(&commit(1, T0, vec![(a_row.clone(), true)]))
            .unwrap();
        let mut b = RedisStore::open(cfg.clone()).unwrap();
        assert!(b.generation() > a.generation());
        let mut bumped = a_row.clone();
        bumped.1.sums.sales = 99;
        let err = a
            .commit(&commit(2, T0, vec![(bumped.clone(), true)]))
            .unwrap_err();
        assert!(matches!(err, StoreError::Superseded { .. }), "{err}");
        assert!(err.to_string().contains("another writer"), "{err}");
        b.commit(&commit(2, T0, vec![(a_row.clone(), true)]))
            .unwrap();
        let err = b
            .commit(&commit(2, T0, vec![(bumped.clone(), true)]))
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Stale {
                    offered: 2,
                    stored: 2
                }
            ),
            "{err}"
        );
        assert_eq!(b.rows().unwrap(), vec![a_row.clone()], "cluster={cluster}");
    }
}

#[test]
fn a_cluster_epoch_left_half_applied_is_finished_by_the_next_writer() {
    let c = RedisCluster::start();
    let cfg = redis_cfg(c.urls(), true);
    let r1 = row(0, "1m", T0, &["claro", "COP"], 0, sums(1, 100, 0, 0));
    let r2 = row(0, "1m", T0, &["tigo", "USD"], 0, sums(2, 200, 0, 0));
    {
        let mut a = RedisStore::open(cfg.clone()).unwrap();
        a.bind_views(&views()).unwrap();
        a.commit(&commit(1, T0, vec![(r1.clone(), true)])).unwrap();
    }
    // A writer that wrote its intent for epoch 2 and died before applying it.
    let c2 = commit(2, T0 + MIN, vec![(r1.clone(), false), (r2.clone(), true)]);
    let client =
        redis::cluster::ClusterClient::new(c.urls().split(',').collect::<Vec<_>>()).unwrap();
    let mut con = client.get_connection().unwrap();
    let _: () = redis::cmd("SET")
        .arg("conf:{conf}:intent")
        .arg(bincode::serialize(&c2).unwrap())
        .query(&mut con)
        .unwrap();
    let mut b = RedisStore::open(cfg).unwrap();
    assert_eq!(b.meta().epoch, 2);
    assert_eq!(b.rows().unwrap(), vec![r2]);
    let left: Option<Vec<u8>> = redis::cmd("GET")
        .arg("conf:{conf}:intent")
        .query(&mut con)
        .unwrap();
    assert!(left.is_none());
}

#[test]
fn a_pool_of_readers_answers_concurrent_queries_within_its_size() {
    let r = RedisServer::start();
    let c = RedisCluster::start();
    for (urls, cluster) in [(r.url(), false), (c.urls(), true)] {
        let mut cfg = redis_cfg(urls, cluster);
        let mut w = RedisStore::open(cfg.clone()).unwrap();
        w.bind_views(&views()).unwrap();
        w.commit(&commit(1, T0 + 60 * MIN, claro_minutes(60)))
            .unwrap();
        cfg.pool_size = 2;
        let reader = tally::store::redis::RedisReader::open(&cfg).unwrap();
        assert_eq!(reader.meta().epoch, 1);
        let minute = WindowSize::parse("1m").unwrap();
        std::thread::scope(|s| {
            for t in 0..8i64 {
                let reader = reader.clone();
                s.spawn(move || {
                    for q in 0..40i64 {
                        let (a, b) = ((t * 7 + q) % 60, (t * 7 + q) % 60 + q % 5);
                        let got = reader
                            .windows(&WindowQuery {
                                provider: "claro",
                                view: "provider_window",
                                size: minute,
                                group: &["COP"],
                                from: T0 + a * MIN,
                                to: T0 + b * MIN,
                            })
                            .unwrap();
                        let sales: Vec<i64> = got.iter().map(|(_, _, v)| v.sums.sales).collect();
                        let want: Vec<i64> = (a..=b.min(59)).map(|i| i + 1).collect();
                        assert_eq!(sales, want, "cluster={cluster} [{a}, {b}]");
                    }
                });
            }
        });
        assert_eq!(reader.rows().unwrap().len(), 60);
        if !cluster {
            // The writer's connection, the pool's two, and this redis-cli.
            let info = r.cli(&["INFO", "clients"]);
            let n: u32 = info
                .lines()
                .find_map(|l| l.strip_prefix("connected_clients:"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert!(n <= 4, "{n} clients: the pool holds more than 2\n{info}");
        }
        let mut bad = cfg.clone();
        bad.pool_size = 0;
        assert!(matches!(
            tally::store::redis::RedisReader::open(&bad),
            Err(StoreError::Config(_))
        ));
    }
}

/// With `changes_stream`, each provider's stream holds every epoch's changed rows
/// once, in epoch order: replaying it gives that provider's rows, and nothing of
/// another provider.
#[test]
fn change_streams_replay_to_each_providers_rows() {
    let r = RedisServer::start();
    let c = RedisCluster::start();
    for (urls, cluster) in [(r.url(), false), (c.urls(), true)] {
        let mut cfg = redis_cfg(urls.clone(), cluster);
        cfg.changes_stream = Some(1000);
        let mut s = RedisStore::open(cfg).unwrap();
        s.bind_views(&views()).unwrap();
        let a = row(0, "1m", T0, &["claro", "COP"], 0, sums(1, 100, 0, 0));
        let b = row(3, "1d", DAY0, &["claro", "", "COP"], 0, sums(2, 200, 0, 0));
        let t = row(0, "1m", T0, &["tigo", "USD"], 0, sums(5, 500, 0, 0));
        s.commit(&commit(
            1,
            T0,
            vec![(a.clone(), true), (b.clone(), true), (t.clone(), true)],
        ))
        .unwrap();
        let mut a2 = a.clone();
        a2.1.sums.sales = 7;
        s.commit(&commit(
            2,
            T0 + MIN,
            vec![(a2.clone(), true), (b.clone(), false)],
        ))
        .unwrap();
        let entries: Vec<(String, Vec<String>)> = if cluster {
            let client =
                redis::cluster::ClusterClient::new(urls.split(',').collect::<Vec<_>>()).unwrap();
            let mut con = client.get_connection().unwrap();
            redis::cmd("XRANGE")
                .arg("conf:{claro}:changes")
                .arg("-")
                .arg("+")
                .query(&mut con)
                .unwrap()
        } else {
            let mut con = redis::Client::open(urls.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            redis::cmd("XRANGE")
                .arg("conf:{claro}:changes")
                .arg("-")
                .arg("+")
                .query(&mut con)
                .unwrap()
        };
        let epochs: Vec<&str> = entries.iter().map(|(_, f)| f[1].as_str()).collect();
        assert_eq!(epochs, vec!["1", "2"], "cluster={cluster}");
        // Replay: (view, size, start, field) -> value.
        let mut state: BTreeMap<(String, String, i64, String), serde_json::Value> = BTreeMap::new();
        for (_, f) in &entries {
            assert_eq!(f[2], "rows");
            let rows: Vec<serde_json::Value> = serde_json::from_str(&f[3]).unwrap();
            for x in rows {
                let k = (
                    x[0].as_str().unwrap().to_owned(),
                    x[1].as_str().unwrap().to_owned(),
                    x[2].as_i64().unwrap(),
                    x[3].as_str().unwrap().to_owned(),
                );
                assert_ne!(k.3, "USD", "tigo's row in claro's stream");
                if x[4].is_null() {
                    state.remove(&k);
                } else {
                    state.insert(k, x[4].clone());
                }
            }
        }
        let want: BTreeMap<_, _> = [(
            (
                "provider_window".to_owned(),
                "1m".to_owned(),
                T0,
                "COP".to_owned(),
            ),
            serde_json::json!([7, "1.00", 0, "0.00", 3, "1.50", "999.99"]),
        )]
        .into();
        assert_eq!(state, want, "cluster={cluster}");
    }
}
