//! traefik with its Redis provider as a route backend: the routes JupyterHub's
//! `TraefikRedisProxy` would write, in the same keys (`traefik_keys`), so the hub's
//! `get_all_routes` reads ours as its own and traefik serves them.
//!
//! - `put` is one MULTI/EXEC of an MSET (what the library itself sends), so traefik's provider,
//!   which reads the whole tree, never sees half a route.
//! - `delete` is one Lua script that SCANs and deletes the route's three subtrees (the
//!   library's own delete script, run once for all three): atomic, and it also removes keys a
//!   writer of another shape left there.
//! - `list` is one Lua script that returns every key and value under `<jh>/routes/`: a
//!   consistent snapshot, in one round trip. What is not stamped or not readable is invisible.
//! - Every call is bounded (`CALL_TIMEOUT`); a failed call drops the connection, and the next
//!   call dials again, so a Redis restart or a dead link never wedges the route worker.
//! - A Redis that restarted empty has lost the hub's route too; the reconciler sees it missing
//!   and `proxy_restarted` asks the hub to restore its routes (`POST /hub/api/proxy`), with the
//!   hub API settings `[chp]` already holds (or a managed service's environment).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::{Context, bail};
use redis::IntoConnectionInfo;
use redis::aio::MultiplexedConnection;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::ChpConfig;
use super::traefik_keys::{self, Layout};
use super::{BaseUrl, BoxFuture, Listing, RouteBackend, RouteEntry, RoutePath};
use crate::keys::read_secret_file;
use crate::secret::Secret;

/// Bound on one Redis call, connecting included, so a hung Redis cannot stall the worker.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// `[traefik_redis]`: where the routes go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraefikRedisConfig {
    /// `redis://host:port/db` (a user name may be given; the password goes in `password_file`).
    pub url: String,
    /// A 0600 file holding Redis's password (`requirepass` or the ACL user's).
    pub password_file: Option<PathBuf>,
    /// `TraefikRedisProxy.kv_jupyterhub_prefix`.
    pub jupyterhub_prefix: String,
    /// `TraefikRedisProxy.kv_traefik_prefix`: traefik's Redis provider `rootKey`.
    pub traefik_prefix: String,
    /// `TraefikRedisProxy.traefik_entrypoint`: the entrypoint the routers attach to.
    pub entrypoint: String,
}

impl Default for TraefikRedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/0".into(),
            password_file: None,
            jupyterhub_prefix: "jupyterhub".into(),
            traefik_prefix: "traefik".into(),
            entrypoint: "http".into(),
        }
    }
}

/// Checks `[traefik_redis]` without connecting: the URL, the password file's permissions, the
/// layout.
pub fn check_config(config: &TraefikRedisConfig) -> anyhow::Result<()> {
    connection_info(config, None)?;
    if let Some(path) = &config.password_file {
        crate::keys::check_private_file(path).context("traefik_redis.password_file")?;
    }
    layout(config)?;
    Ok(())
}

fn layout(config: &TraefikRedisConfig) -> anyhow::Result<Layout> {
    Layout::new(
        &config.jupyterhub_prefix,
        &config.traefik_prefix,
        &config.entrypoint,
    )
}

/// The URL's connection info, with `password` set. A password in the URL is refused: the
/// URL is config that gets printed, the password file is not.
fn connection_info(
    config: &TraefikRedisConfig,
    password: Option<&Secret>,
) -> anyhow::Result<redis::ConnectionInfo> {
    if !config.url.starts_with("redis://") {
        bail!("traefik_redis.url must start with redis://");
    }
    let info = config
        .url
        .as_str()
        .into_connection_info()
        .context("traefik_redis.url is not a Redis URL")?;
    if info.redis_settings().password().is_some() {
        bail!("traefik_redis.url holds a password: put it in traefik_redis.password_file");
    }
    Ok(match password {
        Some(p) => {
            let settings = info.redis_settings().clone().set_password(p.expose());
            info.set_redis_settings(settings)
        }
        None => info,
    })
}

/// The routes in traefik's Redis.
pub struct TraefikRedis {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    layout: Layout,
    base_url: BaseUrl,
    hub: Option<(String, Secret)>,
    http: reqwest::Client,
}

impl std::fmt::Debug for TraefikRedis {
    // The client holds the password; show only where the routes go.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraefikRedis")
            .field("layout", &self.layout)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// Returns every key under `ARGV[1]` (a SCAN pattern) and its value, flat: k1, v1, k2, v2.
/// Keys that are not strings (nobody's route) are skipped rather than failing the whole list.
static LIST: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local out = {}
local cursor = "0"
repeat
    local page = redis.call("SCAN", cursor, "MATCH", ARGV[1], "COUNT", 1000)
    cursor = page[1]
    for _, key in ipairs(page[2]) do
        if redis.call("TYPE", key).ok == "string" then
            out[#out + 1] = key
            out[#out + 1] = redis.call("GET", key)
        end
    end
until cursor == "0"
return out
"#,
    )
});

/// Deletes every key under each SCAN pattern in ARGV, in one atomic step; returns how many.
static DELETE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local n = 0
for _, pattern in ipairs(ARGV) do
    local cursor = "0"
    repeat
        local page = redis.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
        cursor = page[1]
        for _, key in ipairs(page[2]) do
            n = n + redis.call("DEL", key)
        end
    until cursor == "0"
end
return n
"#,
    )
});

impl TraefikRedis {
    /// From `[traefik_redis]`, for routes under `base_url`; the hub's API (to restore its
    /// routes after Redis lost them) from `[chp]`'s `hub_api_url` and `hub_token_file`, else
    /// the managed-service environment. Nothing connects until the first call.
    pub fn from_config(
        config: &TraefikRedisConfig,
        chp: &ChpConfig,
        base_url: BaseUrl,
    ) -> anyhow::Result<Self> {
        let password = config
            .password_file
            .as_deref()
            .map(|p| read_secret_file(p).context("traefik_redis.password_file"))
            .transpose()?;
        let client = redis::Client::open(connection_info(config, password.as_ref())?)
            .context("traefik_redis.url")?;
        let hub = super::chp::hub_api(chp, &super::chp::process_env)?;
        Ok(Self {
            client,
            conn: Mutex::new(None),
            layout: layout(config)?,
            base_url,
            hub,
            http: reqwest::Client::builder().timeout(CALL_TIMEOUT).build()?,
        })
    }

    /// The connection, dialled if there is none (after a failure, or the first time).
    async fn connection(&self) -> anyhow::Result<MultiplexedConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT));
        let c = tokio::time::timeout(
            CALL_TIMEOUT,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .context("connecting to Redis timed out")?
        .context("connecting to Redis")?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs one call on the connection, bounded; any failure drops the connection so the next
    /// call starts on a fresh one (a restarted Redis closed the old one).
    async fn call<T, F>(
        &self,
        what: &str,
        f: impl FnOnce(MultiplexedConnection) -> F,
    ) -> anyhow::Result<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.connection().await?;
        let result = match tokio::time::timeout(CALL_TIMEOUT, f(conn)).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context(what.to_owned())),
            Err(_) => Err(anyhow::anyhow!("{what}: Redis did not answer in time")),
        };
        *self.conn.lock().await = None;
        result
    }

    /// SCAN pattern for every key below `dir` (which holds no glob characters: the layout
    /// refuses them in prefixes, aliases are letters, digits, `-` and `_`).
    fn below(dir: &str) -> String {
        format!("{dir}*")
    }
}

impl RouteBackend for TraefikRedis {
    fn list(&self) -> BoxFuture<'_, anyhow::Result<Listing>> {
        Box::pin(async move {
            let pattern = Self::below(&self.layout.routes_dir());
            let flat: Vec<Vec<u8>> = self
                .call("listing routes", |mut c| async move {
                    LIST.arg(pattern).invoke_async(&mut c).await
                })
                .await?;
            // router alias -> field -> value; keys or values that are not UTF-8 are nobody's.
            let mut routes: HashMap<&str, HashMap<&str, &str>> = HashMap::new();
            for pair in flat.chunks_exact(2) {
                let (Ok(key), Ok(value)) =
                    (std::str::from_utf8(&pair[0]), std::str::from_utf8(&pair[1]))
                else {
                    continue;
                };
                if let Some((router, field)) = self.layout.split(key) {
                    routes.entry(router).or_default().insert(field, value);
                }
            }
            Ok(Listing {
                hub_present: routes.values().any(traefik_keys::is_hub),
                ours: routes
                    .iter()
                    .filter_map(|(router, fields)| {
                        traefik_keys::read(&self.base_url, router, fields)
                    })
                    .collect(),
            })
        })
    }

    fn get<'a>(&'a self, path: &'a RoutePath) -> BoxFuture<'a, anyhow::Result<Option<RouteEntry>>> {
        Box::pin(async move {
            let dir = self.layout.keys(path).data_dir;
            let names = Layout::fields();
            let keys: Vec<String> = names.iter().map(|f| format!("{dir}{f}")).collect();
            let values: Vec<Option<String>> = self
                .call("reading a route", |mut c| async move {
                    redis::cmd("MGET").arg(&keys).query_async(&mut c).await
                })
                .await?;
            let fields: HashMap<&str, &str> = names
                .iter()
                .zip(&values)
                .filter_map(|(n, v)| Some((*n, v.as_deref()?)))
                .collect();
            let router = traefik_keys::alias(&traefik_keys::routespec(path), "router");
            Ok(traefik_keys::read(&self.base_url, &router, &fields))
        })
    }

    fn put<'a>(&'a self, entry: &'a RouteEntry) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let pairs = self.layout.pairs(entry)?;
            self.call("writing a route", |mut c| async move {
                redis::pipe()
                    .atomic()
                    .mset(&pairs)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
        })
    }

    fn delete<'a>(&'a self, path: &'a RoutePath) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let k = self.layout.keys(path);
            let patterns = [&k.data_dir, &k.router_dir, &k.service_dir].map(|d| Self::below(d));
            self.call("deleting a route", |mut c| async move {
                DELETE.arg(&patterns[..]).invoke_async::<i64>(&mut c).await
            })
            .await?;
            Ok(())
        })
    }

    /// Redis lost everything (a restart without persistence): the hub's `/` route and every
    /// route of its own are gone, and the hub would not notice before its next `check_routes`.
    fn proxy_restarted(&self) -> BoxFuture<'_, anyhow::Result<bool>> {
        Box::pin(async move {
            let Some(hub) = &self.hub else {
                return Ok(false);
            };
            super::chp::ask_hub_to_restore(&self.http, hub).await?;
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked_and_the_password_never_printed() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("redis.password");
        crate::keys::write_private_file(&file, b"hunter2-redis\n").unwrap();
        let config = TraefikRedisConfig {
            password_file: Some(file.clone()),
            ..TraefikRedisConfig::default()
        };
        check_config(&config).unwrap();
        let backend =
            TraefikRedis::from_config(&config, &ChpConfig::default(), BaseUrl::new("/").unwrap())
                .unwrap();
        let shown = format!("{backend:?} {config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(
            backend
                .client
                .get_connection_info()
                .redis_settings()
                .password(),
            Some("hunter2-redis")
        );
        for bad in [
            "http://127.0.0.1:6379",
            "redis://:pw@127.0.0.1:6379/0",
            "redis://u:pw@127.0.0.1:6379/0",
            "redis://127.0.0.1:notaport",
        ] {
            let c = TraefikRedisConfig {
                url: bad.into(),
                ..TraefikRedisConfig::default()
            };
            assert!(check_config(&c).is_err(), "{bad}");
        }
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        assert!(check_config(&config).is_err());
    }
}
