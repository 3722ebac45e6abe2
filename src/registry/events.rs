//! What the registry tells the rest of the broker: one typed change per step of a tunnel's life.
//!
//! Two kinds of listener, because they need different promises:
//! - a `Journal` makes changes durable; the registry waits for it, and a change it could not
//!   record does not happen (an issue or a renewal fails) or is reported (an end holds anyway);
//! - a `Watcher` (the route worker) only learns of changes; it must not block, and queues
//!   whatever slow work follows.

use std::sync::Arc;

use anyhow::Context;

use crate::record::TunnelRecord;
use crate::store::Store;

/// One change to one tunnel.
#[derive(Debug, Clone)]
pub enum Change {
    /// A tunnel was issued (or restored at start): its record, port reserved.
    Issued(TunnelRecord),
    /// A renewal moved its expiry or lease.
    Renewed(TunnelRecord),
    /// It was revoked or expired; the record carries why and when.
    Ended(TunnelRecord),
    /// A live session now holds its forward, so its route is wanted.
    Linked {
        /// Tunnel id.
        id: String,
        /// JupyterHub user.
        user: String,
        /// JupyterHub server name.
        server_name: String,
        /// The hub port the route targets.
        port: u16,
    },
    /// No session holds its forward any more; its route is no longer wanted.
    Unlinked {
        /// Tunnel id.
        id: String,
    },
    /// Past retention: forgotten.
    Purged {
        /// Tunnel id.
        id: String,
    },
}

impl Change {
    /// Whether a journal must record it before it counts.
    pub fn durable(&self) -> bool {
        !matches!(self, Self::Linked { .. } | Self::Unlinked { .. })
    }
}

/// Makes durable changes durable. Called on a blocking thread, one change at a time per tunnel.
pub trait Journal: Send + Sync + 'static {
    /// Records `change`; only durable changes are passed.
    fn record(&self, change: &Change) -> anyhow::Result<()>;
}

/// Learns of every change, in order per tunnel. Must return at once.
pub trait Watcher: Send + Sync + 'static {
    /// Takes note of `change`.
    fn changed(&self, change: &Change);
}

/// The state store as the registry's journal: the store knows records, not changes.
pub struct StoreJournal(pub Arc<dyn Store>);

impl Journal for StoreJournal {
    fn record(&self, change: &Change) -> anyhow::Result<()> {
        match change {
            Change::Issued(r) | Change::Renewed(r) | Change::Ended(r) => self.0.put(r),
            Change::Purged { id } => self.0.remove(id),
            Change::Linked { .. } | Change::Unlinked { .. } => Ok(()),
        }
    }
}

/// Runs `journal.record(change)` off the async threads.
pub(super) async fn write(journal: &Arc<dyn Journal>, change: Change) -> anyhow::Result<()> {
    let journal = Arc::clone(journal);
    tokio::task::spawn_blocking(move || journal.record(&change))
        .await
        .context("store task")?
}
