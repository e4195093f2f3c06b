//! The Parquet lake, end to end: `tally run` stages counted events, `tally compact`
//! publishes provider-days that DuckDB reads back as the store counts them; a kill
//! at each step of a compaction keeps the previous version readable and a rerun
//! completes, a second rerun changes nothing; facts lost in a crash are staged again;
//! a day that does not verify is not published; the lake on S3 (moto's server).

mod common;

use common::tally;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use tally::pipeline::{Pipeline, DEFAULT_PIPELINE};

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test paths")
}

/// Rows of a DuckDB query, as JSON objects (DuckDB from scripts/deps.sh's venv).
fn duck(sql: &str) -> Vec<Value> {
    let out = std::process::Command::new(common::python())
        .args([
            "-c",
            "import duckdb, json, sys\n\
             c = duckdb.connect()\n\
             r = c.sql(sys.argv[1])\n\
             cols = [d[0] for d in r.description]\n\
             for row in r.fetchall():\n\
             \x20   print(json.dumps(dict(zip(cols, row)), default=str))",
            sql,
        ])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "duckdb failed on {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn export_rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn pipeline() -> Pipeline {
    Pipeline::parse("sales.toml", DEFAULT_PIPELINE).unwrap()
}

/// The provider-local date a day window starts (export `window_start`).
fn local_date(p: &Pipeline, provider: &str, window_start: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(window_start)
        .unwrap()
        .with_timezone(&p.time_zone(provider))
        .date_naive()
        .to_string()
}

/// The dates the lake has staging files for.
fn staged_dates(lake: &Path) -> Vec<String> {
    let mut d: Vec<String> = tree(&lake.join("staging"))
        .into_keys()
        .filter(|k| k.ends_with(".parquet"))
        .filter_map(|k| {
            k.strip_prefix("date=")
                .and_then(|r| r.split('/').next())
                .map(str::to_owned)
        })
        .collect();
    d.dedup();
    d
}

/// The default pipeline with `[archive]` settings, in `dir`.
fn pipeline_with(dir: &Path, archive: &str) -> PathBuf {
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, format!("{DEFAULT_PIPELINE}\n[archive]\n{archive}\n")).unwrap();
    p
}

fn compact(data: &Path, lake: &Path, date: &str, env: &[(&str, &str)]) -> Output {
    let mut c = tally();
    c.args(["compact", "--quiet", "--date", date, "--data-dir", s(data)])
        .args(["--lake", s(lake)]);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("tally runs")
}

fn compact_ok(data: &Path, lake: &Path, date: &str) -> String {
    let out = compact(data, lake, date, &[]);
    assert!(
        out.status.success(),
        "compact {date}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every file under `dir` with its bytes, by relative path.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

/// Day figures per (date, provider, currency) as the export has them
/// (provider_window, 1d): sales, gross, refunds, refunds amount, distinct customers,
/// min and max ticket.
type Figures = BTreeMap<(String, String, String), Vec<String>>;

fn export_day_figures(p: &Pipeline, export: &Path) -> Figures {
    export_rows(export)
        .into_iter()
        .filter(|r| r["view"] == "provider_window" && r["window"] == "1d")
        .map(|r| {
            let prov = r["provider_id"].as_str().unwrap().to_owned();
            let date = local_date(p, &prov, r["window_start"].as_str().unwrap());
            let f = [
                "sales_count",
                "gross_amount",
                "refunds_count",
                "refunds_amount",
                "distinct_customers",
                "min_ticket",
                "max_ticket",
            ]
            .iter()
            .map(|k| match &r[*k] {
                Value::String(x) => x.clone(),
                Value::Null => "null".into(),
                v => v.to_string(),
            })
            .collect();
            ((date, prov, r["currency"].as_str().unwrap().to_owned()), f)
        })
        .collect()
}

/// The same figures from Parquet event files, by DuckDB (`files`: a DuckDB list or glob).
fn duck_day_figures(files: &str) -> Figures {
    let sql = format!(
        "select cast(date as varchar) as date, provider_id, currency, \
           count(*) filter (where kind = 'sale') as sales, \
           coalesce(sum(amount) filter (where kind = 'sale'), 0) as gross, \
           count(*) filter (where kind = 'refund') as refunds, \
           coalesce(sum(amount) filter (where kind = 'refund'), 0) as refunds_amount, \
           count(distinct customer_id) as customers, \
           min(amount) filter (where kind = 'sale') as min_ticket, \
           max(amount) filter (where kind = 'sale') as max_ticket \
         from read_parquet({files}, hive_partitioning = true) group by all"
    );
    duck(&sql)
        .into_iter()
        .map(|r| {
            let money = |v: &Value| match v {
                Value::Null => "null".to_owned(),
                Value::String(x) => decimal(x),
                v => decimal(&v.to_string()),
            };
            (
                (
                    r["date"].as_str().unwrap().to_owned(),
                    r["provider_id"].as_str().unwrap().to_owned(),
                    r["currency"].as_str().unwrap().to_owned(),
                ),
                vec![
                    r["sales"].to_string(),
                    money(&r["gross"]),
                    r["refunds"].to_string(),
                    money(&r["refunds_amount"]),
                    r["customers"].to_string(),
                    money(&r["min_ticket"]),
                    money(&r["max_ticket"]),
                ],
            )
        })
        .collect()
}

/// A DuckDB decimal as Tally writes amounts: exactly two fraction digits.
fn decimal(x: &str) -> String {
    let (int, frac) = x.split_once('.').unwrap_or((x, ""));
    format!("{int}.{:0<2}", frac)
}

fn generate(dir: &Path, events: &str, seed: &str) -> PathBuf {
    let input = dir.join("events.jsonl");
    common::gen_to(
        &input,
        &[
            "--events",
            events,
            "--seed",
            seed,
            "--events-per-second",
            "0.4",
            "--providers",
            "5",
        ],
    );
    input
}

#[test]
fn duckdb_reads_the_compacted_days_as_the_store_counts_them() {
    let tmp = tempfile::tempdir().unwrap();
    let input = generate(tmp.path(), "60000", "71");
    let (data, export) = (tmp.path().join("d"), tmp.path().join("export.jsonl"));
    // Compaction by hand here; the run's own schedule has its test.
    let pipe = pipeline_with(tmp.path(), "schedule = false");
    common::run_until_eof(&input, &data, Some(2), Some(&pipe), Some(&export));
    let lake = data.join("lake");
    let dates = staged_dates(&lake);
    assert!(dates.len() >= 3, "a multi-day stream: {dates:?}");
    for d in &dates {
        let out = compact_ok(&data, &lake, d);
        assert!(out.contains("0 failed verification"), "{out}");
    }
    let p = pipeline();
    let want = export_day_figures(&p, &export);
    let got = duck_day_figures(&format!("'{}/events/*/*/*.parquet'", s(&lake)));
    assert_eq!(got, want);
    // Every staging file is consumed once its day is published.
    assert_eq!(staged_dates(&lake), Vec::<String>::new());

    // Hour windows too: the product view's 1h rows from the events.
    let hours = duck(&format!(
        "select provider_id, product_id, currency, \
           strftime(time_bucket(interval 1 hour, ts), '%Y-%m-%dT%H:%M:%SZ') as start, \
           count(*) filter (where kind = 'sale') as sales, \
           coalesce(sum(amount) filter (where kind = 'refund'), 0) as refunds_amount \
         from read_parquet('{}/events/*/*/*.parquet', hive_partitioning = true) group by all",
        s(&lake)
    ));
    let hours: BTreeMap<(String, String, String, String), (String, String)> = hours
        .into_iter()
        .map(|r| {
            (
                (
                    r["provider_id"].as_str().unwrap().into(),
                    r["product_id"].as_str().unwrap().into(),
                    r["currency"].as_str().unwrap().into(),
                    r["start"].as_str().unwrap().into(),
                ),
                (
                    r["sales"].to_string(),
                    decimal(&match &r["refunds_amount"] {
                        Value::String(x) => x.clone(),
                        v => v.to_string(),
                    }),
                ),
            )
        })
        .collect();
    let want_hours: BTreeMap<(String, String, String, String), (String, String)> =
        export_rows(&export)
            .into_iter()
            .filter(|r| r["view"] == "product_window" && r["window"] == "1h")
            .map(|r| {
                (
                    (
                        r["provider_id"].as_str().unwrap().into(),
                        r["product_id"].as_str().unwrap().into(),
                        r["currency"].as_str().unwrap().into(),
                        r["window_start"].as_str().unwrap().into(),
                    ),
                    (
                        r["sales_count"].to_string(),
                        r["refunds_amount"].as_str().unwrap().to_owned(),
                    ),
                )
            })
            .collect();
    assert_eq!(hours.len(), want_hours.len());
    assert_eq!(hours, want_hours);

    // The daily aggregates are the store's rows: the top products of each day.
    let top = duck(&format!(
        "select cast(date as varchar) as date, provider_id, currency, rank, member, \
           cast(net_amount as varchar) as net \
         from read_parquet('{}/aggregates/view=top_products/*/*/*.parquet', hive_partitioning = true) \
         where \"window\" = '1d'",
        s(&lake)
    ));
    let top: BTreeMap<(String, String, String, u64), (String, String)> = top
        .into_iter()
        .map(|r| {
            (
                (
                    r["date"].as_str().unwrap().into(),
                    r["provider_id"].as_str().unwrap().into(),
                    r["currency"].as_str().unwrap().into(),
                    r["rank"].as_u64().unwrap(),
                ),
                (
                    r["member"].as_str().unwrap().into(),
                    decimal(r["net"].as_str().unwrap()),
                ),
            )
        })
        .collect();
    let want_top: BTreeMap<(String, String, String, u64), (String, String)> = export_rows(&export)
        .into_iter()
        .filter(|r| r["view"] == "top_products")
        .map(|r| {
            let prov = r["provider_id"].as_str().unwrap().to_owned();
            (
                (
                    local_date(&p, &prov, r["window_start"].as_str().unwrap()),
                    prov,
                    r["currency"].as_str().unwrap().into(),
                    r["rank"].as_u64().unwrap(),
                ),
                (
                    r["product_id"].as_str().unwrap().into(),
                    r["net_amount"].as_str().unwrap().into(),
                ),
            )
        })
        .collect();
    assert!(!want_top.is_empty());
    assert_eq!(top, want_top);

    // Voided events are in the audit with their voids, never among the events.
    let audit = duck(&format!(
        "select role, count(*) as n from read_parquet('{}/audit/*/*/*.parquet', hive_partitioning = true) group by role order by role",
        s(&lake)
    ));
    let n = |role: &str| {
        audit
            .iter()
            .find(|r| r["role"] == role)
            .map_or(0, |r| r["n"].as_u64().unwrap())
    };
    assert!(n("voided") > 0, "{audit:?}");
    assert_eq!(n("voided"), n("void"));
    let overlap = duck(&format!(
        "select count(*) as n from read_parquet('{l}/events/*/*/*.parquet', hive_partitioning = true) e \
         join read_parquet('{l}/audit/*/*/*.parquet', hive_partitioning = true) a \
         on a.role = 'voided' and a.event_id = e.event_id",
        l = s(&lake)
    ));
    assert_eq!(overlap[0]["n"], 0);
}

/// The figures of one date, from the files a manifest lists (by DuckDB).
fn manifest_figures(lake: &Path, date: &str) -> Figures {
    let man: Value = serde_json::from_slice(
        &std::fs::read(lake.join(format!("manifests/date={date}.json"))).unwrap(),
    )
    .unwrap();
    let files: Vec<String> = man["providers"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|p| p["events"].as_array().unwrap().clone())
        .map(|f| {
            let path = f["path"].as_str().unwrap();
            let bytes = std::fs::read(lake.join(path)).unwrap();
            use sha2::Digest;
            let digest: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect();
            assert_eq!(digest, f["sha256"].as_str().unwrap(), "{path}: checksum");
            format!("'{}'", s(&lake.join(path)))
        })
        .collect();
    duck_day_figures(&format!("[{}]", files.join(", ")))
}

fn only_date(f: &Figures, date: &str) -> Figures {
    f.iter()
        .filter(|(k, _)| k.0 == date)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    for (rel, bytes) in tree(from) {
        let p = to.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

/// Writes the first `n` lines of `input` to `out`.
fn head(input: &Path, n: usize, out: &Path) {
    let text = std::fs::read_to_string(input).unwrap();
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(out, lines.join("\n") + "\n").unwrap();
}

#[test]
fn a_kill_at_each_step_of_compaction_keeps_the_previous_version_and_a_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let input = generate(tmp.path(), "24000", "72");
    let p = pipeline();
    // Version 1 of a day from the first half of the stream, version 2 from all of it:
    // the day in the middle gets more events.
    let (data, half) = (tmp.path().join("d"), tmp.path().join("half.jsonl"));
    head(&input, 12_000, &half);
    let export1 = tmp.path().join("export1.jsonl");
    let pipe = pipeline_with(tmp.path(), "schedule = false");
    common::run_until_eof(&half, &data, None, Some(&pipe), Some(&export1));
    let lake = data.join("lake");
    let day = staged_dates(&lake).last().unwrap().clone();
    compact_ok(&data, &lake, &day);
    let v1 = only_date(&export_day_figures(&p, &export1), &day);
    assert_eq!(manifest_figures(&lake, &day), v1);
    let export2 = tmp.path().join("export2.jsonl");
    let more = tmp.path().join("more.jsonl");
    std::fs::write(
        &more,
        std::fs::read_to_string(&input)
            .unwrap()
            .lines()
            .skip(12_000)
            .collect::<Vec<_>>()
            .join("\n")
            + "\n",
    )
    .unwrap();
    common::run_until_eof(&more, &data, None, Some(&pipe), Some(&export2));
    let v2 = only_date(&export_day_figures(&p, &export2), &day);
    assert_ne!(v1, v2, "the second half adds to {day}");
    let before = tree(&lake);

    for step in ["written", "moved", "published"] {
        let lake = tmp.path().join(format!("lake-{step}"));
        copy_dir(&data.join("lake"), &lake);
        let out = compact(
            &data,
            &lake,
            &day,
            &[("TALLY_FAILPOINT", &format!("compact:{step}"))],
        );
        assert!(
            !out.status.success(),
            "{step}: the failpoint stops the process"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("failpoint compact:{step}")),
            "{step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // What readers see: the previous version until the manifest is written,
        // the new one after, never a mix, every listed file whole.
        let seen = manifest_figures(&lake, &day);
        if step == "published" {
            assert_eq!(seen, v2, "{step}");
        } else {
            assert_eq!(seen, v1, "{step}");
        }
        // What a put cut short by the crash leaves (on a local lake, the object
        // store's staging name, which listings hide), as another provider's thread
        // may be writing when one stops the process: the rerun removes it too.
        let prov = v2.keys().next().expect("a provider that day").1.clone();
        let cut = lake.join(format!(
            "_tmp/date={day}/provider_id={prov}/events/date={day}/provider_id={prov}"
        ));
        std::fs::create_dir_all(&cut).unwrap();
        std::fs::write(cut.join("part-00000-cut.parquet#3"), b"PAR1 partial").unwrap();
        // A rerun completes: the new version, nothing left over.
        let out = compact_ok(&data, &lake, &day);
        assert!(out.contains("0 failed verification"), "{step}: {out}");
        assert_eq!(manifest_figures(&lake, &day), v2, "{step}");
        let files = tree(&lake);
        let man: Value =
            serde_json::from_slice(&files[&format!("manifests/date={day}.json")]).unwrap();
        let listed: std::collections::BTreeSet<String> = man["providers"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|p| {
                let mut v: Vec<Value> = p["events"].as_array().unwrap().clone();
                v.extend(p["audit"].as_array().unwrap().clone());
                for list in p["aggregates"].as_object().unwrap().values() {
                    v.extend(list.as_array().unwrap().clone());
                }
                v
            })
            .map(|f| f["path"].as_str().unwrap().to_owned())
            .collect();
        for rel in files.keys() {
            let of_day = rel.contains(&format!("/date={day}/"))
                || rel.starts_with(&format!("events/date={day}/"));
            if of_day && !rel.starts_with("staging/") {
                assert!(listed.contains(rel), "{step}: {rel} is not in the manifest");
            }
            assert!(!rel.starts_with("_tmp/"), "{step}: {rel} left behind");
        }
        assert!(
            !files
                .keys()
                .any(|k| k.starts_with(&format!("staging/date={day}/"))),
            "{step}: the day's staging is consumed"
        );
        // A second rerun changes nothing, byte for byte.
        let out = compact_ok(&data, &lake, &day);
        assert!(out.contains("0 published"), "{step}: {out}");
        assert_eq!(
            tree(&lake),
            files,
            "{step}: the second rerun changed the lake"
        );
    }
    // The lake the failpoint runs copied is untouched.
    assert_eq!(tree(&data.join("lake")), before);
}

/// A run killed before its first flush loses no fact: the restart stages the facts of
/// the epochs committed since the last flush again, from the staging log.
#[test]
fn facts_lost_in_a_crash_are_staged_again_at_the_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let input = generate(tmp.path(), "30000", "73");
    // Epochs of a thousand records, a flush only when a day closes: the open day's
    // facts are in memory when the run is killed.
    let pipe = tmp.path().join("slow-flush.toml");
    std::fs::write(
        &pipe,
        DEFAULT_PIPELINE.replace("max_events = 100000", "max_events = 1000")
            + "\n[archive]\nflush_interval = \"1h\"\nschedule = false\n",
    )
    .unwrap();
    let data = tmp.path().join("d");
    let addr = format!("127.0.0.1:{}", common::redis::free_port());
    let mut child = tally()
        .args(["run", s(&input), "--follow", "--data-dir", s(&data)])
        .args(["--pipeline", s(&pipe), "--metrics-addr", &addr])
        .spawn()
        .unwrap();
    common::wait_for(
        "every record committed",
        std::time::Duration::from_secs(60),
        || {
            std::net::TcpStream::connect(&addr).is_ok()
                && common::find_metric(&common::scrape(&addr), "tally_records_total")
                    == Some(30_000.0)
        },
    );
    // A day that closes is flushed at once; the facts of the epochs after the last
    // flush are only in memory.
    let m = common::scrape(&addr);
    let staged = common::find_metric(&m, "tally_archive_staged_epoch").unwrap_or(0.0);
    let committed = common::metric(&m, "tally_last_committed_epoch");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        staged < committed,
        "the lake trails the store at the kill: staged {staged}, committed {committed}"
    );
    let lake = data.join("lake");
    let export = tmp.path().join("export.jsonl");
    common::run_until_eof(&input, &data, None, Some(&pipe), Some(&export));
    let dates = staged_dates(&lake);
    assert!(dates.len() >= 2, "{dates:?}");
    for d in &dates {
        let out = compact_ok(&data, &lake, d);
        assert!(out.contains("0 failed verification"), "{out}");
    }
    let got = duck_day_figures(&format!("'{}/events/*/*/*.parquet'", s(&lake)));
    assert_eq!(got, export_day_figures(&pipeline(), &export));
}

/// The lake and the store disagree (the store of a run that missed some events):
/// nothing is published, the report names the providers and figures, the staging
/// stays, and the exit code says so.
#[test]
fn a_day_that_does_not_verify_is_not_published() {
    let tmp = tempfile::tempdir().unwrap();
    let input = generate(tmp.path(), "12000", "74");
    let (full, short) = (tmp.path().join("full"), tmp.path().join("short"));
    let pipe = pipeline_with(tmp.path(), "schedule = false");
    let (full_export, short_export) = (
        tmp.path().join("full.jsonl"),
        tmp.path().join("short.jsonl"),
    );
    common::run_until_eof(&input, &full, None, Some(&pipe), Some(&full_export));
    let fewer = tmp.path().join("fewer.jsonl");
    let text = std::fs::read_to_string(&input).unwrap();
    let kept: Vec<&str> = text.lines().skip(300).collect();
    std::fs::write(&fewer, kept.join("\n") + "\n").unwrap();
    common::run_until_eof(&fewer, &short, None, Some(&pipe), Some(&short_export));
    let lake = full.join("lake");
    let day = staged_dates(&lake)[0].clone();
    let staging_before = tree(&lake.join(format!("staging/date={day}")));
    let out = compact(&short, &lake, &day, &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("verification failed"), "{err}");
    assert!(!lake.join(format!("manifests/date={day}.json")).exists());
    assert!(!lake.join(format!("events/date={day}")).exists());
    assert_eq!(
        tree(&lake.join(format!("staging/date={day}"))),
        staging_before
    );
    let reports = tree(&lake.join(format!("reports/date={day}")));
    assert!(!reports.is_empty());
    // The provider_window day rows of each store, as their exports give them: the
    // report's figures for that view are exactly where they differ, store (the short
    // run's) against lake (the full run's facts), in group order.
    let (held, facts) = (
        export_day_figures(&pipeline(), &short_export),
        export_day_figures(&pipeline(), &full_export),
    );
    let names = [
        "sales_count",
        "gross_amount",
        "refunds_count",
        "refunds_amount",
    ];
    let mut expected: Vec<(String, String, String, String, String)> = Vec::new();
    for key in held.keys().chain(facts.keys()).collect::<BTreeSet<_>>() {
        let (date, prov, currency) = key;
        if *date != day {
            continue;
        }
        let zero = vec!["0".to_owned(), "0.00".into(), "0".into(), "0.00".into()];
        let (a, b) = (
            held.get(key).unwrap_or(&zero),
            facts.get(key).unwrap_or(&zero),
        );
        for (i, figure) in names.iter().enumerate() {
            if a[i] != b[i] {
                let (p, c, f) = (prov.clone(), currency.clone(), figure.to_string());
                expected.push((p, c, f, a[i].clone(), b[i].clone()));
            }
        }
    }
    assert!(!expected.is_empty());
    let mut reported = Vec::new();
    for (name, bytes) in &reports {
        let r: Value = serde_json::from_slice(bytes).unwrap();
        let prov = r["provider_id"].as_str().unwrap();
        assert_eq!(name, &format!("provider_id={prov}.json"));
        let diffs = r["differences"].as_array().unwrap();
        assert!(!diffs.is_empty());
        for d in diffs {
            assert_eq!(d["group"][0], prov);
            assert_ne!(d["store"], d["lake"]);
            if d["view"] == "provider_window" {
                let text = |v: &Value| v.as_str().unwrap().to_owned();
                assert_eq!(d["group"].as_array().unwrap().len(), 2, "{d}");
                reported.push((
                    text(&d["group"][0]),
                    text(&d["group"][1]),
                    text(&d["figure"]),
                    text(&d["store"]),
                    text(&d["lake"]),
                ));
            }
        }
    }
    // Reports are read in provider order; within one, groups come in order.
    assert_eq!(reported, expected);
    // A provider that has nothing that day is refused, naming it.
    let mut c = tally();
    c.args(["compact", "--quiet", "--date", &day, "--provider", "nobody"])
        .args(["--data-dir", s(&full), "--lake", s(&lake)]);
    let out = c.output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("provider 'nobody' has nothing on"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!lake.join(format!("manifests/date={day}.json")).exists());
    // Against its own store the same lake verifies, and the report goes.
    let out = compact_ok(&full, &lake, &day);
    assert!(out.contains("0 failed verification"), "{out}");
    assert!(tree(&lake.join(format!("reports/date={day}"))).is_empty());
}

/// `tally run --until-eof` compacts by itself every day closed by the end of its
/// input (lateness included); the last day stays staged.
#[test]
fn the_run_compacts_each_day_once_it_has_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let input = generate(tmp.path(), "40000", "75");
    let (data, export) = (tmp.path().join("d"), tmp.path().join("export.jsonl"));
    common::run_until_eof(&input, &data, None, None, Some(&export));
    let lake = data.join("lake");
    let staged = staged_dates(&lake);
    let published: Vec<String> = std::fs::read_dir(lake.join("manifests"))
        .unwrap()
        .map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.strip_prefix("date=")
                .unwrap()
                .strip_suffix(".json")
                .unwrap()
                .to_owned()
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(published.len() >= 2, "{published:?}");
    assert_eq!(staged.len(), 1, "only the open day is left: {staged:?}");
    assert!(staged[0] > *published.last().unwrap());
    let all = export_day_figures(&pipeline(), &export);
    for d in &published {
        assert_eq!(manifest_figures(&lake, d), only_date(&all, d), "{d}");
    }
}

/// The lake on S3: moto's server on a free loopback port, a bucket and a prefix.
#[test]
fn the_lake_on_s3() {
    let tmp = tempfile::tempdir().unwrap();
    let port = common::redis::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut moto = std::process::Command::new(common::venv().join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("moto_server (scripts/deps.sh installs it)");
    let boto = |code: &str| {
        let out = std::process::Command::new(common::python())
            .args([
                "-c",
                &format!(
                    "import boto3, json, sys\n\
                     s3 = boto3.client('s3', endpoint_url='{endpoint}', region_name='us-east-1', \
                       aws_access_key_id='test', aws_secret_access_key='test')\n{code}"
                ),
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    common::wait_for("moto_server", std::time::Duration::from_secs(30), || {
        boto("s3.list_buckets()").0
    });
    let made = boto("s3.create_bucket(Bucket='tally-lake')");
    assert!(made.0, "{}", made.2);
    let input = generate(tmp.path(), "20000", "76");
    let data = tmp.path().join("d");
    let export = tmp.path().join("export.jsonl");
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let lake = "s3://tally-lake/prod/tally";
    let mut run = tally();
    run.args(["run", s(&input), "--until-eof", "--data-dir", s(&data)])
        .args(["--lake", lake, "--export", s(&export)]);
    for (k, v) in env {
        run.env(k, v);
    }
    let out = run.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys = || -> Vec<String> {
        let (ok, out, err) = boto(
            "r = s3.list_objects_v2(Bucket='tally-lake', Prefix='prod/tally/')\n\
             print(json.dumps([o['Key'] for o in r.get('Contents', [])]))",
        );
        assert!(ok, "{err}");
        serde_json::from_str(out.trim()).unwrap()
    };
    let listed = keys();
    assert!(
        listed
            .iter()
            .any(|k| k.starts_with("prod/tally/manifests/date=")),
        "{listed:?}"
    );
    let open: Vec<String> = listed
        .iter()
        .filter_map(|k| k.strip_prefix("prod/tally/staging/date="))
        .map(|r| r.split('/').next().unwrap().to_owned())
        .collect();
    assert!(!open.is_empty(), "{listed:?}");
    // Compact the open day by hand against the same store: verified, then unchanged.
    let mut c = tally();
    c.args([
        "compact",
        "--quiet",
        "--date",
        &open[0],
        "--data-dir",
        s(&data),
        "--lake",
        lake,
    ]);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("0 failed verification") && !said.contains(" 0 published"),
        "{said}"
    );
    let out = c.output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 published"));
    let after = keys();
    assert!(
        !after
            .iter()
            .any(|k| k.starts_with("prod/tally/staging/date=")),
        "{after:?}"
    );
    // Every event file downloaded and read by DuckDB gives the store's day figures.
    let local = tmp.path().join("download");
    let (ok, _, err) = boto(&format!(
        "import os\n\
         r = s3.list_objects_v2(Bucket='tally-lake', Prefix='prod/tally/events/')\n\
         for o in r.get('Contents', []):\n\
         \x20   p = os.path.join('{}', o['Key'][len('prod/tally/'):])\n\
         \x20   os.makedirs(os.path.dirname(p), exist_ok=True)\n\
         \x20   s3.download_file('tally-lake', o['Key'], p)",
        s(&local)
    ));
    assert!(ok, "{err}");
    let got = duck_day_figures(&format!("'{}/events/*/*/*.parquet'", s(&local)));
    assert_eq!(got, export_day_figures(&pipeline(), &export));
    let _ = moto.kill();
    let _ = moto.wait();
}

/// With Redis, a range older than the retention is answered from the lake's daily
/// aggregates: ListWindows over days whose hour rows Redis has dropped gives every
/// row an embedded store (which keeps all) has.
#[test]
fn old_ranges_come_from_the_lake_once_redis_has_dropped_them() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pipe = d.join("short-retention.toml");
    let text = DEFAULT_PIPELINE
        .replace("max_events = 100000", "max_events = 100")
        .replace("\"1h\" = \"35d\"", "\"1h\" = \"30h\"")
        .replace("\"1d\" = \"400d\"", "\"1d\" = \"1d\"");
    assert_ne!(text, DEFAULT_PIPELINE);
    std::fs::write(&pipe, text).unwrap();
    let keys = d.join("keys.json");
    let key = |role: &[&str]| {
        let mut args = vec!["keys", "add", "--keys", s(&keys)];
        args.extend_from_slice(role);
        String::from_utf8(common::ok(&args).stdout)
            .unwrap()
            .trim()
            .to_owned()
    };
    let (claro, admin) = (key(&["--provider", "claro"]), key(&["--admin"]));
    let input = d.join("events.jsonl");
    common::gen_to(
        &input,
        &[
            "--events",
            "60000",
            "--events-per-second",
            "0.4",
            "--seed",
            "77",
        ],
    );
    // What an embedded store, which keeps every row, holds.
    let (reference, full) = (d.join("ref"), d.join("full.jsonl"));
    common::ok(&[
        "run",
        s(&input),
        "--until-eof",
        "--no-archive",
        "--data-dir",
        s(&reference),
        "--pipeline",
        s(&pipe),
        "--export",
        s(&full),
    ]);
    let redis = common::redis::RedisServer::start();
    let port = common::redis::free_port();
    let data = d.join("d");
    let mut child = tally()
        .args(["run", s(&input), "--follow", "--data-dir", s(&data)])
        .args([
            "--pipeline",
            s(&pipe),
            "--redis",
            &redis.url(),
            "--keys",
            s(&keys),
        ])
        .args(["--grpc-addr", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    let addr = format!("http://127.0.0.1:{port}");
    let query = |key: &str, args: &[&str]| {
        tally()
            .args(["query", "--addr", &addr, "--json"])
            .args(args)
            .env("TALLY_API_KEY", key)
            .output()
            .unwrap()
    };
    let manifest = data.join("lake/manifests/date=2026-11-16.json");
    common::wait_for(
        "every record committed and the days compacted",
        std::time::Duration::from_secs(120),
        || {
            let out = query(&admin, &["status"]);
            out.status.success()
                && serde_json::from_slice::<Value>(&out.stdout).unwrap()["records"] == 60_000
                && manifest.exists()
        },
    );
    let hours = |rows: &[Value]| -> Vec<Value> {
        rows.iter()
            .filter(|r| {
                r["view"] == "provider_window" && r["window"] == "1h" && r["provider_id"] == "claro"
            })
            .map(|r| {
                let mut v = r.clone();
                let o = v.as_object_mut().unwrap();
                o.remove("provider_id");
                o.retain(|_, x| !x.is_null());
                v
            })
            .collect()
    };
    let want = hours(&export_rows(&full));
    // Redis has dropped the hours of the first days.
    let held = d.join("redis.jsonl");
    common::ok(&[
        "export",
        "--redis",
        &redis.url(),
        "--data-dir",
        s(&data),
        "--out",
        s(&held),
    ]);
    let in_redis = hours(&export_rows(&held));
    assert!(
        in_redis.len() + 8 <= want.len(),
        "Redis holds {} of {} hour rows: nothing to read from the lake",
        in_redis.len(),
        want.len()
    );
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
            "2026-11-25T00:00:00Z",
            "--page-size",
            "50",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
    let _ = child.kill();
    let _ = child.wait();
}
