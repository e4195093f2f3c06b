//! The dataflow against the reference model (tests/common/reference.rs), at 1 and 3
//! workers, with random epoch splits: dedup, conflicting duplicates, voids in both
//! orders, void of void, cross-provider voids, orphans, refunds, lateness, expiry
//! and sealing (a short horizon), and two time zones. The reference ignores the
//! splits, so every split must give the same outcome.

mod common;

use common::reference::{reference, Outcome};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tally::dataflow::{run_epochs, Fact, Out, Record};
use tally::decode::decode;
use tally::model::{Event, Millis, Position};
use tally::pipeline::Pipeline;

const PIPELINE: &str = r#"
allowed_lateness = "15m"
dedup_horizon = "2h"
[time_zones.providers]
b = "America/Bogota"
[[views]]
name = "pw"
group_by = ["provider_id", "currency"]
windows = ["1h", "1d"]
metrics = ["sales_count", "gross_amount", "refunds_count", "refunds_amount", "net_amount", "distinct_customers", "min_ticket", "max_ticket"]
[[views]]
name = "prod"
group_by = ["provider_id", "product_id", "currency"]
windows = ["1d"]
metrics = ["sales_count", "net_amount"]
[[views]]
name = "region"
group_by = ["provider_id", "attrs.region", "currency"]
windows = ["15m"]
metrics = ["refunds_count", "gross_amount"]
[[views]]
name = "top"
group_by = ["provider_id", "currency"]
windows = ["1d"]
top_k = { k = 2, key = "product_id", by = "net_amount" }
"#;

#[derive(Clone, Debug)]
enum Op {
    /// A sale or refund with a (possibly reused) id.
    Sale {
        id: u8,
        provider: u8,
        product: u8,
        customer: u8,
        amount: u16,
        refund: bool,
        usd: bool,
        region: u8,
        dt: i64,
    },
    Void {
        id: u8,
        target: u8,
        provider: u8,
        dt: i64,
    },
    /// An earlier record again, byte for byte.
    Redeliver(usize),
    /// Event time jumps ahead (past the horizon, to exercise expiry and sealing).
    Jump(i64),
}

fn op() -> impl Strategy<Value = Op> {
    let dt = -1_500_000i64..1_200_000;
    prop_oneof![
        6 => (0u8..40, 0u8..2, 0u8..4, 0u8..5, 0u16..500, prop::bool::weighted(0.2), prop::bool::weighted(0.2), 0u8..3, dt.clone())
            .prop_map(|(id, provider, product, customer, amount, refund, usd, region, dt)| Op::Sale { id, provider, product, customer, amount, refund, usd, region, dt }),
        2 => (40u8..60, 0u8..60, 0u8..2, dt).prop_map(|(id, target, provider, dt)| Op::Void { id, target, provider, dt }),
        1 => (0usize..1000).prop_map(Op::Redeliver),
        1 => (3_600_000i64..10_000_000).prop_map(Op::Jump),
    ]
}

/// Builds the records (as the source would read them) from the operations.
fn lines(ops: &[Op]) -> Vec<String> {
    let mut now: Millis = 1_795_318_200_000; // 2026-11-22T03:30:00Z, near Bogota's midnight
    let mut out: Vec<String> = Vec::new();
    for op in ops {
        let line = match op {
            Op::Sale {
                id,
                provider,
                product,
                customer,
                amount,
                refund,
                usd,
                region,
                dt,
            } => {
                now += dt.abs() / 4;
                let p = ["a", "b"][*provider as usize];
                let kind = if *refund { "refund" } else { "sale" };
                let cur = if *usd { "USD" } else { "COP" };
                let attrs = match region {
                    0 => String::new(),
                    r => format!(",\"attrs\":{{\"region\":\"r{r}\"}}"),
                };
                format!(
                    "{{\"event_id\":\"e{id}\",\"provider_id\":\"{p}\",\"product_id\":\"p{product}\",\"customer_id\":\"c{customer}\",\"kind\":\"{kind}\",\"amount\":\"{}.{:02}\",\"currency\":\"{cur}\",\"ts\":{}{attrs}}}",
                    amount / 10,
                    amount % 10 * 7,
                    now + dt
                )
            }
            Op::Void {
                id,
                target,
                provider,
                dt,
            } => {
                let p = ["a", "b"][*provider as usize];
                format!(
                    "{{\"event_id\":\"e{id}\",\"provider_id\":\"{p}\",\"product_id\":\"p0\",\"customer_id\":\"c0\",\"kind\":\"void\",\"currency\":\"COP\",\"ts\":{},\"ref_event_id\":\"e{target}\"}}",
                    now + dt
                )
            }
            Op::Redeliver(i) if !out.is_empty() => out[i % out.len()].clone(),
            Op::Redeliver(_) => continue,
            Op::Jump(ms) => {
                now += ms;
                continue;
            }
        };
        out.push(line);
    }
    out
}

/// Epochs as the dataflow takes them (records, clock) and as the reference takes them.
type Split = (Vec<(Vec<Record>, Millis)>, Vec<Vec<(Event, Position)>>);

/// Splits records into epochs at the given cut flags, computing each record's
/// watermark and each epoch's clock exactly as ingest does.
fn epochs(p: &Pipeline, lines: &[String], cuts: &[bool]) -> Split {
    let lateness = p.allowed_lateness.as_millis() as Millis;
    let mut clock = Millis::MIN;
    let mut df = vec![(Vec::new(), clock)];
    let mut reference = vec![Vec::new()];
    for (i, l) in lines.iter().enumerate() {
        if i > 0 && cuts[i % cuts.len()] {
            df.push((Vec::new(), clock));
            reference.push(Vec::new());
        }
        let event = decode(l.as_bytes()).expect("test records are valid");
        let pos = Position {
            source: 0,
            offset: i as u64 * 1000,
        };
        let wm = if clock == Millis::MIN {
            Millis::MIN
        } else {
            clock - lateness
        };
        clock = clock.max(event.ts);
        reference.last_mut().unwrap().push((event.clone(), pos));
        let last = df.last_mut().unwrap();
        last.0.push(Record {
            event: Box::new(event),
            pos,
            wm,
            raw: l.as_str().into(),
        });
        last.1 = clock;
    }
    (df, reference)
}

fn dataflow(p: &Arc<Pipeline>, workers: usize, epochs: Vec<(Vec<Record>, Millis)>) -> Outcome {
    let mut outputs = run_epochs(Arc::clone(p), workers, epochs);
    outputs.sort_by_key(|o| (o.epoch, o.worker));
    let mut got = Outcome::default();
    let mut voided = BTreeSet::new();
    for o in outputs {
        for item in o.out {
            match item {
                Out::Row(u) => match u.value {
                    Some(v) => {
                        got.rows.insert((u.key, u.rank), v);
                    }
                    None => {
                        assert!(
                            got.rows.remove(&(u.key, u.rank)).is_some(),
                            "deleted a row that was never there"
                        );
                    }
                },
                Out::Dead(d) => {
                    assert!(
                        got.dead.insert((d.pos, d.reason.code())),
                        "two dead letters for one record"
                    );
                }
                Out::Orphan { provider } => *got.orphans.entry(provider).or_default() += 1,
                Out::Duplicate => got.duplicates += 1,
                Out::Fact(f) => match *f {
                    Fact::Counted { event, .. } => {
                        assert!(
                            got.counted.insert((event.event_id.to_string(), event.ts)),
                            "an event counted twice"
                        );
                    }
                    Fact::Voided {
                        void, target_ts, ..
                    } => {
                        let target = void.ref_event_id.expect("a void has a target");
                        assert!(
                            voided.insert((target.to_string(), target_ts)),
                            "an event voided twice"
                        );
                    }
                },
            }
        }
    }
    // Applied as sets, as compaction does.
    for v in &voided {
        assert!(
            got.counted.remove(v),
            "a void of an event never counted: {v:?}"
        );
    }
    got
}

fn check(ops: Vec<Op>, cuts: Vec<bool>) -> Result<(), TestCaseError> {
    let p = Arc::new(Pipeline::parse("test.toml", PIPELINE).unwrap());
    let lines = lines(&ops);
    let (df_epochs, ref_epochs) = epochs(&p, &lines, &cuts);
    let want = reference(&p, &ref_epochs);
    for workers in [1, 3] {
        let got = dataflow(&p, workers, df_epochs.clone());
        if got.dead != want.dead {
            let sizes: Vec<usize> = df_epochs.iter().map(|e| e.0.len()).collect();
            std::fs::write(
                "/tmp/fail.txt",
                format!("{sizes:?}\n{}\n", lines.join("\n")),
            )
            .unwrap();
        }
        prop_assert_eq!(
            &got.dead,
            &want.dead,
            "dead letters differ at {} workers",
            workers
        );
        prop_assert_eq!(&got.duplicates, &want.duplicates);
        prop_assert_eq!(&got.orphans, &want.orphans);
        prop_assert_eq!(
            &got.counted,
            &want.counted,
            "the archive's facts differ from the counted events at {} workers",
            workers
        );
        let diff: BTreeMap<_, _> = want
            .rows
            .iter()
            .filter(|(k, v)| got.rows.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), (Some(v.clone()), got.rows.get(k).cloned())))
            .chain(
                got.rows
                    .iter()
                    .filter(|(k, _)| !want.rows.contains_key(*k))
                    .map(|(k, v)| (k.clone(), (None, Some(v.clone())))),
            )
            .collect();
        prop_assert!(
            diff.is_empty(),
            "{} workers: rows differ (key: (want, got)): {:#?}",
            workers,
            diff
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn dataflow_matches_the_reference_model(ops in prop::collection::vec(op(), 1..120), cuts in prop::collection::vec(prop::bool::weighted(0.15), 1..40)) {
        check(ops, cuts)?;
    }
}

/// The generated workload (every kind of trouble `tally gen` makes) agrees too.
#[test]
fn generated_stream_matches_the_reference_model() {
    let p = Arc::new(Pipeline::parse("sales.toml", tally::pipeline::DEFAULT_PIPELINE).unwrap());
    let g = tally::source::gen::GenOptions {
        events: Some(20_000),
        seed: 3,
        ..Default::default()
    };
    let lines: Vec<String> = tally::source::gen::Generator::new(g)
        .map(|l| String::from_utf8(l).unwrap())
        .collect();
    let cuts: Vec<bool> = (0..997).map(|i| i % 331 == 0).collect();
    let (df_epochs, ref_epochs) = epochs(&p, &lines, &cuts);
    let want = reference(&p, &ref_epochs);
    assert!(
        want.rows.len() > 1000 && want.dead.len() > 10 && want.duplicates > 100,
        "the workload exercises the rules"
    );
    for workers in [1, 2] {
        let got = dataflow(&p, workers, df_epochs.clone());
        assert_eq!(got.dead, want.dead);
        assert_eq!(got.duplicates, want.duplicates);
        assert!(got.rows == want.rows, "rows differ at {workers} workers");
    }
}

/// What a record finds past the dedup horizon does not depend on where epochs were cut:
/// a void of a target past its horizon does not cancel it, and a redelivery past its
/// horizon is a new (and late) event, not a silent duplicate, in one epoch as in four.
#[test]
fn the_horizon_is_judged_at_each_record_not_at_epoch_ends() {
    let p = Arc::new(Pipeline::parse("test.toml", PIPELINE).unwrap());
    let t0: Millis = 1_795_318_200_000;
    let later = t0 + 2 * 3_600_000 + 60_000; // past e1's horizon of 2 h
    let sale = |id: &str, ts: Millis| {
        format!("{{\"event_id\":\"{id}\",\"provider_id\":\"a\",\"product_id\":\"p\",\"customer_id\":\"c\",\"kind\":\"sale\",\"amount\":\"10.00\",\"currency\":\"COP\",\"ts\":{ts}}}")
    };
    let lines = vec![
        sale("e1", t0),
        sale("e2", later),
        format!("{{\"event_id\":\"e3\",\"provider_id\":\"a\",\"product_id\":\"p\",\"customer_id\":\"c\",\"kind\":\"void\",\"currency\":\"COP\",\"ts\":{later},\"ref_event_id\":\"e1\"}}"),
        sale("e1", t0),
    ];
    let mut outcomes = Vec::new();
    for cut in 0..8u8 {
        let cuts: Vec<bool> = (0..4).map(|i| i > 0 && cut & (1 << (i - 1)) != 0).collect();
        let (df_epochs, ref_epochs) = epochs(&p, &lines, &cuts);
        let want = reference(&p, &ref_epochs);
        for workers in [1, 2] {
            let got = dataflow(&p, workers, df_epochs.clone());
            assert_eq!(got, want, "cuts {cut:03b} at {workers} workers");
        }
        outcomes.push(want);
    }
    let first = &outcomes[0];
    assert!(outcomes.iter().all(|o| o == first));
    let e1 = ("e1".to_string(), t0);
    assert!(
        first.counted.contains(&e1),
        "the void past e1's horizon left it counted"
    );
    assert_eq!(first.duplicates, 0);
    let late = Position {
        source: 0,
        offset: 3000,
    };
    assert!(first.dead.contains(&(late, "late")), "{:?}", first.dead);
}
