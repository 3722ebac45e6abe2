//! Restoring the registry from the journal's records at start.

use std::collections::HashSet;
use std::sync::Arc;

use tracing::{error, warn};

use super::Registry;
use super::events::{Change, write};
use crate::audit::Event;
use crate::grants::Grant;
use crate::record::{EndReason, Ended, TunnelRecord};

/// What a restore found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Restored {
    /// Tunnels served again.
    pub active: usize,
    /// Ended tunnels kept for their retention.
    pub ended: usize,
}

impl Registry {
    /// Loads stored records at start: ends those whose deadline passed while the broker was
    /// down, forgets ended ones past `retention` seconds, and serves the rest on their ports.
    /// Two active records on one port or one key mean an end that never reached the store:
    /// the newer one is served and the older one is ended now.
    pub async fn restore(
        &self,
        mut records: Vec<TunnelRecord>,
        now: u64,
        retention: u64,
    ) -> anyhow::Result<Restored> {
        records.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        let mut restored = Restored::default();
        let mut ports = HashSet::new();
        for mut record in records {
            if record.ended.is_none() && now >= record.deadline() {
                record.ended = Some(Ended {
                    at: record.deadline(),
                    reason: EndReason::Expired,
                });
                Event::ExpiredWhileDown { record: &record }.record(&self.metrics);
                write(&self.journal, Change::Ended(record.clone())).await?;
            }
            if record.ended.is_some() {
                restored.ended += self.restore_ended(record, now, retention).await?;
                continue;
            }
            let grant = Arc::new(Grant::new(record));
            let indexed = self.index(&grant);
            let Some(indexed) = indexed.filter(|_| ports.insert(grant.port())) else {
                error!(
                    tunnel = %grant.id(),
                    port = grant.port(),
                    "a newer stored tunnel holds this one's port or key (its end was never \
                     recorded); ending it"
                );
                let mut record = grant.to_record();
                record.ended = Some(Ended {
                    at: now,
                    reason: EndReason::Revoked,
                });
                write(&self.journal, Change::Ended(record.clone())).await?;
                restored.ended += self.restore_ended(record, now, retention).await?;
                continue;
            };
            indexed.keep();
            // On failure the tunnel logs why (audit) and retries the bind in the background.
            let listener = self.ports.reserve_exact(grant.port());
            if listener.is_err() {
                self.ports.mark_reserved(grant.port());
            }
            self.tell(&Change::Issued(grant.to_record()));
            self.tunnels.start(grant, listener);
            restored.active += 1;
        }
        self.update_port_gauge();
        Ok(restored)
    }

    /// An ended record: kept for the API until `retention` has passed, then purged. One whose
    /// key another tunnel holds cannot be listed beside it and is purged at once.
    async fn restore_ended(
        &self,
        record: TunnelRecord,
        now: u64,
        retention: u64,
    ) -> anyhow::Result<usize> {
        let ended_at = record.ended.map_or(now, |e| e.at);
        if ended_at.saturating_add(retention) > now {
            if self
                .grants
                .insert(Arc::new(Grant::new(record.clone())))
                .is_ok()
            {
                return Ok(1);
            }
            warn!(tunnel = %record.id, "stored ended tunnel shares a key with another; purged");
        }
        write(&self.journal, Change::Purged { id: record.id }).await?;
        Ok(0)
    }
}
