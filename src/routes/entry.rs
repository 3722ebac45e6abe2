//! The typed route: a validated server-route path, a target, the hub's data and the owner
//! stamp. Backends translate these to and from their own storage; nothing here knows one.

use std::fmt;

use anyhow::ensure;

use crate::names::NameError;

/// JupyterHub's `base_url`: starts and ends with `/`, plain segments only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl(String);

impl BaseUrl {
    /// Checks `s` as a base URL. The characters are limited because the path goes into proxy
    /// URLs and rules: `?`, `#`, `%` or a space would change what they mean.
    pub fn new(s: &str) -> anyhow::Result<Self> {
        ensure!(
            s.starts_with('/') && s.ends_with('/'),
            "base_url {s:?} must start and end with '/' (JupyterHub's base_url)"
        );
        ensure!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~@/".contains(&b)),
            "base_url {s:?} may hold only letters, digits and -._~@/"
        );
        let inner = s
            .strip_prefix('/')
            .and_then(|r| r.strip_suffix('/'))
            .unwrap_or_default();
        ensure!(
            s == "/" || inner.split('/').all(|seg| !seg.bytes().all(|b| b == b'.')),
            "base_url {s:?} must not hold empty, '.' or '..' segments"
        );
        Ok(Self(s.to_owned()))
    }

    /// The base URL as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A server route's path: `<base_url>user/<user>[/<server>]`, names checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoutePath {
    base_url: String,
    user: String,
    server: String,
}

impl RoutePath {
    /// The path JupyterHub gives `user`'s `server_name` ("" = the default server).
    pub fn new(base_url: &BaseUrl, user: &str, server_name: &str) -> Result<Self, NameError> {
        crate::names::check_user(user)?;
        crate::names::check_server(server_name)?;
        Ok(Self {
            base_url: base_url.0.clone(),
            user: user.to_owned(),
            server: server_name.to_owned(),
        })
    }

    /// Reads a decoded path (no trailing slash, as CHP lists it); None unless it is a server
    /// route under `base_url` with names we accept.
    pub fn parse(base_url: &BaseUrl, decoded: &str) -> Option<Self> {
        let rest = decoded
            .strip_prefix(base_url.as_str())?
            .strip_prefix("user/")?;
        let mut segments = rest.split('/');
        let (Some(user), server, None) = (segments.next(), segments.next(), segments.next()) else {
            return None;
        };
        // "/user/alice/" is not the default server's path in decoded form; refuse it.
        if server.is_some_and(str::is_empty) {
            return None;
        }
        Self::new(base_url, user, server.unwrap_or_default()).ok()
    }

    /// The decoded segments, base URL first: `["jh", "user", "alice", "gpu"]`.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.base_url
            .split('/')
            .filter(|s| !s.is_empty())
            .chain(["user", self.user.as_str()])
            .chain((!self.server.is_empty()).then_some(self.server.as_str()))
    }

    /// The JupyterHub user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The server name, "" for the default server.
    pub fn server_name(&self) -> &str {
        &self.server
    }
}

/// The decoded form, without the trailing slash: `/jh/user/alice/gpu`.
impl fmt::Display for RoutePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}user/{}", self.base_url, self.user)?;
        if !self.server.is_empty() {
            write!(f, "/{}", self.server)?;
        }
        Ok(())
    }
}

/// Where a route sends requests: a tunnel's hub port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As it goes into a URL (an IPv6 address in brackets).
    pub host: String,
    /// The hub port.
    pub port: u16,
}

impl Target {
    /// Reads `http://<host>:<port>`, the form JupyterHub's `Server.host` takes.
    pub fn parse(url: &str) -> Option<Self> {
        let (host, port) = url.strip_prefix("http://")?.rsplit_once(':')?;
        if host.is_empty() || host.contains('/') {
            return None;
        }
        Some(Self {
            host: host.to_owned(),
            port: port.parse().ok()?,
        })
    }
}

/// `http://<host>:<port>`, exactly what the spawner returns to the hub (no trailing slash), so
/// the hub's `check_routes` finds nothing to rewrite.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)
    }
}

/// The owner stamp a route carries when tunnelbot wrote it. A route without it is never
/// rewritten unless a live tunnel wants its path, and never deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner(&'static str);

impl Owner {
    /// Every broker's stamp: brokers of one deployment (an active/standby pair) share routes.
    pub const TUNNELBOT: Owner = Owner("tunnelbot");

    /// The stamp's name, for backends that store it as a key.
    pub fn name(self) -> &'static str {
        self.0
    }
}

/// One route as the broker writes it and as a backend reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// Where.
    pub path: RoutePath,
    /// To which hub port.
    pub target: Target,
    /// The user the hub keeps in the route's data (`path`'s user when we wrote it).
    pub user: String,
    /// The server name the hub keeps in the route's data.
    pub server_name: String,
    /// Who wrote it.
    pub owner: Owner,
}

impl RouteEntry {
    /// Our route for `path` to `target`, with the data the hub itself would write.
    pub fn new(path: RoutePath, target: Target) -> Self {
        Self {
            user: path.user.clone(),
            server_name: path.server.clone(),
            path,
            target,
            owner: Owner::TUNNELBOT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(s: &str) -> BaseUrl {
        BaseUrl::new(s).unwrap()
    }

    #[test]
    fn paths_and_targets_as_jupyterhub_writes_them() {
        let p = RoutePath::new(&base("/"), "alice", "").unwrap();
        assert_eq!(p.to_string(), "/user/alice");
        assert_eq!(p.segments().collect::<Vec<_>>(), ["user", "alice"]);
        let p = RoutePath::new(&base("/jh/x/"), "a b@x.org", "gpu-1").unwrap();
        assert_eq!(p.to_string(), "/jh/x/user/a b@x.org/gpu-1");
        assert_eq!(
            p.segments().collect::<Vec<_>>(),
            ["jh", "x", "user", "a b@x.org", "gpu-1"]
        );
        let e = RouteEntry::new(p, Target::parse("http://[::1]:20001").unwrap());
        assert_eq!(
            (e.user.as_str(), e.server_name.as_str()),
            ("a b@x.org", "gpu-1")
        );
        assert_eq!(e.target.to_string(), "http://[::1]:20001");
        assert_eq!(e.owner, Owner::TUNNELBOT);
        for bad in [
            "https://h:1",
            "http://h",
            "http://:1",
            "http://h:x",
            "http://h/p:1",
        ] {
            assert_eq!(Target::parse(bad), None, "{bad}");
        }
        assert!(RoutePath::new(&base("/"), "..", "").is_err());
        assert!(RoutePath::new(&base("/"), "alice", "../hub").is_err());
    }

    #[test]
    fn only_server_route_paths_parse() {
        let root = base("/");
        for ok in [
            "/user/alice",
            "/user/a b@x.org/gpu-1",
            "/user/hub",
            "/user/x/hub",
        ] {
            let p = RoutePath::parse(&root, ok).unwrap_or_else(|| panic!("{ok}"));
            assert_eq!(p.to_string(), ok);
        }
        assert!(RoutePath::parse(&base("/jh/"), "/jh/user/alice/gpu").is_some());
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
            assert!(RoutePath::parse(&root, bad).is_none(), "{bad:?}");
        }
        for bad in ["/jh/", "/jh/hub", "/jh/hub/", "/user/alice", "/jh/user/.."] {
            assert!(RoutePath::parse(&base("/jh/"), bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn base_urls() {
        for ok in ["/", "/jh/", "/a/b-c.d~e@f/"] {
            assert_eq!(base(ok).as_str(), ok);
        }
        for bad in [
            "", "/jh", "jh/", "//", "/a//b/", "/../", "/./", "/a?/", "/a b/", "/%2e/",
        ] {
            assert!(BaseUrl::new(bad).is_err(), "{bad:?}");
        }
    }
}
