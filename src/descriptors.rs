//! File descriptors: raise the soft `RLIMIT_NOFILE` to the hard limit at start, and refuse a
//! config whose limits need more descriptors than that.
//!
//! Running out of descriptors does not fail one request: every accept, every tunnel connect,
//! `/readyz` and the state store fail together (300 idle connections under a 256-file limit
//! stopped everything). So the broker takes all the soft limit it may, and a config that could
//! outgrow it is a config error, found at start rather than under load.

use std::fmt;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::config::Config;

/// Descriptors beyond the counted ones: stdio, the runtime's epoll and wakers, the two
/// listeners, the state store's files, CHP and hub client connections, the signal pipe.
pub const RESERVE: u64 = 64;

/// The soft and hard `RLIMIT_NOFILE` after `raise`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// What the process may use now.
    pub soft: u64,
    /// The ceiling an unprivileged process may raise `soft` to.
    pub hard: u64,
}

/// Raises the soft limit to the hard one; returns both (unchanged when raising fails).
pub fn raise() -> std::io::Result<Limit> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
        return Ok(Limit { soft, hard });
    }
    Ok(Limit { soft, hard })
}

/// How many descriptors a config can hold open at its limits (at least; see `check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// One listener per reserved port (`tunnels.ports`).
    pub ports: u64,
    /// One socket per logged-in SSH session: `limits.max_sessions`, but never more than the
    /// ports, as a credential holds one port and at most one session.
    pub sessions: u64,
    /// One socket per connection still logging in (`limits.max_unauthenticated`).
    pub startups: u64,
    /// One socket per admin connection (`admin.max_connections`).
    pub admin: u64,
}

impl Need {
    /// Counts `config`'s limits.
    pub fn of(config: &Config) -> Self {
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        Self {
            ports: n(config.tunnels.ports.len().get()),
            sessions: n(config
                .limits
                .max_sessions
                .min(config.tunnels.ports.len().get())),
            startups: n(config.limits.max_unauthenticated),
            admin: n(config.admin.max_connections),
        }
    }

    /// The sum, with the reserve.
    pub fn total(&self) -> u64 {
        self.ports
            .saturating_add(self.sessions)
            .saturating_add(self.startups)
            .saturating_add(self.admin)
            .saturating_add(RESERVE)
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (tunnels.ports {} + limits.max_sessions {} + limits.max_unauthenticated {} + \
             admin.max_connections {} + {RESERVE} reserved)",
            self.total(),
            self.ports,
            self.sessions,
            self.startups,
            self.admin
        )
    }
}

/// Refuses `config` when its limits need more descriptors than `available` (the soft limit
/// after `raise`). Hub-side connections carried by tunnels need descriptors too and are not
/// counted, so a config that passes can still run short: this is the floor.
pub fn check(config: &Config, available: u64) -> anyhow::Result<Need> {
    let need = Need::of(config);
    anyhow::ensure!(
        need.total() <= available,
        "the config needs at least {need} file descriptors, but only {available} are available \
         (RLIMIT_NOFILE, raised to its hard limit): lower tunnels.ports, limits.max_sessions, \
         limits.max_unauthenticated or admin.max_connections, or raise the hard limit (systemd: \
         LimitNOFILE=; a shell: ulimit -Hn)"
    );
    Ok(need)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_needed_by_the_defaults() {
        let need = Need::of(&Config::default());
        assert_eq!(
            (need.ports, need.sessions, need.startups, need.admin),
            (5_000, 5_000, 2_048, 64)
        );
        // Fits the 20,000 hard limit of a stock container, so the quick start runs anywhere.
        assert_eq!(need.total(), 12_176);
        assert!(check(&Config::default(), 1 << 20).is_ok());
    }

    #[test]
    fn descriptors_short_config_is_refused_naming_the_numbers() {
        let err = check(&Config::default(), 256).unwrap_err().to_string();
        for part in [
            "12176",
            "only 256",
            "tunnels.ports 5000",
            "limits.max_sessions 5000",
            "limits.max_unauthenticated 2048",
            "admin.max_connections 64",
        ] {
            assert!(err.contains(part), "{part}: {err}");
        }
    }

    #[test]
    fn descriptors_raise_reaches_the_hard_limit() {
        let limit = raise().unwrap();
        assert_eq!(limit.soft, limit.hard);
    }
}
