//! `tally keys add|list|revoke`: manage the API keys file of `tally run --keys`. A
//! running server picks changes up within a second, without a restart.

use super::Exit;
use crate::query::keys::{self, Role};
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct KeysFile {
    /// The keys file.
    #[arg(long, env = "TALLY_KEYS", default_value = "tally-keys.json")]
    pub keys: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a key and print it once (only its SHA-256 digest is stored).
    Add {
        /// A key that reads this provider's aggregates, and only those.
        #[arg(long, group = "role")]
        provider: Option<String>,
        /// A key that publishes events (Ingest).
        #[arg(long, group = "role")]
        ingest: bool,
        /// A key for operators (Admin).
        #[arg(long, group = "role")]
        admin: bool,
        /// A label for people.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        file: KeysFile,
    },
    /// List the keys: id, role, name, created, revoked (never the keys themselves).
    List {
        #[command(flatten)]
        file: KeysFile,
    },
    /// Revoke a key by its id: refused from the server's next reload (within a second).
    Revoke {
        id: String,
        #[command(flatten)]
        file: KeysFile,
    },
}

pub fn keys(c: KeysCommand) -> Result<Exit> {
    match c {
        KeysCommand::Add {
            provider,
            ingest,
            admin,
            name,
            file,
        } => {
            let role = match (provider, ingest, admin) {
                (Some(p), false, false) => Role::Provider { provider: p },
                (None, true, false) => Role::Ingest,
                (None, false, true) => Role::Admin,
                _ => anyhow::bail!("name one role: --provider P, --ingest or --admin"),
            };
            let (key, e) = keys::add(&file.keys, role, &name)?;
            eprintln!(
                "added key {} ({}) to {}; it is shown only now:",
                e.id,
                e.role.describe(),
                file.keys.display()
            );
            println!("{key}");
        }
        KeysCommand::List { file } => {
            println!(
                "{:<14} {:<24} {:<20} {:<22} revoked",
                "id", "role", "name", "created"
            );
            for k in keys::list(&file.keys)? {
                println!(
                    "{:<14} {:<24} {:<20} {:<22} {}",
                    k.id,
                    k.role.describe(),
                    k.name,
                    k.created,
                    k.revoked.as_deref().unwrap_or("-")
                );
            }
        }
        KeysCommand::Revoke { id, file } => {
            let k = keys::revoke(&file.keys, &id)?;
            eprintln!(
                "revoked key {} ({}); a running server refuses it within a second",
                k.id,
                k.role.describe()
            );
        }
    }
    Ok(Exit::Ok)
}
