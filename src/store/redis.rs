//! The Redis store: rows as sorted sets, one atomic Lua script per epoch, fenced.
//!
//! # Key layout (also in docs/redis.md)
//!
//! `<ns>` is the deployment's namespace (`--redis-namespace`, default `tally`); `<P>`
//! a provider id. Every key of a provider carries the hash tag `{<P>}`, so it lives in
//! one Cluster slot, whatever the namespace.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<ns>:{<P>}:w:<view>:<size>:<k2>:<k3>...` | sorted set | one series: the windows of one group key |
//! | `<ns>:{<P>}:series` | set | the series keys of provider P, without the `<ns>:{<P>}:w:` prefix |
//! | `<ns>:{<P>}:fence` | hash | `gen`, `epoch` last applied to P (Cluster only) |
//! | `<ns>:{<ns>}:meta` | hash | `gen`, `epoch`, `meta` (JSON: clock, positions, counters, views) |
//! | `<ns>:{<ns>}:providers` | set | every provider with rows |
//! | `<ns>:{<ns>}:intent` | string | the epoch being applied (Cluster only) |
//!
//! A series key's `<k2>...` are the view's group-by values after provider_id, each
//! byte outside `[A-Za-z0-9_.-]` written `%XX`; `<size>` is the window label (`1m`,
//! `1h`, `1d`). A member is `<rank>|<json>` with score the window start in Unix
//! milliseconds; rank is 0 except in top-k views (1..=k). The JSON holds `start` and
//! the counts and sums (`sales_count`, `gross_amount`, `refunds_count`,
//! `refunds_amount`; amounts as decimal strings), `distinct_customers`, `min_ticket`,
//! `max_ticket` when the view has them, and `member` (the ranked key) in top-k views.
//! "All windows of provider P, view V, size S, group key K from T1 to T2" is one
//! command: `ZRANGE <ns>:{P}:w:V:S:K T1 T2 BYSCORE`.
//!
//! # Retention
//!
//! Each series key expires `ttl(size)` after its last write (wall clock), and every
//! commit trims from the series it touches the windows that ended more than
//! `ttl(size)` before the commit's clock (event time), so a live series never grows
//! without bound and a backfill keeps the same span as a live run.
//!
//! # Commit and fencing
//!
//! Opening the store increments `meta.gen`: the writer's generation. A commit is
//! refused (`STALE`) when its generation is older than the stored one (another writer
//! took over) or its epoch is not newer than the stored one. On one Redis, an epoch is
//! one script: the fence check, every row change, the series sets, TTLs and trims,
//! and the new meta, all or nothing. On a Cluster a script can only touch one slot, so
//! an epoch is applied in three steps, each atomic: the whole commit is written to
//! `intent` (fenced on meta), then each provider's changes (fenced on the provider's
//! `fence`, skipped where already applied), then meta (fenced) with the intent
//! deleted. A writer that stops between the steps leaves the intent, and the next
//! writer finishes it at open before anything else. Each provider therefore always
//! sees whole epochs, which is what isolation lets it see.
//!
//! # Outages
//!
//! A connection that fails gives [`StoreError::Unavailable`]; the caller retries the
//! same commit. A commit that reached Redis before the connection dropped is
//! recognised on retry (the stored epoch and generation are the retried ones) and
//! counts as done. If Redis comes back with an older epoch than this writer committed
//! (it lost writes), the store refuses to go on: the process must restart and rebuild
//! from what Redis holds.

use super::{Commit, Meta, Store, StoreError, StoredRow};
use crate::dataflow::{RowKey, RowUpdate, RowValue, Sums};
use crate::model::window::WindowSize;
use crate::model::{format_hundredths, Millis, Sum};
use crate::pipeline::{Metric, View};
use compact_str::CompactString;
use redis::{ConnectionLike, RedisError, Script};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How to reach Redis and how to keep rows there.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URLs: one server, or the Cluster's seed nodes.
    pub urls: Vec<String>,
    /// Treat `urls` as Redis Cluster seed nodes.
    pub cluster: bool,
    /// Prefix of every key; `[A-Za-z0-9_.-]+`.
    pub namespace: String,
    /// ACL user and password; they override the URL's.
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM file of the certificate authority for `rediss://` (the system roots otherwise).
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Longest wait for one reply (a large epoch's script included).
    pub response_timeout: Duration,
    /// How long to keep retrying when Redis is unreachable at start.
    pub start_timeout: Duration,
    /// The longest pause between retries (the backoff doubles from 100 ms up to this).
    pub backoff_max: Duration,
    /// Row TTL per window size.
    pub ttl: Vec<(WindowSize, Duration)>,
}

impl RedisConfig {
    /// A config for one URL with the defaults.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            urls: vec![url.into()],
            cluster: false,
            namespace: "tally".into(),
            username: None,
            password: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(60),
            backoff_max: Duration::from_secs(5),
            ttl: Vec::new(),
        }
    }

    /// The TTL of a window size: configured, or 3 days below 1 hour, 35 days below a
    /// day, 400 days for days.
    pub fn ttl(&self, size: WindowSize) -> Duration {
        if let Some((_, d)) = self.ttl.iter().find(|(s, _)| *s == size) {
            return *d;
        }
        default_ttl(size)
    }

    /// Where this config points, without credentials, for messages.
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self.urls.iter().map(|u| redact(u)).collect();
        format!(
            "{} {} (namespace {})",
            if self.cluster {
                "Redis Cluster"
            } else {
                "Redis"
            },
            hosts.join(","),
            self.namespace
        )
    }
}

/// The default TTL of a window size.
pub fn default_ttl(size: WindowSize) -> Duration {
    const DAY: u64 = 86_400;
    let ms = match size {
        WindowSize::LocalDay => i64::MAX,
        WindowSize::Fixed(ms) => ms,
    };
    let days = if ms < 3_600_000 {
        3
    } else if ms < 86_400_000 {
        35
    } else {
        400
    };
    Duration::from_secs(days * DAY)
}

/// A URL with its user and password cut out.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(a)) if a > s => format!("{}{}", &url[..s + 3], &url[a + 1..]),
        _ => url.to_owned(),
    }
}

/// Applies one group of changes, fenced. See the module docs; `mode` is `strict`
/// (refuse unless newer), `redo` (skip if already applied) or `intent` (check like
/// `strict`, but leave the fence as it is).
const APPLY: &str = r#"
local g = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
local e = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local mode, mg, me = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if mg < g then return redis.error_reply('STALE ' .. e .. ' ' .. g) end
if me <= e then
  if mode == 'redo' then return 0 end
  return redis.error_reply('STALE ' .. e .. ' ' .. g)
end
local i = 5
local n = #ARGV
while i <= n do
  local op = ARGV[i]
  local k = KEYS[tonumber(ARGV[i + 1])]
  if op == 'Z' then
    local s, prefix, m = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    for _, old in ipairs(redis.call('ZRANGE', k, s, s, 'BYSCORE')) do
      if string.sub(old, 1, #prefix) == prefix then redis.call('ZREM', k, old) end
    end
    if m ~= '' then redis.call('ZADD', k, s, m) end
    i = i + 5
  elseif op == 'T' then
    if ARGV[i + 3] ~= '' then redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. ARGV[i + 3]) end
    if redis.call('EXISTS', k) == 1 then
      redis.call('PEXPIRE', k, ARGV[i + 2])
    end
    i = i + 4
  elseif op == 'S' then
    local c = tonumber(ARGV[i + 3])
    for j = 1, c do redis.call('SADD', k, ARGV[i + 3 + j]) end
    if ARGV[i + 2] ~= '' then redis.call('PEXPIRE', k, ARGV[i + 2]) end
    i = i + 4 + c
  elseif op == 'D' then
    redis.call('DEL', k)
    i = i + 2
  elseif op == 'P' then
    redis.call('SET', k, ARGV[i + 2])
    i = i + 3
  else
    return redis.error_reply('BADOP ' .. op)
  end
end
if mode ~= 'intent' then
  redis.call('HSET', KEYS[1], 'gen', mg, 'epoch', me)
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'meta', ARGV[4]) end
end
return 1
"#;

enum Conn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    fn con(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => &mut **c,
        }
    }
}

/// Keys of one namespace.
struct Keys {
    ns: String,
}

impl Keys {
    fn meta(&self) -> String {
        format!("{0}:{{{0}}}:meta", self.ns)
    }
    fn providers(&self) -> String {
        format!("{0}:{{{0}}}:providers", self.ns)
    }
    fn intent(&self) -> String {
        format!("{0}:{{{0}}}:intent", self.ns)
    }
    fn provider(&self, p: &str) -> String {
        format!("{}:{{{p}}}:", self.ns)
    }
}

/// The Redis store. See the module docs.
pub struct RedisStore {
    cfg: RedisConfig,
    keys: Keys,
    client: Client,
    conn: Option<Conn>,
    script: Script,
    gen: u64,
    meta: Meta,
}

enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// Does this error mean "Redis is not reachable now" (retry), rather than a refusal?
fn transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_cluster_error()
        || matches!(
            e.code(),
            Some("LOADING" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN")
        )
}

impl RedisStore {
    /// Connects (retrying with backoff up to `start_timeout`), takes over as the
    /// writer (a new generation), and finishes an epoch a previous writer left half
    /// applied on a Cluster.
    pub fn open(cfg: RedisConfig) -> Result<RedisStore, StoreError> {
        let mut s = RedisStore::connect(cfg)?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match s.take_over() {
                Ok(()) => return Ok(s),
                Err(StoreError::Unavailable(why)) if started.elapsed() < s.cfg.start_timeout => {
                    tracing::warn!(
                        store = %s.cfg.describe(),
                        error = %why,
                        retry_in_ms = pause.as_millis() as u64,
                        "Redis unreachable; retrying"
                    );
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(s.cfg.backoff_max);
                }
                Err(StoreError::Unavailable(why)) => {
                    return Err(StoreError::Unavailable(format!(
                        "{} still unreachable after {:?}: {why}",
                        s.cfg.describe(),
                        s.cfg.start_timeout
                    )))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens without taking over: for readers (export, queries).
    pub fn open_reader(cfg: RedisConfig) -> Result<RedisStore, StoreError> {
        let mut s = RedisStore::connect(cfg)?;
        s.meta = s.read_meta()?.1;
        Ok(s)
    }

    fn connect(cfg: RedisConfig) -> Result<RedisStore, StoreError> {
        if cfg.namespace.is_empty()
            || !cfg
                .namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            return Err(StoreError::Config(format!(
                "Redis namespace '{}' must be non-empty [A-Za-z0-9_.-]",
                cfg.namespace
            )));
        }
        if cfg.urls.is_empty() {
            return Err(StoreError::Config("no Redis URL given".into()));
        }
        // rustls needs one process-wide crypto provider; a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs = match &cfg.ca_file {
            Some(p) => Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(p).map_err(|e| {
                    StoreError::Config(format!("Redis CA file {}: {e}", p.display()))
                })?),
            }),
            None => None,
        };
        let bad = |e: RedisError| StoreError::Config(format!("{}: {e}", cfg.describe()));
        let client = if cfg.cluster {
            let mut b = redis::cluster::ClusterClientBuilder::new(cfg.urls.clone())
                .connection_timeout(cfg.connect_timeout)
                .response_timeout(cfg.response_timeout)
                .retries(2);
            if let Some(u) = &cfg.username {
                b = b.username(u);
            }
            if let Some(p) = &cfg.password {
                b = b.password(p);
            }
            if let Some(c) = certs {
                b = b.certs(c);
            }
            Client::Cluster(b.build().map_err(bad)?)
        } else {
            if cfg.urls.len() != 1 {
                return Err(StoreError::Config(
                    "several Redis URLs given without --redis-cluster".into(),
                ));
            }
            let mut info: redis::ConnectionInfo =
                redis::IntoConnectionInfo::into_connection_info(cfg.urls[0].as_str())
                    .map_err(bad)?;
            let mut redis_info = info.redis_settings().clone();
            if let Some(u) = &cfg.username {
                redis_info = redis_info.set_username(u);
            }
            if let Some(p) = &cfg.password {
                redis_info = redis_info.set_password(p);
            }
            info = info.set_redis_settings(redis_info);
            let c = match certs {
                Some(c) => redis::Client::build_with_tls(info, c),
                None => redis::Client::open(info),
            };
            Client::Single(c.map_err(bad)?)
        };
        Ok(RedisStore {
            keys: Keys {
                ns: cfg.namespace.clone(),
            },
            cfg,
            client,
            conn: None,
            script: Script::new(APPLY),
            gen: 0,
            meta: Meta::default(),
        })
    }

    fn unavailable(&mut self, e: RedisError) -> StoreError {
        // Reconnect on the next call.
        self.conn = None;
        StoreError::Unavailable(format!("{}: {e}", self.cfg.describe()))
    }

    fn refused(&self, e: &RedisError) -> StoreError {
        StoreError::Redis(format!("{}: {e}", self.cfg.describe()))
    }

    /// The connection, made on first use or after a failure.
    fn conn(&mut self) -> Result<&mut Conn, RedisError> {
        if self.conn.is_none() {
            let c = match &self.client {
                Client::Single(c) => {
                    let c2 = c.get_connection_with_timeout(self.cfg.connect_timeout)?;
                    c2.set_read_timeout(Some(self.cfg.response_timeout))?;
                    c2.set_write_timeout(Some(self.cfg.response_timeout))?;
                    Conn::Single(c2)
                }
                Client::Cluster(c) => Conn::Cluster(Box::new(c.get_connection()?)),
            };
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// Runs `f` on the connection; a transient failure becomes `Unavailable`.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut dyn ConnectionLike) -> Result<T, RedisError>,
    ) -> Result<T, StoreError> {
        let r = match self.conn() {
            Ok(c) => f(c.con()),
            Err(e) => Err(e),
        };
        r.map_err(|e| {
            if transient(&e) {
                self.unavailable(e)
            } else {
                self.refused(&e)
            }
        })
    }

    /// Reads meta: (generation, meta).
    fn read_meta(&mut self) -> Result<(u64, Meta), StoreError> {
        let key = self.keys.meta();
        let (gen, epoch, blob): (Option<u64>, Option<u64>, Option<String>) = self.with(|c| {
            redis::cmd("HMGET")
                .arg(&key)
                .arg("gen")
                .arg("epoch")
                .arg("meta")
                .query(c)
        })?;
        let meta = match blob {
            Some(b) => serde_json::from_str::<Meta>(&b).map_err(|e| StoreError::Corrupt {
                path: key.clone(),
                reason: e.to_string(),
            })?,
            None => Meta::default(),
        };
        if epoch.unwrap_or(0) != meta.epoch {
            return Err(StoreError::Corrupt {
                path: key,
                reason: format!(
                    "epoch field {} differs from the meta's {}",
                    epoch.unwrap_or(0),
                    meta.epoch
                ),
            });
        }
        Ok((gen.unwrap_or(0), meta))
    }

    fn take_over(&mut self) -> Result<(), StoreError> {
        let key = self.keys.meta();
        self.gen = self.with(|c| redis::cmd("HINCRBY").arg(&key).arg("gen").arg(1).query(c))?;
        self.meta = self.read_meta()?.1;
        if let Client::Cluster(_) = self.client {
            let ikey = self.keys.intent();
            let blob: Option<Vec<u8>> = self.with(|c| redis::cmd("GET").arg(&ikey).query(c))?;
            if let Some(b) = blob {
                let c: Commit = bincode::deserialize(&b).map_err(|e| StoreError::Corrupt {
                    path: ikey.clone(),
                    reason: e.to_string(),
                })?;
                if c.epoch > self.meta.epoch {
                    tracing::info!(
                        epoch = c.epoch,
                        "finishing the epoch a previous writer left half applied"
                    );
                    self.commit_cluster(&c, false)?;
                } else {
                    let _: () = self.with(|con| redis::cmd("DEL").arg(&ikey).query(con))?;
                }
            }
        }
        tracing::info!(
            store = %self.cfg.describe(),
            generation = self.gen,
            epoch = self.meta.epoch,
            "Redis store open"
        );
        Ok(())
    }

    /// Runs the APPLY script. `Ok(false)`: skipped (`redo` and already applied).
    fn apply(
        &mut self,
        fence: &str,
        mode: &str,
        epoch: u64,
        meta_blob: &str,
        keys: &[String],
        ops: &[Arg],
    ) -> Result<bool, StoreError> {
        let script = self.script.clone();
        let mut inv = script.prepare_invoke();
        inv.key(fence);
        for k in keys {
            inv.key(k);
        }
        inv.arg(mode).arg(self.gen).arg(epoch).arg(meta_blob);
        for a in ops {
            match a {
                Arg::S(s) => inv.arg(s.as_str()),
                Arg::I(i) => inv.arg(*i),
                Arg::B(b) => inv.arg(b.as_slice()),
            };
        }
        let gen = self.gen;
        let r: Result<i64, RedisError> = match self.conn() {
            Ok(Conn::Single(c)) => inv.invoke(c),
            Ok(Conn::Cluster(c)) => inv.invoke(&mut **c),
            Err(e) => Err(e),
        };
        match r {
            Ok(n) => Ok(n == 1),
            Err(e) if e.code() == Some("STALE") => {
                let mut it = e.detail().unwrap_or("").split_whitespace();
                let stored: u64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                let stored_gen: u64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                if stored_gen > gen {
                    Err(StoreError::Superseded {
                        mine: gen,
                        theirs: stored_gen,
                    })
                } else if stored == epoch && stored_gen == gen && mode != "intent" {
                    // Our own earlier attempt got through before its reply was lost.
                    Ok(true)
                } else {
                    Err(StoreError::Stale {
                        offered: epoch,
                        stored,
                    })
                }
            }
            Err(e) if transient(&e) => Err(self.unavailable(e)),
            Err(e) => Err(self.refused(&e)),
        }
    }

    /// The script's keys and ops for some changes (all of one provider on a Cluster).
    fn row_ops(
        &self,
        c: &Commit,
        changes: &[&RowUpdate],
        keys: &mut Vec<String>,
        ops: &mut Vec<Arg>,
    ) {
        // Key index in KEYS (1 is the fence).
        let mut index: std::collections::HashMap<String, usize> = Default::default();
        let mut idx = |k: String, keys: &mut Vec<String>| -> usize {
            *index.entry(k).or_insert_with_key(|k| {
                keys.push(k.clone());
                keys.len() + 1
            })
        };
        // Per series: the size, to set its TTL and trim once.
        let mut series: BTreeMap<usize, WindowSize> = BTreeMap::new();
        let mut by_provider: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for u in changes {
            let Some(view) = self.meta.views.get(u.key.view as usize) else {
                continue;
            };
            let provider = u.key.group[0].as_str();
            let suffix = series_suffix(view, &u.key);
            let full = format!("{}w:{suffix}", self.keys.provider(provider));
            let k = idx(full, keys);
            if series.insert(k, u.key.size).is_none() {
                by_provider.entry(provider).or_default().push(suffix);
            }
            ops.push(Arg::S("Z".into()));
            ops.push(Arg::I(k as i64));
            ops.push(Arg::I(u.key.start));
            ops.push(Arg::S(format!("{}|", u.rank)));
            ops.push(Arg::S(match &u.value {
                Some(v) => member(view, u.key.start, u.rank, v),
                None => String::new(),
            }));
        }
        for (k, size) in series {
            let ttl = self.cfg.ttl(size);
            let ttl_ms = ttl.as_millis().min(i64::MAX as u128) as i64;
            // Windows that ended more than the TTL before the clock.
            let trim = c
                .clock
                .checked_sub(ttl_ms)
                .and_then(|t| t.checked_sub(size.max_len()))
                .filter(|_| c.clock != Millis::MIN);
            ops.push(Arg::S("T".into()));
            ops.push(Arg::I(k as i64));
            ops.push(Arg::I(ttl_ms));
            ops.push(match trim {
                Some(t) => Arg::I(t),
                None => Arg::S(String::new()),
            });
        }
        let longest = self
            .meta
            .views
            .iter()
            .flat_map(|v| &v.windows)
            .map(|s| self.cfg.ttl(*s))
            .max()
            .unwrap_or_default()
            .as_millis()
            .min(i64::MAX as u128) as i64;
        for (p, suffixes) in by_provider {
            let k = idx(format!("{}series", self.keys.provider(p)), keys);
            ops.push(Arg::S("S".into()));
            ops.push(Arg::I(k as i64));
            ops.push(Arg::I(longest));
            ops.push(Arg::I(suffixes.len() as i64));
            ops.extend(suffixes.into_iter().map(Arg::S));
        }
    }

    fn meta_after(&self, c: &Commit) -> Result<Meta, StoreError> {
        let mut m = self.meta.clone();
        super::advance(&mut m, c)?;
        Ok(m)
    }

    fn commit_single(&mut self, c: &Commit) -> Result<(), StoreError> {
        let next = self.meta_after(c)?;
        let blob = serde_json::to_string(&next).expect("meta serializes");
        let changes: Vec<&RowUpdate> = c.changes.iter().collect();
        let mut keys = Vec::new();
        let mut ops = Vec::new();
        self.row_ops(c, &changes, &mut keys, &mut ops);
        let providers = providers_of(&changes);
        if !providers.is_empty() {
            keys.push(self.keys.providers());
            ops.push(Arg::S("S".into()));
            ops.push(Arg::I(keys.len() as i64 + 1));
            ops.push(Arg::S(String::new()));
            ops.push(Arg::I(providers.len() as i64));
            ops.extend(providers.into_iter().map(|p| Arg::S(p.to_owned())));
        }
        let fence = self.keys.meta();
        self.apply(&fence, "strict", c.epoch, &blob, &keys, &ops)?;
        self.meta = next;
        Ok(())
    }

    /// The three-step commit of a Cluster. `fresh`: a new epoch (the intent is written
    /// first); otherwise the intent is already there (finishing at open).
    fn commit_cluster(&mut self, c: &Commit, fresh: bool) -> Result<(), StoreError> {
        let next = self.meta_after(c)?;
        let meta_key = self.keys.meta();
        let intent = self.keys.intent();
        if fresh {
            let blob = bincode::serialize(c).expect("commit serializes");
            let ops = vec![Arg::S("P".into()), Arg::I(2), Arg::B(blob)];
            match self.apply(
                &meta_key,
                "intent",
                c.epoch,
                "",
                std::slice::from_ref(&intent),
                &ops,
            ) {
                Ok(_) => {}
                // A retry after the whole epoch went through.
                Err(StoreError::Stale { stored, .. })
                    if stored == c.epoch && self.confirm(c.epoch)? =>
                {
                    self.meta = next;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        let mut groups: BTreeMap<&str, Vec<&RowUpdate>> = BTreeMap::new();
        for u in &c.changes {
            groups.entry(u.key.group[0].as_str()).or_default().push(u);
        }
        for (p, changes) in &groups {
            let mut keys = Vec::new();
            let mut ops = Vec::new();
            self.row_ops(c, changes, &mut keys, &mut ops);
            let fence = format!("{}fence", self.keys.provider(p));
            self.apply(&fence, "redo", c.epoch, "", &keys, &ops)?;
        }
        let blob = serde_json::to_string(&next).expect("meta serializes");
        let providers: Vec<&str> = groups.keys().copied().collect();
        let mut keys = vec![intent];
        let mut ops = vec![Arg::S("D".into()), Arg::I(2)];
        if !providers.is_empty() {
            keys.push(self.keys.providers());
            ops.push(Arg::S("S".into()));
            ops.push(Arg::I(3));
            ops.push(Arg::S(String::new()));
            ops.push(Arg::I(providers.len() as i64));
            ops.extend(providers.into_iter().map(|p| Arg::S(p.to_owned())));
        }
        self.apply(&meta_key, "strict", c.epoch, &blob, &keys, &ops)?;
        self.meta = next;
        Ok(())
    }

    /// Is `epoch` stored under this writer's generation (our own earlier attempt)?
    fn confirm(&mut self, epoch: u64) -> Result<bool, StoreError> {
        let key = self.keys.meta();
        let (g, e): (Option<u64>, Option<u64>) = self.with(|c| {
            redis::cmd("HMGET")
                .arg(&key)
                .arg("gen")
                .arg("epoch")
                .query(c)
        })?;
        Ok(g == Some(self.gen) && e == Some(epoch))
    }

    /// Checks that Redis still holds what this writer committed: an older stored
    /// epoch means Redis lost writes, and the process must rebuild from it.
    fn check_not_behind(&mut self) -> Result<(), StoreError> {
        let key = self.keys.meta();
        let (g, e): (Option<u64>, Option<u64>) = self.with(|c| {
            redis::cmd("HMGET")
                .arg(&key)
                .arg("gen")
                .arg("epoch")
                .query(c)
        })?;
        let (g, e) = (g.unwrap_or(0), e.unwrap_or(0));
        if g > self.gen {
            return Err(StoreError::Superseded {
                mine: self.gen,
                theirs: g,
            });
        }
        if e < self.meta.epoch {
            return Err(StoreError::Lost {
                stored: e,
                committed: self.meta.epoch,
            });
        }
        Ok(())
    }

    /// `MEMORY USAGE` of the series keys per view: view name -> (bytes, rows, keys).
    pub fn memory_usage(&mut self) -> Result<BTreeMap<String, (u64, u64, u64)>, StoreError> {
        let keys = self.series_keys()?;
        let mut cmds = Vec::with_capacity(keys.len() * 2);
        for k in &keys {
            let mut m = redis::cmd("MEMORY");
            m.arg("USAGE").arg(k).arg("SAMPLES").arg(0);
            let mut z = redis::cmd("ZCARD");
            z.arg(k);
            cmds.push(m);
            cmds.push(z);
        }
        let v: Vec<Option<u64>> = self.batch(cmds)?;
        let views = self.meta.views.clone();
        let mut out: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        for (k, pair) in keys.iter().zip(v.chunks(2)) {
            let name = parse_series(&self.keys.ns, &views, k)
                .map_or("?".to_owned(), |(ix, _, _)| views[ix].name.clone());
            let e = out.entry(name).or_default();
            e.0 += pair[0].unwrap_or(0);
            e.1 += pair[1].unwrap_or(0);
            e.2 += 1;
        }
        Ok(out)
    }

    /// Runs commands pipelined, in chunks (routed per key on a Cluster).
    fn batch<T: redis::FromRedisValue>(
        &mut self,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::with_capacity(cmds.len());
        for chunk in cmds.chunks(512) {
            let r: Result<Vec<T>, RedisError> = match self.conn() {
                Ok(Conn::Single(c)) => {
                    let mut p = redis::pipe();
                    for cmd in chunk {
                        p.add_command(cmd.clone());
                    }
                    p.query(c)
                }
                Ok(Conn::Cluster(c)) => {
                    let mut p = redis::cluster::cluster_pipe();
                    for cmd in chunk {
                        p.add_command(cmd.clone());
                    }
                    p.query(c)
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => out.extend(v),
                Err(e) if transient(&e) => return Err(self.unavailable(e)),
                Err(e) => return Err(self.refused(&e)),
            }
        }
        Ok(out)
    }

    /// Every series key of the namespace.
    fn series_keys(&mut self) -> Result<Vec<String>, StoreError> {
        let pkey = self.keys.providers();
        let mut providers: Vec<String> =
            self.with(|c| redis::cmd("SMEMBERS").arg(&pkey).query(c))?;
        providers.sort();
        let cmds = providers
            .iter()
            .map(|p| {
                let mut c = redis::cmd("SMEMBERS");
                c.arg(format!("{}series", self.keys.provider(p)));
                c
            })
            .collect();
        let series: Vec<Vec<String>> = self.batch(cmds)?;
        let mut out = Vec::new();
        for (p, series) in providers.iter().zip(series) {
            let prefix = self.keys.provider(p);
            out.extend(series.into_iter().map(|s| format!("{prefix}w:{s}")));
        }
        out.sort();
        Ok(out)
    }

    /// Every stored row, read back from Redis.
    pub fn read_rows(&mut self) -> Result<Vec<StoredRow>, StoreError> {
        let mut out = Vec::new();
        let views = self.meta.views.clone();
        let keys = self.series_keys()?;
        let cmds = keys
            .iter()
            .map(|k| {
                let mut c = redis::cmd("ZRANGE");
                c.arg(k).arg(0).arg(-1).arg("WITHSCORES");
                c
            })
            .collect();
        let all: Vec<Vec<(String, f64)>> = self.batch(cmds)?;
        for (key, members) in keys.into_iter().zip(all) {
            let Some((view_ix, size, group)) = parse_series(&self.keys.ns, &views, &key) else {
                return Err(StoreError::Corrupt {
                    path: key,
                    reason: "not a series key of this namespace's views".into(),
                });
            };
            for (m, score) in members {
                let (rank, value) = parse_member(&m).ok_or_else(|| StoreError::Corrupt {
                    path: key.clone(),
                    reason: format!("member '{m}' is not <rank>|<json>"),
                })?;
                out.push((
                    (
                        RowKey {
                            view: view_ix as u16,
                            size,
                            start: score as Millis,
                            group: group.clone(),
                        },
                        rank,
                    ),
                    value,
                ));
            }
        }
        Ok(out)
    }

    /// This writer's generation.
    pub fn generation(&self) -> u64 {
        self.gen
    }
}

/// One script argument.
enum Arg {
    S(String),
    I(i64),
    B(Vec<u8>),
}

fn providers_of<'a>(changes: &[&'a RowUpdate]) -> Vec<&'a str> {
    let mut p: Vec<&str> = changes.iter().map(|u| u.key.group[0].as_str()).collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// `%XX` for every byte outside `[A-Za-z0-9_.-]`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `<view>:<size>:<k2>:...` of a row's series.
fn series_suffix(view: &View, k: &RowKey) -> String {
    let mut s = format!("{}:{}", view.name, k.size.label());
    for g in &k.group[1..] {
        s.push(':');
        s.push_str(&escape(g));
    }
    s
}

fn parse_series(
    ns: &str,
    views: &[View],
    key: &str,
) -> Option<(usize, WindowSize, Vec<CompactString>)> {
    let rest = key.strip_prefix(ns)?.strip_prefix(":{")?;
    let close = rest.find('}')?;
    let provider = &rest[..close];
    let rest = rest[close + 1..].strip_prefix(":w:")?;
    let mut parts = rest.split(':');
    let view_name = parts.next()?;
    let view_ix = views.iter().position(|v| v.name == view_name)?;
    let size = WindowSize::parse(parts.next()?).ok()?;
    let mut group = vec![CompactString::from(provider)];
    for p in parts {
        group.push(unescape(p)?.into());
    }
    (group.len() == views[view_ix].group_by.len()).then_some((view_ix, size, group))
}

/// `<rank>|<json>` for a row, keys in a fixed order.
fn member(view: &View, start: Millis, rank: u32, v: &RowValue) -> String {
    use std::fmt::Write;
    let mut m = format!(
        "{rank}|{{\"start\":{start},\"sales_count\":{},\"gross_amount\":\"{}\",\"refunds_count\":{},\"refunds_amount\":\"{}\"",
        v.sums.sales,
        format_hundredths(v.sums.gross),
        v.sums.refunds,
        format_hundredths(v.sums.refunds_amount)
    );
    let ticket = |t: Option<i64>| match t {
        Some(t) => format!("\"{}\"", format_hundredths(t.into())),
        None => "null".to_owned(),
    };
    if view.metrics.contains(&Metric::DistinctCustomers) {
        let _ = write!(m, ",\"distinct_customers\":{}", v.distinct_customers);
    }
    if view.metrics.contains(&Metric::MinTicket) {
        let _ = write!(m, ",\"min_ticket\":{}", ticket(v.min_ticket));
    }
    if view.metrics.contains(&Metric::MaxTicket) {
        let _ = write!(m, ",\"max_ticket\":{}", ticket(v.max_ticket));
    }
    if let Some(k) = &v.member {
        let _ = write!(
            m,
            ",\"member\":{}",
            serde_json::to_string(k.as_str()).expect("strings serialize")
        );
    }
    m.push('}');
    m
}

/// Decimal string with up to two fraction digits to hundredths.
fn parse_hundredths(s: &str) -> Option<Sum> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (i, f) = s.split_once('.').unwrap_or((s, "00"));
    if f.len() != 2 || i.is_empty() {
        return None;
    }
    let v = i.parse::<Sum>().ok()? * 100 + f.parse::<Sum>().ok()?;
    Some(if neg { -v } else { v })
}

fn parse_member(m: &str) -> Option<(u32, RowValue)> {
    let (rank, json) = m.split_once('|')?;
    let rank: u32 = rank.parse().ok()?;
    let o: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json).ok()?;
    let int = |k: &str| o.get(k).and_then(|v| v.as_i64()).unwrap_or(0);
    let amount = |k: &str| -> Option<Sum> {
        match o.get(k) {
            None => Some(0),
            Some(v) => parse_hundredths(v.as_str()?),
        }
    };
    let ticket = |k: &str| -> Option<Option<i64>> {
        match o.get(k) {
            None | Some(serde_json::Value::Null) => Some(None),
            Some(v) => Some(Some(i64::try_from(parse_hundredths(v.as_str()?)?).ok()?)),
        }
    };
    Some((
        rank,
        RowValue {
            sums: Sums {
                sales: int("sales_count"),
                gross: amount("gross_amount")?,
                refunds: int("refunds_count"),
                refunds_amount: amount("refunds_amount")?,
            },
            distinct_customers: int("distinct_customers") as u64,
            min_ticket: ticket("min_ticket")?,
            max_ticket: ticket("max_ticket")?,
            member: o
                .get("member")
                .and_then(|v| v.as_str())
                .map(CompactString::from),
        },
    ))
}

impl Store for RedisStore {
    fn meta(&self) -> &Meta {
        &self.meta
    }

    fn bind_views(&mut self, views: &[View]) -> Result<(), StoreError> {
        // Stored with the first commit's meta.
        super::check_views(&mut self.meta, views).map(|_| ())
    }

    fn commit(&mut self, c: &Commit) -> Result<(), StoreError> {
        // After a failure: make sure Redis did not lose what we committed before.
        let reconnecting = self.conn.is_none() && self.meta.epoch > 0;
        if reconnecting {
            self.check_not_behind()?;
        }
        match self.client {
            Client::Single(_) => self.commit_single(c),
            Client::Cluster(_) => self.commit_cluster(c, true),
        }
    }

    fn rows(&mut self) -> Result<Vec<StoredRow>, StoreError> {
        self.read_rows()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trips_and_keeps_keys_readable() {
        for s in ["recarga-5000", "", "a:b|c", "ñandú {x}", "%41"] {
            assert_eq!(unescape(&escape(s)).as_deref(), Some(s));
            assert!(!escape(s).contains(':'));
        }
        assert_eq!(escape("recarga-5000"), "recarga-5000");
        assert_eq!(escape("a:b"), "a%3Ab");
    }

    #[test]
    fn amounts_round_trip() {
        for v in [0i128, 1, -1, 99, 100, -12345, 10i128.pow(30)] {
            assert_eq!(parse_hundredths(&format_hundredths(v)), Some(v));
        }
        assert_eq!(parse_hundredths("1.5"), None);
    }

    #[test]
    fn credentials_never_show_in_messages() {
        assert_eq!(
            redact("redis://u:secret@127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(redact("rediss://h:1"), "rediss://h:1");
    }

    #[test]
    fn default_ttls_follow_the_issue() {
        let d = |s| default_ttl(WindowSize::parse(s).unwrap()).as_secs() / 86_400;
        assert_eq!((d("1m"), d("5m"), d("1h"), d("1d")), (3, 3, 35, 400));
    }
}
