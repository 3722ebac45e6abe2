//! An in-memory route backend for the reconciler's tests: a proxy table that also holds routes
//! that are not ours, a switch that fails every call, and a log of every write.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use anyhow::bail;

use super::{BaseUrl, BoxFuture, Listing, Owner, RouteBackend, RouteEntry, RoutePath, Target};

/// One route as the fake proxy stores it: raw strings, so foreign shapes fit too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub target: String,
    pub user: String,
    pub server_name: String,
    /// Carries our owner stamp.
    pub stamped: bool,
    /// The hub's own route.
    pub hub: bool,
}

impl Stored {
    /// A route as the hub writes it for a server: no stamp.
    pub fn hubs(target: &str, user: &str) -> Self {
        Self {
            target: target.into(),
            user: user.into(),
            server_name: String::new(),
            stamped: false,
            hub: false,
        }
    }

    /// The same with our stamp.
    pub fn stamped(target: &str, user: &str) -> Self {
        Self {
            stamped: true,
            ..Self::hubs(target, user)
        }
    }

    /// The hub's own route.
    pub fn hub_route() -> Self {
        Self {
            hub: true,
            ..Self::hubs("http://127.0.0.1:8081", "")
        }
    }
}

/// A write the reconciler made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(String),
    Delete(String),
}

#[derive(Default)]
struct State {
    table: BTreeMap<String, Stored>,
    failing: bool,
    writes: Vec<Write>,
    restarts_reported: usize,
    /// Whether `proxy_restarted` puts the hub's route back, as the real hub does.
    hub_restores: bool,
}

/// The fake proxy.
pub struct Fake {
    base_url: BaseUrl,
    state: Mutex<State>,
}

impl Fake {
    pub fn new(base_url: &str) -> Self {
        Self {
            base_url: BaseUrl::new(base_url).unwrap(),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Writes a route as someone else would (not logged as the reconciler's write).
    pub fn insert(&self, path: &str, route: Stored) {
        self.state().table.insert(path.into(), route);
    }

    pub fn route(&self, path: &str) -> Option<Stored> {
        self.state().table.get(path).cloned()
    }

    /// The proxy restarts: an empty table.
    pub fn restart(&self) {
        self.state().table.clear();
    }

    pub fn fail(&self, failing: bool) {
        self.state().failing = failing;
    }

    pub fn hub_restores(&self, yes: bool) {
        self.state().hub_restores = yes;
    }

    pub fn writes(&self) -> Vec<Write> {
        self.state().writes.clone()
    }

    pub fn restarts_reported(&self) -> usize {
        self.state().restarts_reported
    }

    /// Reads a stored route as the CHP backend would: stamped, a server-route path, a target.
    fn parse(&self, path: &str, s: &Stored) -> Option<RouteEntry> {
        if !s.stamped {
            return None;
        }
        Some(RouteEntry {
            path: RoutePath::parse(&self.base_url, path)?,
            target: Target::parse(&s.target)?,
            user: s.user.clone(),
            server_name: s.server_name.clone(),
            owner: Owner::TUNNELBOT,
        })
    }

    fn check(&self) -> anyhow::Result<MutexGuard<'_, State>> {
        let state = self.state();
        if state.failing {
            bail!("fake proxy down");
        }
        Ok(state)
    }
}

impl RouteBackend for Fake {
    fn list(&self) -> BoxFuture<'_, anyhow::Result<Listing>> {
        Box::pin(async move {
            let state = self.check()?;
            Ok(Listing {
                ours: state
                    .table
                    .iter()
                    .filter_map(|(p, s)| self.parse(p, s))
                    .collect(),
                hub_present: state.table.values().any(|s| s.hub),
            })
        })
    }

    fn get<'a>(&'a self, path: &'a RoutePath) -> BoxFuture<'a, anyhow::Result<Option<RouteEntry>>> {
        Box::pin(async move {
            let path = path.to_string();
            let state = self.check()?;
            Ok(state.table.get(&path).and_then(|s| self.parse(&path, s)))
        })
    }

    fn put<'a>(&'a self, entry: &'a RouteEntry) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let mut state = self.check()?;
            let path = entry.path.to_string();
            let stored = Stored {
                target: entry.target.to_string(),
                user: entry.user.clone(),
                server_name: entry.server_name.clone(),
                stamped: entry.owner == Owner::TUNNELBOT,
                hub: false,
            };
            state.table.insert(path.clone(), stored);
            state.writes.push(Write::Put(path));
            Ok(())
        })
    }

    fn delete<'a>(&'a self, seen: &'a RouteEntry) -> BoxFuture<'a, anyhow::Result<bool>> {
        Box::pin(async move {
            let mut state = self.check()?;
            let path = seen.path.to_string();
            let gone = state.table.remove(&path).is_some();
            state.writes.push(Write::Delete(path));
            Ok(gone)
        })
    }

    fn proxy_restarted(&self) -> BoxFuture<'_, anyhow::Result<bool>> {
        Box::pin(async move {
            let mut state = self.check()?;
            state.restarts_reported += 1;
            if state.hub_restores {
                state.table.insert("/".into(), Stored::hub_route());
            }
            Ok(true)
        })
    }
}
