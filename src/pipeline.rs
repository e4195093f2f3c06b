//! Pipeline files (pipelines/*.toml): sources, views, lateness, dedup horizon,
//! epochs, provider time zones, dead letters. Every key is documented in
//! pipelines/README.md.
//!
//! A file is parsed once, at start; anything wrong (unknown key, bad duration,
//! unknown zone, metric or field, a view that would sum across currencies...) is
//! a [`PipelineError`] naming the file, the line and the reason.

use crate::model::window::WindowSize;
use chrono_tz::Tz;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// A pipeline file that cannot be used: where and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct PipelineError {
    pub file: String,
    /// 1-based; 0 when the file could not be read at all.
    pub line: usize,
    pub reason: String,
}

/// A field a view can group by. `provider_id` is always first.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GroupField {
    ProviderId,
    ProductId,
    CustomerId,
    Currency,
    /// `attrs.<name>`; events without the attribute group under "".
    Attr(String),
}

impl GroupField {
    pub fn parse(s: &str) -> Result<GroupField, String> {
        Ok(match s {
            "provider_id" => GroupField::ProviderId,
            "product_id" => GroupField::ProductId,
            "customer_id" => GroupField::CustomerId,
            "currency" => GroupField::Currency,
            _ => match s.strip_prefix("attrs.") {
                Some(n) if !n.is_empty() => GroupField::Attr(n.to_owned()),
                _ => {
                    return Err(format!(
                        "unknown field '{s}': expected provider_id, product_id, customer_id, currency or attrs.<name>"
                    ))
                }
            },
        })
    }

    /// The name used in exports and the API (`attrs.region` for an attribute).
    pub fn name(&self) -> String {
        match self {
            GroupField::ProviderId => "provider_id".into(),
            GroupField::ProductId => "product_id".into(),
            GroupField::CustomerId => "customer_id".into(),
            GroupField::Currency => "currency".into(),
            GroupField::Attr(n) => format!("attrs.{n}"),
        }
    }
}

/// A metric a view can keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    SalesCount,
    GrossAmount,
    RefundsCount,
    RefundsAmount,
    NetAmount,
    DistinctCustomers,
    MinTicket,
    MaxTicket,
}

impl Metric {
    pub const ALL: [Metric; 8] = [
        Metric::SalesCount,
        Metric::GrossAmount,
        Metric::RefundsCount,
        Metric::RefundsAmount,
        Metric::NetAmount,
        Metric::DistinctCustomers,
        Metric::MinTicket,
        Metric::MaxTicket,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::SalesCount => "sales_count",
            Metric::GrossAmount => "gross_amount",
            Metric::RefundsCount => "refunds_count",
            Metric::RefundsAmount => "refunds_amount",
            Metric::NetAmount => "net_amount",
            Metric::DistinctCustomers => "distinct_customers",
            Metric::MinTicket => "min_ticket",
            Metric::MaxTicket => "max_ticket",
        }
    }

    /// Whether the metric is an amount of money (and so needs `currency` in the group).
    pub fn is_money(self) -> bool {
        !matches!(
            self,
            Metric::SalesCount | Metric::RefundsCount | Metric::DistinctCustomers
        )
    }

    /// Whether the metric is a plain sum, so it can rank a top-k.
    pub fn is_sum(self) -> bool {
        !matches!(
            self,
            Metric::DistinctCustomers | Metric::MinTicket | Metric::MaxTicket
        )
    }
}

/// A top-k ranking: the `k` values of `key` with the largest `by`, ties by key bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopK {
    pub k: usize,
    pub key: GroupField,
    pub by: Metric,
}

/// One view: a group-by, windows, and either metrics or a top-k.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub name: String,
    pub group_by: Vec<GroupField>,
    pub windows: Vec<WindowSize>,
    /// Empty for a top-k view.
    pub metrics: Vec<Metric>,
    pub top_k: Option<TopK>,
}

/// Where events come from when the command line names no inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// JSON Lines files or directories of them, read in name order.
    Files {
        paths: Vec<PathBuf>,
        follow: bool,
    },
    Stdin,
    /// Every shard of a Kinesis stream.
    Kinesis(crate::source::kinesis::KinesisSpec),
    /// Every partition of a Fluvio topic.
    Fluvio(crate::source::fluvio::FluvioSpec),
}

/// A validated pipeline.
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub name: String,
    pub file: String,
    pub allowed_lateness: Duration,
    pub dedup_horizon: Duration,
    pub epoch_max_duration: Duration,
    pub epoch_max_events: usize,
    pub dead_letters: PathBuf,
    pub default_time_zone: Tz,
    pub time_zones: BTreeMap<String, Tz>,
    pub sources: Vec<SourceSpec>,
    pub views: Vec<View>,
    /// Row TTL per window size in the Redis store (`[retention]`); unlisted sizes use
    /// the store's defaults.
    pub retention: Vec<(WindowSize, Duration)>,
    /// Large-transaction alert thresholds (`[alerts]`).
    pub alerts: Alerts,
    /// The Parquet lake: staging of counted events and nightly compaction (`[archive]`).
    pub archive: Archive,
    /// The staging log's files (`[staging]`).
    pub staging: Staging,
}

/// How the staging log (the dataflow's input, replayed after a restart) is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staging {
    /// Once a file of the log holds this many bytes, the next epoch starts a new one;
    /// whole files are deleted once a restart would skip all their epochs.
    pub segment_size: u64,
}

impl Default for Staging {
    fn default() -> Self {
        Staging {
            segment_size: 64 << 20,
        }
    }
}

/// Where and how the archive keeps counted events (see `archive`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archive {
    /// Whether `tally run` stages counted events for compaction at all.
    pub enabled: bool,
    /// The lake: a path (relative to the data directory) or an `s3://bucket/prefix` URL.
    pub lake: String,
    /// How often staged facts are written to the lake (and at every shutdown).
    pub flush_interval: Duration,
    /// Target size of a compacted Parquet file, in bytes.
    pub target_file_size: u64,
    /// Whether `tally run` compacts each closed day by itself.
    pub schedule: bool,
}

impl Default for Archive {
    fn default() -> Self {
        Archive {
            enabled: true,
            lake: "lake".into(),
            flush_interval: Duration::from_secs(30),
            target_file_size: 128 << 20,
            schedule: true,
        }
    }
}

/// `128MiB`, `64MB`, `512KiB`, `1048576`: a size in bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid size '{s}': expected a whole number and a unit, as in 512KiB, 128MiB or 1GiB"
        )
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).filter(|&b| b > 0).ok_or_else(bad)
}

/// Large-transaction thresholds, in hundredths, per currency: a provider's own,
/// else the default. A sale or refund at or above its threshold is an alert.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Alerts {
    pub default: BTreeMap<String, i64>,
    pub providers: BTreeMap<String, BTreeMap<String, i64>>,
}

impl Alerts {
    pub fn is_empty(&self) -> bool {
        self.default.is_empty() && self.providers.is_empty()
    }

    /// The threshold of a provider's transactions in a currency, if any.
    pub fn threshold(&self, provider: &str, currency: &str) -> Option<i64> {
        self.providers
            .get(provider)
            .and_then(|m| m.get(currency))
            .or_else(|| self.default.get(currency))
            .copied()
    }
}

impl Pipeline {
    pub fn load(path: &Path) -> Result<Pipeline, PipelineError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError {
            file: file.clone(),
            line: 0,
            reason: format!("cannot read: {e}"),
        })?;
        Pipeline::parse(&file, &text)
    }

    /// Parses and validates pipeline text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Pipeline, PipelineError> {
        let at = |offset: usize, reason: String| PipelineError {
            file: file.to_owned(),
            line: text[..offset.min(text.len())].matches('\n').count() + 1,
            reason,
        };
        let raw: RawPipeline = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            at(offset, e.message().trim().to_owned())
        })?;
        raw.validate(file, &at)
    }

    /// The time zone of a provider's days.
    pub fn time_zone(&self, provider: &str) -> Tz {
        self.time_zones
            .get(provider)
            .copied()
            .unwrap_or(self.default_time_zone)
    }

    pub fn view(&self, name: &str) -> Option<&View> {
        self.views.iter().find(|v| v.name == name)
    }
}

/// A duration written as `250ms`, `30s`, `15m`, `48h` or `2d`.
#[derive(Clone, Copy, Debug)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!("invalid duration '{s}': expected a whole number and a unit, as in 250ms, 30s, 15m, 48h or 2d")
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_millis(ms))
}

struct Zone(Tz);

impl<'de> Deserialize<'de> for Zone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<Tz>().map(Zone).map_err(|_| {
            serde::de::Error::custom(format!(
                "unknown time zone '{s}': expected an IANA name such as America/Bogota or UTC"
            ))
        })
    }
}

struct Group(GroupField);

impl<'de> Deserialize<'de> for Group {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        GroupField::parse(&s)
            .map(Group)
            .map_err(serde::de::Error::custom)
    }
}

struct Size(WindowSize);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        WindowSize::parse(&s)
            .map(Size)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: Option<String>,
    allowed_lateness: Option<Spanned<Dur>>,
    dedup_horizon: Option<Spanned<Dur>>,
    dead_letters: Option<PathBuf>,
    #[serde(default)]
    epoch: RawEpoch,
    #[serde(default)]
    time_zones: RawZones,
    #[serde(default)]
    sources: Vec<RawSource>,
    views: Vec<RawView>,
    #[serde(default)]
    retention: BTreeMap<Spanned<String>, Spanned<Dur>>,
    #[serde(default)]
    alerts: RawAlerts,
    #[serde(default)]
    archive: RawArchive,
    #[serde(default)]
    staging: RawStaging,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStaging {
    segment_size: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawArchive {
    enabled: Option<bool>,
    lake: Option<String>,
    flush_interval: Option<Spanned<Dur>>,
    target_file_size: Option<Spanned<String>>,
    schedule: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    #[serde(default)]
    default: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    providers: BTreeMap<Spanned<String>, BTreeMap<Spanned<String>, Spanned<String>>>,
}

type Thresholds = BTreeMap<Spanned<String>, Spanned<String>>;

fn thresholds(
    m: Thresholds,
    at: &dyn Fn(usize, String) -> PipelineError,
) -> Result<BTreeMap<String, i64>, PipelineError> {
    let mut out = BTreeMap::new();
    for (c, v) in m {
        if crate::model::Currency::parse(c.get_ref()).is_none() {
            return Err(at(
                c.span().start,
                format!(
                    "alerts: '{}' is not a currency code (3 upper-case letters)",
                    c.get_ref()
                ),
            ));
        }
        let h = crate::decode::parse_money(v.get_ref()).ok_or_else(|| {
            at(
                v.span().start,
                format!(
                    "alerts: '{}' is not an amount (a decimal string, at most 2 fraction digits)",
                    v.get_ref()
                ),
            )
        })?;
        out.insert(c.into_inner(), h.hundredths());
    }
    Ok(out)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEpoch {
    max_duration: Option<Spanned<Dur>>,
    max_events: Option<Spanned<usize>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawZones {
    default: Option<Zone>,
    #[serde(default)]
    providers: BTreeMap<Spanned<String>, Zone>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
enum RawSource {
    Files {
        paths: Vec<PathBuf>,
        #[serde(default)]
        follow: bool,
    },
    Stdin,
    Kinesis {
        stream: String,
        start: Option<KinesisStart>,
        region: Option<String>,
        endpoint: Option<String>,
        poll_interval: Option<Dur>,
    },
    Fluvio {
        topic: String,
        start: Option<FluvioStart>,
        endpoint: Option<String>,
        poll_interval: Option<Dur>,
    },
}

/// `beginning`, `end` or an offset.
struct FluvioStart(crate::source::fluvio::FluvioStart);

impl<'de> Deserialize<'de> for FluvioStart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(FluvioStart).map_err(serde::de::Error::custom)
    }
}

/// `trim_horizon`, `latest` or an RFC 3339 instant.
struct KinesisStart(crate::source::kinesis::StartAt);

impl<'de> Deserialize<'de> for KinesisStart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map(KinesisStart)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawView {
    name: Spanned<String>,
    group_by: Spanned<Vec<Group>>,
    windows: Spanned<Vec<Size>>,
    metrics: Option<Spanned<Vec<Metric>>>,
    top_k: Option<Spanned<RawTopK>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopK {
    k: usize,
    key: Group,
    by: Metric,
}

impl RawPipeline {
    fn validate(
        self,
        file: &str,
        at: &dyn Fn(usize, String) -> PipelineError,
    ) -> Result<Pipeline, PipelineError> {
        let mut views: Vec<View> = Vec::new();
        if self.views.is_empty() {
            return Err(at(0, "a pipeline needs at least one [[views]]".into()));
        }
        let allowed_lateness = self
            .allowed_lateness
            .as_ref()
            .map_or(Duration::from_secs(15 * 60), |d| d.get_ref().0);
        let dedup_horizon = self
            .dedup_horizon
            .as_ref()
            .map_or(Duration::from_secs(48 * 3600), |d| d.get_ref().0);
        if dedup_horizon < allowed_lateness {
            // A redelivery after the horizon and inside the lateness would count twice.
            let span = self
                .dedup_horizon
                .as_ref()
                .or(self.allowed_lateness.as_ref());
            return Err(at(
                span.map_or(0, |d| d.span().start),
                format!(
                    "dedup_horizon ({dedup_horizon:?}) is shorter than allowed_lateness \
                     ({allowed_lateness:?}): a redelivery after the horizon and within the \
                     lateness would count twice"
                ),
            ));
        }
        for v in self.views {
            let name_at = v.name.span().start;
            let name = v.name.into_inner();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(at(
                    name_at,
                    format!("view name '{name}' must be non-empty ASCII letters, digits and _"),
                ));
            }
            if views.iter().any(|x| x.name == name) {
                return Err(at(name_at, format!("view '{name}' is defined twice")));
            }
            let group_at = v.group_by.span().start;
            let group_by: Vec<GroupField> =
                v.group_by.into_inner().into_iter().map(|g| g.0).collect();
            if group_by.first() != Some(&GroupField::ProviderId) {
                return Err(at(
                    group_at,
                    format!("view '{name}': group_by must start with provider_id"),
                ));
            }
            for (i, g) in group_by.iter().enumerate() {
                if group_by[..i].contains(g) {
                    return Err(at(
                        group_at,
                        format!("view '{name}': {} appears twice in group_by", g.name()),
                    ));
                }
            }
            let windows_at = v.windows.span().start;
            let mut windows: Vec<WindowSize> =
                v.windows.into_inner().into_iter().map(|s| s.0).collect();
            if windows.is_empty() {
                return Err(at(windows_at, format!("view '{name}': windows is empty")));
            }
            windows.sort();
            windows.dedup();
            let has_currency = group_by.contains(&GroupField::Currency);
            let (metrics, top_k) = match (v.metrics, v.top_k) {
                (Some(m), None) => {
                    let m_at = m.span().start;
                    let mut metrics = m.into_inner();
                    if metrics.is_empty() {
                        return Err(at(m_at, format!("view '{name}': metrics is empty")));
                    }
                    let mut sorted = metrics.clone();
                    sorted.sort();
                    sorted.dedup();
                    if sorted.len() != metrics.len() {
                        return Err(at(m_at, format!("view '{name}': a metric is listed twice")));
                    }
                    if !has_currency {
                        if let Some(x) = metrics.iter().find(|x| x.is_money()) {
                            return Err(at(m_at, format!(
                                "view '{name}': {} is money and money is never summed across currencies: add currency to group_by",
                                x.name()
                            )));
                        }
                    }
                    metrics.shrink_to_fit();
                    (metrics, None)
                }
                (None, Some(t)) => {
                    let t_at = t.span().start;
                    let t = t.into_inner();
                    if t.k == 0 || t.k > 1000 {
                        return Err(at(
                            t_at,
                            format!("view '{name}': top_k.k must be between 1 and 1000"),
                        ));
                    }
                    if !t.by.is_sum() {
                        return Err(at(t_at, format!("view '{name}': top_k.by must be one of sales_count, gross_amount, refunds_count, refunds_amount, net_amount")));
                    }
                    if t.by.is_money() && !has_currency {
                        return Err(at(
                            t_at,
                            format!(
                                "view '{name}': ranking by {} needs currency in group_by",
                                t.by.name()
                            ),
                        ));
                    }
                    if matches!(t.key.0, GroupField::ProviderId | GroupField::Currency)
                        || group_by.contains(&t.key.0)
                    {
                        return Err(at(t_at, format!("view '{name}': top_k.key must be a field outside group_by (product_id, customer_id or attrs.<name>)")));
                    }
                    (
                        Vec::new(),
                        Some(TopK {
                            k: t.k,
                            key: t.key.0,
                            by: t.by,
                        }),
                    )
                }
                (Some(m), Some(_)) => {
                    return Err(at(
                        m.span().start,
                        format!("view '{name}': a view has either metrics or top_k, not both"),
                    ))
                }
                (None, None) => {
                    return Err(at(
                        name_at,
                        format!("view '{name}': needs metrics or top_k"),
                    ))
                }
            };
            views.push(View {
                name,
                group_by,
                windows,
                metrics,
                top_k,
            });
        }

        let epoch_max_duration = match self.epoch.max_duration {
            Some(d) if d.get_ref().0.is_zero() => {
                return Err(at(
                    d.span().start,
                    "epoch.max_duration must be more than zero".into(),
                ))
            }
            Some(d) => d.into_inner().0,
            None => Duration::from_millis(200),
        };
        let epoch_max_events = match self.epoch.max_events {
            Some(n) if *n.get_ref() == 0 => {
                return Err(at(
                    n.span().start,
                    "epoch.max_events must be more than zero".into(),
                ))
            }
            Some(n) => n.into_inner(),
            None => 100_000,
        };
        let mut time_zones = BTreeMap::new();
        for (p, z) in self.time_zones.providers {
            let p_at = p.span().start;
            let p = p.into_inner();
            if p.is_empty()
                || p.len() > 64
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            {
                return Err(at(p_at, format!("'{p}' is not a valid provider_id")));
            }
            time_zones.insert(p, z.0);
        }
        let mut retention = Vec::new();
        for (size, ttl) in self.retention {
            let size_at = size.span().start;
            let w = WindowSize::parse(size.get_ref())
                .map_err(|e| at(size_at, format!("retention: '{}': {e}", size.get_ref())))?;
            if !views.iter().any(|v| v.windows.contains(&w)) {
                return Err(at(
                    size_at,
                    format!("retention: no view has {} windows", size.get_ref()),
                ));
            }
            if ttl.get_ref().0.is_zero() {
                return Err(at(
                    ttl.span().start,
                    "retention must be more than zero".into(),
                ));
            }
            retention.push((w, ttl.into_inner().0));
        }
        let mut alerts = Alerts {
            default: thresholds(self.alerts.default, at)?,
            providers: BTreeMap::new(),
        };
        for (p, m) in self.alerts.providers {
            if !crate::decode::valid_provider_id(p.get_ref()) {
                return Err(at(
                    p.span().start,
                    format!("alerts: '{}' is not a valid provider_id", p.get_ref()),
                ));
            }
            alerts.providers.insert(p.into_inner(), thresholds(m, at)?);
        }
        let mut archive = Archive::default();
        if let Some(e) = self.archive.enabled {
            archive.enabled = e;
        }
        if let Some(s) = self.archive.schedule {
            archive.schedule = s;
        }
        if let Some(l) = self.archive.lake {
            archive.lake = l;
        }
        if let Some(f) = self.archive.flush_interval {
            if f.get_ref().0.is_zero() {
                return Err(at(
                    f.span().start,
                    "archive.flush_interval must be more than zero".into(),
                ));
            }
            archive.flush_interval = f.into_inner().0;
        }
        if let Some(t) = self.archive.target_file_size {
            archive.target_file_size = parse_size(t.get_ref())
                .map_err(|e| at(t.span().start, format!("archive.target_file_size: {e}")))?;
        }
        let mut staging = Staging::default();
        if let Some(t) = self.staging.segment_size {
            staging.segment_size = parse_size(t.get_ref())
                .map_err(|e| at(t.span().start, format!("staging.segment_size: {e}")))?;
        }
        let sources = self
            .sources
            .into_iter()
            .map(|s| match s {
                RawSource::Files { paths, follow } => SourceSpec::Files { paths, follow },
                RawSource::Stdin => SourceSpec::Stdin,
                RawSource::Kinesis {
                    stream,
                    start,
                    region,
                    endpoint,
                    poll_interval,
                } => {
                    let mut k = crate::source::kinesis::KinesisSpec::new(&stream);
                    if let Some(s) = start {
                        k.start = s.0;
                    }
                    if let Some(p) = poll_interval {
                        k.poll_interval = p.0;
                    }
                    k.region = region;
                    k.endpoint = endpoint;
                    SourceSpec::Kinesis(k)
                }
                RawSource::Fluvio {
                    topic,
                    start,
                    endpoint,
                    poll_interval,
                } => {
                    let mut f = crate::source::fluvio::FluvioSpec::new(&topic);
                    if let Some(s) = start {
                        f.start = s.0;
                    }
                    if let Some(p) = poll_interval {
                        f.poll_interval = p.0;
                    }
                    f.endpoint = endpoint;
                    SourceSpec::Fluvio(f)
                }
            })
            .collect();
        Ok(Pipeline {
            name: self.name.unwrap_or_else(|| "tally".into()),
            file: file.to_owned(),
            allowed_lateness,
            dedup_horizon,
            epoch_max_duration,
            epoch_max_events,
            dead_letters: self
                .dead_letters
                .unwrap_or_else(|| "dead-letters.jsonl".into()),
            default_time_zone: self.time_zones.default.map_or(Tz::UTC, |z| z.0),
            time_zones,
            sources,
            views,
            retention,
            alerts,
            archive,
            staging,
        })
    }
}

/// The default pipeline, shipped as pipelines/sales.toml.
pub const DEFAULT_PIPELINE: &str = include_str!("../pipelines/sales.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> PipelineError {
        Pipeline::parse("p.toml", text).unwrap_err()
    }

    const VIEW: &str = "[[views]]\nname = \"v\"\ngroup_by = [\"provider_id\", \"currency\"]\nwindows = [\"1h\"]\nmetrics = [\"sales_count\"]\n";

    #[test]
    fn default_pipeline_has_the_five_views() {
        let p = Pipeline::parse("sales.toml", DEFAULT_PIPELINE).unwrap();
        let names: Vec<_> = p.views.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "provider_window",
                "product_window",
                "customer_window",
                "region_window",
                "top_products"
            ]
        );
        assert_eq!(p.allowed_lateness, Duration::from_secs(900));
        assert_eq!(p.dedup_horizon, Duration::from_secs(48 * 3600));
        let top = p.view("top_products").unwrap().top_k.clone().unwrap();
        assert_eq!(
            (top.k, top.key, top.by),
            (5, GroupField::ProductId, Metric::NetAmount)
        );
    }

    #[test]
    fn kinesis_sources_parse_and_bad_starts_name_their_line() {
        use crate::source::kinesis::StartAt;
        let p = Pipeline::parse(
            "p.toml",
            &format!("[[sources]]\nkind = \"kinesis\"\nstream = \"sales\"\nstart = \"latest\"\npoll_interval = \"1s\"\nendpoint = \"http://127.0.0.1:4567\"\n{VIEW}"),
        )
        .unwrap();
        let SourceSpec::Kinesis(k) = &p.sources[0] else {
            panic!("{:?}", p.sources)
        };
        assert_eq!(
            (
                k.stream.as_str(),
                k.start,
                k.poll_interval,
                k.region.as_deref()
            ),
            ("sales", StartAt::Latest, Duration::from_secs(1), None)
        );
        assert_eq!(k.endpoint.as_deref(), Some("http://127.0.0.1:4567"));
        let e = err(&format!(
            "[[sources]]\nkind = \"kinesis\"\nstream = \"sales\"\nstart = \"yesterday\"\n{VIEW}"
        ));
        // A source's fields are read through its `kind` tag, which hides their own
        // spans: the error names the source's [[sources]] line.
        assert!(e.line == 1 && e.reason.contains("'yesterday'"), "{e}");
        let e = err(&format!(
            "[[sources]]\nkind = \"kinesis\"\nstream = \"sales\"\nshard = \"0\"\n{VIEW}"
        ));
        assert!(e.reason.contains("shard"), "{e}");
    }

    #[test]
    fn fluvio_sources_parse_and_bad_starts_name_their_line() {
        use crate::source::fluvio::FluvioStart;
        let p = Pipeline::parse(
            "p.toml",
            &format!("[[sources]]\nkind = \"fluvio\"\ntopic = \"sales\"\nstart = \"end\"\npoll_interval = \"1s\"\nendpoint = \"127.0.0.1:9003\"\n{VIEW}"),
        )
        .unwrap();
        let SourceSpec::Fluvio(f) = &p.sources[0] else {
            panic!("{:?}", p.sources)
        };
        assert_eq!(
            (
                f.topic.as_str(),
                f.start,
                f.poll_interval,
                f.endpoint.as_deref()
            ),
            (
                "sales",
                FluvioStart::End,
                Duration::from_secs(1),
                Some("127.0.0.1:9003")
            )
        );
        let e = err(&format!(
            "[[sources]]\nkind = \"fluvio\"\ntopic = \"sales\"\nstart = \"later\"\n{VIEW}"
        ));
        assert!(e.line == 1 && e.reason.contains("'later'"), "{e}");
    }

    #[test]
    fn the_staging_segment_size_is_read_and_checked() {
        let p = Pipeline::parse(
            "t.toml",
            &format!("[staging]\nsegment_size = \"512KiB\"\n{VIEW}"),
        )
        .unwrap();
        assert_eq!(p.staging.segment_size, 512 << 10);
        let p = Pipeline::parse("t.toml", VIEW).unwrap();
        assert_eq!(p.staging.segment_size, 64 << 20);
        for bad in ["0", "big", "12 MiB"] {
            let e = err(&format!("[staging]\nsegment_size = \"{bad}\"\n{VIEW}"));
            assert!(
                e.line == 2 && e.reason.contains("staging.segment_size: invalid size"),
                "{e}"
            );
        }
        let e = err(&format!("[staging]\nsegments = \"1MiB\"\n{VIEW}"));
        assert!(e.line == 2 && e.reason.contains("segments"), "{e}");
    }

    #[test]
    fn unknown_key_names_its_line() {
        let e = err(&format!("name = \"x\"\nlatenes = \"1m\"\n{VIEW}"));
        assert_eq!(e.line, 2, "{e}");
        assert!(e.reason.contains("latenes"), "{e}");
    }

    #[test]
    fn a_horizon_shorter_than_the_lateness_is_rejected_with_its_line() {
        let e = err(&format!(
            "allowed_lateness = \"2h\"\ndedup_horizon = \"1h\"\n{VIEW}"
        ));
        assert!(
            e.line == 2
                && e.reason
                    .contains("dedup_horizon (3600s) is shorter than allowed_lateness (7200s)"),
            "{e}"
        );
        // The default horizon (48 h) against a longer lateness: the lateness's line.
        let e = err(&format!("\nallowed_lateness = \"49h\"\n{VIEW}"));
        assert!(e.line == 2 && e.reason.contains("dedup_horizon"), "{e}");
        let p = Pipeline::parse(
            "p.toml",
            &format!("allowed_lateness = \"1h\"\ndedup_horizon = \"1h\"\n{VIEW}"),
        );
        assert!(p.is_ok(), "an equal horizon is fine");
    }

    #[test]
    fn bad_duration_zone_metric_field_and_currency_are_rejected_with_lines() {
        let e = err(&format!("allowed_lateness = \"15 minutes\"\n{VIEW}"));
        assert!(e.line == 1 && e.reason.contains("invalid duration"), "{e}");
        let e = err(&format!(
            "{VIEW}[time_zones.providers]\nclaro = \"Mars/Olympus\"\n"
        ));
        assert!(e.line == 7 && e.reason.contains("unknown time zone"), "{e}");
        let e = err("[[views]]\nname = \"v\"\ngroup_by = [\"provider_id\", \"currency\"]\nwindows = [\"1h\"]\nmetrics = [\"sales_total\"]\n");
        assert!(e.line == 5 && e.reason.contains("sales_total"), "{e}");
        let e = err("[[views]]\nname = \"v\"\ngroup_by = [\"provider_id\", \"store\"]\nwindows = [\"1h\"]\nmetrics = [\"sales_count\"]\n");
        assert!(
            e.line == 3 && e.reason.contains("unknown field 'store'"),
            "{e}"
        );
        let e = err("[[views]]\nname = \"v\"\ngroup_by = [\"provider_id\"]\nwindows = [\"1h\"]\nmetrics = [\"gross_amount\"]\n");
        assert!(e.line == 5 && e.reason.contains("currency"), "{e}");
        let e = err("[[views]]\nname = \"v\"\ngroup_by = [\"product_id\"]\nwindows = [\"1h\"]\nmetrics = [\"sales_count\"]\n");
        assert!(e.line == 3 && e.reason.contains("provider_id"), "{e}");
        let e = err("[[views]]\nname = \"v\"\ngroup_by = [\"provider_id\"]\nwindows = [\"7m\"]\nmetrics = [\"sales_count\"]\n");
        assert!(e.line == 4 && e.reason.contains("7m"), "{e}");
    }
}
