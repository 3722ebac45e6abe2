//! The config sections the route layer reads: `[routes]` and `[chp]` (with its deprecated
//! route keys); `[traefik_redis]` lives beside its backend. `config::Config` holds them, and
//! only `routes::Settings` reads them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `[routes]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesConfig {
    /// Which proxy holds the routes.
    pub backend: RouteBackendKind,
    /// JupyterHub's `base_url`.
    pub base_url: String,
    /// How often the proxy's table is compared with the live tunnels.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        Self {
            backend: RouteBackendKind::Chp,
            base_url: "/".into(),
            reconcile_interval: Duration::from_secs(5),
        }
    }
}

/// `routes.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteBackendKind {
    /// configurable-http-proxy's REST API (`[chp]`).
    Chp,
    /// traefik's Redis provider, in JupyterHub's `TraefikRedisProxy` keys (`[traefik_redis]`).
    #[serde(rename = "traefik-redis")]
    TraefikRedis,
    /// No routes: the spawner alone drives them.
    None,
}

/// `[chp]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChpConfig {
    /// Deprecated: `routes.backend`. `false` still turns routes off.
    pub enabled: Option<bool>,
    /// CHP's REST API.
    pub api_url: String,
    /// A file holding CHP's token; when unset, `CONFIGPROXY_AUTH_TOKEN` is read.
    pub token_file: Option<PathBuf>,
    /// Deprecated: `routes.base_url`, still read.
    pub base_url: Option<String>,
    /// The host written into route targets: the older name of `tunnels.public_host`, kept as
    /// an alias; the two must agree when both are set.
    pub target_host: Option<String>,
    /// Deprecated: `routes.reconcile_interval`, still read.
    #[serde(with = "humantime_serde::option")]
    pub reconcile_interval: Option<Duration>,
    /// JupyterHub's API (`http://hub:8081/hub/api`), to ask the hub to restore its own routes
    /// after a CHP restart.
    pub hub_api_url: Option<String>,
    /// A file holding a hub API token with the `proxy` scope.
    pub hub_token_file: Option<PathBuf>,
}

impl Default for ChpConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            api_url: "http://127.0.0.1:8001".into(),
            token_file: None,
            base_url: None,
            target_host: None,
            reconcile_interval: None,
            hub_api_url: None,
            hub_token_file: None,
        }
    }
}
