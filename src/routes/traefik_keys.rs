//! JupyterHub's traefik key layout, as `jupyterhub-traefik-proxy` 2.1.0 writes it (`proxy.py`
//! `_dynamic_config_for_route`, `kv_proxy.py` `flatten_dict_for_kv`, `traefik_utils.py`):
//!
//! ```text
//! <jh>/routes/<router>/{routespec,target,router,service}      routespec = "/user/alice/"
//! <jh>/routes/<router>/data/{user,server_name,tunnelbot}      tunnelbot = "true" (our stamp)
//! <traefik>/http/routers/<router>/{rule,service,entryPoints/0}
//! <traefik>/http/services/<service>/loadBalancer/{servers/0/url,passHostHeader}
//! ```
//!
//! `<router>` is `router_` + the routespec escaped with `escapism` (safe: ASCII letters, digits
//! and `-`; every other byte becomes `_` and its upper-case hex, unpadded), so no name can put
//! a `/` into a key or reach another route's keys: the escaping is injective and `_` itself is
//! escaped. The routespec is the path JupyterHub's `proxy_spec` gives (segments escaped with
//! `quote(v, safe='@~')`, trailing `/`). Data values are strings: the library writes a Python
//! `True` as `"true"`, so the stamp reads back in the hub as `{"tunnelbot": "true"}`, which
//! `check_routes` never looks at.

use std::collections::HashMap;

use anyhow::{bail, ensure};

use super::chp::escape;
use super::{BaseUrl, Owner, RouteEntry, RoutePath, Target};

/// The three fields of a route's data the hub writes for a server, and our stamp.
const DATA_USER: &str = "data/user";
const DATA_SERVER: &str = "data/server_name";
/// The hub's own route carries `data/hub = "true"`.
const DATA_HUB: &str = "data/hub";

/// Where routes live in Redis: the two key prefixes and traefik's entrypoint name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    jupyterhub: String,
    traefik: String,
    entrypoint: String,
}

/// The keys one route occupies, by tree.
pub struct RouteKeys {
    /// `<jh>/routes/<router>/`: JupyterHub's record of the route.
    pub data_dir: String,
    /// `<traefik>/http/routers/<router>/`.
    pub router_dir: String,
    /// `<traefik>/http/services/<service>/`.
    pub service_dir: String,
}

impl Layout {
    /// Checks the prefixes (`KVStorePrefix` drops a trailing `/`, so do we) and the entrypoint.
    /// Only plain characters are allowed: a prefix becomes part of SCAN patterns, where `*`, `?`,
    /// `[` or `\` would match other keys.
    pub fn new(jupyterhub: &str, traefik: &str, entrypoint: &str) -> anyhow::Result<Self> {
        let prefix = |what: &str, p: &str| -> anyhow::Result<String> {
            let p = p.trim_end_matches('/');
            ensure!(
                !p.is_empty()
                    && !p.starts_with('/')
                    && !p.contains("//")
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)),
                "traefik_redis.{what} {p:?} must be a non-empty key prefix of letters, digits and -_./"
            );
            Ok(p.to_owned())
        };
        let (jupyterhub, traefik) = (
            prefix("jupyterhub_prefix", jupyterhub)?,
            prefix("traefik_prefix", traefik)?,
        );
        ensure!(
            jupyterhub != traefik,
            "traefik_redis.jupyterhub_prefix and traefik_prefix must differ: traefik would read the hub's data as config"
        );
        ensure!(
            !entrypoint.is_empty()
                && entrypoint
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)),
            "traefik_redis.entrypoint {entrypoint:?} must be a traefik entrypoint name"
        );
        Ok(Self {
            jupyterhub,
            traefik,
            entrypoint: entrypoint.to_owned(),
        })
    }

    /// `<jh>/routes/`: every route JupyterHub's `get_all_routes` sees lives below it.
    pub fn routes_dir(&self) -> String {
        format!("{}/routes/", self.jupyterhub)
    }

    /// The three subtrees of the route at `path`.
    pub fn keys(&self, path: &RoutePath) -> RouteKeys {
        let spec = routespec(path);
        let (router, service) = (alias(&spec, "router"), alias(&spec, "service"));
        RouteKeys {
            data_dir: format!("{}{router}/", self.routes_dir()),
            router_dir: format!("{}/http/routers/{router}/", self.traefik),
            service_dir: format!("{}/http/services/{service}/", self.traefik),
        }
    }

    /// Every key and value of `entry`, both trees, stamp included: one MSET writes it.
    pub fn pairs(&self, entry: &RouteEntry) -> anyhow::Result<Vec<(String, String)>> {
        let spec = routespec(&entry.path);
        let (router, service) = (alias(&spec, "router"), alias(&spec, "service"));
        let k = self.keys(&entry.path);
        let target = entry.target.to_string();
        Ok(vec![
            (format!("{}routespec", k.data_dir), spec.clone()),
            (format!("{}target", k.data_dir), target.clone()),
            (format!("{}router", k.data_dir), router),
            (format!("{}service", k.data_dir), service.clone()),
            (format!("{}{DATA_USER}", k.data_dir), entry.user.clone()),
            (
                format!("{}{DATA_SERVER}", k.data_dir),
                entry.server_name.clone(),
            ),
            (
                format!("{}data/{}", k.data_dir, entry.owner.name()),
                "true".into(),
            ),
            (format!("{}rule", k.router_dir), rule(&spec)?),
            (
                format!("{}entryPoints/0", k.router_dir),
                self.entrypoint.clone(),
            ),
            (format!("{}service", k.router_dir), service),
            (
                format!("{}loadBalancer/servers/0/url", k.service_dir),
                target,
            ),
            (
                format!("{}loadBalancer/passHostHeader", k.service_dir),
                "true".into(),
            ),
        ])
    }

    /// Every key of the route at `path` that its layout names: the stamp first, the target
    /// second (the delete script checks those two), then the rest of what `pairs` writes and
    /// the data fields the hub writes for other kinds of route. Lists longer than one item
    /// (`entryPoints/1`, `servers/1/url`) are found by the script from these.
    pub fn named_keys(&self, path: &RoutePath) -> Vec<String> {
        let k = self.keys(path);
        let mut keys = vec![
            format!("{}data/{}", k.data_dir, Owner::TUNNELBOT.name()),
            format!("{}target", k.data_dir),
        ];
        // JupyterHub's add_user, add_service and add_hub_route data: an orphaned data key
        // (a route without its routespec) would make the hub's get_all_routes fail.
        for field in [
            "routespec",
            "router",
            "service",
            DATA_USER,
            DATA_SERVER,
            DATA_HUB,
            "data/service",
        ] {
            keys.push(format!("{}{field}", k.data_dir));
        }
        for field in ["rule", "service", "entryPoints/0"] {
            keys.push(format!("{}{field}", k.router_dir));
        }
        for field in ["servers/0/url", "passHostHeader"] {
            keys.push(format!("{}loadBalancer/{field}", k.service_dir));
        }
        keys
    }

    /// The data-tree field names `get` reads for one route, in a fixed order.
    pub fn fields() -> [&'static str; 6] {
        [
            "routespec",
            "target",
            "router",
            DATA_USER,
            DATA_SERVER,
            "data/tunnelbot",
        ]
    }

    /// Splits a key under `routes_dir` into (router alias, field).
    pub fn split<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        key.strip_prefix(self.jupyterhub.as_str())?
            .strip_prefix("/routes/")?
            .split_once('/')
    }
}

/// Reads one route's data fields (field name to value) as ours: our stamp, a routespec that is
/// a server route under `base_url` in the canonical form, filed under the alias that routespec
/// gives, a target and the hub's two data strings. Anything else is None: not ours to touch.
pub fn read(base_url: &BaseUrl, router: &str, fields: &HashMap<&str, &str>) -> Option<RouteEntry> {
    let owner = Owner::TUNNELBOT;
    if fields.get(format!("data/{}", owner.name()).as_str()) != Some(&"true") {
        return None;
    }
    let spec = *fields.get("routespec")?;
    let decoded = percent_decode(spec.strip_suffix('/')?)?;
    let path = RoutePath::parse(base_url, &decoded)?;
    if routespec(&path) != spec
        || alias(spec, "router") != router
        || fields.get("router") != Some(&router)
    {
        return None;
    }
    Some(RouteEntry {
        target: Target::parse(fields.get("target")?)?,
        user: (*fields.get(DATA_USER)?).to_owned(),
        server_name: (*fields.get(DATA_SERVER)?).to_owned(),
        path,
        owner,
    })
}

/// Whether these data fields are the hub's own route (`{'hub': True}` in `add_hub_route`).
pub fn is_hub(fields: &HashMap<&str, &str>) -> bool {
    fields.get(DATA_HUB) == Some(&"true")
}

/// JupyterHub's routespec for `path`: `Spawner.proxy_spec`, segments escaped, trailing `/`.
pub fn routespec(path: &RoutePath) -> String {
    let mut spec = String::from("/");
    for segment in path.segments() {
        spec.push_str(&escape(segment));
        spec.push('/');
    }
    spec
}

/// `traefik_utils.generate_alias`: `<kind>_` + `escapism.escape(routespec, safe=letters,
/// digits, "-")`, each other byte as `_` and `'%X' % byte` (upper case, not zero-padded).
pub fn alias(routespec: &str, kind: &str) -> String {
    let mut out = format!("{kind}_");
    for b in routespec.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:X}"));
        }
    }
    out
}

/// `traefik_utils.generate_rule` for a path routespec: the decoded path as a prefix, and the
/// path without its slash exactly. A backtick would end traefik's quoted string and let a name
/// write rule syntax (`x`) || PathPrefix(`/`), say), and braces are a regex in traefik's v2
/// rule syntax (`PathPrefix(`/user/{x:.*}/`)` matches every user's path), so such a path is
/// refused.
pub fn rule(routespec: &str) -> anyhow::Result<String> {
    let Some(path) = percent_decode(routespec) else {
        bail!("routespec {routespec:?} does not decode");
    };
    if !path.starts_with('/')
        || !path.ends_with('/')
        || path.contains(['`', '{', '}'])
        || path.len() < 2
    {
        bail!("refusing a traefik rule for {path:?}: not a plain path prefix");
    }
    let bare = path.trim_end_matches('/');
    Ok(format!("( PathPrefix(`{path}`) || Path(`{bare}`) )"))
}

/// Decodes `%XX` escapes; None for a broken escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests;
