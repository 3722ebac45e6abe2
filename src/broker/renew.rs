//! `Broker::renew`: extends a live tunnel's expiry and restarts its lease (rules in `lease`).
//!
//! The new times are stored before they take effect, under the grant's write lock, so a store
//! failure changes nothing and a revoke or expiry racing the renewal is always written last.

use std::sync::Arc;
use std::time::Duration;

use tracing::error;

use super::Broker;
use crate::grants::Grant;
use crate::lease::plan_renewal;
use crate::record::unix_now;

/// Why a renewal failed; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// No such tunnel (404).
    #[error("no tunnel {0}")]
    NotFound(String),
    /// The tunnel is revoked or expired; it cannot come back (409).
    #[error("tunnel {id} has ended ({reason}); issue a new one")]
    Ended {
        /// Tunnel id.
        id: String,
        /// revoked or expired.
        reason: &'static str,
    },
    /// The request itself is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// The state store could not record it (503): nothing changed.
    #[error("state store unavailable: {0:#}")]
    Store(anyhow::Error),
}

impl Broker {
    /// Renews tunnel `id` for `ttl` (the lifetime asked at issue when None): see `lease`.
    pub async fn renew(&self, id: &str, ttl: Option<Duration>) -> Result<Arc<Grant>, RenewError> {
        let result = self.try_renew(id, ttl).await;
        let label = match &result {
            Ok(_) => "ok",
            Err(RenewError::Store(_)) => "error",
            Err(_) => "refused",
        };
        self.inner
            .metrics
            .tunnel_renewals
            .with_label_values(&[label])
            .inc();
        result
    }

    async fn try_renew(&self, id: &str, ttl: Option<Duration>) -> Result<Arc<Grant>, RenewError> {
        let grant = self
            .inner
            .registry
            .get(id)
            .ok_or_else(|| RenewError::NotFound(id.to_owned()))?;
        let ended = |grant: &Grant| {
            let reason = match grant.ended() {
                Some(e) => e.reason.as_str(),
                // Past its deadline the reaper ends it within a tick; a renewal must not revive it.
                None if unix_now() >= grant.deadline() => "expired",
                None => return None,
            };
            Some(RenewError::Ended {
                id: id.to_owned(),
                reason,
            })
        };
        let writes = grant.writes().lock().await;
        if let Some(e) = ended(&grant) {
            return Err(e);
        }
        let now = unix_now();
        let renewal = plan_renewal(
            ttl,
            grant.ttl_seconds(),
            grant.expires_at(),
            now,
            &self.inner.config.tunnels,
        )
        .map_err(RenewError::BadRequest)?;
        if let Err(e) = self
            .inner
            .registry
            .renew(&grant, renewal.expires_at, renewal.renewed_at)
            .await
        {
            error!(tunnel = %id, error = %format!("{e:#}"), "renewal failed: state store unwritable");
            return Err(RenewError::Store(e));
        }
        // A revoke that landed while the record was written has already told its session.
        if let Some(e) = ended(&grant) {
            return Err(e);
        }
        self.audit(crate::audit::Event::Renewed { grant: &grant });
        drop(writes);
        Ok(grant)
    }
}
