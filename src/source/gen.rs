//! A deterministic, seeded generator of realistic sales events, for the demo, tests
//! and benchmarks: the same options always give the same bytes.
//!
//! - providers and products are Zipf-skewed; each provider has its currency, regions
//!   and a catalogue with fixed prices;
//! - event time advances with daily (quiet nights, busy evenings) and weekly (busier
//!   weekends) seasonality;
//! - refunds of earlier sales; voids of earlier sales and refunds, some sent before
//!   their target; redeliveries (the same record again); out-of-order events (within
//!   10 minutes, inside the default 15-minute lateness) and late ones (hours behind);
//! - with `bad_rate > 0`, bad records of every dead-letter reason, in turn.

use super::{Line, SourceMsg};
use crate::decode::{decode, Field, Problem, Reason};
use crate::model::Millis;
use crossbeam_channel::Sender;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenOptions {
    pub seed: u64,
    /// How many records; `None` for an endless stream.
    pub events: Option<u64>,
    /// Event time of the first event.
    pub start: Millis,
    /// Average events per second of event time (sets how many days N events span).
    pub events_per_second: f64,
    pub providers: usize,
    pub products: usize,
    pub customers: usize,
    /// Fraction of records that are bad, cycling through every reason.
    pub bad_rate: f64,
    /// Fraction of late events (hours behind; dead letters `late`).
    pub late_rate: f64,
    /// Emit at most this many records per wall-clock second (live streams); `None`: as fast as possible.
    pub rate: Option<f64>,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            seed: 42,
            events: Some(10_000),
            start: 1_795_000_000_000, // 2026-11-18T...Z
            events_per_second: 50.0,
            providers: 12,
            products: 400,
            customers: 50_000,
            bad_rate: 0.0,
            late_rate: 0.002,
            rate: None,
        }
    }
}

const NAMES: [(&str, &str, &str); 12] = [
    ("claro", "COP", "-05:00"),
    ("tigo", "COP", "-05:00"),
    ("oxxo", "MXN", "-06:00"),
    ("rappi", "BRL", "-03:00"),
    ("exito", "COP", "-05:00"),
    ("movistar", "PEN", "-05:00"),
    ("falabella", "CLP", "-03:00"),
    ("mercado", "ARS", "-03:00"),
    ("walmart", "USD", "Z"),
    ("bodega", "USD", "-04:00"),
    ("cinepolis", "MXN", "-06:00"),
    ("avianca", "USD", "-05:00"),
];
const REGIONS: [&str; 5] = ["andina", "caribe", "pacifico", "orinoquia", "amazonia"];
const CHANNELS: [&str; 3] = ["pos", "web", "app"];

/// Sampling from a Zipf(s=1.1) distribution over `0..n` by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n.max(1))
            .map(|k| {
                acc += 1.0 / (k as f64).powf(1.1);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut SmallRng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

#[derive(Clone)]
struct Sent {
    id: String,
    provider: usize,
    product: usize,
    customer: u64,
    amount: i64,
    is_void: bool,
    line: String,
}

/// The generator: an iterator of records (lines without newline).
pub struct Generator {
    o: GenOptions,
    rng: SmallRng,
    providers: Zipf,
    products: Zipf,
    seq: u64,
    emitted: u64,
    now: Millis,
    recent: VecDeque<Sent>,
    queued: VecDeque<Vec<u8>>,
    bad_turn: usize,
    reasons: Vec<Reason>,
}

impl Generator {
    pub fn new(o: GenOptions) -> Generator {
        let providers = Zipf::new(o.providers.clamp(1, NAMES.len() * 100));
        let products = Zipf::new(o.products.max(1));
        Generator {
            rng: SmallRng::seed_from_u64(o.seed),
            now: o.start,
            providers,
            products,
            seq: 0,
            emitted: 0,
            recent: VecDeque::new(),
            queued: VecDeque::new(),
            bad_turn: 0,
            reasons: Reason::all(),
            o,
        }
    }

    fn provider(&self, p: usize) -> (String, &'static str, &'static str) {
        let (name, cur, off) = NAMES[p % NAMES.len()];
        if p < NAMES.len() {
            (name.to_owned(), cur, off)
        } else {
            (format!("{name}-{}", p / NAMES.len()), cur, off)
        }
    }

    /// Relative intensity at an instant: daily and weekly seasonality.
    fn intensity(t: Millis) -> f64 {
        let hour = (t.rem_euclid(86_400_000) as f64) / 3_600_000.0;
        let day = (t.div_euclid(86_400_000) + 4).rem_euclid(7); // 0 = Sunday
        let daily =
            0.35 + 0.65 * (((hour - 9.0) / 24.0 * std::f64::consts::TAU).sin().max(0.0) + 0.2);
        let weekly = if day == 0 || day == 6 { 1.3 } else { 1.0 };
        daily * weekly
    }

    fn next_id(&mut self, provider: &str) -> String {
        self.seq += 1;
        format!("{provider}-{:010}", self.seq)
    }

    fn ts_text(&mut self, ts: Millis, offset: &str) -> String {
        if self.rng.random_bool(0.3) {
            return ts.to_string();
        }
        let secs = match offset {
            "Z" => 0,
            o => {
                let sign = if o.starts_with('-') { -1 } else { 1 };
                sign * (o[1..3].parse::<i32>().unwrap_or(0) * 3600
                    + o[4..6].parse::<i32>().unwrap_or(0) * 60)
            }
        };
        let tz = chrono::FixedOffset::east_opt(secs).expect("offset");
        let t = chrono::DateTime::from_timestamp_millis(ts)
            .expect("ts")
            .with_timezone(&tz);
        format!(
            "\"{}\"",
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    }

    fn amount_text(&mut self, h: i64) -> String {
        if self.rng.random_bool(0.5) {
            format!("\"{}.{:02}\"", h / 100, h % 100)
        } else if h % 100 == 0 {
            format!("{}", h / 100)
        } else {
            format!("{}.{:02}", h / 100, h % 100)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn line(
        &mut self,
        id: &str,
        p: usize,
        product: usize,
        customer: u64,
        kind: &str,
        amount: Option<i64>,
        ts: Millis,
        r#ref: Option<&str>,
    ) -> String {
        let (name, cur, off) = self.provider(p);
        let ts = self.ts_text(ts, off);
        let mut s = format!(
            "{{\"event_id\":\"{id}\",\"provider_id\":\"{name}\",\"product_id\":\"sku-{product:04}\",\"customer_id\":\"c-{customer}\",\"kind\":\"{kind}\""
        );
        if let Some(a) = amount {
            let a = self.amount_text(a);
            s.push_str(&format!(",\"amount\":{a}"));
        }
        s.push_str(&format!(",\"currency\":\"{cur}\",\"ts\":{ts}"));
        if let Some(r) = r#ref {
            s.push_str(&format!(",\"ref_event_id\":\"{r}\""));
        }
        if self.rng.random_bool(0.8) {
            let region = REGIONS[(customer as usize + p) % REGIONS.len()];
            let channel = CHANNELS[self.rng.random_range(0..CHANNELS.len())];
            s.push_str(&format!(
                ",\"attrs\":{{\"region\":\"{region}\",\"channel\":\"{channel}\"}}"
            ));
        }
        s.push('}');
        s
    }

    fn price(&self, p: usize, product: usize) -> i64 {
        let (_, cur, _) = NAMES[p % NAMES.len()];
        let base = match cur {
            "COP" | "CLP" | "ARS" => 2_000_000,
            _ => 2_000,
        };
        let h = xxhash_rust::xxh3::xxh3_64(&(p as u64 * 1_000_003 + product as u64).to_le_bytes());
        base / 10 + (h % base as u64) as i64
    }

    fn remember(&mut self, s: Sent) {
        self.recent.push_back(s);
        if self.recent.len() > 4096 {
            self.recent.pop_front();
        }
    }

    fn pick_recent(&mut self) -> Option<Sent> {
        if self.recent.is_empty() {
            return None;
        }
        let i = self.recent.len() - 1 - self.rng.random_range(0..self.recent.len().min(512));
        Some(self.recent[i].clone())
    }

    fn good(&mut self) -> String {
        let step = 1000.0 / self.o.events_per_second / Self::intensity(self.now)
            * (0.5 + self.rng.random::<f64>());
        self.now += step as Millis;
        let roll: f64 = self.rng.random();
        if roll < 0.02 {
            if let Some(s) = self.pick_recent() {
                return s.line; // a redelivery
            }
        }
        if roll < 0.08 {
            if let Some(s) = self.pick_recent().filter(|s| !s.is_void) {
                let id = self.next_id(&self.provider(s.provider).0);
                let ts = self.now;
                let amount = (s.amount / 2).max(1);
                let line = self.line(
                    &id,
                    s.provider,
                    s.product,
                    s.customer,
                    "refund",
                    Some(amount),
                    ts,
                    Some(&s.id),
                );
                self.remember(Sent {
                    id,
                    amount,
                    is_void: false,
                    line: line.clone(),
                    ..s
                });
                return line;
            }
        }
        if roll < 0.105 {
            if let Some(s) = self.pick_recent().filter(|s| !s.is_void) {
                let id = self.next_id(&self.provider(s.provider).0);
                let line = self.line(
                    &id,
                    s.provider,
                    s.product,
                    s.customer,
                    "void",
                    None,
                    self.now,
                    Some(&s.id),
                );
                self.remember(Sent {
                    id,
                    is_void: true,
                    line: line.clone(),
                    ..s
                });
                return line;
            }
        }
        let p = self.providers.sample(&mut self.rng);
        let product = self.products.sample(&mut self.rng);
        let customer = self.rng.random_range(0..self.o.customers.max(1) as u64);
        let amount = self.price(p, product) * self.rng.random_range(1..=3);
        let mut ts = self.now;
        if (0.115..0.165).contains(&roll) {
            ts -= self.rng.random_range(1_000..600_000); // out of order, inside lateness
        } else if (0.165..0.165 + self.o.late_rate).contains(&roll) {
            ts -= self.rng.random_range(7_200_000..21_600_000); // hours behind: late
        }
        let id = self.next_id(&self.provider(p).0);
        let line = self.line(&id, p, product, customer, "sale", Some(amount), ts, None);
        if (0.105..0.115).contains(&roll) {
            // A void sent before its target.
            let vid = self.next_id(&self.provider(p).0);
            let void = self.line(&vid, p, product, customer, "void", None, ts, Some(&id));
            self.queued.push_back(line.clone().into_bytes());
            self.remember(Sent {
                id: vid,
                provider: p,
                product,
                customer,
                amount: 0,
                is_void: true,
                line: void.clone(),
            });
            return void;
        }
        self.remember(Sent {
            id,
            provider: p,
            product,
            customer,
            amount,
            is_void: false,
            line: line.clone(),
        });
        line
    }

    /// A record that is a dead letter for `reason`.
    fn bad(&mut self, reason: Reason) -> Vec<u8> {
        let p = self.providers.sample(&mut self.rng);
        let (name, cur, _) = self.provider(p);
        let id = self.next_id(&name);
        let ts = self.now;
        let mut obj = serde_json::json!({
            "event_id": id, "provider_id": name, "product_id": "sku-0001", "customer_id": "c-1",
            "kind": "sale", "amount": "10.00", "currency": cur, "ts": ts,
        });
        let set = |o: &mut serde_json::Value, k: &str, v: serde_json::Value| {
            o.as_object_mut().expect("object").insert(k.to_owned(), v);
        };
        match reason {
            Reason::InvalidUtf8 => return b"{\"event_id\":\"\xff\xfe\"}".to_vec(),
            Reason::InvalidJson => {
                return match self.bad_turn % 3 {
                    0 => b"{\"event_id\":\"x\",".to_vec(),
                    1 => b"{\"event_id\":\"a\",\"event_id\":\"b\"}".to_vec(),
                    _ => b"{\"amount\":NaN}".to_vec(),
                }
            }
            Reason::NotObject => return b"[1,2,3]".to_vec(),
            Reason::Field(f, prob) => {
                if f == Field::RefEventId {
                    set(&mut obj, "kind", "void".into());
                }
                let key = f.name();
                match prob {
                    Problem::Missing => {
                        obj.as_object_mut().expect("object").remove(key);
                    }
                    Problem::Type => set(&mut obj, key, serde_json::Value::Null),
                    Problem::Invalid => {
                        let v: serde_json::Value = match f {
                            Field::EventId
                            | Field::ProductId
                            | Field::CustomerId
                            | Field::RefEventId => "".into(),
                            Field::ProviderId => "no spaces allowed".into(),
                            Field::Kind => "gift".into(),
                            Field::Amount => "12.345".into(),
                            Field::Currency => "usd".into(),
                            Field::Ts => "2026-02-30T10:00:00Z".into(),
                            Field::Attrs => serde_json::json!({"region": 5}),
                        };
                        set(&mut obj, key, v);
                    }
                }
            }
            Reason::Late => set(&mut obj, "ts", (ts - 30 * 3_600_000).into()),
            Reason::ConflictingDuplicate => {
                // An earlier event's id again, with another customer.
                if let Some(s) = self.pick_recent() {
                    return s
                        .line
                        .replacen("\"customer_id\":\"", "\"customer_id\":\"other-", 1)
                        .into_bytes();
                }
                return self.good().into_bytes();
            }
            Reason::VoidTargetsVoid | Reason::VoidProviderMismatch => {
                let want_void = reason == Reason::VoidTargetsVoid;
                let target = self
                    .recent
                    .iter()
                    .rev()
                    .find(|s| s.is_void == want_void && (want_void || s.provider != p))
                    .cloned();
                match target {
                    Some(t) => {
                        let vp = if want_void { t.provider } else { p };
                        let vid = self.next_id(&self.provider(vp).0);
                        return self
                            .line(&vid, vp, 1, 1, "void", None, self.now, Some(&t.id))
                            .into_bytes();
                    }
                    None => return self.good().into_bytes(),
                }
            }
        }
        serde_json::to_vec(&obj).expect("json")
    }
}

impl Iterator for Generator {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.o.events.is_some_and(|n| self.emitted >= n) {
            return None;
        }
        self.emitted += 1;
        if let Some(q) = self.queued.pop_front() {
            return Some(q);
        }
        if self.o.bad_rate > 0.0 && self.rng.random_bool(self.o.bad_rate.min(1.0)) {
            let reason = self.reasons[self.bad_turn % self.reasons.len()];
            self.bad_turn += 1;
            return Some(self.bad(reason));
        }
        Some(self.good().into_bytes())
    }
}

/// Streams generated records to the ingest loop, skipping the first `skip_bytes`
/// (a committed position) and pacing to `rate` records per second when set.
pub(super) fn stream(
    idx: u32,
    o: GenOptions,
    skip_bytes: u64,
    tx: &Sender<SourceMsg>,
    stop: &AtomicBool,
) {
    let rate = o.rate;
    let mut offset = 0u64;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut batch = Vec::with_capacity(super::BATCH);
    for raw in Generator::new(o) {
        let end = offset + raw.len() as u64 + 1;
        if end <= skip_bytes {
            offset = end;
            continue;
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let decoded = decode(&raw);
        batch.push(Line {
            offset,
            end,
            raw,
            decoded,
        });
        offset = end;
        sent += 1;
        let pace = rate.map(|r| started + Duration::from_secs_f64(sent as f64 / r));
        if batch.len() >= super::BATCH || pace.is_some() && batch.len() >= 64 {
            if tx
                .send(SourceMsg::Lines {
                    source: idx,
                    lines: std::mem::take(&mut batch),
                    checkpoint: None,
                })
                .is_err()
            {
                return;
            }
            if let Some(at) = pace {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(SourceMsg::Lines {
            source: idx,
            lines: batch,
            checkpoint: None,
        });
    }
}
