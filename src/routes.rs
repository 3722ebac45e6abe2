//! Proxy routes for live tunnels: what should be routed, and the worker that makes it so.
//!
//! The wanted set holds one route per tunnel whose forward is held by a live session. A single
//! worker task applies changes as they happen (forward granted: add; tunnel ended: delete) and,
//! every `reconcile_interval`, compares the proxy's whole table with the wanted set: missing or
//! wrong routes are written again (a restarted CHP has an empty table) and routes that are ours
//! but no longer wanted are deleted.
//!
//! A route is ours only when all of these hold, and nothing else is ever deleted:
//! - its data carries our marker `"tunnelbot": true` (written beside JupyterHub's keys, which
//!   the hub's `check_routes` never compares, so it survives there);
//! - its target is `target_host` and a port of our range (the range belongs to tunnelbot);
//! - its path has the shape of a server route, `<base_url>user/<user>[/<server>]`, with names
//!   that pass `names`: so `/`, `<base_url>hub/` and every other route are out of reach.
//!
//! The same shape check guards every write. Deleting a route when its tunnel ends first reads
//! the route and leaves it alone unless it is ours: the hub may have written it since.
//!
//! Nothing here runs on the SSH path: a slow or dead proxy delays routes, never tunnels.
//!
//! At shutdown the worker stops and `withdraw` deletes every route of ours from the proxy,
//! before the tunnel listeners close: the proxy never keeps a route to a port that is about
//! to be free, which another local user could then bind.

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
        json!({
            "target": self.target,
            "jupyterhub": true,
            "user": self.user,
            "server_name": self.server_name,
            MARKER: true,
        })
    }

    /// Whether the proxy's `entry` for this path already says what we would write.
    fn matches(&self, entry: &Value) -> bool {
        entry.get("target").and_then(Value::as_str) == Some(self.target.as_str())
            && entry.get("jupyterhub") == Some(&Value::Bool(true))
            && entry.get("user").and_then(Value::as_str) == Some(self.user.as_str())
            && entry.get("server_name").and_then(Value::as_str) == Some(self.server_name.as_str())
            && marked(entry)
    }
}

/// The key in route data that says the broker wrote the route.
pub const MARKER: &str = "tunnelbot";

/// Whether route data carries our marker.
pub fn marked(entry: &Value) -> bool {
    entry.get(MARKER) == Some(&Value::Bool(true))
}

/// Whether `path` (decoded) is a server route under `base_url` whose names `names` accepts:
/// the only paths the broker ever writes or deletes.
pub fn server_route_path(base_url: &str, path: &str) -> bool {
    let Some(rest) = path
        .strip_prefix(base_url)
        .and_then(|r| r.strip_prefix("user/"))
    else {
        return false;
    };
    let mut segments = rest.split('/');
    let (Some(user), server, None) = (segments.next(), segments.next(), segments.next()) else {
        return false;
    };
    crate::names::check_user(user).is_ok()
        && server.is_none_or(|s| !s.is_empty() && crate::names::check_server(s).is_ok())
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
    /// The route at `path` (decoded), None when absent.
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, anyhow::Result<Option<Value>>>;
    /// Deletes the route at `path` (decoded); an absent route is success.
    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, anyhow::Result<()>>;
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
    base_url: String,
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
        base_url: String,
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

    /// Deletes every route of ours from the proxy, within `within` (shutdown: the worker has
    /// stopped, so nothing writes one again). Returns how many were deleted, or None when the
    /// proxy could not be read or the time ran out.
    pub async fn withdraw(&self, within: Duration) -> Option<usize> {
        self.wanted().clear();
        let work = async {
            let table = match self.inner.backend.list().await {
                Ok(t) => t,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "proxy unreachable; routes not withdrawn");
                    return None;
                }
            };
            // Concurrent, so thousands of routes fit the time, but bounded, so the proxy is
            // not flooded.
            let gate = Arc::new(tokio::sync::Semaphore::new(32));
            let mut deletes = tokio::task::JoinSet::new();
            for (path, entry) in table {
                if self.ours(&path, &entry) {
                    let backend = Arc::clone(&self.inner.backend);
                    let gate = Arc::clone(&gate);
                    deletes.spawn(async move {
                        let _turn = gate.acquire().await;
                        backend.delete(&path).await.map(|()| path)
                    });
                }
            }
            let mut deleted = 0;
            while let Some(done) = deletes.join_next().await {
                match done {
                    Ok(Ok(path)) => {
                        deleted += 1;
                        self.count("delete", true);
                        info!(target: "audit", event = "route_removed", path, "route removed (shutdown)");
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
                // Only if the route there is still ours: the hub may have rewritten it.
                match self.inner.backend.get(&route.path).await {
                    Ok(Some(entry)) if self.ours(&route.path, &entry) => {
                        self.delete(&route.path).await;
                    }
                    Ok(Some(_)) => {
                        info!(path = %route.path, "route is no longer ours; left alone");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(path = %route.path, error = %format!("{e:#}"), "route lookup failed; the next reconcile removes it if it is ours");
                    }
                }
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
        if !server_route_path(&self.inner.base_url, &route.path) {
            warn!(path = %route.path, "refusing to write a route outside <base_url>user/<name>[/<server>]");
            return false;
        }
        let result = self.inner.backend.put(route).await;
        self.count("add", result.is_ok());
        if let Err(e) = &result {
            warn!(path = %route.path, error = %format!("{e:#}"), "route add failed; retrying at the next reconcile");
        }
        result.is_ok()
    }

    async fn delete(&self, path: &str) {
        if !server_route_path(&self.inner.base_url, path) {
            warn!(
                path,
                "refusing to delete a route outside <base_url>user/<name>[/<server>]"
            );
            return;
        }
        let result = self.inner.backend.delete(path).await;
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

    /// Whether the route at `path` is one of ours: marked, at a server route path, and
    /// targeting our host and a port of our range.
    fn ours(&self, path: &str, entry: &Value) -> bool {
        if !marked(entry) || !server_route_path(&self.inner.base_url, path) {
            return false;
        }
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
            if !by_path.contains_key(path) && self.ours(path, entry) {
                self.delete(path).await;
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
        let r = Route::for_server("/jh/", "a b@x.org", "gpu-1", "127.0.0.1", 20001);
        assert_eq!(r.path, "/jh/user/a b@x.org/gpu-1");
        assert_eq!(r.escaped, "/jh/user/a%20b@x.org/gpu-1");
        assert_eq!(r.data()["jupyterhub"], true);
        assert_eq!(r.data()[MARKER], true);
        assert_eq!(r.data()["server_name"], "gpu-1");
        assert_eq!(escape("é~_.-"), "%C3%A9~_.-");
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
        let mut not_ours = r.data();
        not_ours.as_object_mut().map(|o| o.remove(MARKER));
        assert!(!r.matches(&not_ours));
    }

    #[test]
    fn only_server_route_paths_are_touchable() {
        for ok in [
            "/user/alice",
            "/user/a b@x.org/gpu-1",
            "/user/hub",
            "/user/x/hub",
        ] {
            assert!(server_route_path("/", ok), "{ok}");
        }
        assert!(server_route_path("/jh/", "/jh/user/alice/gpu"));
        for bad in [
            "/",
            "",
            "/hub",
            "/hub/",
            "/user",
            "/user/",
            "/user/..",
            "/user/.",
            "/user/alice/..",
            "/user/alice/",
            "/user/alice/gpu/x",
            "/user//x",
            "/services/x",
            "/jh/user/alice",
        ] {
            assert!(!server_route_path("/", bad), "{bad:?}");
        }
        for bad in ["/jh/", "/jh/hub", "/jh/hub/", "/user/alice", "/jh/user/.."] {
            assert!(!server_route_path("/jh/", bad), "{bad:?}");
        }
    }
}
