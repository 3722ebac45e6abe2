//! Leases and renewals as plain rules: the lease an issue request gets, and the expiry a
//! renewal sets. `broker::renew` applies them; this module touches no state.
//!
//! A renewal sets `expires_at` to now + the asked lifetime (default: the lifetime asked at
//! issue, else `tunnels.default_ttl`), never shortening it, so two callers renewing with
//! different lifetimes cannot cut each other's. It also restarts the lease, if the tunnel has
//! one: a tunnel with a lease expires `lease_seconds` after its last renewal, which is how an
//! orphan (its hub record gone, a revoke lost) ends soon rather than at `expires_at`.

use std::time::Duration;

use crate::config::TunnelsConfig;

/// The times a renewal at `renewed_at` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    /// The new hard expiry, Unix seconds.
    pub expires_at: u64,
    /// Now, Unix seconds; the lease counts from here.
    pub renewed_at: u64,
}

/// Checks a requested lifetime against `tunnels.max_ttl`; the message names the request field.
pub fn check_ttl(ttl: Duration, cfg: &TunnelsConfig) -> Result<(), String> {
    if ttl.is_zero() {
        return Err("ttl_seconds must be above zero".into());
    }
    if ttl > cfg.max_ttl {
        return Err(format!(
            "ttl_seconds {} is over the maximum {} ({})",
            ttl.as_secs(),
            cfg.max_ttl.as_secs(),
            humantime::format_duration(cfg.max_ttl)
        ));
    }
    Ok(())
}

/// Plans a renewal at `now` of a tunnel expiring at `expires_at` that was issued for
/// `issued_ttl` seconds. An explicit `ttl` is checked like an issue's; the default is capped at
/// `tunnels.max_ttl` (the config may have been lowered since the issue).
pub fn plan_renewal(
    ttl: Option<Duration>,
    issued_ttl: Option<u64>,
    expires_at: u64,
    now: u64,
    cfg: &TunnelsConfig,
) -> Result<Renewal, String> {
    let secs = match ttl {
        Some(ttl) => {
            check_ttl(ttl, cfg)?;
            ttl.as_secs()
        }
        None => issued_ttl
            .unwrap_or(cfg.default_ttl.as_secs())
            .min(cfg.max_ttl.as_secs()),
    };
    let wanted = now
        .checked_add(secs)
        .ok_or_else(|| "ttl_seconds is too large".to_owned())?;
    Ok(Renewal {
        expires_at: wanted.max(expires_at),
        renewed_at: now,
    })
}

/// The lease an issue request gets: `lease_seconds` if given, else `tunnels.lease` (zero: none).
/// When `tunnels.lease` is set it is policy, so a request may shorten the lease but neither
/// lengthen nor drop it; otherwise a request may ask for any lease up to `tunnels.max_ttl`.
pub fn issue_lease(requested: Option<u64>, cfg: &TunnelsConfig) -> Result<Option<u64>, String> {
    let configured = cfg.lease.as_secs();
    let Some(asked) = requested else {
        return Ok((configured > 0).then_some(configured));
    };
    if asked == 0 {
        return if configured == 0 {
            Ok(None)
        } else {
            Err(format!(
                "lease_seconds must be above zero: tunnels.lease ({}) requires a lease",
                humantime::format_duration(cfg.lease)
            ))
        };
    }
    let limit = if configured > 0 {
        configured
    } else {
        cfg.max_ttl.as_secs()
    };
    if asked > limit {
        let key = if configured > 0 {
            "tunnels.lease"
        } else {
            "tunnels.max_ttl"
        };
        return Err(format!(
            "lease_seconds {asked} is over {key} ({limit} seconds)"
        ));
    }
    Ok(Some(asked))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(lease: u64) -> TunnelsConfig {
        TunnelsConfig {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(86400),
            lease: Duration::from_secs(lease),
            ..TunnelsConfig::default()
        }
    }

    #[test]
    fn renewals_extend_from_now_within_max_ttl_and_never_shorten() {
        let c = cfg(0);
        let plan = |ttl: Option<u64>, issued, expires_at| {
            plan_renewal(ttl.map(Duration::from_secs), issued, expires_at, 1000, &c)
        };
        // Default: the lifetime asked at issue, else default_ttl; capped at max_ttl.
        assert_eq!(plan(None, Some(600), 1100).unwrap().expires_at, 1600);
        assert_eq!(plan(None, None, 1100).unwrap().expires_at, 4600);
        assert_eq!(plan(None, Some(999_999), 0).unwrap().expires_at, 87_400);
        assert_eq!(
            plan(Some(60), None, 1100).unwrap(),
            Renewal {
                expires_at: 1100,
                renewed_at: 1000
            }
        );
        assert_eq!(plan(Some(86400), None, 0).unwrap().expires_at, 87_400);
        assert!(
            plan(Some(86401), None, 0)
                .unwrap_err()
                .contains("over the maximum")
        );
        assert!(plan(Some(0), None, 0).unwrap_err().contains("above zero"));
    }

    #[test]
    fn issue_leases_follow_the_config() {
        let off = cfg(0);
        assert_eq!(issue_lease(None, &off), Ok(None));
        assert_eq!(issue_lease(Some(0), &off), Ok(None));
        assert_eq!(issue_lease(Some(300), &off), Ok(Some(300)));
        assert!(
            issue_lease(Some(86401), &off)
                .unwrap_err()
                .contains("max_ttl")
        );
        let on = cfg(600);
        assert_eq!(issue_lease(None, &on), Ok(Some(600)));
        assert_eq!(issue_lease(Some(60), &on), Ok(Some(60)));
        assert!(
            issue_lease(Some(601), &on)
                .unwrap_err()
                .contains("tunnels.lease")
        );
        assert!(
            issue_lease(Some(0), &on)
                .unwrap_err()
                .contains("requires a lease")
        );
    }
}
