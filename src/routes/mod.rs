//! Proxy routes for live tunnels: the typed route, the backend seam and the wanted set.
//!
//! A route is a `RouteEntry`: a `RoutePath` (`<base_url>user/<user>[/<server>]`, names that
//! `names` accepts, so `/`, `<base_url>hub/` and every other route are out of reach by
//! construction), a `Target` (`http://<tunnel host>:<hub port>`), the user and server name the
//! hub keeps beside it, and the `Owner` stamp that says tunnelbot wrote it. A `RouteBackend`
//! speaks only these types; how they are stored (CHP's JSON, traefik's keys) is its own
//! business (`chp`, `traefik_redis`).
//!
//! The wanted set holds one route per tunnel whose forward is held by a live session. The
//! broker only says `want(id, user, server, port)` and `unwant(id)`: the path and target are
//! made here, from `[routes]`, which nothing else reads. The worker (`reconcile`) applies each
//! change and, every `reconcile_interval`, repairs the proxy's table.
//!
//! A route is ours, and may be rewritten or deleted, only when all of these hold:
//! - the backend found our owner stamp on it and could read it as a `RouteEntry` (so its path
//!   has the server-route shape);
//! - its target is the tunnel host and a port of `tunnels.ports` (the range is tunnelbot's).
//!
//! Nothing here runs on the SSH path: a slow or dead proxy delays routes, never tunnels.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;

use crate::metrics::Metrics;
use crate::names::NameError;
use crate::port_range::PortRange;

pub mod chp;
mod entry;
#[cfg(test)]
mod fake;
mod held;
mod reconcile;
mod sections;
mod settings;
#[cfg(test)]
mod tests;
mod traefik_keys;
pub mod traefik_redis;

pub use entry::{BaseUrl, Owner, RouteEntry, RoutePath, Target};
pub use sections::{ChpConfig, RouteBackendKind, RoutesConfig};
pub use settings::{Sections, Settings, build};

/// A boxed future, for the object-safe backend trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What `list` found.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Every route that carries our owner stamp and reads as a `RouteEntry`.
    pub ours: Vec<RouteEntry>,
    /// Whether the hub's own route is there; its absence means the proxy lost its table.
    pub hub_present: bool,
}

/// A proxy that holds routes. Implementations: `chp::ChpClient`, `traefik_redis::TraefikRedis`.
pub trait RouteBackend: Send + Sync + 'static {
    /// Our routes, and whether the hub's route is there.
    fn list(&self) -> BoxFuture<'_, anyhow::Result<Listing>>;
    /// The route at `path` when it is ours (stamped and readable), else None.
    fn get<'a>(&'a self, path: &'a RoutePath) -> BoxFuture<'a, anyhow::Result<Option<RouteEntry>>>;
    /// Writes (or overwrites) `entry`, stamp included, in one step.
    fn put<'a>(&'a self, entry: &'a RouteEntry) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Deletes the route at `seen.path` if it is still `seen` (our stamp, the same target), the
    /// route the reconciler read and judged ours: Ok(true) when deleted, Ok(false) when it is
    /// absent or was rewritten meanwhile (left alone). A backend that can compare and delete in
    /// one step does (traefik-redis); CHP cannot and deletes the path, right after the read.
    fn delete<'a>(&'a self, seen: &'a RouteEntry) -> BoxFuture<'a, anyhow::Result<bool>>;
    /// The proxy lost the hub's route (it restarted empty): get the routes we do not own
    /// restored, if the backend knows how. Ok(false) when it does not.
    fn proxy_restarted(&self) -> BoxFuture<'_, anyhow::Result<bool>> {
        Box::pin(async { Ok(false) })
    }
}

/// A tunnel's route, as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteState {
    /// Route support is off.
    Disabled,
    /// No live session, so no route is wanted.
    Absent,
    /// Wanted, not yet written.
    Pending,
    /// Written and seen in the proxy.
    Registered,
    /// The last attempt failed; retried every reconcile interval.
    Error,
}

impl RouteState {
    /// The API string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Absent => "absent",
            Self::Pending => "pending",
            Self::Registered => "registered",
            Self::Error => "error",
        }
    }
}

struct Wanted {
    entry: RouteEntry,
    state: RouteState,
    /// When the forward was granted; cleared once the registration time is recorded.
    granted: Option<Instant>,
    /// Later wants win when two tunnels claim one path.
    seq: u64,
}

enum Op {
    Put(String),
    Delete(RoutePath),
}

/// The route table the broker wants, and the handle to its worker.
#[derive(Clone)]
pub struct Routes {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn RouteBackend>,
    wanted: Mutex<HashMap<String, Wanted>>,
    ops: mpsc::UnboundedSender<Op>,
    ops_rx: Mutex<Option<mpsc::UnboundedReceiver<Op>>>,
    base_url: BaseUrl,
    target_host: String,
    range: PortRange,
    interval: Duration,
    metrics: Metrics,
    seq: AtomicU64,
    /// The route path and hub port of every tunnel this broker holds, issued until purged:
    /// a stamped route there to that port is ours whatever host it names (the other broker
    /// of a pair wrote it before a failover).
    held: Mutex<held::Held>,
}

impl Routes {
    /// A route table over `backend`; nothing happens until `run` is spawned.
    pub fn new(
        backend: Arc<dyn RouteBackend>,
        base_url: BaseUrl,
        target_host: String,
        range: PortRange,
        interval: Duration,
        metrics: Metrics,
    ) -> Self {
        let (ops, rx) = mpsc::unbounded_channel();
        Self {
            inner: Arc::new(Inner {
                backend,
                wanted: Mutex::default(),
                ops,
                ops_rx: Mutex::new(Some(rx)),
                base_url,
                target_host,
                range,
                interval,
                metrics,
                seq: AtomicU64::new(0),
                held: Mutex::default(),
            }),
        }
    }

    fn held(&self) -> MutexGuard<'_, held::Held> {
        self.inner.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wanted(&self) -> MutexGuard<'_, HashMap<String, Wanted>> {
        self.inner.wanted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The route tunnel `id` gets for `user`'s `server_name` on hub port `port`.
    pub fn entry_for(
        &self,
        user: &str,
        server_name: &str,
        port: u16,
    ) -> Result<RouteEntry, NameError> {
        let path = RoutePath::new(&self.inner.base_url, user, server_name)?;
        let target = Target {
            host: self.inner.target_host.clone(),
            port,
        };
        Ok(RouteEntry::new(path, target))
    }

    /// Tunnel `id` (for `user`'s `server_name`) has a live session on hub port `port`: route
    /// to it.
    pub fn want(&self, id: &str, user: &str, server_name: &str, port: u16) {
        // Names were checked at issue; a record from an older, looser broker gets no route.
        let entry = match self.entry_for(user, server_name, port) {
            Ok(e) => e,
            Err(e) => {
                warn!(tunnel = %id, error = %e, "no route for a name the proxy path cannot hold");
                return;
            }
        };
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let mut wanted = self.wanted();
        if let Some(w) = wanted.get_mut(id)
            && w.entry == entry
            && w.state == RouteState::Registered
        {
            w.seq = seq;
            return;
        }
        wanted.insert(
            id.to_owned(),
            Wanted {
                entry,
                state: RouteState::Pending,
                granted: Some(Instant::now()),
                seq,
            },
        );
        drop(wanted);
        let _ = self.inner.ops.send(Op::Put(id.to_owned()));
    }

    /// Tunnel `id` has no live session any more: remove its route.
    pub fn unwant(&self, id: &str) {
        let removed = self.wanted().remove(id);
        if let Some(w) = removed {
            let _ = self.inner.ops.send(Op::Delete(w.entry.path));
        }
    }

    /// The route state of tunnel `id`.
    pub fn state(&self, id: &str) -> RouteState {
        self.wanted()
            .get(id)
            .map_or(RouteState::Absent, |w| w.state)
    }

    /// The tunnel id whose route should own `path`: the latest want.
    fn winner(&self, path: &RoutePath) -> Option<String> {
        self.wanted()
            .iter()
            .filter(|(_, w)| w.entry.path == *path)
            .max_by_key(|(_, w)| w.seq)
            .map(|(id, _)| id.clone())
    }

    /// The winning entry per path, with its tunnel id.
    fn winners(&self) -> Vec<(String, RouteEntry)> {
        let mut by_path: HashMap<&RoutePath, (&String, &Wanted)> = HashMap::new();
        let wanted = self.wanted();
        for (id, w) in wanted.iter() {
            let e = by_path.entry(&w.entry.path).or_insert((id, w));
            if w.seq > e.1.seq {
                *e = (id, w);
            }
        }
        by_path
            .into_values()
            .map(|(id, w)| (id.clone(), w.entry.clone()))
            .collect()
    }

    /// Records the outcome of writing `entry` for tunnel `id`, unless it changed meanwhile.
    fn mark(&self, id: &str, entry: &RouteEntry, ok: bool) {
        let mut wanted = self.wanted();
        let Some(w) = wanted.get_mut(id) else { return };
        if &w.entry != entry {
            return;
        }
        w.state = if ok {
            RouteState::Registered
        } else {
            RouteState::Error
        };
        if ok && let Some(t) = w.granted.take() {
            crate::audit::Event::RouteRegistered {
                tunnel: id,
                path: &entry.path,
                target: &entry.target,
                after: t.elapsed(),
            }
            .record(&self.inner.metrics);
        }
    }

    /// Whether a stamped, readable route is one of ours: it targets our range, and either our
    /// host or the port of the tunnel we hold at that path (written by the other broker of a
    /// pair before it failed over to us; left, it would point at a port nobody serves there).
    fn ours(&self, entry: &RouteEntry) -> bool {
        if entry.owner != Owner::TUNNELBOT || !self.inner.range.contains(entry.target.port) {
            return false;
        }
        entry.target.host == self.inner.target_host
            || self.held().contains(&entry.path, entry.target.port)
    }

    /// Tunnel `id` of `user`'s `server_name` holds hub port `port` (issued or restored).
    fn hold(&self, id: &str, user: &str, server_name: &str, port: u16) {
        if let Ok(entry) = self.entry_for(user, server_name, port) {
            self.held().insert(id, entry.path, port);
        }
    }

    /// Tunnel `id` is forgotten.
    fn forget(&self, id: &str) {
        self.held().remove(id);
    }
}

/// The route worker follows the registry: a route is wanted while a session holds the forward.
impl crate::registry::Watcher for Routes {
    fn changed(&self, change: &crate::registry::Change) {
        use crate::registry::Change;
        match change {
            Change::Linked {
                id,
                user,
                server_name,
                port,
            } => self.want(id, user, server_name, *port),
            Change::Unlinked { id } => self.unwant(id),
            Change::Purged { id } => {
                self.unwant(id);
                self.forget(id);
            }
            Change::Ended(record) => self.unwant(&record.id),
            Change::Issued(r) => self.hold(&r.id, &r.user, &r.server_name, r.port),
            Change::Renewed(_) => {}
        }
    }
}
