//! Connections that have not logged in yet, bounded in total and per source address, apart from
//! logged-in sessions (OpenSSH's `MaxStartups`/`PerSourceMaxStartups` are the model).
//!
//! At a bound the newcomer is admitted and room is made by closing the connection least likely
//! to be a job: the oldest one that never sent a byte, else the oldest. A job's client speaks at
//! once and logs in within milliseconds, so a flood of idle connections only ever evicts itself,
//! however many it opens and from wherever.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::transport::{Activity, KillSwitch};

/// The not-yet-logged-in connections.
#[derive(Debug)]
pub struct PreAuth {
    total: usize,
    per_source: usize,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    conns: HashMap<u64, Waiting>,
    by_source: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Waiting {
    source: IpAddr,
    since: Instant,
    activity: Arc<Activity>,
    kill: Arc<KillSwitch>,
    evicted: CancellationToken,
}

/// A connection's place in the table; leaving (login or close) is dropping it.
#[derive(Debug)]
pub struct Ticket {
    table: Arc<PreAuth>,
    id: u64,
    evicted: CancellationToken,
}

impl Ticket {
    /// Cancelled when the connection was closed to make room.
    pub fn evicted(&self) -> &CancellationToken {
        &self.evicted
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut table = self.table.lock();
        if let Some(w) = table.conns.remove(&self.id) {
            table.forget_source(w.source);
        }
    }
}

impl Table {
    fn forget_source(&mut self, source: IpAddr) {
        if let Some(n) = self.by_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }

    /// Closes the best victim among connections `from` (any source when None).
    fn evict(&mut self, from: Option<IpAddr>) -> bool {
        let victim = self
            .conns
            .iter()
            .filter(|(_, w)| from.is_none_or(|s| w.source == s))
            .min_by_key(|(_, w)| (w.activity.reads() > 0, w.since))
            .map(|(id, _)| *id);
        let Some(w) = victim.and_then(|id| self.conns.remove(&id)) else {
            return false;
        };
        self.forget_source(w.source);
        w.evicted.cancel();
        w.kill.kill();
        true
    }
}

impl PreAuth {
    /// At most `total` connections, `per_source` from any one address.
    pub fn new(total: usize, per_source: usize) -> Self {
        Self {
            total,
            per_source,
            table: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits connection `id` from `source`, closing others at a bound; returns its ticket and
    /// how many were closed.
    pub fn admit(
        self: &Arc<Self>,
        id: u64,
        source: IpAddr,
        activity: Arc<Activity>,
        kill: Arc<KillSwitch>,
    ) -> (Ticket, usize) {
        let mut table = self.lock();
        let mut evicted = 0;
        if table.by_source.get(&source).copied().unwrap_or(0) >= self.per_source
            && table.evict(Some(source))
        {
            evicted += 1;
        }
        if table.conns.len() >= self.total && table.evict(None) {
            evicted += 1;
        }
        let token = CancellationToken::new();
        table.conns.insert(
            id,
            Waiting {
                source,
                since: Instant::now(),
                activity,
                kill,
                evicted: token.clone(),
            },
        );
        *table.by_source.entry(source).or_default() += 1;
        drop(table);
        let ticket = Ticket {
            table: Arc::clone(self),
            id,
            evicted: token,
        };
        (ticket, evicted)
    }

    /// Connections waiting to log in.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(p: &Arc<PreAuth>, id: u64, ip: &str, spoke: bool) -> (Ticket, Arc<KillSwitch>) {
        let activity = Arc::new(Activity::default());
        if spoke {
            activity.saw_bytes();
        }
        let kill = Arc::new(KillSwitch::default());
        let (t, _) = p.admit(id, ip.parse().unwrap(), activity, Arc::clone(&kill));
        (t, kill)
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_source_evicts_its_own_silent_connections_first() {
        let p = Arc::new(PreAuth::new(100, 2));
        let (talker, _) = admit(&p, 1, "10.0.0.1", true);
        tokio::time::advance(std::time::Duration::from_millis(5)).await;
        let (silent, _) = admit(&p, 2, "10.0.0.1", false);
        let (other, _) = admit(&p, 3, "10.0.0.2", false);
        // Source 10.0.0.1 is full: its silent connection makes room, though it is newer.
        let (_new, _) = admit(&p, 4, "10.0.0.1", true);
        assert!(silent.evicted().is_cancelled());
        assert!(!talker.evicted().is_cancelled());
        assert!(!other.evicted().is_cancelled(), "other sources untouched");
        assert_eq!(p.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_bound_evicts_the_oldest_when_all_spoke() {
        let p = Arc::new(PreAuth::new(2, 10));
        let (old, _) = admit(&p, 1, "10.0.0.1", true);
        tokio::time::advance(std::time::Duration::from_millis(5)).await;
        let (young, _) = admit(&p, 2, "10.0.0.2", true);
        let (_new, _) = admit(&p, 3, "10.0.0.3", true);
        assert!(old.evicted().is_cancelled());
        assert!(!young.evicted().is_cancelled());
        assert_eq!(p.len(), 2);
        drop(young);
        assert_eq!(p.len(), 1, "a ticket leaves the table when dropped");
    }
}
