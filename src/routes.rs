//! Proxy routes for live tunnels: what should be routed, and the worker that makes it so.
//!
//! The wanted set holds one route per tunnel whose forward is held by a live session. A single
//! worker task applies changes as they happen (forward granted: add; tunnel ended: delete) and,
//! every `reconcile_interval`, compares the proxy's whole table with the wanted set: missing or
//! wrong routes are written again (a restarted CHP has an empty table) and routes that are ours
//! but no longer wanted are deleted. A route is ours when its target is `target_host` and a port
//! of our range: the range belongs to tunnelbot, so this holds across broker restarts without
//! remembering anything, and routes pointing anywhere else are never touched.
//!
//! Nothing here runs on the SSH path: a slow or dead proxy delays routes, never tunnels.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::PortRange;
use crate::metrics::Metrics;

/// A boxed future, for the object-safe backend trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One route as the broker writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The path as the proxy stores it: percent-escapes decoded, no trailing slash.
    pub path: String,
    /// The path escaped as JupyterHub escapes it, for the API URL.
    pub escaped: String,
    /// `http://<target_host>:<port>`, exactly what the spawner returns to the hub.
    pub target: String,
    /// JupyterHub user.
    pub user: String,
    /// JupyterHub server name.
    pub server_name: String,
}

impl Route {
    /// The route JupyterHub itself would write for `user`'s `server_name` under `base_url`.
    pub fn for_server(
        base_url: &str,
        user: &str,
        server_name: &str,
        target_host: &str,
        port: u16,
    ) -> Self {
        let mut path = format!("{base_url}user/{user}");
        let mut escaped = format!("{base_url}user/{}", escape(user));
        if !server_name.is_empty() {
            path = format!("{path}/{server_name}");
            escaped = format!("{escaped}/{}", escape(server_name));
        }
        Self {
            path,
            escaped,
            target: format!("http://{target_host}:{port}"),
            user: user.to_owned(),
            server_name: server_name.to_owned(),
        }
    }

    /// The route data: the same keys JupyterHub writes, so the hub takes it for its own.
    pub fn data(&self) -> Value {
        json!({"target": self.target, "jupyterhub": true, "user": self.user, "server_name": self.server_name})
    }

    /// Whether the proxy's `entry` for this path already says what we would write.
    fn matches(&self, entry: &Value) -> bool {
        entry.get("target").and_then(Value::as_str) == Some(self.target.as_str())
            && entry.get("jupyterhub") == Some(&Value::Bool(true))
            && entry.get("user").and_then(Value::as_str) == Some(self.user.as_str())
            && entry.get("server_name").and_then(Value::as_str) == Some(self.server_name.as_str())
    }
}

/// Percent-escapes a path segment as Python's `quote(v, safe='@~')` does (JupyterHub's escaping).
pub fn escape(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A proxy that holds routes: CHP today, perhaps traefik later.
pub trait RouteBackend: Send + Sync + 'static {
    /// The whole table: decoded path → route data.
    fn list(&self) -> BoxFuture<'_, anyhow::Result<HashMap<String, Value>>>;
    /// Writes (or overwrites) `route`.
    fn put<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Deletes the route at `escaped`; an absent route is success.
    fn delete<'a>(&'a self, escaped: &'a str) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Asks the hub to restore its own routes (after a proxy restart); false if not configured.
    fn restore_hub(&self) -> BoxFuture<'_, anyhow::Result<bool>>;
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
    route: Route,
    state: RouteState,
    /// When the forward was granted; cleared once the registration time is recorded.
    granted: Option<Instant>,
    /// Later wants win when two tunnels claim one path.
    seq: u64,
}

enum Op {
    Put(String),
    Delete(Route),
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
    target_host: String,
    range: PortRange,
    interval: Duration,
    metrics: Metrics,
    seq: std::sync::atomic::AtomicU64,
}

impl Routes {
    /// A route table over `backend`; nothing happens until `run` is spawned.
    pub fn new(
        backend: Arc<dyn RouteBackend>,
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
                target_host,
                range,
                interval,
                metrics,
                seq: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    fn wanted(&self) -> std::sync::MutexGuard<'_, HashMap<String, Wanted>> {
        self.inner.wanted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tunnel `id` has a live session: route `route` to it.
    pub fn want(&self, id: &str, route: Route) {
        let seq = self
            .inner
            .seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut wanted = self.wanted();
        if let Some(w) = wanted.get_mut(id)
            && w.route == route
            && w.state == RouteState::Registered
        {
            w.seq = seq;
            return;
        }
        wanted.insert(
            id.to_owned(),
            Wanted {
                route,
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
            let _ = self.inner.ops.send(Op::Delete(w.route));
        }
    }

    /// The route state of tunnel `id`.
    pub fn state(&self, id: &str) -> RouteState {
        self.wanted()
            .get(id)
            .map_or(RouteState::Absent, |w| w.state)
    }

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
        let mut hub_seen = true;
        let mut hub_asked: Option<Instant> = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                Some(op) = ops.recv() => self.apply(op).await,
                _ = tick.tick() => self.reconcile(&mut hub_seen, &mut hub_asked).await,
            }
        }
    }

    async fn apply(&self, op: Op) {
        match op {
            Op::Put(id) => {
                let route = self.wanted().get(&id).map(|w| w.route.clone());
                let Some(route) = route else { return };
                // A later want for the same path wins; don't let an older one overwrite it.
                if self.winner(&route.path).as_deref() != Some(id.as_str()) {
                    return;
                }
                let ok = self.put(&route).await;
                self.mark(&id, &route, ok);
            }
            Op::Delete(route) => {
                if self.winner(&route.path).is_some() {
                    return; // another live tunnel claims the path now
                }
                self.delete(&route.escaped, &route.path).await;
            }
        }
    }

    /// The tunnel id whose route should own `path`.
    fn winner(&self, path: &str) -> Option<String> {
        self.wanted()
            .iter()
            .filter(|(_, w)| w.route.path == path)
            .max_by_key(|(_, w)| w.seq)
            .map(|(id, _)| id.clone())
    }

    fn mark(&self, id: &str, route: &Route, ok: bool) {
        let mut wanted = self.wanted();
        let Some(w) = wanted.get_mut(id) else { return };
        if &w.route != route {
            return;
        }
        w.state = if ok {
            RouteState::Registered
        } else {
            RouteState::Error
        };
        if ok && let Some(t) = w.granted.take() {
            self.inner
                .metrics
                .route_register_duration
                .observe(t.elapsed().as_secs_f64());
            info!(target: "audit", event = "route_registered", tunnel = %id, path = %route.path, target = %route.target, "route registered");
        }
    }

    async fn put(&self, route: &Route) -> bool {
        let result = self.inner.backend.put(route).await;
        self.count("add", result.is_ok());
        if let Err(e) = &result {
            warn!(path = %route.path, error = %format!("{e:#}"), "route add failed; retrying at the next reconcile");
        }
        result.is_ok()
    }

    async fn delete(&self, escaped: &str, path: &str) {
        let result = self.inner.backend.delete(escaped).await;
        self.count("delete", result.is_ok());
        match result {
            Ok(()) => info!(target: "audit", event = "route_removed", path, "route removed"),
            Err(e) => {
                warn!(path, error = %format!("{e:#}"), "route delete failed; retrying at the next reconcile")
            }
        }
    }

    fn count(&self, op: &str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.inner
            .metrics
            .route_operations
            .with_label_values(&[op, result])
            .inc();
        self.inner.metrics.chp_up.set(i64::from(ok));
    }

    /// Whether `entry` is one of ours: it targets our host and a port of our range.
    fn ours(&self, entry: &Value) -> bool {
        let Some(target) = entry.get("target").and_then(Value::as_str) else {
            return false;
        };
        let Some(rest) = target.strip_prefix("http://") else {
            return false;
        };
        let Some((host, port)) = rest.rsplit_once(':') else {
            return false;
        };
        host == self.inner.target_host
            && port
                .parse::<u16>()
                .is_ok_and(|p| self.inner.range.contains(p))
    }

    async fn reconcile(&self, hub_seen: &mut bool, hub_asked: &mut Option<Instant>) {
        let table = match self.inner.backend.list().await {
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
        // The winning route per path.
        let mut by_path: HashMap<String, (String, Route, u64)> = HashMap::new();
        for (id, w) in self.wanted().iter() {
            let e = by_path
                .entry(w.route.path.clone())
                .or_insert_with(|| (id.clone(), w.route.clone(), w.seq));
            if w.seq > e.2 {
                *e = (id.clone(), w.route.clone(), w.seq);
            }
        }
        for (id, route, _) in by_path.values() {
            match table.get(&route.path) {
                Some(entry) if route.matches(entry) => self.mark(id, route, true),
                _ => {
                    debug!(path = %route.path, "route missing or different; writing it");
                    let ok = self.put(route).await;
                    self.mark(id, route, ok);
                }
            }
        }
        for (path, entry) in &table {
            if !by_path.contains_key(path) && self.ours(entry) {
                self.delete(&escape_path(path), path).await;
            }
        }
        // No hub route: CHP restarted under the hub, which would not notice for minutes.
        let hub_present = table
            .values()
            .any(|e| e.get("hub") == Some(&Value::Bool(true)));
        if hub_present {
            *hub_seen = true;
        } else if *hub_seen || hub_asked.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            *hub_seen = false;
            *hub_asked = Some(Instant::now());
            match self.inner.backend.restore_hub().await {
                Ok(true) => {
                    self.inner
                        .metrics
                        .route_operations
                        .with_label_values(&["hub_restore", "ok"])
                        .inc();
                    info!("proxy has no hub route; asked the hub to restore its routes");
                }
                Ok(false) => {}
                Err(e) => {
                    self.inner
                        .metrics
                        .route_operations
                        .with_label_values(&["hub_restore", "error"])
                        .inc();
                    warn!(error = %format!("{e:#}"), "asking the hub to restore its routes failed");
                }
            }
        }
    }
}

/// Escapes every segment of a decoded path (for deleting a route found in the table).
fn escape_path(path: &str) -> String {
    path.split('/').map(escape).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_as_jupyterhub_writes_them() {
        let r = Route::for_server("/", "alice", "", "127.0.0.1", 20001);
        assert_eq!(
            (r.path.as_str(), r.escaped.as_str()),
            ("/user/alice", "/user/alice")
        );
        assert_eq!(r.target, "http://127.0.0.1:20001");
        let r = Route::for_server("/jh/", "a b@x.org", "gpu 1", "127.0.0.1", 20001);
        assert_eq!(r.path, "/jh/user/a b@x.org/gpu 1");
        assert_eq!(r.escaped, "/jh/user/a%20b@x.org/gpu%201");
        assert_eq!(r.data()["jupyterhub"], true);
        assert_eq!(r.data()["server_name"], "gpu 1");
        assert_eq!(escape("é~_.-"), "%C3%A9~_.-");
        assert_eq!(escape_path("/user/a b"), "/user/a%20b");
    }

    #[test]
    fn matching_needs_every_key() {
        let r = Route::for_server("/", "alice", "", "127.0.0.1", 20001);
        assert!(r.matches(&r.data()));
        let mut other = r.data();
        other["target"] = json!("http://127.0.0.1:20002");
        assert!(!r.matches(&other));
        let mut unmarked = r.data();
        unmarked.as_object_mut().map(|o| o.remove("jupyterhub"));
        assert!(!r.matches(&unmarked));
    }
}
