//! Accept errors: back off while the process is out of descriptors or buffers, and warn at a
//! bounded rate.
//!
//! `accept()` fails at once and keeps failing while the process is at its descriptor limit
//! (EMFILE), the system is (ENFILE) or the kernel is short of memory (ENOBUFS, ENOMEM). A loop
//! that retries at once spins a core and, logging each failure, floods the journal (359
//! warnings in 8 s were seen). So each such failure doubles a pause from 5 ms up to 1 s, the
//! first success resets it, and a warning is written at most once per 10 s with the number of
//! failures it stands for. Errors that belong to one connection (the peer reset it before we
//! took it) are neither paused on nor warned about.

use std::io;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

/// The first pause after a resource error.
const FIRST: Duration = Duration::from_millis(5);
/// The longest pause: short enough that a freed descriptor is used within a second.
const MAX: Duration = Duration::from_secs(1);
/// At most one warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What to do about one accept error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only that connection failed (reset, aborted): take the next one.
    Connection,
    /// The process or system lacks a resource: pause before trying again.
    Resource,
}

/// Classifies an accept error.
pub fn kind(err: &io::Error) -> Kind {
    match err.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted
        | io::ErrorKind::WouldBlock => Kind::Connection,
        // EPROTO and EPERM (a firewall dropped the connection) are per-connection too; anything
        // else, EMFILE, ENFILE, ENOBUFS and ENOMEM first, is treated as a shortage.
        _ if matches!(err.raw_os_error(), Some(71 | 1)) => Kind::Connection,
        _ => Kind::Resource,
    }
}

/// Per-listener accept error state; one per accept loop.
#[derive(Debug)]
pub struct AcceptErrors {
    listener: &'static str,
    delay: Duration,
    last_warning: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    /// For the accept loop of `listener` (a name for the logs: "ssh", "admin", "tunnel").
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            delay: Duration::ZERO,
            last_warning: None,
            suppressed: 0,
        }
    }

    /// A connection was accepted: the next shortage starts again from the first pause.
    pub fn accepted(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// Handles a failed accept: logs (rate-bounded) and returns how long to pause.
    pub fn failed(&mut self, err: &io::Error) -> Duration {
        if kind(err) == Kind::Connection {
            debug!(listener = self.listener, error = %err, "accept failed for one connection");
            return Duration::ZERO;
        }
        self.delay = (self.delay * 2).clamp(FIRST, MAX);
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            warn!(
                listener = self.listener,
                error = %err,
                suppressed = self.suppressed,
                pause_ms = u64::try_from(self.delay.as_millis()).unwrap_or(u64::MAX),
                "accept failing; pausing before the next try (suppressed = failures since the last warning)"
            );
            self.last_warning = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        self.delay
    }

    /// `failed`, then the pause itself.
    pub async fn pause(&mut self, err: &io::Error) {
        let d = self.failed(err);
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }

    /// Failures since the last warning that were not logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(24)
    }

    #[tokio::test(start_paused = true)]
    async fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut e = AcceptErrors::new("test");
        let pauses: Vec<_> = (0..10).map(|_| e.failed(&emfile())).collect();
        assert_eq!(pauses[0], Duration::from_millis(5));
        assert_eq!(pauses[1], Duration::from_millis(10));
        assert_eq!(pauses[7], Duration::from_millis(640));
        assert_eq!(pauses[8], MAX);
        assert_eq!(pauses[9], MAX);
        e.accepted();
        assert_eq!(e.failed(&emfile()), FIRST);
        for errno in [23, 105, 12] {
            assert_eq!(kind(&io::Error::from_raw_os_error(errno)), Kind::Resource);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accept_warnings_are_bounded_and_count_the_suppressed() {
        let mut e = AcceptErrors::new("test");
        e.failed(&emfile()); // warned
        for _ in 0..358 {
            e.failed(&emfile());
        }
        assert_eq!(e.suppressed(), 358);
        tokio::time::advance(WARN_EVERY).await;
        e.failed(&emfile()); // warned, with the count, which starts again
        assert_eq!(e.suppressed(), 0);
    }

    #[test]
    fn accept_errors_of_one_connection_do_not_pause() {
        let mut e = AcceptErrors::new("test");
        for err in [
            io::Error::from(io::ErrorKind::ConnectionAborted),
            io::Error::from(io::ErrorKind::ConnectionReset),
            io::Error::from_raw_os_error(71),
        ] {
            assert_eq!(e.failed(&err), Duration::ZERO);
        }
        assert_eq!(e.suppressed(), 0);
    }
}
