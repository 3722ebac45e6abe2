//! A tunnel's life after issue: restored at start, ended by revoke or expiry, and forgotten
//! once past retention.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Broker;
use crate::audit::Event;
use crate::grants::Grant;
use crate::record::{EndReason, Ended, unix_now};

impl Broker {
    pub(super) async fn restore(&self) -> anyhow::Result<()> {
        let store = Arc::clone(&self.inner.store);
        let records = tokio::task::spawn_blocking(move || store.load())
            .await
            .context("loading state")??;
        let now = unix_now();
        let (mut active, mut kept) = (0, 0);
        for mut record in records {
            if record.ended.is_none() && now >= record.deadline() {
                record.ended = Some(Ended {
                    at: record.deadline(),
                    reason: EndReason::Expired,
                });
                self.audit(Event::ExpiredWhileDown { record: &record });
                self.persist(record.clone()).await?;
            }
            if let Some(ended) = record.ended {
                if ended
                    .at
                    .saturating_add(self.inner.config.tunnels.retention.as_secs())
                    <= now
                {
                    self.unpersist(record.id.clone()).await?;
                } else {
                    kept += 1;
                    let grant = Arc::new(Grant::new(record));
                    if self.inner.grants.insert(grant).is_err() {
                        warn!("duplicate key in stored ended tunnel; skipped");
                    }
                }
                continue;
            }
            // On failure the tunnel logs why (audit) and retries the bind in the background.
            let listener = self.inner.ports.reserve_exact(record.port);
            if listener.is_err() {
                self.inner.ports.mark_reserved(record.port);
            }
            let grant = Arc::new(Grant::new(record));
            if self.inner.grants.insert(Arc::clone(&grant)).is_err() {
                warn!(tunnel = %grant.id(), "duplicate key in stored tunnel; skipped");
                self.inner.ports.release(grant.port());
                continue;
            }
            self.inner.tunnels.start(grant, listener);
            active += 1;
        }
        self.update_port_gauge();
        info!(active, ended = kept, "state restored");
        Ok(())
    }

    /// Revokes tunnel `id`: refuses its key from now on, disconnects its session, frees its
    /// port. Revoking an ended tunnel is a no-op. The revocation holds in memory even when the
    /// store cannot record it; the error then says so.
    pub async fn revoke(&self, id: &str) -> Result<bool, anyhow::Error> {
        let Some(grant) = self.inner.grants.get(id) else {
            return Ok(false);
        };
        self.end(&grant, EndReason::Revoked).await?;
        Ok(true)
    }

    pub(super) async fn end(&self, grant: &Arc<Grant>, reason: EndReason) -> anyhow::Result<()> {
        if !grant.end(Ended {
            at: unix_now(),
            reason,
        }) {
            return Ok(());
        }
        let message = match reason {
            EndReason::Revoked => "credential revoked",
            EndReason::Expired => "credential expired",
        };
        // The credential's one live login, whether it holds the forward or not.
        self.inner.sessions.close(grant.id(), message);
        self.inner.tunnels.close(grant.id());
        if let Some(routes) = &self.inner.routes {
            routes.unwant(grant.id());
        }
        self.update_port_gauge();
        self.audit(Event::Ended { grant, reason });
        // After a renewal in flight has stored its record, so this end is the last write.
        let _writes = grant.writes().lock().await;
        self.persist(grant.to_record())
            .await
            .context("the tunnel is ended in memory, but the state store could not record it")
    }

    /// Ends expired tunnels and forgets ended ones past retention.
    pub async fn reap(&self) {
        let now = unix_now();
        let retention = self.inner.config.tunnels.retention.as_secs();
        for grant in self.inner.grants.all() {
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
                    match self.unpersist(grant.id().to_owned()).await {
                        Ok(()) => {
                            self.inner.grants.remove(grant.id());
                        }
                        // Kept in memory and retried next tick, so the record cannot outlive us on disk.
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
