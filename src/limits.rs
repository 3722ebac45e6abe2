//! Per-source failed-login limiting: a source that fails too often in a minute is turned away
//! at accept for the rest of that minute, before it costs a key exchange.

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

    /// Counts one failed login from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        if self.per_minute == 0 {
            return;
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
    }

    /// Whether `ip` used up its failures in the current window.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> bool {
        self.per_minute != 0
            && self
                .windows
                .get(&ip)
                .is_some_and(|w| now.duration_since(w.0) < WINDOW && w.1 >= self.per_minute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let l = FailureLimiter::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..2 {
            l.record_failure(a, t0);
        }
        assert!(!l.blocked(a, t0));
        l.record_failure(a, t0);
        assert!(l.blocked(a, t0));
        assert!(!l.blocked(b, t0), "other sources are not affected");
        assert!(!l.blocked(a, t0 + WINDOW), "a new minute starts clean");
        assert!(!FailureLimiter::new(0).blocked(a, t0));
    }
}
