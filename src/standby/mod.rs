//! An active/standby pair of brokers on one Redis (`[store] backend = "redis"`).
//!
//! A broker starts as a standby: it binds nothing and serves nothing, and polls the lease
//! (`lease.rs`). Once it holds the lease it opens the broker from the shared store, which binds
//! every reserved hub port, then binds its SSH and admin listeners and serves; a renewal task
//! keeps the lease. No split brain: if no renewal has been confirmed for the lease minus a
//! margin, the broker exits at once with `EXIT_LEASE_LOST`, closing every socket, before the
//! lease can lapse and the other broker take over; its store writes are refused from the
//! moment the lease is gone (`store::RedisStore`). A stop on SIGTERM drains as usual and then
//! gives the lease up, so the standby takes over without waiting it out.
//!
//! The systemd descriptor store would keep hub ports listening after the process is gone, so a
//! broker that loses the lease first takes each of its tunnels' listeners out of it, and a
//! broker that has to wait for the lease closes (and takes out) whatever systemd passed back:
//! the other broker owns those tunnels now. Within one holder's life the store works as
//! before (a restart that finds the lease free keeps its ports).

mod lease;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use lease::{Fence, Lease, margin, stop_by};

use crate::fdstore::FdStore;
use crate::{Broker, Listeners};

/// Exit status of a broker that lost its lease (EX_TEMPFAIL): `Restart=` starts it again, as
/// a standby.
pub const EXIT_LEASE_LOST: u8 = 75;

/// Waits until this broker holds the lease; None when `shutdown` comes first. The returned
/// instant is when the taking call started: the lease lasts at least its TTL from then. While
/// waiting, listeners systemd passed back are closed: the other broker serves those tunnels.
pub async fn acquire(
    lease: &mut Lease,
    fds: &FdStore,
    shutdown: impl Future<Output = ()>,
) -> Option<(Fence, Instant)> {
    let poll = (lease.ttl() / 10).max(Duration::from_millis(100));
    let mut waiting = false;
    tokio::pin!(shutdown);
    loop {
        let started = Instant::now();
        match lease.try_acquire().await {
            Ok(Some(fence)) => {
                info!(
                    broker = lease.id(),
                    token = fence.token,
                    "lease taken: active"
                );
                status("active: holds the lease");
                return Some((fence, started));
            }
            Ok(None) => {
                if !waiting {
                    let holder = lease.holder().await.ok().flatten().unwrap_or_default();
                    info!(broker = lease.id(), %holder, "standby: another broker holds the lease");
                    fds.release_unclaimed();
                    // A standby is up and doing its job: `systemctl start` must not wait for
                    // the lease (it may never come), so it says READY=1 now.
                    crate::fdstore::notify_ready();
                    status(&format!("standby: {holder} holds the lease"));
                    waiting = true;
                }
            }
            Err(e) => warn!(error = %format!("{e:#}"), "standby: cannot reach redis"),
        }
        tokio::select! {
            () = &mut shutdown => return None,
            () = tokio::time::sleep(poll) => {}
        }
    }
}

/// systemd's one-line status (`systemctl status`); nothing without a service manager.
fn status(text: &str) {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Status(text)]) {
        warn!(error = %e, "could not tell the service manager our status");
    }
}

/// Why a holder stopped holding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Given up on request (the broker stopped).
    Released,
    /// No renewal confirmed in time: the lease may lapse at any moment.
    Unconfirmed,
    /// Another broker (or nobody) holds it now.
    Taken,
}

/// The renewal task of the active broker.
pub struct Holding {
    task: JoinHandle<Held>,
    cancel: CancellationToken,
}

impl Holding {
    /// Renews `fence` every `renew`, from now until it is released or lost; `confirmed` is
    /// when the call that took (or last renewed) it started.
    pub fn start(lease: Lease, fence: Fence, confirmed: Instant, renew: Duration) -> Self {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(hold(lease, fence, confirmed, renew, cancel.clone()));
        Self { task, cancel }
    }

    /// Resolves when the lease is lost (at once if it already is).
    pub async fn lost(&mut self) -> Held {
        (&mut self.task).await.unwrap_or(Held::Unconfirmed)
    }

    /// Stops renewing and gives the lease up (bounded by the renewal timeout).
    pub async fn release(self) -> Held {
        self.cancel.cancel();
        self.task.await.unwrap_or(Held::Unconfirmed)
    }
}

async fn hold(
    mut lease: Lease,
    fence: Fence,
    mut confirmed: Instant,
    renew: Duration,
    cancel: CancellationToken,
) -> Held {
    let ttl = lease.ttl();
    loop {
        let deadline = stop_by(confirmed, ttl);
        let started = Instant::now();
        if started >= deadline {
            return Held::Unconfirmed;
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            r = tokio::time::timeout_at(deadline, lease.renew(&fence)) => match r {
                Ok(Ok(true)) => confirmed = started,
                Ok(Ok(false)) => return Held::Taken,
                Ok(Err(e)) => warn!(error = %format!("{e:#}"), "lease renewal failed"),
                Err(_) => {}
            },
        }
        let next = (started + renew).min(stop_by(confirmed, ttl));
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep_until(next) => {}
        }
    }
    match tokio::time::timeout(renew, lease.release(&fence)).await {
        Ok(Ok(true)) => info!("lease released"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => warn!(error = %format!("{e:#}"), "could not release the lease; it lapses"),
        Err(_) => warn!("releasing the lease timed out; it lapses"),
    }
    Held::Released
}

/// How an active broker's serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Stopped on `shutdown`; the lease was given up.
    Stopped,
    /// The lease was lost: the caller must exit now (`EXIT_LEASE_LOST`), which closes every
    /// socket; the tunnel listeners are already out of the descriptor store.
    LeaseLost(Held),
}

/// Serves `broker` (already opened from the shared store) while `holding` keeps the lease.
pub async fn serve(
    broker: Broker,
    listeners: Listeners,
    mut holding: Holding,
    fds: Arc<FdStore>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Ended> {
    let run = crate::run(broker.clone(), listeners, shutdown);
    tokio::pin!(run);
    tokio::select! {
        r = &mut run => {
            let held = holding.release().await;
            if held != Held::Released {
                // Stopping anyway; the lease was already gone.
                warn!(?held, "the lease was lost while stopping");
            }
            r.map(|()| Ended::Stopped)
        }
        held = holding.lost() => {
            error!(?held, "lease lost: stopping at once so the standby can take over");
            for (grant, _) in broker.list() {
                fds.remove(grant.port());
            }
            Ok(Ended::LeaseLost(held))
        }
    }
}
