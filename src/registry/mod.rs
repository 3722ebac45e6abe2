//! The registry: the one owner of every tunnel's life, from issue to purge.
//!
//! Each tunnel is one grant (who may publish it, `grants.rs`) and, while it is active, one live
//! tunnel (its reserved listener and the session link holding its forward, `tunnels.rs`). Only
//! the registry changes either, and every change goes out as a typed `Change`
//! (`events.rs`): the journal (the state store) records the durable ones before they count, and
//! watchers (the route worker, the live sessions) follow along. Nobody else is called in step.
//!
//! Rollback comes from guards: an issue that fails after the port was reserved drops the
//! `Reservation` (the port goes back) and the `Indexed` guard (the grant leaves the index).
//! The port returns to the pool only when the tunnel's listener has closed.

use std::sync::Arc;
use std::time::Duration;

use crate::grants::{AuthRefusal, ForwardRefusal, Grant, Grants};
use crate::link::Link;
use crate::metrics::Metrics;
use crate::ports::PortPool;
use crate::tunnels::{CarryLimits, LiveStatus, Tunnels};

mod events;
mod life;

pub use events::{Change, Journal, StoreJournal, Watcher};
pub use life::{IssueFailure, Restored};

/// Every tunnel the broker knows, active or ended but retained.
pub struct Registry {
    grants: Grants,
    tunnels: Tunnels,
    ports: Arc<PortPool>,
    journal: Arc<dyn Journal>,
    watchers: Vec<Arc<dyn Watcher>>,
    metrics: Metrics,
}

impl Registry {
    /// An empty registry over `ports`, recording to `journal` and telling `watchers`.
    pub fn new(
        ports: Arc<PortPool>,
        metrics: Metrics,
        carry: CarryLimits,
        journal: Arc<dyn Journal>,
        watchers: Vec<Arc<dyn Watcher>>,
    ) -> Self {
        let tunnels = Tunnels::new(Arc::clone(&ports), metrics.clone(), carry);
        Self {
            grants: Grants::default(),
            tunnels,
            ports,
            journal,
            watchers,
            metrics,
        }
    }

    fn tell(&self, change: &Change) {
        for w in &self.watchers {
            w.changed(change);
        }
    }

    /// The grant `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Grant>> {
        self.grants.get(id)
    }

    /// Every grant, in no particular order.
    pub fn all(&self) -> Vec<Arc<Grant>> {
        self.grants.all()
    }

    /// The live side of tunnel `id` (None once it ended).
    pub fn status(&self, id: &str) -> Option<LiveStatus> {
        self.tunnels.status(id)
    }

    /// `user`'s active certificate tunnels at unix time `now`.
    pub fn certificate_tunnels(&self, user: &str, now: u64) -> Vec<Arc<Grant>> {
        self.grants.certificate_tunnels(user, now)
    }

    /// Decides a key login: see `Grants::authenticate`.
    pub fn authenticate(
        &self,
        expected_user: &str,
        user: &str,
        fingerprint: &str,
        now: u64,
    ) -> Result<Arc<Grant>, AuthRefusal> {
        self.grants
            .authenticate(expected_user, user, fingerprint, now)
    }

    /// Links `link`'s session to `grant`'s tunnel and returns the port; its route is wanted
    /// from now on.
    pub fn link(&self, grant: &Grant, link: Arc<Link>) -> Result<u16, ForwardRefusal> {
        let port = self.tunnels.attach(grant.id(), link)?;
        self.tell(&Change::Linked {
            id: grant.id().to_owned(),
            user: grant.user().to_owned(),
            server_name: grant.server_name().to_owned(),
            port,
        });
        Ok(port)
    }

    /// Unlinks session `session_id` from tunnel `id`; false when a newer session had already
    /// taken it over (its route stays wanted).
    pub fn unlink(&self, id: &str, session_id: u64) -> bool {
        let detached = self.tunnels.detach(id, session_id);
        if detached {
            self.tell(&Change::Unlinked { id: id.to_owned() });
        }
        detached
    }

    /// Closes every tunnel listener for shutdown (grants stay issued, ports stay reserved for
    /// the next process); waits at most `within`.
    pub async fn close_listeners(&self, within: Duration) -> bool {
        self.tunnels.close_listeners(within).await
    }

    /// Reserves the next free hub port for a tunnel being issued (see `issue`).
    pub fn reserve(&self) -> Result<crate::reservation::Reservation, crate::ports::PoolError> {
        crate::reservation::Reservation::take(&self.ports)
    }

    fn update_port_gauge(&self) {
        let free = i64::try_from(self.ports.free()).unwrap_or(i64::MAX);
        self.metrics.ports_free.set(free);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
