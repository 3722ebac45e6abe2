//! The route worker: applies each want and unwant as it comes, and every interval compares
//! the proxy's table with the wanted set. Missing or different routes are written again (a
//! restarted CHP has an empty table); routes that are ours but no longer wanted are deleted.
//!
//! Deleting a route when its tunnel ends first reads it back and leaves it alone unless it is
//! still ours: the hub may have written it since. A path wanted again before the delete runs
//! (a quick reconnect) is not deleted at all.
//!
//! At shutdown the worker stops and `withdraw` deletes every route of ours, before the tunnel
//! listeners close: the proxy never keeps a route to a port that is about to be free, which
//! another local user could then bind.

use crate::audit::Event;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Op, RouteEntry, Routes};

/// After asking the hub to restore its routes, how long before asking again while its route
/// stays missing (a hub that is down, or a proxy that keeps losing its table).
const HUB_ASK_AGAIN: Duration = Duration::from_secs(60);

/// Deletes in flight at once during `withdraw`: thousands of routes fit the time, and the
/// proxy is not flooded.
const WITHDRAW_CONCURRENCY: usize = 32;

/// Whether the hub's route was there at the last pass, and when the hub was last asked.
struct HubWatch {
    seen: bool,
    asked: Option<Instant>,
}

impl Routes {
    /// Applies changes as they come and reconciles every interval, until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let Some(mut ops) = self
            .inner
            .ops_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            warn!("route worker started twice");
            return;
        };
        let mut tick = tokio::time::interval(self.inner.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hub = HubWatch {
            seen: true,
            asked: None,
        };
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                Some(op) = ops.recv() => self.apply(op).await,
                _ = tick.tick() => self.reconcile(&mut hub).await,
            }
        }
    }

    /// Deletes every route of ours from the proxy, within `within` (shutdown: the worker has
    /// stopped, so nothing writes one again). Returns how many were deleted, or None when the
    /// proxy could not be read or the time ran out.
    pub async fn withdraw(&self, within: Duration) -> Option<usize> {
        self.wanted().clear();
        let work = async {
            let listing = match self.inner.backend.list().await {
                Ok(t) => t,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "proxy unreachable; routes not withdrawn");
                    return None;
                }
            };
            let gate = Arc::new(tokio::sync::Semaphore::new(WITHDRAW_CONCURRENCY));
            let mut deletes = tokio::task::JoinSet::new();
            for entry in listing.ours.into_iter().filter(|e| self.ours(e)) {
                let backend = Arc::clone(&self.inner.backend);
                let gate = Arc::clone(&gate);
                deletes.spawn(async move {
                    let _turn = gate.acquire().await;
                    backend.delete(&entry).await.map(|gone| (entry.path, gone))
                });
            }
            let mut deleted = 0;
            while let Some(done) = deletes.join_next().await {
                match done {
                    Ok(Ok((path, gone))) => {
                        self.count("delete", true);
                        if gone {
                            deleted += 1;
                            Event::RouteRemoved {
                                path: &path,
                                shutdown: true,
                            }
                            .record(&self.inner.metrics);
                        }
                    }
                    Ok(Err(e)) => {
                        self.count("delete", false);
                        warn!(error = %format!("{e:#}"), "route delete failed at shutdown");
                    }
                    Err(e) => warn!(error = %e, "route delete task failed"),
                }
            }
            Some(deleted)
        };
        match tokio::time::timeout(within, work).await {
            Ok(done) => done,
            Err(_) => {
                warn!(
                    seconds = within.as_secs_f64(),
                    "routes not all withdrawn in time"
                );
                None
            }
        }
    }

    async fn apply(&self, op: Op) {
        match op {
            Op::Put(id) => {
                let entry = self.wanted().get(&id).map(|w| w.entry.clone());
                let Some(entry) = entry else { return };
                // A later want for the same path wins; don't let an older one overwrite it.
                if self.winner(&entry.path).as_deref() != Some(id.as_str()) {
                    return;
                }
                let ok = self.put(&entry).await;
                self.mark(&id, &entry, ok);
            }
            Op::Delete(path) => {
                if self.winner(&path).is_some() {
                    return; // wanted again (a reconnect), or another live tunnel claims it
                }
                // Only if the route there is still ours: the hub may have rewritten it.
                match self.inner.backend.get(&path).await {
                    Ok(Some(entry)) if self.ours(&entry) => self.delete(&entry).await,
                    Ok(Some(_)) => info!(path = %path, "route is no longer ours; left alone"),
                    Ok(None) => {}
                    Err(e) => {
                        warn!(path = %path, error = %format!("{e:#}"), "route lookup failed; the next reconcile removes it if it is ours");
                    }
                }
            }
        }
    }

    async fn put(&self, entry: &RouteEntry) -> bool {
        let result = self.inner.backend.put(entry).await;
        self.count("add", result.is_ok());
        if let Err(e) = &result {
            warn!(path = %entry.path, error = %format!("{e:#}"), "route add failed; retrying at the next reconcile");
        }
        result.is_ok()
    }

    async fn delete(&self, seen: &RouteEntry) {
        let path = &seen.path;
        let result = self.inner.backend.delete(seen).await;
        self.count("delete", result.is_ok());
        match result {
            Ok(true) => Event::RouteRemoved {
                path,
                shutdown: false,
            }
            .record(&self.inner.metrics),
            Ok(false) => info!(path = %path, "route was rewritten meanwhile; left alone"),
            Err(e) => {
                warn!(path = %path, error = %format!("{e:#}"), "route delete failed; retrying at the next reconcile")
            }
        }
    }

    /// Counts one proxy call; the last call's result is the proxy's "up" gauge.
    fn count(&self, op: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.inner
            .metrics
            .route_operations
            .with_label_values(&[op, result])
            .inc();
        self.inner.metrics.chp_up.set(i64::from(ok));
    }

    async fn reconcile(&self, hub: &mut HubWatch) {
        let listing = match self.inner.backend.list().await {
            Ok(t) => {
                self.count("list", true);
                t
            }
            Err(e) => {
                if self.inner.metrics.chp_up.get() == 1 {
                    warn!(error = %format!("{e:#}"), "proxy unreachable; routes will be restored when it is back");
                }
                self.count("list", false);
                return;
            }
        };
        let winners = self.winners();
        for (id, want) in &winners {
            if listing.ours.iter().any(|have| have == want) {
                self.mark(id, want, true);
            } else {
                debug!(path = %want.path, "route missing or different; writing it");
                let ok = self.put(want).await;
                self.mark(id, want, ok);
            }
        }
        for have in &listing.ours {
            let wanted = winners.iter().any(|(_, w)| w.path == have.path);
            if !wanted && self.ours(have) {
                self.delete(have).await;
            }
        }
        self.watch_hub(hub, listing.hub_present).await;
    }

    /// No hub route: the proxy restarted under the hub, which would not notice for minutes.
    /// Asks once when it goes missing, then at most every `HUB_ASK_AGAIN` while it stays so.
    async fn watch_hub(&self, hub: &mut HubWatch, present: bool) {
        if present {
            hub.seen = true;
            return;
        }
        if !hub.seen && hub.asked.is_some_and(|t| t.elapsed() <= HUB_ASK_AGAIN) {
            return;
        }
        hub.seen = false;
        hub.asked = Some(Instant::now());
        let result = match self.inner.backend.proxy_restarted().await {
            Ok(false) => return,
            Ok(true) => {
                info!("proxy has no hub route; asked the hub to restore its routes");
                "ok"
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "asking the hub to restore its routes failed");
                "error"
            }
        };
        self.inner
            .metrics
            .route_operations
            .with_label_values(&["hub_restore", result])
            .inc();
    }
}
