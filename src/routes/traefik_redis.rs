//! traefik with its Redis provider as a route backend: the routes JupyterHub's
//! `TraefikRedisProxy` would write, in the same keys (`traefik_keys`), so the hub's
//! `get_all_routes` reads ours as its own and traefik serves them.
//!
//! - `put` is one MULTI/EXEC of an MSET (what the library itself sends), so traefik's provider,
//!   which reads the whole tree, never sees half a route.
//! - `delete` is one small Lua script (`traefik_delete.lua`) that checks the route is still
//!   the one the reconciler read and judged ours (our stamp, the same target) and deletes the
//!   keys the route's layout names, as one atomic step. It never SCANs: Redis cannot interrupt a
//!   running script (our `CALL_TIMEOUT` only stops waiting for it), and one that has written
//!   cannot be killed, so a script's work must not grow with the keyspace.
//! - `list` walks `<jh>/routes/*` with SCAN pages and MGET batches from here, as the library's
//!   `scan_iter` does: every call touches at most `PAGE` keys. It is no snapshot: a route
//!   written or deleted during the walk may read half there, which `traefik_keys::read` does
//!   not accept as ours, so it is skipped this pass and the reconciler sees it whole at the
//!   next (a missing wanted route is simply written again).
//! - Every call is bounded (`CALL_TIMEOUT`); a failed call drops the connection, and the next
//!   call dials again, so a Redis restart or a dead link never wedges the route worker.
//! - The hub writing a route at a path we stamped (its `add_route` MSET) leaves our
//!   `data/tunnelbot` key there. When that route's target is one the reconciler counts as ours
//!   (what the spawner returns: the tunnel's own hub port), it is deleted once the tunnel ends,
//!   as intended: the port is free and no route may point at it. A route the hub wrote with any
//!   other target is never deleted; the script compares the target itself, so a hub write
//!   between our read and our delete cannot slip through.
//! - A Redis that restarted empty has lost the hub's route too; the reconciler sees it missing
//!   and `proxy_restarted` asks the hub to restore its routes (`POST /hub/api/proxy`), with the
//!   hub API settings `[chp]` already holds (or a managed service's environment).

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use anyhow::Context;
use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;
use tracing::info;

use super::ChpConfig;
use super::traefik_keys::{self, Layout};
use super::{BaseUrl, BoxFuture, Listing, RouteBackend, RouteEntry, RoutePath};
use crate::keys::read_secret_file;
use crate::secret::Secret;

mod config;
pub use config::{TraefikRedisConfig, check_config};
use config::{connection_info, layout};

/// Bound on one Redis call, connecting included, so a hung Redis cannot stall the worker.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Keys one SCAN page asks for and one MGET reads: the most any single `list` call touches.
const PAGE: usize = 500;

/// The routes in traefik's Redis.
pub struct TraefikRedis {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    layout: Layout,
    base_url: BaseUrl,
    /// What a target of ours looks like, for the delete script's check.
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

/// Checks and deletes one route (see the script's header).
static DELETE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("traefik_delete.lua")));

impl TraefikRedis {
    /// From `[traefik_redis]`, for routes under `base_url`; the hub's API (to
    /// restore its routes after Redis lost them) from `[chp]`'s `hub_api_url` and
    /// `hub_token_file`, else the managed-service environment. Nothing connects until the
    /// first call.
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

    /// Every string key under `<jh>/routes/` and its value, a page at a time. Keys seen twice
    /// (SCAN may return one again) are read once; keys gone or not strings by the MGET are
    /// skipped.
    async fn walk(&self) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        // The prefix holds no glob characters: the layout refuses them.
        let pattern = &format!("{}*", self.layout.routes_dir());
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, page): (u64, Vec<Vec<u8>>) = self
                .call("listing routes", |mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(PAGE)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            keys.extend(page);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort_unstable();
        keys.dedup();
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(PAGE) {
            let values: Vec<Option<Vec<u8>>> = self
                .call("reading routes", |mut c| async move {
                    redis::cmd("MGET").arg(batch).query_async(&mut c).await
                })
                .await?;
            out.extend(
                batch
                    .iter()
                    .zip(values)
                    .filter_map(|(k, v)| Some((k.clone(), v?))),
            );
        }
        Ok(out)
    }
}

impl RouteBackend for TraefikRedis {
    fn list(&self) -> BoxFuture<'_, anyhow::Result<Listing>> {
        Box::pin(async move {
            let flat = self.walk().await?;
            // router alias -> field -> value; keys or values that are not UTF-8 are nobody's.
            let mut routes: HashMap<&str, HashMap<&str, &str>> = HashMap::new();
            for (key, value) in &flat {
                let (Ok(key), Ok(value)) = (std::str::from_utf8(key), std::str::from_utf8(value))
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

    fn delete<'a>(&'a self, seen: &'a RouteEntry) -> BoxFuture<'a, anyhow::Result<bool>> {
        Box::pin(async move {
            let path = &seen.path;
            let k = self.layout.keys(path);
            let keys = self.layout.named_keys(path);
            let target = seen.target.to_string();
            let deleted: i64 = self
                .call("deleting a route", |mut c| async move {
                    DELETE
                        .key(keys)
                        .arg(&target)
                        .arg(&k.router_dir)
                        .arg(&k.service_dir)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            // The reconciler read the route as ours just before; the hub rewrote it since.
            if deleted < 0 {
                info!(path = %path, "route was rewritten for another target; left alone");
            }
            Ok(deleted > 0)
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
