//! The embedded store: one redb file in the state folder, the default.
//!
//! Writes are durable when `put`/`remove` return (redb commits with fsync), so an answer the
//! admin API has sent is never lost to a SIGKILL.

use std::path::Path;

use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::Store;
use crate::record::TunnelRecord;

const TUNNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("tunnels_v1");

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{EndReason, Ended};

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
            ..TunnelRecord::default()
        }
    }

    /// A record written before leases and renewals (no such fields) still loads, with none.
    #[test]
    fn records_from_older_versions_load() {
        let old = r#"{"id":"tb_1","user":"alice","server_name":"","port":20001,
            "public_key":"ssh-ed25519 AAAA","fingerprint":"SHA256:x","created_at":10,
            "expires_at":100,"ended":null}"#;
        let r: TunnelRecord = serde_json::from_str(old).unwrap();
        assert_eq!(
            (r.ttl_seconds, r.lease_seconds, r.renewed_at),
            (None, None, None)
        );
        assert_eq!((r.lease_until(), r.deadline()), (None, 100));
        let tmp = tempfile::tempdir().unwrap();
        let store = RedbStore::open(tmp.path()).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(TUNNELS)
            .unwrap()
            .insert("tb_1", old.as_bytes())
            .unwrap();
        txn.commit().unwrap();
        assert_eq!(store.load().unwrap(), vec![r]);
    }

    #[test]
    fn the_lease_or_the_expiry_whichever_is_first() {
        let mut r = record("a");
        r.expires_at = 1000;
        r.lease_seconds = Some(60);
        assert_eq!((r.lease_until(), r.deadline()), (Some(61), 61));
        r.renewed_at = Some(990);
        assert_eq!((r.lease_until(), r.deadline()), (Some(1050), 1000));
        r.lease_seconds = Some(u64::MAX);
        assert_eq!(r.deadline(), 1000);
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
