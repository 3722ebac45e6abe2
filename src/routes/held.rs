//! The route path and hub port of every tunnel a broker holds (issued or restored, until
//! purged), indexed both ways: by tunnel id, to forget one, and by (path, port), so the
//! reconciler's ownership test for each listed route is one lookup, not a walk of every tunnel.

use std::collections::HashMap;

use super::RoutePath;

/// See the module doc.
#[derive(Debug, Default)]
pub(super) struct Held {
    by_id: HashMap<String, (RoutePath, u16)>,
    /// How many held tunnels have each (path, port): a user's ended tunnel, kept until purged,
    /// may share both with a newer one.
    by_route: HashMap<(RoutePath, u16), usize>,
}

impl Held {
    /// Tunnel `id` holds `port`, routed at `path`.
    pub(super) fn insert(&mut self, id: &str, path: RoutePath, port: u16) {
        if let Some(old) = self.by_id.insert(id.to_owned(), (path.clone(), port)) {
            self.release(old);
        }
        *self.by_route.entry((path, port)).or_default() += 1;
    }

    /// Tunnel `id` is forgotten.
    pub(super) fn remove(&mut self, id: &str) {
        if let Some(old) = self.by_id.remove(id) {
            self.release(old);
        }
    }

    /// Whether a held tunnel is routed at `path` to `port`.
    pub(super) fn contains(&self, path: &RoutePath, port: u16) -> bool {
        self.by_route.contains_key(&(path.clone(), port))
    }

    fn release(&mut self, key: (RoutePath, u16)) {
        if let Some(n) = self.by_route.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.by_route.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::BaseUrl;

    #[test]
    fn a_route_stays_held_while_any_tunnel_holds_it() {
        let path = RoutePath::new(&BaseUrl::new("/").unwrap(), "alice", "").unwrap();
        let mut held = Held::default();
        held.insert("old", path.clone(), 20001);
        held.insert("new", path.clone(), 20001);
        assert!(held.contains(&path, 20001));
        assert!(!held.contains(&path, 20002));
        held.remove("old");
        assert!(held.contains(&path, 20001));
        held.remove("new");
        held.remove("new");
        assert!(!held.contains(&path, 20001));
    }
}
