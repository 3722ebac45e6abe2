//! The route config: `[routes]`, with `[chp]`'s deprecated keys folded in, read here and
//! nowhere else; and the route layer it builds.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure};
use tracing::warn;

use super::sections::{ChpConfig, RouteBackendKind, RoutesConfig};
use super::traefik_redis::TraefikRedisConfig;
use super::{BaseUrl, RouteBackend, Routes, chp, traefik_redis};
use crate::metrics::Metrics;
use crate::port_range::PortRange;

/// The config sections routes are made from (`Config::route_sections`).
#[derive(Debug, Clone, Copy)]
pub struct Sections<'a> {
    /// `[routes]`.
    pub routes: &'a RoutesConfig,
    /// `[chp]`, also read for the hub API pair and the deprecated route keys.
    pub chp: &'a ChpConfig,
    /// `[traefik_redis]`.
    pub traefik_redis: &'a TraefikRedisConfig,
}

/// `[routes]` with the deprecated `[chp]` keys folded in: the one reading of both sections.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Which proxy.
    pub backend: RouteBackendKind,
    /// JupyterHub's base URL.
    pub base_url: BaseUrl,
    /// Reconcile period.
    pub interval: Duration,
}

impl Settings {
    /// Resolves and checks the route config; None when routes are off. The old `[chp]`
    /// `enabled`, `base_url` and `reconcile_interval` still work; a value that contradicts
    /// the `[routes]` one is refused rather than guessed at.
    pub fn read(config: Sections<'_>) -> anyhow::Result<Option<Self>> {
        let (routes, old) = (config.routes, config.chp);
        let backend = match (old.enabled, routes.backend) {
            (Some(true), RouteBackendKind::None) => {
                bail!("chp.enabled = true and routes.backend = \"none\" disagree; drop chp.enabled")
            }
            (Some(false), _) => RouteBackendKind::None,
            (_, kind) => kind,
        };
        if backend == RouteBackendKind::None {
            return Ok(None);
        }
        let default = RoutesConfig::default();
        let base_url = match &old.base_url {
            Some(b) if routes.base_url != default.base_url && routes.base_url != *b => bail!(
                "chp.base_url {b:?} and routes.base_url {:?} differ; set only routes.base_url",
                routes.base_url
            ),
            Some(b) => b,
            None => &routes.base_url,
        };
        let interval = match old.reconcile_interval {
            Some(i)
                if routes.reconcile_interval != default.reconcile_interval
                    && routes.reconcile_interval != i =>
            {
                bail!(
                    "chp.reconcile_interval and routes.reconcile_interval differ; set only routes.reconcile_interval"
                )
            }
            Some(i) => i,
            None => routes.reconcile_interval,
        };
        ensure!(
            !interval.is_zero(),
            "routes.reconcile_interval must be above zero"
        );
        let base_url = BaseUrl::new(base_url)?;
        match backend {
            RouteBackendKind::Chp => chp::check_config(config.chp)?,
            RouteBackendKind::TraefikRedis => {
                traefik_redis::check_config(config.traefik_redis)?;
                // The hub API pair (to restore the hub's routes) is read from [chp] here too.
                chp::hub_api(config.chp, &chp::process_env)?;
            }
            RouteBackendKind::None => {}
        }
        Ok(Some(Self {
            backend,
            base_url,
            interval,
        }))
    }
}

/// The route layer `config` asks for, routing to `tunnel_host` and hub ports in `ports`; None
/// when routes are off.
pub fn build(
    config: Sections<'_>,
    ports: PortRange,
    tunnel_host: String,
    metrics: Metrics,
) -> anyhow::Result<Option<Routes>> {
    let Some(settings) = Settings::read(config)? else {
        return Ok(None);
    };
    for (set, key) in [
        (
            config.chp.enabled.is_some(),
            "chp.enabled (now routes.backend)",
        ),
        (
            config.chp.base_url.is_some(),
            "chp.base_url (now routes.base_url)",
        ),
        (
            config.chp.reconcile_interval.is_some(),
            "chp.reconcile_interval (now routes.reconcile_interval)",
        ),
    ] {
        if set {
            warn!(key, "deprecated config key; it still works");
        }
    }
    let backend: Arc<dyn RouteBackend> = match settings.backend {
        RouteBackendKind::Chp => Arc::new(chp::ChpClient::from_config(
            config.chp,
            settings.base_url.clone(),
        )?),
        RouteBackendKind::TraefikRedis => Arc::new(traefik_redis::TraefikRedis::from_config(
            config.traefik_redis,
            config.chp,
            settings.base_url.clone(),
        )?),
        RouteBackendKind::None => return Ok(None),
    };
    Ok(Some(Routes::new(
        backend,
        settings.base_url,
        tunnel_host,
        ports,
        settings.interval,
        metrics,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn settings(text: &str) -> anyhow::Result<Option<Settings>> {
        Settings::read(Config::parse(text)?.route_sections())
    }

    #[test]
    fn routes_keys_and_their_deprecated_chp_spellings() {
        let s = settings("").unwrap().unwrap();
        assert_eq!(s.backend, RouteBackendKind::Chp);
        assert_eq!(s.base_url.as_str(), "/");
        assert_eq!(s.interval, Duration::from_secs(5));
        for off in [
            "[routes]\nbackend = \"none\"\n",
            "[chp]\nenabled = false\n",
            "[routes]\nbackend = \"chp\"\n[chp]\nenabled = false\n",
        ] {
            assert!(settings(off).unwrap().is_none(), "{off}");
        }
        let new = "[routes]\nbase_url = \"/jh/\"\nreconcile_interval = \"200ms\"\n";
        let old = "[chp]\nenabled = true\nbase_url = \"/jh/\"\nreconcile_interval = \"200ms\"\n";
        for text in [new, old, &format!("{new}{old}")] {
            let s = settings(text).unwrap().unwrap();
            assert_eq!(s.base_url.as_str(), "/jh/", "{text}");
            assert_eq!(s.interval, Duration::from_millis(200), "{text}");
        }
        for clash in [
            "[routes]\nbackend = \"none\"\n[chp]\nenabled = true\n",
            "[routes]\nbase_url = \"/a/\"\n[chp]\nbase_url = \"/b/\"\n",
            "[routes]\nreconcile_interval = \"1s\"\n[chp]\nreconcile_interval = \"2s\"\n",
            "[routes]\nreconcile_interval = \"0s\"\n",
            "[routes]\nbackend = \"traefik\"\n",
        ] {
            assert!(settings(clash).is_err(), "{clash}");
        }
    }

    #[test]
    fn traefik_redis_is_chosen_and_checked_without_connecting() {
        let s = settings("[routes]\nbackend = \"traefik-redis\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(s.backend, RouteBackendKind::TraefikRedis);
        let config = Config::parse(
            "[routes]\nbackend = \"traefik-redis\"\n[traefik_redis]\nurl = \"redis://127.0.0.1:1/\"\n",
        )
        .unwrap();
        let routes = build(
            config.route_sections(),
            config.tunnels.ports,
            "127.0.0.1".into(),
            Metrics::new().unwrap(),
        )
        .unwrap();
        assert!(routes.is_some());
        for bad in [
            "url = \"redis://:secret@127.0.0.1/\"\n",
            "jupyterhub_prefix = \"j*\"\n",
            "entrypoint = \"\"\n",
            "password_file = \"/nonexistent/redis.password\"\n",
        ] {
            let text = format!("[routes]\nbackend = \"traefik-redis\"\n[traefik_redis]\n{bad}");
            assert!(settings(&text).is_err(), "{bad}");
        }
    }
}
