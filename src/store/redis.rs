//! The Redis store: one hash per window, one atomic commit per epoch, fenced.
//!
//! # Key layout (also in docs/redis.md)
//!
//! `<ns>` is the deployment's namespace (`--redis-namespace`, default `tally`); `<P>`
//! a provider id. Every key of a provider carries the hash tag `{<P>}`, so it lives in
//! one Cluster slot, whatever the namespace.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<ns>:{<P>}:w:<view>:<size>:<start>` | hash | one window: field = group key, value = the row |
//! | `<ns>:{<P>}:i:<view>:<size>` | sorted set | the window starts of P's windows of that view and size (member = score = start) |
//! | `<ns>:{<P>}:fence` | hash | `gen`, `epoch` last applied to P (Cluster only) |
//! | `<ns>:{<P>}:changes` | stream | with `changes_stream`: per epoch, `epoch` and `rows`, P's changed rows |
//! | `<ns>:{<ns>}:meta` | hash | `gen`, `epoch`, `meta` (JSON: clock, positions, counters, views) |
//! | `<ns>:{<ns>}:providers` | set | every provider with rows |
//! | `<ns>:{<ns>}:intent` | string | the epoch being applied (Cluster only) |
//!
//! `<size>` is the window label (`1m`, `1h`, `1d`), `<start>` the window start in Unix
//! milliseconds. A field is the view's group-by values after provider_id, each byte
//! outside `[A-Za-z0-9_.-]` written `%XX`, joined by `:` (empty for a view grouped
//! by provider alone); in a top-k view, `|<rank>` follows. A value is a JSON array:
//! `[sales_count, gross_amount, refunds_count, refunds_amount, distinct_customers,
//! min_ticket, max_ticket, member]`, amounts as decimal strings, `null` where the
//! view lacks the metric, trailing `null`s left out. "All windows of provider P,
//! view V, size S, group key K from T1 to T2" is one round trip: [`READ`], a
//! read-only script over the index and the window hashes (all in P's slot).
//!
//! # Retention
//!
//! Each window key expires `ttl(size)` after its last write (wall clock), and every
//! commit trims from the indexes it touches, deleting their window keys, the
//! windows that ended more than `ttl(size)` before the commit's clock (event time),
//! so a backfill keeps the same span as a live run.
//!
//! # Commit and fencing
//!
//! Opening the store increments `meta.gen`: the writer's generation. A commit is
//! refused (`STALE`) when its generation is older than the stored one (another writer
//! took over) or its epoch is not newer than the stored one. On one Redis, an epoch is
//! one MULTI/EXEC transaction, fenced by WATCH on meta: every row change, the
//! indexes, TTLs and trims, and the new meta, all or nothing (plain commands: a Lua
//! script spent two thirds of its time turning arguments into Lua strings). On a
//! Cluster a transaction or script can only touch one slot, so an epoch is applied
//! in three steps, each an atomic Lua script ([`APPLY`]): the whole commit is
//! written to `intent` (fenced on meta), then each provider's changes (fenced on
//! the provider's `fence`, skipped where already applied), then meta (fenced) with
//! the intent deleted. A writer that stops between the steps leaves the intent, and the next
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
    /// Connections in a [`RedisReader`]'s pool (the writer uses one of its own).
    pub pool_size: u32,
    /// Append each epoch's changes of a provider to the stream `<ns>:{P}:changes`,
    /// capped at about this many entries; `None`: no streams.
    pub changes_stream: Option<u64>,
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
            pool_size: 8,
            changes_stream: None,
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
/// (refuse unless newer), `redo` (skip if already applied), `intent` (check like
/// `strict`, but leave the fence as it is) or `patch` (a swap's writes beside the
/// writer: neither check nor move the fence). KEYS[1] is the fence; ARGV is mode,
/// generation, epoch, meta JSON (or empty), then ops naming keys by KEYS index:
/// - `J idx ttl_ms trim_below prefix n s1..sn`: adds window starts to an index,
///   trims it (deleting the trimmed windows' keys, `prefix..start`, in the same
///   slot) and sets its TTL;
/// - `H k ttl_ms idx start ns nd f1 v1..f_ns v_ns d1..d_nd`: sets `ns` rows of a
///   window and deletes `nd`, then sets the window's TTL, or, when its last row
///   went, takes its start out of the index;
/// - `A k maxlen epoch rows`: appends an epoch's changes to a provider's stream;
/// - `S k ttl_ms n m1..mn`: adds to a set; `D k`: deletes; `P k value`: sets a string.
const APPLY: &str = r#"
local mode, mg, me = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if mode ~= 'patch' then
  local g = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
  local e = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
  if mg < g then return redis.error_reply('STALE ' .. e .. ' ' .. g) end
  if me <= e then
    if mode == 'redo' then return 0 end
    return redis.error_reply('STALE ' .. e .. ' ' .. g)
  end
end
local i = 5
local n = #ARGV
while i <= n do
  local op = ARGV[i]
  local k = KEYS[tonumber(ARGV[i + 1])]
  if op == 'H' then
    local ns, nd = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6])
    local a = i + 7
    -- Straight from ARGV, in slices below Lua's stack limit.
    local last = a + 2 * ns - 1
    while a <= last do
      local b = math.min(a + 3999, last)
      redis.call('HSET', k, unpack(ARGV, a, b))
      a = b + 1
    end
    last = a + nd - 1
    while a <= last do
      local b = math.min(a + 3999, last)
      redis.call('HDEL', k, unpack(ARGV, a, b))
      a = b + 1
    end
    if redis.call('EXISTS', k) == 1 then
      redis.call('PEXPIRE', k, ARGV[i + 2])
    else
      redis.call('ZREM', KEYS[tonumber(ARGV[i + 3])], ARGV[i + 4])
    end
    i = last + 1
  elseif op == 'J' then
    local c = tonumber(ARGV[i + 5])
    for j = 1, c do
      local st = ARGV[i + 5 + j]
      redis.call('ZADD', k, st, st)
    end
    if ARGV[i + 3] ~= '' then
      local cut = '(' .. ARGV[i + 3]
      for _, st in ipairs(redis.call('ZRANGE', k, '-inf', cut, 'BYSCORE')) do
        redis.call('DEL', ARGV[i + 4] .. st)
      end
      redis.call('ZREMRANGEBYSCORE', k, '-inf', cut)
    end
    redis.call('PEXPIRE', k, ARGV[i + 2])
    i = i + 6 + c
  elseif op == 'S' then
    local c = tonumber(ARGV[i + 3])
    for j = 1, c do redis.call('SADD', k, ARGV[i + 3 + j]) end
    if ARGV[i + 2] ~= '' then redis.call('PEXPIRE', k, ARGV[i + 2]) end
    i = i + 4 + c
  elseif op == 'A' then
    redis.call('XADD', k, 'MAXLEN', '~', ARGV[i + 2], '*', 'epoch', ARGV[i + 3], 'rows', ARGV[i + 4])
    i = i + 5
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
if mode ~= 'intent' and mode ~= 'patch' then
  redis.call('HSET', KEYS[1], 'gen', mg, 'epoch', me)
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'meta', ARGV[4]) end
end
return 1
"#;

/// The windows of one group key in a range, in one round trip. KEYS[1] is the index
/// (`<ns>:{P}:i:<view>:<size>`); ARGV: window key prefix (`<ns>:{P}:w:<view>:<size>:`),
/// field, T1, T2 (window starts, inclusive), and `1` for a top-k view (then every
/// rank's field, `<field>|<rank>`, is returned). Returns start, field, value triples.
pub const READ: &str = r#"
local out = {}
local mode = ARGV[5]
local want = ARGV[2] .. '|'
for _, st in ipairs(redis.call('ZRANGE', KEYS[1], ARGV[3], ARGV[4], 'BYSCORE')) do
  local key = ARGV[1] .. st
  if mode ~= '0' then
    local all = redis.call('HGETALL', key)
    for j = 1, #all, 2 do
      if mode == '2' or string.sub(all[j], 1, #want) == want then
        table.insert(out, st); table.insert(out, all[j]); table.insert(out, all[j + 1])
      end
    end
  else
    local v = redis.call('HGET', key, ARGV[2])
    if v then table.insert(out, st); table.insert(out, ARGV[2]); table.insert(out, v) end
  end
end
return out
"#;

enum Conn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    fn as_ref(&mut self) -> ConnRef<'_> {
        match self {
            Conn::Single(c) => ConnRef::Single(c),
            Conn::Cluster(c) => ConnRef::Cluster(c),
        }
    }
}

/// A borrowed connection: the writer's own, or one from a reader's pool.
enum ConnRef<'a> {
    Single(&'a mut redis::Connection),
    Cluster(&'a mut redis::cluster::ClusterConnection),
}

impl ConnRef<'_> {
    fn con(&mut self) -> &mut dyn ConnectionLike {
        match self {
            ConnRef::Single(c) => *c,
            ConnRef::Cluster(c) => *c,
        }
    }

    /// Commands pipelined (routed per key on a Cluster).
    fn pipeline<T: redis::FromRedisValue>(
        &mut self,
        cmds: &[redis::Cmd],
    ) -> Result<Vec<T>, RedisError> {
        match self {
            ConnRef::Single(c) => {
                let mut p = redis::pipe();
                for cmd in cmds {
                    p.add_command(cmd.clone());
                }
                p.query(*c)
            }
            ConnRef::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    p.add_command(cmd.clone());
                }
                p.query(c)
            }
        }
    }
}

/// Where reads get a connection.
trait Source {
    /// Runs `f` on a connection; a transient failure becomes `Unavailable`.
    fn run<T>(
        &mut self,
        f: impl FnOnce(ConnRef<'_>) -> Result<T, RedisError>,
    ) -> Result<T, StoreError>;
}

/// Runs commands pipelined, in chunks.
fn batch<T: redis::FromRedisValue>(
    src: &mut impl Source,
    cmds: Vec<redis::Cmd>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::with_capacity(cmds.len());
    for chunk in cmds.chunks(512) {
        out.extend(src.run(|mut c| c.pipeline::<T>(chunk))?);
    }
    Ok(out)
}

/// Keys of one namespace.
#[derive(Clone)]
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

/// Checks a config and makes its client (no connection yet).
fn build_client(cfg: &RedisConfig) -> Result<Client, StoreError> {
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
    crate::install_crypto();
    let certs =
        match &cfg.ca_file {
            Some(p) => Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(p).map_err(|e| {
                    StoreError::Config(format!("Redis CA file {}: {e}", p.display()))
                })?),
            }),
            None => None,
        };
    let bad = |e: RedisError| StoreError::Config(format!("{}: {e}", cfg.describe()));
    Ok(if cfg.cluster {
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
            redis::IntoConnectionInfo::into_connection_info(cfg.urls[0].as_str()).map_err(bad)?;
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
    })
}

/// A shared, thread-safe reader of one namespace for queries: a pool of at most
/// `pool_size` connections (`r2d2`), each request taking one for its round trip.
/// Cheap to clone. It does not take over as writer.
#[derive(Clone)]
pub struct RedisReader {
    inner: std::sync::Arc<ReaderInner>,
}

struct ReaderInner {
    pool: Pool,
    keys: Keys,
    meta: Meta,
    describe: String,
}

enum Pool {
    Single(r2d2::Pool<redis::Client>),
    Cluster(r2d2::Pool<redis::cluster::ClusterClient>),
}

/// Gives pooled single-server connections the configured reply timeout.
#[derive(Debug)]
struct Timeouts(Duration);

impl r2d2::CustomizeConnection<redis::Connection, RedisError> for Timeouts {
    fn on_acquire(&self, c: &mut redis::Connection) -> Result<(), RedisError> {
        c.set_read_timeout(Some(self.0))?;
        c.set_write_timeout(Some(self.0))
    }
}

impl RedisReader {
    /// Opens the pool (connecting at first use) and reads the namespace's meta.
    pub fn open(cfg: &RedisConfig) -> Result<RedisReader, StoreError> {
        if cfg.pool_size == 0 {
            return Err(StoreError::Config(
                "Redis pool size must be at least 1".into(),
            ));
        }
        let (size, timeout) = (cfg.pool_size, cfg.connect_timeout);
        let pool = match build_client(cfg)? {
            Client::Single(c) => Pool::Single(
                r2d2::Pool::builder()
                    .max_size(size)
                    .min_idle(Some(0))
                    .connection_timeout(timeout)
                    .connection_customizer(Box::new(Timeouts(cfg.response_timeout)))
                    .build_unchecked(c),
            ),
            Client::Cluster(c) => Pool::Cluster(
                r2d2::Pool::builder()
                    .max_size(size)
                    .min_idle(Some(0))
                    .connection_timeout(timeout)
                    .build_unchecked(c),
            ),
        };
        let mut inner = ReaderInner {
            pool,
            keys: Keys {
                ns: cfg.namespace.clone(),
            },
            meta: Meta::default(),
            describe: cfg.describe(),
        };
        let key = inner.keys.meta();
        let blob: Option<String> = PoolSource(&inner)
            .run(|mut c| redis::cmd("HGET").arg(&key).arg("meta").query(c.con()))?;
        if let Some(b) = blob {
            inner.meta = serde_json::from_str(&b).map_err(|e| StoreError::Corrupt {
                path: key,
                reason: e.to_string(),
            })?;
        }
        Ok(RedisReader {
            inner: std::sync::Arc::new(inner),
        })
    }

    /// As [`RedisReader::open`], for a namespace that may hold no commit yet: the
    /// views are the pipeline's (the writer refuses to commit with others).
    pub fn open_for(cfg: &RedisConfig, views: &[View]) -> Result<RedisReader, StoreError> {
        let mut r = RedisReader::open(cfg)?;
        if let Some(inner) = std::sync::Arc::get_mut(&mut r.inner) {
            inner.meta.views = views.to_vec();
        }
        Ok(r)
    }

    /// The meta read at open (the views are fixed; epoch and counters move on).
    pub fn meta(&self) -> &Meta {
        &self.inner.meta
    }

    /// As [`RedisStore::windows`], on a pooled connection.
    pub fn windows(&self, q: &WindowQuery) -> Result<Vec<(Millis, u32, RowValue)>, StoreError> {
        let i = &self.inner;
        read_windows(&mut PoolSource(i), &i.keys, &i.meta.views, q)
    }

    /// The rows of every group in the windows `q` names (its `group` is not used):
    /// one round trip, in no particular order.
    pub fn window_rows(&self, q: &WindowQuery) -> Result<Vec<StoredRow>, StoreError> {
        let i = &self.inner;
        read_window_rows(&mut PoolSource(i), &i.keys, &i.meta.views, q, None)
    }

    /// Every stored row.
    pub fn rows(&self) -> Result<Vec<StoredRow>, StoreError> {
        let i = &self.inner;
        read_rows(&mut PoolSource(i), &i.keys, &i.meta.views)
    }
}

/// A pooled connection per call.
struct PoolSource<'a>(&'a ReaderInner);

impl Source for PoolSource<'_> {
    fn run<T>(
        &mut self,
        f: impl FnOnce(ConnRef<'_>) -> Result<T, RedisError>,
    ) -> Result<T, StoreError> {
        let i = self.0;
        let unavailable = |e: String| StoreError::Unavailable(format!("{}: {e}", i.describe));
        let r = match &i.pool {
            Pool::Single(p) => {
                let mut c = p.get().map_err(|e| unavailable(e.to_string()))?;
                f(ConnRef::Single(&mut c))
            }
            Pool::Cluster(p) => {
                let mut c = p.get().map_err(|e| unavailable(e.to_string()))?;
                f(ConnRef::Cluster(&mut c))
            }
        };
        r.map_err(|e| {
            if transient(&e) {
                unavailable(e.to_string())
            } else {
                StoreError::Redis(format!("{}: {e}", i.describe))
            }
        })
    }
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
        s.retrying(RedisStore::take_over)?;
        Ok(s)
    }

    /// Opens without taking over: for readers (export, queries) and for checks
    /// before a takeover. Retries like [`RedisStore::open`].
    pub fn open_reader(cfg: RedisConfig) -> Result<RedisStore, StoreError> {
        let mut s = RedisStore::connect(cfg)?;
        s.meta = s.retrying(|s| s.read_meta())?.1;
        Ok(s)
    }

    /// Runs `op` until Redis answers, with backoff, up to `start_timeout`.
    fn retrying<T>(
        &mut self,
        mut op: impl FnMut(&mut RedisStore) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match op(self) {
                Err(StoreError::Unavailable(why)) if started.elapsed() < self.cfg.start_timeout => {
                    tracing::warn!(
                        store = %self.cfg.describe(),
                        error = %why,
                        retry_in_ms = pause.as_millis() as u64,
                        "Redis unreachable; retrying"
                    );
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(self.cfg.backoff_max);
                }
                Err(StoreError::Unavailable(why)) => {
                    return Err(StoreError::Unavailable(format!(
                        "{} still unreachable after {:?}: {why}",
                        self.cfg.describe(),
                        self.cfg.start_timeout
                    )))
                }
                other => return other,
            }
        }
    }

    fn connect(cfg: RedisConfig) -> Result<RedisStore, StoreError> {
        let client = build_client(&cfg)?;
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
        self.run(|mut c| f(c.con()))
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

    /// What some changes do to Redis (all of one provider on a Cluster): the index
    /// and window keys they touch, their rows, TTLs and trims.
    /// `clock`: the commit's clock, which windows are trimmed by (`Millis::MIN`: none).
    fn plan(&self, clock: Millis, changes: &[&RowUpdate]) -> Plan {
        let mut indexes: Vec<IndexPlan> = Vec::new();
        let mut index_at: std::collections::HashMap<String, usize> = Default::default();
        let mut windows: Vec<WindowPlan> = Vec::new();
        let mut window_at: std::collections::HashMap<String, usize> = Default::default();
        let ttl_ms = |size: WindowSize| self.cfg.ttl(size).as_millis().min(i64::MAX as u128) as i64;
        // Per provider, the epoch's changes as JSON items (with change streams on).
        let mut streams: BTreeMap<&str, String> = BTreeMap::new();
        for u in changes {
            let Some(view) = self.meta.views.get(u.key.view as usize) else {
                continue;
            };
            let provider = u.key.group[0].as_str();
            let size = u.key.size.label();
            let key = format!(
                "{}:{{{provider}}}:w:{}:{size}:{}",
                self.keys.ns, view.name, u.key.start
            );
            let f = field(view, &u.key, u.rank);
            let v = u.value.as_ref().map(|v| value(view, v));
            if self.cfg.changes_stream.is_some() {
                let items = streams.entry(provider).or_default();
                items.push(if items.is_empty() { '[' } else { ',' });
                let _ = std::fmt::Write::write_fmt(
                    items,
                    format_args!(
                        "[{},\"{size}\",{},{},{}]",
                        serde_json::to_string(&view.name).expect("strings serialize"),
                        u.key.start,
                        serde_json::to_string(&f).expect("strings serialize"),
                        v.as_deref().unwrap_or("null"),
                    ),
                );
            }
            let w = match window_at.get(&key) {
                Some(w) => *w,
                None => {
                    let p = self.keys.provider(provider);
                    let series = format!("{}:{size}", view.name);
                    let index_key = format!("{p}i:{series}");
                    let i = *index_at.entry(index_key.clone()).or_insert_with(|| {
                        let size = u.key.size;
                        // Windows that ended more than the TTL before the clock.
                        let trim = (clock != Millis::MIN)
                            .then(|| clock.checked_sub(ttl_ms(size))?.checked_sub(size.max_len()))
                            .flatten();
                        indexes.push(IndexPlan {
                            key: index_key,
                            prefix: format!("{p}w:{series}:"),
                            ttl_ms: ttl_ms(size),
                            trim,
                            starts: Vec::new(),
                        });
                        indexes.len() - 1
                    });
                    indexes[i].starts.push(u.key.start);
                    window_at.insert(key.clone(), windows.len());
                    windows.push(WindowPlan {
                        key,
                        index: i,
                        start: u.key.start,
                        ttl_ms: ttl_ms(u.key.size),
                        rows: BTreeMap::new(),
                    });
                    windows.len() - 1
                }
            };
            // The last change of a row wins, should an epoch hold two; an empty value
            // deletes the row.
            windows[w].rows.insert(f, v.unwrap_or_default());
        }
        let streams = streams
            .into_iter()
            .map(|(p, mut items)| {
                items.push(']');
                (format!("{}changes", self.keys.provider(p)), items)
            })
            .collect();
        Plan {
            indexes,
            windows,
            streams,
        }
    }

    /// A plan as APPLY's keys and ops.
    fn lua_ops(&self, epoch: u64, plan: Plan, keys: &mut Vec<String>, ops: &mut Vec<Arg>) {
        // KEYS index (1 is the fence) of each index key.
        let first = keys.len() + 2;
        let index_slot: Vec<usize> = (0..plan.indexes.len()).map(|i| first + i).collect();
        // Indexes first (so a window emptied below can leave its index), then each
        // window's rows and TTL.
        for (i, ix) in plan.indexes.into_iter().enumerate() {
            keys.push(ix.key);
            ops.push(Arg::S("J".into()));
            ops.push(Arg::I(index_slot[i] as i64));
            ops.push(Arg::I(ix.ttl_ms));
            ops.push(match ix.trim {
                Some(t) => Arg::I(t),
                None => Arg::S(String::new()),
            });
            ops.push(Arg::S(ix.prefix));
            ops.push(Arg::I(ix.starts.len() as i64));
            ops.extend(ix.starts.into_iter().map(Arg::I));
        }
        for w in plan.windows {
            keys.push(w.key);
            let (set, del): (Vec<_>, Vec<_>) = w.rows.into_iter().partition(|(_, v)| !v.is_empty());
            ops.push(Arg::S("H".into()));
            ops.push(Arg::I(keys.len() as i64 + 1));
            ops.push(Arg::I(w.ttl_ms));
            ops.push(Arg::I(index_slot[w.index] as i64));
            ops.push(Arg::I(w.start));
            ops.push(Arg::I(set.len() as i64));
            ops.push(Arg::I(del.len() as i64));
            for (f, v) in set {
                ops.push(Arg::S(f));
                ops.push(Arg::S(v));
            }
            ops.extend(del.into_iter().map(|(f, _)| Arg::S(f)));
        }
        for (k, payload) in plan.streams {
            keys.push(k);
            ops.push(Arg::S("A".into()));
            ops.push(Arg::I(keys.len() as i64 + 1));
            ops.push(Arg::I(self.cfg.changes_stream.unwrap_or(0) as i64));
            ops.push(Arg::I(epoch as i64));
            ops.push(Arg::S(payload));
        }
    }

    fn meta_after(&self, c: &Commit) -> Result<Meta, StoreError> {
        let mut m = self.meta.clone();
        super::advance(&mut m, c)?;
        Ok(m)
    }

    /// One server: the epoch as one MULTI/EXEC transaction of plain commands,
    /// fenced by WATCH on meta (a Lua script would spend most of its time turning
    /// every argument into a Lua string).
    fn commit_single(&mut self, c: &Commit) -> Result<(), StoreError> {
        let next = self.meta_after(c)?;
        let blob = serde_json::to_string(&next).expect("meta serializes");
        let changes: Vec<&RowUpdate> = c.changes.iter().collect();
        let plan = self.plan(c.clock, &changes);
        let providers = providers_of(&changes);
        let meta_key = self.keys.meta();
        let providers_key = self.keys.providers();
        let stream_len = self.cfg.changes_stream.unwrap_or(0);
        let (gen, epoch) = (self.gen, c.epoch);
        let r = self.with(|con| {
            redis::cmd("WATCH").arg(&meta_key).exec(con)?;
            let (g, e): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
                .arg(&meta_key)
                .arg("gen")
                .arg("epoch")
                .query(con)?;
            let (g, e) = (g.unwrap_or(0), e.unwrap_or(0));
            if g > gen || e >= epoch {
                redis::cmd("UNWATCH").exec(con)?;
                return Ok(Err((e, g)));
            }
            // The windows trimmed from each index (read under the WATCH).
            let mut trims = redis::pipe();
            let mut trimmed_ix = Vec::new();
            for (i, ix) in plan.indexes.iter().enumerate() {
                if let Some(t) = ix.trim {
                    trims
                        .cmd("ZRANGE")
                        .arg(&ix.key)
                        .arg("-inf")
                        .arg(format!("({t}"))
                        .arg("BYSCORE");
                    trimmed_ix.push(i);
                }
            }
            let trimmed: Vec<Vec<String>> = if trimmed_ix.is_empty() {
                Vec::new()
            } else {
                trims.query(con)?
            };
            let mut tx = rows_tx(
                &plan,
                &trimmed,
                &trimmed_ix,
                &providers,
                &providers_key,
                stream_len,
                epoch,
            );
            tx.cmd("HSET")
                .arg(&meta_key)
                .arg("gen")
                .arg(gen)
                .arg("epoch")
                .arg(epoch)
                .arg("meta")
                .arg(&blob)
                .ignore();
            // `None`: meta changed since the WATCH (another writer).
            let done: Option<()> = tx.query(con)?;
            if done.is_none() {
                let (g, e): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
                    .arg(&meta_key)
                    .arg("gen")
                    .arg("epoch")
                    .query(con)?;
                return Ok(Err((e.unwrap_or(0), g.unwrap_or(0))));
            }
            Ok(Ok(()))
        })?;
        if let Err((stored, stored_gen)) = r {
            return Err(if stored_gen > gen {
                StoreError::Superseded {
                    mine: gen,
                    theirs: stored_gen,
                }
            } else if stored == epoch && stored_gen == gen {
                // Our own earlier attempt got through before its reply was lost.
                self.meta = next;
                return Ok(());
            } else {
                StoreError::Stale {
                    offered: epoch,
                    stored,
                }
            });
        }
        self.unindex_emptied(&plan)?;
        self.meta = next;
        Ok(())
    }

    /// Writes rows into the namespace beside its writer, without taking it over: one
    /// MULTI/EXEC on one server, so a reader sees all of them or none. Meant for
    /// windows the writer has sealed (a backfill's swap, see [`super::swap`]): the
    /// writer never writes those again, and its fencing is untouched. On a Cluster,
    /// where one transaction cannot span providers, one script per provider.
    pub fn patch(&mut self, changes: &[RowUpdate]) -> Result<(), StoreError> {
        if self.cfg.cluster {
            return self.patch_cluster(changes);
        }
        let changes: Vec<&RowUpdate> = changes.iter().collect();
        let plan = self.plan(Millis::MIN, &changes);
        let providers = providers_of(&changes);
        let providers_key = self.keys.providers();
        let stream_len = self.cfg.changes_stream.unwrap_or(0);
        let epoch = self.meta.epoch;
        let tx = rows_tx(
            &plan,
            &[],
            &[],
            &providers,
            &providers_key,
            stream_len,
            epoch,
        );
        self.with(|con| tx.query::<()>(con))?;
        self.unindex_emptied(&plan)
    }

    /// A Cluster has no transaction across slots: one script per provider (whose keys
    /// share its hash tag), so each provider's windows change at once, which is what
    /// one provider's reads can see; then the providers set. Like `patch` on one
    /// server, it leaves every fence alone (mode `patch`).
    fn patch_cluster(&mut self, changes: &[RowUpdate]) -> Result<(), StoreError> {
        let epoch = self.meta.epoch;
        let mut groups: BTreeMap<&str, Vec<&RowUpdate>> = BTreeMap::new();
        for u in changes {
            groups.entry(u.key.group[0].as_str()).or_default().push(u);
        }
        for (p, changes) in &groups {
            let (mut keys, mut ops) = (Vec::new(), Vec::new());
            self.lua_ops(epoch, self.plan(Millis::MIN, changes), &mut keys, &mut ops);
            let fence = format!("{}fence", self.keys.provider(p));
            self.apply(&fence, "patch", epoch, "", &keys, &ops)?;
        }
        if !groups.is_empty() {
            let meta_key = self.keys.meta();
            let keys = vec![self.keys.providers()];
            let mut ops = vec![
                Arg::S("S".into()),
                Arg::I(2),
                Arg::S(String::new()),
                Arg::I(groups.len() as i64),
            ];
            ops.extend(groups.keys().map(|p| Arg::S((*p).to_owned())));
            self.apply(&meta_key, "patch", epoch, "", &keys, &ops)?;
        }
        Ok(())
    }

    /// Windows whose last row went leave their index (a dangling start would only be
    /// skipped by readers; this keeps the index exact).
    fn unindex_emptied(&mut self, plan: &Plan) -> Result<(), StoreError> {
        let emptied: Vec<(&str, &str, Millis)> = plan
            .windows
            .iter()
            .filter(|w| w.rows.values().any(String::is_empty))
            .map(|w| (w.key.as_str(), plan.indexes[w.index].key.as_str(), w.start))
            .collect();
        if !emptied.is_empty() {
            let exists: Vec<bool> = batch(
                self,
                emptied
                    .iter()
                    .map(|(k, _, _)| {
                        let mut c = redis::cmd("EXISTS");
                        c.arg(*k);
                        c
                    })
                    .collect(),
            )?;
            let gone: Vec<redis::Cmd> = emptied
                .iter()
                .zip(exists)
                .filter(|(_, e)| !e)
                .map(|((_, ix, st), _)| {
                    let mut c = redis::cmd("ZREM");
                    c.arg(*ix).arg(*st);
                    c
                })
                .collect();
            if !gone.is_empty() {
                let _: Vec<i64> = batch(self, gone)?;
            }
        }
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
            self.lua_ops(c.epoch, self.plan(c.clock, changes), &mut keys, &mut ops);
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

    /// The stored (generation, epoch).
    fn stored_fence(&mut self) -> Result<(u64, u64), StoreError> {
        let key = self.keys.meta();
        let (g, e): (Option<u64>, Option<u64>) = self.with(|c| {
            redis::cmd("HMGET")
                .arg(&key)
                .arg("gen")
                .arg("epoch")
                .query(c)
        })?;
        Ok((g.unwrap_or(0), e.unwrap_or(0)))
    }

    /// Is `epoch` stored under this writer's generation (our own earlier attempt)?
    fn confirm(&mut self, epoch: u64) -> Result<bool, StoreError> {
        Ok(self.stored_fence()? == (self.gen, epoch))
    }

    /// Checks that Redis still holds what this writer committed: an older stored
    /// epoch means Redis lost writes, and the process must rebuild from it.
    fn check_not_behind(&mut self) -> Result<(), StoreError> {
        let (g, e) = self.stored_fence()?;
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

    /// `MEMORY USAGE` of the window and index keys per view: view name -> (bytes,
    /// rows, window keys).
    pub fn memory_usage(&mut self) -> Result<BTreeMap<String, (u64, u64, u64)>, StoreError> {
        let (keys, views) = (self.keys.clone(), self.meta.views.clone());
        memory_usage(self, &keys, &views)
    }

    /// Every stored row, read back from Redis.
    pub fn read_rows(&mut self) -> Result<Vec<StoredRow>, StoreError> {
        let (keys, views) = (self.keys.clone(), self.meta.views.clone());
        read_rows(self, &keys, &views)
    }

    /// The windows a query asks for, in one round trip: (start, rank, value), by
    /// start then rank.
    pub fn windows(&mut self, q: &WindowQuery) -> Result<Vec<(Millis, u32, RowValue)>, StoreError> {
        let (keys, views) = (self.keys.clone(), self.meta.views.clone());
        read_windows(self, &keys, &views, q)
    }

    /// This writer's generation.
    pub fn generation(&self) -> u64 {
        self.gen
    }
}

/// `MEMORY USAGE` of the window and index keys per view: view name -> (bytes,
/// rows, window keys).
fn memory_usage(
    src: &mut impl Source,
    keys: &Keys,
    views: &[View],
) -> Result<BTreeMap<String, (u64, u64, u64)>, StoreError> {
    let (windows, indexes) = window_keys(src, keys, views)?;
    let mut cmds = Vec::with_capacity(windows.len() * 2 + indexes.len());
    for (_, _, _, k) in &windows {
        let mut m = redis::cmd("MEMORY");
        m.arg("USAGE").arg(k).arg("SAMPLES").arg(0);
        let mut h = redis::cmd("HLEN");
        h.arg(k);
        cmds.push(m);
        cmds.push(h);
    }
    for (_, k) in &indexes {
        let mut m = redis::cmd("MEMORY");
        m.arg("USAGE").arg(k).arg("SAMPLES").arg(0);
        cmds.push(m);
    }
    let v: Vec<Option<u64>> = batch(src, cmds)?;
    let name = |ix: usize| views[ix].name.clone();
    let mut out: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for ((ix, _, _, _), pair) in windows.iter().zip(v.chunks(2)) {
        let e = out.entry(name(*ix)).or_default();
        e.0 += pair[0].unwrap_or(0);
        e.1 += pair[1].unwrap_or(0);
        e.2 += 1;
    }
    for ((ix, _), b) in indexes.iter().zip(&v[windows.len() * 2..]) {
        out.entry(name(*ix)).or_default().0 += b.unwrap_or(0);
    }
    Ok(out)
}

/// One atomic transaction writing a plan's rows: index additions and trims (the
/// windows `trimmed` read for the indexes `trimmed_ix`), window rows and TTLs, change
/// streams and the provider set. The caller may add commands before running it.
#[allow(clippy::too_many_arguments)]
fn rows_tx(
    plan: &Plan,
    trimmed: &[Vec<String>],
    trimmed_ix: &[usize],
    providers: &[&str],
    providers_key: &str,
    stream_len: u64,
    epoch: u64,
) -> redis::Pipeline {
    let mut tx = redis::pipe();
    tx.atomic();
    for (i, ix) in plan.indexes.iter().enumerate() {
        let z = tx.cmd("ZADD").arg(&ix.key);
        for st in &ix.starts {
            z.arg(*st).arg(*st);
        }
        tx.ignore();
        if let Some(t) = ix.trim {
            let gone = &trimmed[trimmed_ix.iter().position(|x| *x == i).expect("trimmed")];
            if !gone.is_empty() {
                let d = tx.cmd("DEL");
                for st in gone {
                    d.arg(format!("{}{st}", ix.prefix));
                }
                tx.ignore();
            }
            tx.cmd("ZREMRANGEBYSCORE")
                .arg(&ix.key)
                .arg("-inf")
                .arg(format!("({t}"))
                .ignore();
        }
        tx.cmd("PEXPIRE").arg(&ix.key).arg(ix.ttl_ms).ignore();
    }
    for w in &plan.windows {
        let sets = w.rows.iter().filter(|(_, v)| !v.is_empty());
        if w.rows.values().any(|v| !v.is_empty()) {
            let h = tx.cmd("HSET").arg(&w.key);
            for (f, v) in sets {
                h.arg(f).arg(v);
            }
            tx.ignore();
        }
        if w.rows.values().any(String::is_empty) {
            let h = tx.cmd("HDEL").arg(&w.key);
            for (f, _) in w.rows.iter().filter(|(_, v)| v.is_empty()) {
                h.arg(f);
            }
            tx.ignore();
        }
        tx.cmd("PEXPIRE").arg(&w.key).arg(w.ttl_ms).ignore();
    }
    for (k, rows) in &plan.streams {
        tx.cmd("XADD")
            .arg(k)
            .arg("MAXLEN")
            .arg("~")
            .arg(stream_len)
            .arg("*")
            .arg("epoch")
            .arg(epoch)
            .arg("rows")
            .arg(rows)
            .ignore();
    }
    if !providers.is_empty() {
        tx.cmd("SADD").arg(providers_key).arg(providers).ignore();
    }
    tx
}

/// Every window key of the namespace, as (view index, size, start, key), and
/// every index key, as (view index, key).
#[allow(clippy::type_complexity)]
fn window_keys(
    src: &mut impl Source,
    keys: &Keys,
    views: &[View],
) -> Result<
    (
        Vec<(usize, WindowSize, Millis, String)>,
        Vec<(usize, String)>,
    ),
    StoreError,
> {
    let pkey = keys.providers();
    let mut providers: Vec<String> =
        src.run(|mut c| redis::cmd("SMEMBERS").arg(&pkey).query(c.con()))?;
    providers.sort();
    let mut series = Vec::new();
    for p in &providers {
        let prefix = keys.provider(p);
        for (ix, v) in views.iter().enumerate() {
            for size in &v.windows {
                let name = format!("{}:{}", v.name, size.label());
                series.push((
                    ix,
                    *size,
                    format!("{prefix}i:{name}"),
                    format!("{prefix}w:{name}:"),
                ));
            }
        }
    }
    let cmds = series
        .iter()
        .map(|(_, _, i, _)| {
            let mut c = redis::cmd("ZRANGE");
            c.arg(i).arg(0).arg(-1);
            c
        })
        .collect();
    let starts: Vec<Vec<Millis>> = batch(src, cmds)?;
    let mut windows = Vec::new();
    let mut indexes = Vec::new();
    for ((ix, size, index, prefix), starts) in series.into_iter().zip(starts) {
        if starts.is_empty() {
            continue;
        }
        windows.extend(
            starts
                .into_iter()
                .map(|st| (ix, size, st, format!("{prefix}{st}"))),
        );
        indexes.push((ix, index));
    }
    Ok((windows, indexes))
}

/// Every stored row, read back from Redis.
fn read_rows(
    src: &mut impl Source,
    keys: &Keys,
    views: &[View],
) -> Result<Vec<StoredRow>, StoreError> {
    let (windows, _) = window_keys(src, keys, views)?;
    let cmds = windows
        .iter()
        .map(|(_, _, _, k)| {
            let mut c = redis::cmd("HGETALL");
            c.arg(k);
            c
        })
        .collect();
    let all: Vec<Vec<(String, String)>> = batch(src, cmds)?;
    let mut out = Vec::new();
    for ((ix, size, start, key), fields) in windows.into_iter().zip(all) {
        let view = &views[ix];
        let provider = key_provider(&key).unwrap_or_default();
        for (f, v) in fields {
            let corrupt = |what: &str| StoreError::Corrupt {
                path: format!("{key} {f}"),
                reason: format!("not a {what} of view {}", view.name),
            };
            let (mut group, rank) = parse_field(view, &f).ok_or_else(|| corrupt("field"))?;
            group.insert(0, provider.into());
            let value = parse_value(&v).ok_or_else(|| corrupt("value"))?;
            out.push((
                (
                    RowKey {
                        view: ix as u16,
                        size,
                        start,
                        group,
                    },
                    rank,
                ),
                value,
            ));
        }
    }
    Ok(out)
}

/// The windows of one group key (the group-by values after provider_id) from
/// `t1` to `t2` (window starts, inclusive), in one round trip: (start, rank,
/// value), by start then rank.
fn read_windows(
    src: &mut impl Source,
    keys: &Keys,
    views: &[View],
    q: &WindowQuery,
) -> Result<Vec<(Millis, u32, RowValue)>, StoreError> {
    let mut out: Vec<_> = read_window_rows(src, keys, views, q, Some(q.group))?
        .into_iter()
        .map(|((k, rank), v)| (k.start, rank, v))
        .collect();
    out.sort_by_key(|(s, r, _)| (*s, *r));
    Ok(out)
}

/// The rows of the windows `q` names, of the group `group` (in the view's order
/// after provider_id), or of every group with `None`: one round trip ([`READ`]).
fn read_window_rows(
    src: &mut impl Source,
    keys: &Keys,
    views: &[View],
    q: &WindowQuery,
    group: Option<&[&str]>,
) -> Result<Vec<StoredRow>, StoreError> {
    let Some((vi, v)) = views.iter().enumerate().find(|(_, v)| v.name == q.view) else {
        return Ok(Vec::new());
    };
    let p = keys.provider(q.provider);
    let name = format!("{}:{}", v.name, q.size.label());
    let f = group
        .unwrap_or_default()
        .iter()
        .map(|g| escape(g))
        .collect::<Vec<_>>()
        .join(":");
    let mode = match (group, &v.top_k) {
        (None, _) => "2",
        (Some(_), Some(_)) => "1",
        (Some(_), None) => "0",
    };
    let script = Script::new(READ);
    let mut inv = script.prepare_invoke();
    inv.key(format!("{p}i:{name}"))
        .arg(format!("{p}w:{name}:"))
        .arg(&f)
        .arg(q.from)
        .arg(q.to)
        .arg(mode);
    let flat: Vec<String> = src.run(|mut c| inv.invoke(c.con()))?;
    let mut out = Vec::with_capacity(flat.len() / 3);
    for t in flat.chunks(3) {
        let bad = || StoreError::Corrupt {
            path: format!("{p}w:{name}:{}", t[0]),
            reason: format!("field '{}' or its value", t[1]),
        };
        let start: Millis = t[0].parse().map_err(|_| bad())?;
        let (rest, rank) = parse_field(v, &t[1]).ok_or_else(bad)?;
        let mut group = Vec::with_capacity(rest.len() + 1);
        group.push(CompactString::from(q.provider));
        group.extend(rest);
        let key = RowKey {
            view: vi as u16,
            size: q.size,
            start,
            group,
        };
        out.push(((key, rank), parse_value(&t[2]).ok_or_else(bad)?));
    }
    Ok(out)
}

/// "All windows of provider P, view V, size S, group key K, from T1 to T2".
#[derive(Clone, Debug)]
pub struct WindowQuery<'a> {
    pub provider: &'a str,
    pub view: &'a str,
    pub size: WindowSize,
    /// The group-by values after provider_id, in the view's order.
    pub group: &'a [&'a str],
    /// Window starts, inclusive.
    pub from: Millis,
    pub to: Millis,
}

/// What one commit does to the keys of a provider (or all, on one server).
struct Plan {
    indexes: Vec<IndexPlan>,
    windows: Vec<WindowPlan>,
    /// Change-stream key and the epoch's changes there, as a JSON array.
    streams: Vec<(String, String)>,
}

struct IndexPlan {
    key: String,
    /// Window key prefix: the key of a window is the prefix and its start.
    prefix: String,
    ttl_ms: i64,
    /// Trim windows starting before this (they ended more than the TTL before the clock).
    trim: Option<Millis>,
    starts: Vec<Millis>,
}

struct WindowPlan {
    key: String,
    /// In `Plan::indexes`.
    index: usize,
    start: Millis,
    ttl_ms: i64,
    /// Field -> value; an empty value deletes the row.
    rows: BTreeMap<String, String>,
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

/// The provider of a key: what its hash tag holds.
fn key_provider(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open..].find('}')? + open;
    Some(&key[open + 1..close])
}

/// A row's field in its window hash: the group-by values after provider_id,
/// escaped, joined by `:`; `|<rank>` in a top-k view.
fn field(view: &View, k: &RowKey, rank: u32) -> String {
    let mut f = String::new();
    for (i, g) in k.group[1..].iter().enumerate() {
        if i > 0 {
            f.push(':');
        }
        f.push_str(&escape(g));
    }
    if view.top_k.is_some() {
        f.push('|');
        f.push_str(&rank.to_string());
    }
    f
}

/// The group-by values after provider_id, and the rank, of a field.
fn parse_field(view: &View, f: &str) -> Option<(Vec<CompactString>, u32)> {
    let (f, rank) = match view.top_k {
        Some(_) => {
            let (f, r) = f.rsplit_once('|')?;
            (f, r.parse().ok()?)
        }
        None => (f, 0),
    };
    let n = view.group_by.len() - 1;
    let group: Vec<CompactString> = if n == 0 {
        (f.is_empty()).then(Vec::new)?
    } else {
        f.split(':')
            .map(|p| unescape(p).map(CompactString::from))
            .collect::<Option<_>>()?
    };
    (group.len() == n).then_some((group, rank))
}

/// A row's value: `[sales_count, gross_amount, refunds_count, refunds_amount,
/// distinct_customers, min_ticket, max_ticket, member]`, trailing nulls left out.
fn value(view: &View, v: &RowValue) -> String {
    use std::fmt::Write;
    let money = |t: Option<i64>| match t {
        Some(t) => format!("\"{}\"", format_hundredths(t.into())),
        None => "null".to_owned(),
    };
    let mut tail: Vec<String> = vec![
        if view.metrics.contains(&Metric::DistinctCustomers) {
            v.distinct_customers.to_string()
        } else {
            "null".into()
        },
        if view.metrics.contains(&Metric::MinTicket) {
            money(v.min_ticket)
        } else {
            "null".into()
        },
        if view.metrics.contains(&Metric::MaxTicket) {
            money(v.max_ticket)
        } else {
            "null".into()
        },
        match &v.member {
            Some(m) => serde_json::to_string(m.as_str()).expect("strings serialize"),
            None => "null".into(),
        },
    ];
    while tail.last().is_some_and(|t| t == "null") {
        tail.pop();
    }
    let mut out = format!(
        "[{},\"{}\",{},\"{}\"",
        v.sums.sales,
        format_hundredths(v.sums.gross),
        v.sums.refunds,
        format_hundredths(v.sums.refunds_amount)
    );
    for t in tail {
        let _ = write!(out, ",{t}");
    }
    out.push(']');
    out
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

fn parse_value(s: &str) -> Option<RowValue> {
    let a: Vec<serde_json::Value> = serde_json::from_str(s).ok()?;
    let at = |i: usize| a.get(i).filter(|v| !v.is_null());
    let amount = |i: usize| parse_hundredths(at(i)?.as_str()?);
    let ticket = |i: usize| -> Option<Option<i64>> {
        match at(i) {
            None => Some(None),
            Some(v) => Some(Some(i64::try_from(parse_hundredths(v.as_str()?)?).ok()?)),
        }
    };
    Some(RowValue {
        sums: Sums {
            sales: at(0)?.as_i64()?,
            gross: amount(1)?,
            refunds: at(2)?.as_i64()?,
            refunds_amount: amount(3)?,
        },
        distinct_customers: match at(4) {
            Some(v) => v.as_u64()?,
            None => 0,
        },
        min_ticket: ticket(5)?,
        max_ticket: ticket(6)?,
        member: match at(7) {
            Some(v) => Some(CompactString::from(v.as_str()?)),
            None => None,
        },
    })
}

impl Source for RedisStore {
    fn run<T>(
        &mut self,
        f: impl FnOnce(ConnRef<'_>) -> Result<T, RedisError>,
    ) -> Result<T, StoreError> {
        let r = match self.conn() {
            Ok(c) => f(c.as_ref()),
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
