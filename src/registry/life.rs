//! The registry's changes: issue, restore, renewal, end, purge. Each is journalled and told to
//! the watchers from here, and each leaves nothing half-done when it fails.

use std::sync::Arc;

use anyhow::Context;
use tracing::warn;

use super::Registry;
use super::events::{Change, write};
use crate::audit::Event;
use crate::grants::{Grant, Grants};
use crate::record::{EndReason, Ended, TunnelRecord};
use crate::reservation::Reservation;

/// Why an issue did not happen; nothing of it remains.
#[derive(Debug, thiserror::Error)]
pub enum IssueFailure {
    /// Another tunnel holds this key.
    #[error("this public key is already used by another tunnel")]
    DuplicateKey,
    /// The journal could not record it.
    #[error("{0:#}")]
    Store(anyhow::Error),
}

/// What a restore found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Restored {
    /// Tunnels served again.
    pub active: usize,
    /// Ended tunnels kept for their retention.
    pub ended: usize,
}

/// A grant in the index until `keep`; dropped before that, it leaves the index again.
struct Indexed<'a> {
    grants: &'a Grants,
    id: Option<String>,
}

impl Indexed<'_> {
    fn keep(mut self) {
        self.id = None;
    }
}

impl Drop for Indexed<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.grants.remove(&id);
        }
    }
}

impl Registry {
    fn index(&self, grant: &Arc<Grant>) -> Option<Indexed<'_>> {
        self.grants.insert(Arc::clone(grant)).ok()?;
        Some(Indexed {
            grants: &self.grants,
            id: Some(grant.id().to_owned()),
        })
    }

    /// Issues `grant` on the port `reservation` holds: indexed, recorded by the journal, then
    /// served. On any failure both guards drop, so the key and the port are free again.
    pub async fn issue(
        &self,
        grant: Arc<Grant>,
        reservation: Reservation,
    ) -> Result<(), IssueFailure> {
        let indexed = self.index(&grant).ok_or(IssueFailure::DuplicateKey)?;
        let change = Change::Issued(grant.to_record());
        write(&self.journal, change.clone())
            .await
            .map_err(IssueFailure::Store)?;
        let listener = reservation.into_listener();
        indexed.keep();
        self.tunnels.start(grant, Ok(listener));
        self.tell(&change);
        self.update_port_gauge();
        Ok(())
    }

    /// Loads stored records at start: ends those whose deadline passed while the broker was
    /// down, forgets ended ones past `retention` seconds, and serves the rest on their ports.
    pub async fn restore(
        &self,
        records: Vec<TunnelRecord>,
        now: u64,
        retention: u64,
    ) -> anyhow::Result<Restored> {
        let mut restored = Restored::default();
        for mut record in records {
            if record.ended.is_none() && now >= record.deadline() {
                record.ended = Some(Ended {
                    at: record.deadline(),
                    reason: EndReason::Expired,
                });
                Event::ExpiredWhileDown { record: &record }.record(&self.metrics);
                write(&self.journal, Change::Ended(record.clone())).await?;
            }
            if let Some(ended) = record.ended {
                if ended.at.saturating_add(retention) <= now {
                    write(&self.journal, Change::Purged { id: record.id }).await?;
                } else if self.grants.insert(Arc::new(Grant::new(record))).is_ok() {
                    restored.ended += 1;
                } else {
                    warn!("duplicate key in stored ended tunnel; skipped");
                }
                continue;
            }
            // On failure the tunnel logs why (audit) and retries the bind in the background.
            let listener = self.ports.reserve_exact(record.port);
            if listener.is_err() {
                self.ports.mark_reserved(record.port);
            }
            let grant = Arc::new(Grant::new(record));
            let Some(indexed) = self.index(&grant) else {
                warn!(tunnel = %grant.id(), "duplicate key in stored tunnel; skipped");
                self.ports.release(grant.port());
                continue;
            };
            indexed.keep();
            self.tell(&Change::Issued(grant.to_record()));
            self.tunnels.start(grant, listener);
            restored.active += 1;
        }
        self.update_port_gauge();
        Ok(restored)
    }

    /// Records a renewal to `expires_at` made at `renewed_at`, then applies it. The caller
    /// holds the grant's write lock; on a journal failure nothing changed.
    pub async fn renew(
        &self,
        grant: &Grant,
        expires_at: u64,
        renewed_at: u64,
    ) -> anyhow::Result<()> {
        let mut record = grant.to_record();
        record.expires_at = expires_at;
        record.renewed_at = Some(renewed_at);
        let change = Change::Renewed(record);
        write(&self.journal, change.clone()).await?;
        grant.renewed(expires_at, renewed_at);
        self.tell(&change);
        Ok(())
    }

    /// Ends `grant` for `reason`: its tunnel closes (the port is freed once its listener is
    /// closed), watchers learn of it (its session is told to go, its route is withdrawn), then
    /// the journal records it. None when it had already ended. The end holds in memory even
    /// when the journal fails; the error says so.
    pub async fn end(
        &self,
        grant: &Arc<Grant>,
        reason: EndReason,
        at: u64,
    ) -> Option<anyhow::Result<()>> {
        if !grant.end(Ended { at, reason }) {
            return None;
        }
        self.tunnels.close(grant.id());
        let change = Change::Ended(grant.to_record());
        self.tell(&change);
        self.update_port_gauge();
        // After a renewal in flight has stored its record, so this end is the last write.
        let _writes = grant.writes().lock().await;
        let change = Change::Ended(grant.to_record());
        Some(
            write(&self.journal, change)
                .await
                .context("the tunnel is ended in memory, but the state store could not record it"),
        )
    }

    /// Forgets ended tunnel `id`, once the journal has: a failure keeps it (retried later), so
    /// the record cannot outlive the broker on disk.
    pub async fn purge(&self, id: &str) -> anyhow::Result<()> {
        let change = Change::Purged { id: id.to_owned() };
        write(&self.journal, change.clone()).await?;
        self.grants.remove(id);
        self.tell(&change);
        Ok(())
    }
}
