//! A hub-side listener per active grant; each accepted connection goes to a `Bridge` (bridge.rs).
//!
//! Each tunnel owns its reserved listener from issue to end, whether or not a job is connected:
//! the port never changes hands, and a reconnecting job replaces the session link once its login
//! has won the credential (`sessions.rs`: only from a session that stopped answering). A connection arriving while no job is linked is closed at once. Every accepted
//! connection is carried in its own task, so a slow or refusing notebook never stalls the SSH
//! session or other channels.
//!
//! A tunnel whose port another process holds (it bound the port while the broker was down)
//! is not listening: its forward is refused with that reason, so no route ever points at the
//! port, and the bind is retried in the background until the port is ours again. On shutdown
//! the listeners close last (`close_listeners`), after the routes are gone, and are not taken
//! out of the service manager's store: the next process adopts them (fdstore.rs).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::accept::AcceptErrors;
use crate::audit::Event;
use crate::bridge::Bridge;
use crate::grants::{ForwardRefusal, Grant};
pub use crate::link::{Link, Stats};
use crate::metrics::Metrics;
use crate::ports::{PoolError, PortPool};

/// What the admin API shows of a tunnel's live side.
#[derive(Debug, Clone)]
pub struct LiveStatus {
    /// The session holding the forward, if any: since when and from where.
    pub link: Option<(SystemTime, SocketAddr)>,
    /// Hub clients to the job.
    pub bytes_to_job: u64,
    /// The job to hub clients.
    pub bytes_from_job: u64,
    /// Whether the reserved port is bound.
    pub listening: bool,
    /// Why it is not, e.g. "port held by another process".
    pub listen_error: Option<&'static str>,
}

/// The reason shown when a reserved port cannot be bound.
pub fn listen_error(e: &PoolError) -> &'static str {
    if e.held_elsewhere() {
        "port held by another process"
    } else {
        "port cannot be bound"
    }
}

struct Tunnel {
    grant: Arc<Grant>,
    link: watch::Sender<Option<Arc<Link>>>,
    stats: Arc<Stats>,
    listening: Arc<AtomicBool>,
    listen_error: Arc<Mutex<Option<&'static str>>>,
    cancel: CancellationToken,
}

/// How tunnels carry connections.
#[derive(Debug, Clone, Copy)]
pub struct CarryLimits {
    /// Bound on a write to a hub client that stopped reading.
    pub write_timeout: Duration,
    /// Hub-side connections one tunnel carries at once.
    pub max_connections: u64,
}

/// The live tunnels, one per active grant.
pub struct Tunnels {
    map: DashMap<String, Tunnel>,
    ports: Arc<PortPool>,
    metrics: Metrics,
    limits: CarryLimits,
    /// Cancelled at shutdown: every listener closes, none leaves the descriptor store.
    stopping: CancellationToken,
    loops: TaskTracker,
}

impl Tunnels {
    /// An empty set.
    pub fn new(ports: Arc<PortPool>, metrics: Metrics, limits: CarryLimits) -> Self {
        Self {
            map: DashMap::new(),
            ports,
            metrics,
            limits,
            stopping: CancellationToken::new(),
            loops: TaskTracker::new(),
        }
    }

    /// Starts serving `grant`'s port. `listener` is its reservation, or why the port could
    /// not be bound (it is then retried in the background). A grant that has ended by now
    /// (revoked while it was being issued) is not started: its listener closes and its port
    /// goes back, and false is returned. The check and the start hold the map entry, which
    /// `close` needs too, so an end either sees the tunnel or the tunnel sees the end.
    pub fn start(
        &self,
        grant: Arc<Grant>,
        listener: Result<std::net::TcpListener, PoolError>,
    ) -> bool {
        let entry = self.map.entry(grant.id().to_owned());
        if grant.ended().is_some() {
            drop(listener);
            self.ports.release(grant.port());
            return false;
        }
        let (link, link_rx) = watch::channel(None);
        let (listener, error) = match listener {
            Ok(l) => (Some(l), None),
            Err(e) => {
                let reason = listen_error(&e);
                Event::PortUnavailable {
                    grant: &grant,
                    error: &e,
                    reason,
                }
                .record(&self.metrics);
                (None, Some(reason))
            }
        };
        let tunnel = Tunnel {
            grant: Arc::clone(&grant),
            link,
            stats: Arc::default(),
            // True from the start when the port is held, so a job that connects before the
            // accept task runs is not refused.
            listening: Arc::new(AtomicBool::new(listener.is_some())),
            listen_error: Arc::new(Mutex::new(error)),
            cancel: self.stopping.child_token(),
        };
        let task = AcceptLoop {
            port: grant.port(),
            link: link_rx,
            stats: Arc::clone(&tunnel.stats),
            listening: Arc::clone(&tunnel.listening),
            listen_error: Arc::clone(&tunnel.listen_error),
            cancel: tunnel.cancel.clone(),
            stopping: self.stopping.clone(),
            ports: Arc::clone(&self.ports),
            metrics: self.metrics.clone(),
            limits: self.limits,
        };
        let span =
            info_span!("tunnel", id = %grant.id(), user = %grant.user(), port = grant.port());
        self.loops.spawn(task.run(listener).instrument(span));
        entry.insert(tunnel);
        true
    }

    /// Links `link`'s session to tunnel `id` and returns the port; a session that held it
    /// before is disconnected (a reconnecting job wins over its own stale connection).
    /// `linked` runs under the tunnel's link lock, the same lock `detach` runs `unlinked`
    /// under, so watchers learn of links and unlinks in the order they happened; and while
    /// the map entry is held, so an end (`close`) comes after it.
    pub fn attach(
        &self,
        id: &str,
        link: Arc<Link>,
        linked: impl FnOnce(u16),
    ) -> Result<u16, ForwardRefusal> {
        let tunnel = self.map.get(id).ok_or(ForwardRefusal::Ended)?;
        if tunnel.grant.ended().is_some() {
            return Err(ForwardRefusal::Ended);
        }
        if !tunnel.listening.load(Ordering::Acquire) {
            return Err(ForwardRefusal::PortUnavailable {
                port: tunnel.grant.port(),
                reason: lock(&tunnel.listen_error).unwrap_or("port not bound yet"),
            });
        }
        let new_id = link.session.id;
        let port = tunnel.grant.port();
        let mut previous = None;
        tunnel.link.send_modify(|slot| {
            previous = slot.replace(link);
            linked(port);
        });
        match previous {
            Some(old) if old.session.id != new_id => {
                // The credential's newer session already won the login, and the claim told the
                // old one to go (sessions.rs); this only moves the forward.
                Event::LinkReplaced {
                    tunnel: id,
                    sessions: (old.session.id, new_id),
                }
                .record(&self.metrics);
            }
            Some(_) => {}
            None => self.metrics.tunnels_connected.inc(),
        }
        Ok(port)
    }

    /// Unlinks session `session_id` from tunnel `id`, if it still holds it; `unlinked` then
    /// runs under the link lock (see `attach`).
    pub fn detach(&self, id: &str, session_id: u64, unlinked: impl FnOnce()) -> bool {
        let Some(tunnel) = self.map.get(id) else {
            return false;
        };
        let mut unlinked = Some(unlinked);
        let detached = tunnel.link.send_if_modified(|slot| {
            if slot.as_ref().is_some_and(|l| l.session.id == session_id) {
                *slot = None;
                if let Some(f) = unlinked.take() {
                    f();
                }
                true
            } else {
                false
            }
        });
        if detached {
            self.metrics.tunnels_connected.dec();
        }
        detached
    }

    /// Ends tunnel `id`: unlinks its session and closes and frees its port. Telling the session
    /// to go is the credential's (`Sessions::close`): it holds every login, forwarding or not.
    pub fn close(&self, id: &str) {
        let Some((_, tunnel)) = self.map.remove(id) else {
            return;
        };
        if tunnel.link.send_replace(None).is_some() {
            self.metrics.tunnels_connected.dec();
        }
        tunnel.cancel.cancel();
    }

    /// The live side of tunnel `id`.
    pub fn status(&self, id: &str) -> Option<LiveStatus> {
        let tunnel = self.map.get(id)?;
        let link = tunnel
            .link
            .borrow()
            .as_ref()
            .map(|l| (l.since, l.session.peer));
        Some(LiveStatus {
            link,
            bytes_to_job: tunnel.stats.bytes_to_job.load(Ordering::Relaxed),
            bytes_from_job: tunnel.stats.bytes_from_job.load(Ordering::Relaxed),
            listening: tunnel.listening.load(Ordering::Acquire),
            listen_error: *lock(&tunnel.listen_error),
        })
    }

    /// Closes every tunnel's listener (shutdown, after the routes are gone) and waits, at most
    /// `within`, until they are closed. Grants stay issued and ports stay in the service
    /// manager's store, so a restarted broker serves them again.
    pub async fn close_listeners(&self, within: Duration) -> bool {
        self.stopping.cancel();
        self.loops.close();
        tokio::time::timeout(within, self.loops.wait())
            .await
            .is_ok()
    }

    /// How many tunnels are served.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none is served.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

struct AcceptLoop {
    port: u16,
    link: watch::Receiver<Option<Arc<Link>>>,
    stats: Arc<Stats>,
    listening: Arc<AtomicBool>,
    listen_error: Arc<Mutex<Option<&'static str>>>,
    cancel: CancellationToken,
    stopping: CancellationToken,
    ports: Arc<PortPool>,
    metrics: Metrics,
    limits: CarryLimits,
}

impl AcceptLoop {
    async fn run(self, reserved: Option<std::net::TcpListener>) {
        if let Some(listener) = self.listen(reserved).await {
            self.listening.store(true, Ordering::Release);
            self.accept(listener).await;
            self.listening.store(false, Ordering::Release);
        }
        if self.stopping.is_cancelled() {
            // Shutdown: the port stays reserved (and in the service manager's store) for the
            // next process; releasing it would tell systemd to close its copy.
            debug!("listener closed for shutdown");
            return;
        }
        // The listener is closed by now, so the port can go back to the pool.
        self.ports.release(self.port);
        debug!("tunnel closed");
    }

    /// The reserved listener, or a retried bind when the port was taken at restore time.
    async fn listen(&self, reserved: Option<std::net::TcpListener>) -> Option<TcpListener> {
        let mut std_listener = reserved;
        let mut backoff = Duration::from_millis(500);
        loop {
            if let Some(l) = std_listener.take() {
                match TcpListener::from_std(l) {
                    Ok(l) => return Some(l),
                    Err(e) => {
                        self.listening.store(false, Ordering::Release);
                        warn!(error = %e, "registering the reserved listener");
                    }
                }
            }
            tokio::select! {
                () = self.cancel.cancelled() => return None,
                () = tokio::time::sleep(backoff) => {}
            }
            // A bind is a cheap local call: retry often, so a port the intruder lets go is ours
            // again within seconds.
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match self.ports.rebind(self.port) {
                Ok(l) => {
                    Event::PortBoundAgain { port: self.port }.record(&self.metrics);
                    *lock(&self.listen_error) = None;
                    std_listener = Some(l);
                }
                Err(e) => {
                    let reason = listen_error(&e);
                    *lock(&self.listen_error) = Some(reason);
                    debug!(error = %e, "reserved port still unavailable: {reason}");
                }
            }
        }
    }

    async fn accept(&self, listener: TcpListener) {
        let mut accept_errors = AcceptErrors::new("tunnel");
        loop {
            let accepted = tokio::select! {
                () = self.cancel.cancelled() => return,
                r = listener.accept() => r,
            };
            let (sock, from) = match accepted {
                Ok(a) => {
                    accept_errors.accepted();
                    a
                }
                Err(e) => {
                    accept_errors.pause(&e).await;
                    continue;
                }
            };
            let refused = &self.metrics.forwarded_connections_refused;
            let Some(link) = self.link.borrow().clone() else {
                debug!(%from, "no job connected; closing");
                refused.with_label_values(&["no_job"]).inc();
                continue;
            };
            if self.stats.connections_active.load(Ordering::Relaxed) >= self.limits.max_connections
            {
                warn!(%from, "tunnel carries its maximum of connections; closing");
                refused.with_label_values(&["over_capacity"]).inc();
                continue;
            }
            let _ = sock.set_nodelay(true);
            self.metrics.forwarded_connections.inc();
            // Counted from accept, so connections still being opened count against the cap.
            self.stats
                .connections_active
                .fetch_add(1, Ordering::Relaxed);
            self.metrics.forwarded_connections_active.inc();
            let bridge = Bridge {
                link,
                port: self.port,
                stats: Arc::clone(&self.stats),
                metrics: self.metrics.clone(),
                write_timeout: self.limits.write_timeout,
            };
            tokio::spawn(bridge.run(sock, from).instrument(tracing::Span::current()));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics under these locks, so a poisoned value is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
