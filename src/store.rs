//! The state that must survive a crash: every issued tunnel, behind a small `Store` seam.
//!
//! Writes are durable when `put`/`remove` return (redb commits with fsync), so an answer the
//! admin API has sent is never lost to a SIGKILL. Calls block on disk: async callers go through
//! `spawn_blocking`. A shared store for two brokers (high availability) would be a second
//! implementation of the trait.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const TUNNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("tunnels_v1");

/// One issued tunnel, as stored. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelRecord {
    /// Opaque id, `tb_` + 32 hex digits.
    pub id: String,
    /// JupyterHub user name.
    pub user: String,
    /// JupyterHub server name; empty for the default server.
    pub server_name: String,
    /// The hub port reserved for this tunnel.
    pub port: u16,
    /// The job's public key, OpenSSH one-line form without comment.
    pub public_key: String,
    /// SHA-256 fingerprint of `public_key`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// When it was issued.
    pub created_at: u64,
    /// When the credential stops working.
    pub expires_at: u64,
    /// Set once the tunnel is revoked or has expired.
    #[serde(default)]
    pub ended: Option<Ended>,
    /// The kind of credential that may publish it (records from before certificates: a key).
    #[serde(default)]
    pub auth: crate::credentials::AuthKind,
}

/// Why and when a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// Unix seconds.
    pub at: u64,
    /// Why.
    pub reason: EndReason,
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// An admin or the spawner revoked it.
    Revoked,
    /// Its lifetime ran out.
    Expired,
}

impl EndReason {
    /// The lowercase name used in the API, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
}

/// Where tunnel records persist.
pub trait Store: Send + Sync + 'static {
    /// Every stored record.
    fn load(&self) -> anyhow::Result<Vec<TunnelRecord>>;
    /// Inserts or replaces `record`, durably.
    fn put(&self, record: &TunnelRecord) -> anyhow::Result<()>;
    /// Deletes the record `id`, durably; a missing id is not an error.
    fn remove(&self, id: &str) -> anyhow::Result<()>;
}

/// The embedded store: one redb file in the state folder.
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) `<state_dir>/tunnelbot.redb`.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        crate::keys::ensure_private_dir(state_dir)?;
        let path = state_dir.join("tunnelbot.redb");
        let db = Database::create(&path).with_context(|| format!("opening {}", path.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(TUNNELS)?;
        txn.commit()?;
        Ok(Self { db })
    }
}

impl Store for RedbStore {
    fn load(&self) -> anyhow::Result<Vec<TunnelRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TUNNELS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let record: TunnelRecord = serde_json::from_slice(value.value())
                .with_context(|| format!("decoding stored tunnel {}", key.value()))?;
            out.push(record);
        }
        Ok(out)
    }

    fn put(&self, record: &TunnelRecord) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(record)?;
        let txn = self.db.begin_write()?;
        txn.open_table(TUNNELS)?
            .insert(record.id.as_str(), bytes.as_slice())?;
        txn.commit().context("committing to the state store")?;
        Ok(())
    }

    fn remove(&self, id: &str) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(TUNNELS)?.remove(id)?;
        txn.commit().context("committing to the state store")?;
        Ok(())
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> TunnelRecord {
        TunnelRecord {
            id: id.into(),
            user: "alice".into(),
            server_name: String::new(),
            port: 20001,
            public_key: "ssh-ed25519 AAAA".into(),
            fingerprint: "SHA256:x".into(),
            created_at: 1,
            expires_at: 2,
            ended: None,
            auth: Default::default(),
        }
    }

    #[test]
    fn records_survive_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(tmp.path()).unwrap();
            store.put(&record("a")).unwrap();
            store.put(&record("b")).unwrap();
            let mut ended = record("b");
            ended.ended = Some(Ended {
                at: 3,
                reason: EndReason::Revoked,
            });
            store.put(&ended).unwrap();
            store.remove("a").unwrap();
            store.remove("never-there").unwrap();
        }
        let store = RedbStore::open(tmp.path()).unwrap();
        let all = store.load().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id, "b");
        assert_eq!(all[0].ended.map(|e| e.reason), Some(EndReason::Revoked));
    }
}
