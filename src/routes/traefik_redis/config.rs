//! `[traefik_redis]`: where the routes go, checked without connecting.

use std::path::PathBuf;

use anyhow::{Context, bail};
use redis::IntoConnectionInfo;
use serde::Deserialize;

use crate::routes::traefik_keys::Layout;
use crate::secret::Secret;

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

pub(super) fn layout(config: &TraefikRedisConfig) -> anyhow::Result<Layout> {
    Layout::new(
        &config.jupyterhub_prefix,
        &config.traefik_prefix,
        &config.entrypoint,
    )
}

/// The URL's connection info, with `password` set. A password in the URL is refused: the
/// URL is config that gets printed, the password file is not.
pub(super) fn connection_info(
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
