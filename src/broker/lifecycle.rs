//! A tunnel's life after issue: restored at start, ended by revoke or expiry, and forgotten
//! once past retention.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::Broker;
use crate::audit::Event;
use crate::grants::Grant;
use crate::record::{EndReason, unix_now};

impl Broker {
    pub(super) async fn restore(&self) -> anyhow::Result<()> {
        let store = Arc::clone(&self.inner.store);
        let records = tokio::task::spawn_blocking(move || store.load())
            .await
            .context("loading state")??;
        let retention = self.inner.config.tunnels.retention.as_secs();
        let restored = self
            .inner
            .registry
            .restore(records, unix_now(), retention)
            .await?;
        info!(
            active = restored.active,
            ended = restored.ended,
            "state restored"
        );
        Ok(())
    }

    /// Revokes tunnel `id`: refuses its key from now on, disconnects its session, frees its
    /// port. Revoking an ended tunnel is a no-op. The revocation holds in memory even when the
    /// store cannot record it; the error then says so.
    pub async fn revoke(&self, id: &str) -> Result<bool, anyhow::Error> {
        let Some(grant) = self.inner.registry.get(id) else {
            return Ok(false);
        };
        self.end(&grant, EndReason::Revoked).await?;
        Ok(true)
    }

    pub(super) async fn end(&self, grant: &Arc<Grant>, reason: EndReason) -> anyhow::Result<()> {
        let Some(recorded) = self.inner.registry.end(grant, reason, unix_now()).await else {
            return Ok(());
        };
        self.audit(Event::Ended { grant, reason });
        recorded
    }

    /// Ends expired tunnels and forgets ended ones past retention.
    pub async fn reap(&self) {
        let now = unix_now();
        let retention = self.inner.config.tunnels.retention.as_secs();
        for grant in self.inner.registry.all() {
            match grant.ended() {
                None if now >= grant.deadline() => {
                    if grant.deadline() < grant.expires_at() {
                        self.audit(Event::LeaseLapsed { grant: &grant });
                    }
                    if let Err(e) = self.end(&grant, EndReason::Expired).await {
                        error!(tunnel = %grant.id(), error = %format!("{e:#}"), "expiry not persisted");
                    }
                }
                Some(ended) if ended.at.saturating_add(retention) <= now => {
                    // Kept in memory and retried next tick, so the record cannot outlive us on disk.
                    match self.inner.registry.purge(grant.id()).await {
                        Ok(()) => {}
                        Err(e) => {
                            error!(tunnel = %grant.id(), error = %format!("{e:#}"), "purge not persisted")
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Runs `reap` four times a second until `cancel`, so an expired credential's session is
    /// gone within a second of its end (a quarter to notice, at most a second to close).
    pub async fn run_reaper(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => self.reap().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use super::super::Broker;
    use crate::config::Config;
    use crate::keys::Keys;
    use crate::metrics::Metrics;
    use crate::record::{EndReason, Ended, TunnelRecord};
    use crate::store::Store;

    /// Found by the `restore` fuzz target: an end time near u64::MAX overflowed the retention sum.
    #[tokio::test]
    async fn restore_survives_extreme_stored_times() {
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::store::RedbStore::open(tmp.path()).unwrap();
        let record = |id: &str, expires_at, ended| TunnelRecord {
            id: id.into(),
            user: "u".into(),
            server_name: String::new(),
            port: 1,
            public_key: String::new(),
            fingerprint: format!("SHA256:{id}"),
            created_at: 0,
            expires_at,
            ended,
            ..TunnelRecord::default()
        };
        store
            .put(&record(
                "a",
                u64::MAX,
                Some(Ended {
                    at: u64::MAX,
                    reason: EndReason::Revoked,
                }),
            ))
            .unwrap();
        store.put(&record("b", 0, None)).unwrap();
        let config =
            Config::parse("[routes]\nbackend = \"none\"\n[tunnels]\nports = \"1-1\"\n").unwrap();
        let keys = Keys::load_or_create(&tmp.path().join("keys")).unwrap();
        let addr: SocketAddr = "127.0.0.1:2222".parse().unwrap();
        let broker = Broker::open(config, keys, Arc::new(store), Metrics::new().unwrap(), addr)
            .await
            .unwrap();
        broker.reap().await;
        assert_eq!(
            broker.get("a").map(|(g, _)| g.ended().map(|e| e.reason)),
            Some(Some(EndReason::Revoked))
        );
        // Expired at time 0: long past retention, so it is purged at restore.
        assert!(broker.get("b").is_none());
    }
}
