//! configurable-http-proxy's REST API as a route backend, and the hub's "restore your routes"
//! call. CHP takes `Authorization: token <T>` (lowercase `token`; `Bearer` gets 403).
//!
//! Every route URL is built from the route's decoded path one segment at a time, each segment
//! percent-escaped, and the finished URL's path is compared with the intended one before
//! anything is sent: a URL parser folds `.`/`..` segments (`%2e` included), which once turned a
//! request for `/user/..` into one for `/`. A path that does not survive unchanged is refused.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::config::ChpConfig;
use crate::keys::read_secret_file;
use crate::routes::{BoxFuture, Route, RouteBackend, escape};
use crate::secret::Secret;

/// Bound on one call to CHP or the hub, so a hung proxy cannot stall the route worker.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A CHP API client.
#[derive(Debug)]
pub struct ChpClient {
    http: reqwest::Client,
    api_url: reqwest::Url,
    token: Option<Secret>,
    hub: Option<(String, Secret)>,
}

impl ChpClient {
    /// From `[chp]`: the token comes from `token_file`, else `CONFIGPROXY_AUTH_TOKEN`.
    pub fn from_config(config: &ChpConfig) -> anyhow::Result<Self> {
        let token = match &config.token_file {
            Some(path) => Some(read_secret_file(path).context("chp.token_file")?),
            None => std::env::var("CONFIGPROXY_AUTH_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .map(Secret::new),
        };
        if token.is_none() {
            tracing::warn!(
                "no CHP token (chp.token_file or CONFIGPROXY_AUTH_TOKEN): calling CHP's API unauthenticated"
            );
        }
        let hub = hub_api(config, &process_env)?;
        if let Some((url, _)) = &hub {
            tracing::info!(hub_api_url = %url, "hub API set: the hub is asked to restore its routes after a CHP restart");
        }
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            .build()?;
        let api_url = reqwest::Url::parse(config.api_url.trim_end_matches('/'))
            .with_context(|| format!("chp.api_url {:?}", config.api_url))?;
        if api_url.cannot_be_a_base() || api_url.query().is_some() || api_url.fragment().is_some() {
            bail!(
                "chp.api_url {:?} must be a plain http(s) URL",
                config.api_url
            );
        }
        Ok(Self {
            http,
            api_url,
            token,
            hub,
        })
    }

    /// `<api_url>/api/routes` followed by `path` (decoded, as CHP lists it), each segment
    /// escaped. Refuses empty and all-dot segments, and any URL whose path a parser changed.
    pub fn route_url(&self, path: &str) -> anyhow::Result<reqwest::Url> {
        let mut intended = self.api_url.path().trim_end_matches('/').to_owned();
        intended.push_str("/api/routes");
        if !path.is_empty() {
            let rest = path.strip_prefix('/').unwrap_or(path);
            for segment in rest.split('/') {
                if segment.is_empty() || segment.bytes().all(|b| b == b'.') {
                    bail!("refusing route path {path:?}: empty or dot segment");
                }
                intended.push('/');
                intended.push_str(&escape(segment));
            }
        }
        let mut url = self.api_url.clone();
        url.set_path(&intended);
        if url.path() != intended {
            bail!(
                "refusing route path {path:?}: the URL path became {:?}, not {intended:?}",
                url.path()
            );
        }
        Ok(url)
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let req = self.http.request(method, self.route_url(path)?);
        Ok(match &self.token {
            Some(t) => req.header("Authorization", format!("token {}", t.expose())),
            None => req,
        })
    }
}

/// A variable of this process's environment; unset and empty are the same.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// JupyterHub's API URL and token, each from `[chp]` or else from the environment JupyterHub
/// gives a managed service (`JUPYTERHUB_API_URL`, `JUPYTERHUB_API_TOKEN`), so a broker the hub
/// starts as a service needs neither key. One without the other is refused.
pub fn hub_api(
    config: &ChpConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<(String, Secret)>> {
    let url = config
        .hub_api_url
        .clone()
        .or_else(|| env("JUPYTERHUB_API_URL"));
    let token = match &config.hub_token_file {
        Some(file) => Some(read_secret_file(file).context("chp.hub_token_file")?),
        None => env("JUPYTERHUB_API_TOKEN").map(Secret::new),
    };
    match (url, token) {
        (Some(url), Some(token)) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("the hub API URL {url:?} must start with http:// or https://");
            }
            Ok(Some((url.trim_end_matches('/').to_owned(), token)))
        }
        (None, None) => Ok(None),
        (Some(_), None) | (None, Some(_)) => bail!(
            "chp.hub_api_url and chp.hub_token_file go together (as do JUPYTERHUB_API_URL and \
             JUPYTERHUB_API_TOKEN, which JupyterHub gives a managed service)"
        ),
    }
}

async fn check(resp: reqwest::Response, what: &str) -> anyhow::Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    let hint = if status == reqwest::StatusCode::FORBIDDEN {
        " (wrong or missing CHP token)"
    } else {
        ""
    };
    bail!(
        "{what}: CHP answered {status}{hint} {}",
        body.chars().take(200).collect::<String>()
    )
}

impl RouteBackend for ChpClient {
    fn list(&self) -> BoxFuture<'_, anyhow::Result<HashMap<String, Value>>> {
        Box::pin(async move {
            let resp = self
                .request(reqwest::Method::GET, "")?
                .send()
                .await
                .context("GET /api/routes")?;
            Ok(check(resp, "GET /api/routes").await?.json().await?)
        })
    }

    fn put<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let resp = self
                .request(reqwest::Method::POST, &route.path)?
                .json(&route.data())
                .send()
                .await
                .context("POST route")?;
            check(resp, "POST route").await?;
            Ok(())
        })
    }

    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, anyhow::Result<Option<Value>>> {
        Box::pin(async move {
            let resp = self
                .request(reqwest::Method::GET, path)?
                .send()
                .await
                .context("GET route")?;
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            Ok(Some(check(resp, "GET route").await?.json().await?))
        })
    }

    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let resp = self
                .request(reqwest::Method::DELETE, path)?
                .send()
                .await
                .context("DELETE route")?;
            // The hub usually deleted it first, on stop.
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(());
            }
            check(resp, "DELETE route").await?;
            Ok(())
        })
    }

    fn restore_hub(&self) -> BoxFuture<'_, anyhow::Result<bool>> {
        Box::pin(async move {
            let Some((url, token)) = &self.hub else {
                return Ok(false);
            };
            let resp = self
                .http
                .post(format!("{url}/proxy"))
                .header("Authorization", format!("token {}", token.expose()))
                .send()
                .await
                .context("POST /hub/api/proxy")?;
            let status = resp.status();
            if !status.is_success() {
                bail!("POST {url}/proxy: hub answered {status}");
            }
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(api_url: &str) -> ChpClient {
        let config = ChpConfig {
            api_url: api_url.into(),
            ..ChpConfig::default()
        };
        ChpClient::from_config(&config).unwrap()
    }

    #[test]
    fn hub_api_from_config_or_the_managed_service_environment() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("hub.token");
        crate::keys::write_private_file(&file, b"from-file\n").unwrap();
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let service = env(&[
            ("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api/"),
            ("JUPYTERHUB_API_TOKEN", "from-env"),
        ]);
        let none = env(&[]);
        let base = ChpConfig::default();
        assert!(hub_api(&base, &none).unwrap().is_none());
        let (url, token) = hub_api(&base, &service).unwrap().unwrap();
        assert_eq!(
            (url.as_str(), token.expose()),
            ("http://127.0.0.1:8081/hub/api", "from-env")
        );
        // Keys win over the environment, each on its own.
        let keys = ChpConfig {
            hub_api_url: Some("http://hub:8081/hub/api".into()),
            hub_token_file: Some(file),
            ..ChpConfig::default()
        };
        let (url, token) = hub_api(&keys, &service).unwrap().unwrap();
        assert_eq!(
            (url.as_str(), token.expose()),
            ("http://hub:8081/hub/api", "from-file")
        );
        let url_only = ChpConfig {
            hub_api_url: Some("http://hub:8081/hub/api".into()),
            ..ChpConfig::default()
        };
        let (_, token) = hub_api(&url_only, &service).unwrap().unwrap();
        assert_eq!(token.expose(), "from-env");
        let err = hub_api(&url_only, &none).unwrap_err();
        assert!(format!("{err:#}").contains("go together"), "{err:#}");
        let half = env(&[("JUPYTERHUB_API_TOKEN", "t")]);
        assert!(hub_api(&base, &half).is_err());
    }

    #[test]
    fn route_urls_are_built_segment_by_segment() {
        let c = client("http://127.0.0.1:8001");
        let url = |p: &str| c.route_url(p).map(|u| u.to_string());
        assert_eq!(url("").unwrap(), "http://127.0.0.1:8001/api/routes");
        assert_eq!(
            url("/user/a b@x.org/gpu").unwrap(),
            "http://127.0.0.1:8001/api/routes/user/a%20b@x.org/gpu"
        );
        assert_eq!(
            url("/user/a?b#c%2e").unwrap(),
            "http://127.0.0.1:8001/api/routes/user/a%3Fb%23c%252e"
        );
        for hostile in [
            "/user/..",
            "/user/.",
            "/user/alice/..",
            "/user//x",
            "/user/...",
            "/",
        ] {
            assert!(url(hostile).is_err(), "{hostile:?} was built");
        }
        let c = client("http://127.0.0.1:8001/prefix/");
        assert_eq!(
            c.route_url("/user/x").unwrap().path(),
            "/prefix/api/routes/user/x"
        );
    }
}
