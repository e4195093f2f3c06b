//! API keys: the keys file, hashing, roles, and the [`Tenant`] a provider key grants.
//!
//! A key is `tly_<id>_<secret>`: `id` is 12 hex digits (public, names the key in
//! `tally keys list` and in logs), `secret` 43 URL-safe base64 characters (32 random
//! bytes). The keys file (JSON) stores, per key, its id, role, provider, name,
//! creation time, revocation time and the SHA-256 digest of the whole key, never the
//! key itself. A plain digest is enough: the secret is 256 random bits, so nothing can
//! be guessed from it (a slow password hash protects low-entropy passwords, which API
//! keys are not). A presented key is looked up by its id and its digest compared in
//! constant time; an unknown id is compared against a dummy digest, so both failures
//! take the same path.
//!
//! [`KeyRing`] holds the file's keys in memory and reloads them when the file changes
//! (checked every second), without a restart; a file that no longer parses is logged
//! and the keys loaded before stay in force. `tally keys add|list|revoke` edit the file
//! (written to a temporary file and renamed, mode 0600).

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use subtle::ConstantTimeEq;

/// What a key may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// Query one provider's aggregates.
    Provider { provider: String },
    /// Publish events.
    Ingest,
    /// Operate: status, and more as it comes.
    Admin,
}

impl Role {
    pub fn describe(&self) -> String {
        match self {
            Role::Provider { provider } => format!("provider {provider}"),
            Role::Ingest => "ingest".into(),
            Role::Admin => "admin".into(),
        }
    }
}

/// One key as stored. (Unknown fields are not refused here: serde cannot check them
/// through the flattened role.)
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyEntry {
    pub id: String,
    #[serde(flatten)]
    pub role: Role,
    /// A label for people ("pos-fleet", "claro dashboard").
    #[serde(default)]
    pub name: String,
    /// Hex SHA-256 of the whole key.
    pub sha256: String,
    /// RFC 3339.
    pub created: String,
    /// RFC 3339; a revoked key is refused.
    #[serde(default)]
    pub revoked: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyEntry>,
}

/// A keys file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("keys file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("keys file {path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("no key with id '{0}' in the keys file")]
    Unknown(String),
}

/// The provider a request may read: built only here, from a valid provider key, so
/// every read of the store is bound to the caller's own provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    provider: String,
}

impl Tenant {
    pub fn provider(&self) -> &str {
        &self.provider
    }
}

/// Who is calling, once the key is checked.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The key's id (for rate limits and logs).
    pub key_id: String,
    pub role: Role,
}

impl Principal {
    /// The tenant of a provider key.
    pub fn tenant(&self) -> Option<Tenant> {
        match &self.role {
            Role::Provider { provider } => Some(Tenant {
                provider: provider.clone(),
            }),
            _ => None,
        }
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The id part of a key, when it has the key's shape.
fn id_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("tly_")?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) && secret.len() == 43)
        .then_some(id)
}

fn load(path: &Path) -> Result<Vec<(KeyEntry, [u8; 32])>, KeyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        // No file yet: no keys (every request is refused until one is added).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(KeyError::Io {
                path: path.display().to_string(),
                source,
            })
        }
    };
    let invalid = |reason: String| KeyError::Invalid {
        path: path.display().to_string(),
        reason,
    };
    let f: KeyFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let mut out = Vec::with_capacity(f.keys.len());
    for k in f.keys {
        let d = unhex(&k.sha256)
            .ok_or_else(|| invalid(format!("key {}: sha256 is not 64 hex digits", k.id)))?;
        out.push((k, d));
    }
    Ok(out)
}

fn save(path: &Path, keys: &[KeyEntry]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = KeyFile {
        keys: keys.to_vec(),
    };
    let mut text = serde_json::to_string_pretty(&file).expect("keys serialize");
    text.push('\n');
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d).map_err(io)?;
    }
    let mut tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new("."))).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    use std::io::Write;
    tmp.write_all(text.as_bytes()).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

fn now_rfc3339() -> String {
    crate::model::window::rfc3339(chrono::Utc::now().timestamp_millis())
}

/// Adds a key for `role`; returns the new key (shown once, never stored) and its entry.
pub fn add(path: &Path, role: Role, name: &str) -> Result<(String, KeyEntry), KeyError> {
    if let Role::Provider { provider } = &role {
        if !crate::decode::valid_provider_id(provider) {
            return Err(KeyError::Invalid {
                path: path.display().to_string(),
                reason: format!(
                    "'{provider}' is not a valid provider_id (1..=64 bytes of [A-Za-z0-9_.-])"
                ),
            });
        }
    }
    let mut keys: Vec<KeyEntry> = load(path)?.into_iter().map(|(k, _)| k).collect();
    let mut id_bytes = [0u8; 6];
    let mut secret = [0u8; 32];
    getrandom::fill(&mut id_bytes).expect("system random source");
    getrandom::fill(&mut secret).expect("system random source");
    let id = hex(&id_bytes);
    let key = format!(
        "tly_{id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let entry = KeyEntry {
        id,
        role,
        name: name.to_owned(),
        sha256: hex(&digest(&key)),
        created: now_rfc3339(),
        revoked: None,
    };
    keys.push(entry.clone());
    save(path, &keys)?;
    Ok((key, entry))
}

/// Every key in the file.
pub fn list(path: &Path) -> Result<Vec<KeyEntry>, KeyError> {
    Ok(load(path)?.into_iter().map(|(k, _)| k).collect())
}

/// Marks a key revoked (kept in the file, refused from the next reload on).
pub fn revoke(path: &Path, id: &str) -> Result<KeyEntry, KeyError> {
    let mut keys: Vec<KeyEntry> = load(path)?.into_iter().map(|(k, _)| k).collect();
    let k = keys
        .iter_mut()
        .find(|k| k.id == id)
        .ok_or_else(|| KeyError::Unknown(id.to_owned()))?;
    if k.revoked.is_none() {
        k.revoked = Some(now_rfc3339());
    }
    let out = k.clone();
    save(path, &keys)?;
    Ok(out)
}

type Loaded = Vec<(KeyEntry, [u8; 32])>;

/// The keys in force, reloaded when the file changes.
#[derive(Clone)]
pub struct KeyRing {
    path: PathBuf,
    keys: Arc<RwLock<Loaded>>,
    seen: Arc<RwLock<Option<(SystemTime, u64)>>>,
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let md = std::fs::metadata(path).ok()?;
    Some((md.modified().ok()?, md.len()))
}

impl KeyRing {
    /// Loads the file (a missing file is an empty ring).
    pub fn open(path: &Path) -> Result<KeyRing, KeyError> {
        let seen = stamp(path);
        let keys = load(path)?;
        Ok(KeyRing {
            path: path.to_owned(),
            keys: Arc::new(RwLock::new(keys)),
            seen: Arc::new(RwLock::new(seen)),
        })
    }

    /// Reloads when the file's modification time or length changed; keeps the keys in
    /// force when the new file is not valid. Returns whether it reloaded.
    pub fn refresh(&self) -> bool {
        let now = stamp(&self.path);
        if *self.seen.read().expect("lock") == now {
            return false;
        }
        *self.seen.write().expect("lock") = now;
        match load(&self.path) {
            Ok(keys) => {
                let n = keys.len();
                *self.keys.write().expect("lock") = keys;
                tracing::info!(keys = n, path = %self.path.display(), "keys reloaded");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "keys file not reloaded; the keys loaded before stay in force");
                false
            }
        }
    }

    /// Reloads in the background every `every` until the runtime stops.
    pub fn watch(&self, every: Duration) {
        let ring = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let r = ring.clone();
                let _ = tokio::task::spawn_blocking(move || r.refresh()).await;
            }
        });
    }

    /// The principal of a presented key; `None` for a malformed, unknown or revoked one.
    pub fn check(&self, key: &str) -> Option<Principal> {
        const DUMMY: [u8; 32] = [0u8; 32];
        let presented = digest(key);
        let keys = self.keys.read().expect("lock");
        let found = id_of(key).and_then(|id| keys.iter().find(|(k, _)| k.id == id));
        let stored = found.map_or(&DUMMY, |(_, d)| d);
        let equal: bool = presented.ct_eq(stored).into();
        match found {
            Some((k, _)) if equal && k.revoked.is_none() => Some(Principal {
                key_id: k.id.clone(),
                role: k.role.clone(),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_check_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let (claro, e) = add(
            &path,
            Role::Provider {
                provider: "claro".into(),
            },
            "dash",
        )
        .unwrap();
        let (admin, _) = add(&path, Role::Admin, "").unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains(&claro));
        let ring = KeyRing::open(&path).unwrap();
        let p = ring.check(&claro).unwrap();
        assert_eq!(p.tenant().unwrap().provider(), "claro");
        assert_eq!(ring.check(&admin).unwrap().role, Role::Admin);
        // One character off, another id, garbage.
        let mut bad = claro.clone();
        bad.pop();
        bad.push(if claro.ends_with('A') { 'B' } else { 'A' });
        assert!(ring.check(&bad).is_none());
        assert!(ring.check("tly_000000000000_x").is_none());
        assert!(ring.check("").is_none());
        revoke(&path, &e.id).unwrap();
        // Same length and mtime second can hide a change: the length differs here.
        ring.refresh();
        assert!(ring.check(&claro).is_none());
        assert!(ring.check(&admin).is_some());
        assert!(matches!(revoke(&path, "nope"), Err(KeyError::Unknown(_))));
        assert!(add(
            &path,
            Role::Provider {
                provider: "a b".into()
            },
            ""
        )
        .is_err());
    }
}
