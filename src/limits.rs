//! Per-source failed-login reporting: a source that fails more than `per_minute` logins in a
//! minute is reported once for that minute (an audit line and a metric, for fail2ban and alerts).
//!
//! Nobody is turned away for it. Jobs behind one NAT gateway or `ProxyJump` host share a source
//! address, so a block would punish every job behind it for one client's failures, and there is
//! nothing to guess: keys are 256-bit. What a failing client can cost is bounded elsewhere: each
//! refusal is padded to a second, a connection gets `max_auth_attempts`, and unauthenticated
//! connections are bounded per source and in total (`preauth.rs`).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

const WINDOW: Duration = Duration::from_secs(60);
/// Above this many tracked sources, stale windows are swept on the next failure.
const SWEEP_AT: usize = 4096;

/// Failed logins per source address in fixed one-minute windows.
#[derive(Debug)]
pub struct FailureLimiter {
    per_minute: u32,
    windows: DashMap<IpAddr, (Instant, u32)>,
}

impl FailureLimiter {
    /// Allows `per_minute` failures per source; 0 disables the limit.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            windows: DashMap::new(),
        }
    }

    /// Counts one failed login from `ip`; true when this failure crossed the limit (report it).
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> bool {
        if self.per_minute == 0 {
            return false;
        }
        if self.windows.len() > SWEEP_AT {
            self.windows
                .retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let mut w = self.windows.entry(ip).or_insert((now, 0));
        if now.duration_since(w.0) >= WINDOW {
            *w = (now, 0);
        }
        w.1 = w.1.saturating_add(1);
        w.1 == self.per_minute.saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_once_per_window_past_the_limit() {
        let l = FailureLimiter::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let reports: Vec<bool> = (0..6).map(|_| l.record_failure(a, t0)).collect();
        assert_eq!(reports, [false, false, false, true, false, false]);
        assert!(!l.record_failure(b, t0), "other sources count apart");
        let next: Vec<bool> = (0..4).map(|_| l.record_failure(a, t0 + WINDOW)).collect();
        assert_eq!(
            next,
            [false, false, false, true],
            "a new minute starts clean"
        );
        assert!(!FailureLimiter::new(0).record_failure(a, t0));
    }
}
