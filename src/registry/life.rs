//! The registry's changes after issue: issue itself, renewal, end, purge. Each is journalled and
//! told to the watchers from here, and each leaves nothing half-done when it fails. Restoring at
//! start is `restore.rs`.

use std::sync::Arc;

use anyhow::Context;

use super::Registry;
use super::events::{Change, write};
use crate::grants::{Grant, Grants};
use crate::record::{EndReason, Ended};
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

/// A grant in the index until `keep`; dropped before that, it leaves the index again.
pub(super) struct Indexed<'a> {
    grants: &'a Grants,
    id: Option<String>,
}

impl Indexed<'_> {
    pub(super) fn keep(mut self) {
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
    pub(super) fn index(&self, grant: &Arc<Grant>) -> Option<Indexed<'_>> {
        self.grants.insert(Arc::clone(grant)).ok()?;
        Some(Indexed {
            grants: &self.grants,
            id: Some(grant.id().to_owned()),
        })
    }

    /// Issues `grant` on the port `reservation` holds: indexed, recorded by the journal, then
    /// served. On any failure both guards drop, so the key and the port are free again. The
    /// grant's write lock is held throughout, so a revoke that finds it in the index meanwhile
    /// is journalled after the issue, and the tunnel is not started (`Tunnels::start`).
    pub async fn issue(
        &self,
        grant: Arc<Grant>,
        reservation: Reservation,
    ) -> Result<(), IssueFailure> {
        let indexed = self.index(&grant).ok_or(IssueFailure::DuplicateKey)?;
        let _writes = grant.writes().lock().await;
        let change = Change::Issued(grant.to_record());
        write(&self.journal, change.clone())
            .await
            .map_err(IssueFailure::Store)?;
        indexed.keep();
        self.tunnels
            .start(Arc::clone(&grant), Ok(reservation.into_listener()));
        self.tell(&change);
        self.update_port_gauge();
        Ok(())
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
    /// the journal records it: the one change told before it is recorded, because an end
    /// must hold at once. None when it had already ended. The end holds in memory even when
    /// the journal fails; the error says so, and `record_ends` writes it again later.
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
        self.tell(&Change::Ended(grant.to_record()));
        self.update_port_gauge();
        Some(self.record_end(grant).await)
    }

    async fn record_end(&self, grant: &Grant) -> anyhow::Result<()> {
        // After a renewal or an issue in flight has stored its record, so this end is the last
        // write.
        let _writes = grant.writes().lock().await;
        let written = write(&self.journal, Change::Ended(grant.to_record())).await;
        if written.is_ok() {
            self.unrecorded.remove(grant.id());
        } else {
            // Else a restart would serve the tunnel again, maybe on a port given away since.
            self.unrecorded.insert(grant.id().to_owned());
        }
        written.context("the tunnel is ended in memory, but the state store could not record it")
    }

    /// Writes again every end the journal failed to record; returns how many are still
    /// missing.
    pub async fn record_ends(&self) -> usize {
        let pending: Vec<String> = self.unrecorded.iter().map(|id| id.clone()).collect();
        for id in pending {
            match self.grants.get(&id) {
                Some(grant) => {
                    // A failure stays in the set for the next call.
                    let _ = self.record_end(&grant).await;
                }
                None => {
                    self.unrecorded.remove(&id);
                }
            }
        }
        self.unrecorded.len()
    }

    /// Forgets ended tunnel `id`, once the journal has: a failure keeps it (retried later), so
    /// the record cannot outlive the broker on disk.
    pub async fn purge(&self, id: &str) -> anyhow::Result<()> {
        let change = Change::Purged { id: id.to_owned() };
        write(&self.journal, change.clone()).await?;
        self.grants.remove(id);
        self.unrecorded.remove(id);
        self.tell(&change);
        Ok(())
    }
}
