//! configurable-http-proxy's REST API as a route backend, and the hub's "restore your routes"
//! call. Everything CHP-shaped lives here: the JSON route data, JupyterHub's keys in it
//! (`jupyterhub: true`, `user`, `server_name`, and `hub: true` on the hub's own route), the
//! owner stamp written as `"tunnelbot": true` beside them (the hub's `check_routes` never
//! compares extra keys, so it survives there), path escaping and `/api/routes` URLs, and
//! `POST /hub/api/proxy`. CHP takes `Authorization: token <T>` (lowercase `token`; `Bearer`
//! gets 403).
//!
//! Every route URL is built from the route's decoded path one segment at a time, each segment
//! percent-escaped, and the finished URL's path is compared with the intended one before
//! anything is sent: a URL parser folds `.`/`..` segments (`%2e` included), which once turned a
//! request for `/user/..` into one for `/`. A path that does not survive unchanged is refused.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::ChpConfig;
use super::{BaseUrl, BoxFuture, Listing, Owner, RouteBackend, RouteEntry, RoutePath, Target};
use crate::keys::read_secret_file;
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
    base_url: BaseUrl,
}

impl ChpClient {
    /// From `[chp]`, for routes under `base_url`: the token comes from `token_file`, else
    /// `CONFIGPROXY_AUTH_TOKEN`.
    pub fn from_config(config: &ChpConfig, base_url: BaseUrl) -> anyhow::Result<Self> {
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
            base_url,
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

/// Checks `[chp]` without connecting: the API URL's scheme, the token file's permissions, and
/// that the hub's API URL and token come as a pair.
pub fn check_config(config: &ChpConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.api_url.starts_with("http://") || config.api_url.starts_with("https://"),
        "chp.api_url {:?} must start with http:// or https://",
        config.api_url
    );
    if let Some(path) = &config.token_file {
        crate::keys::check_private_file(path).context("chp.token_file")?;
    }
    hub_api(config, &process_env)?;
    Ok(())
}

/// Percent-escapes a path segment as Python's `quote(v, safe='@~')` does (JupyterHub's escaping).
pub fn escape(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The route data for `entry`: the keys JupyterHub writes, so the hub takes it for its own,
/// and the owner stamp.
pub fn data(entry: &RouteEntry) -> Value {
    let mut data = json!({
        "target": entry.target.to_string(),
        "jupyterhub": true,
        "user": entry.user,
        "server_name": entry.server_name,
    });
    if let Some(o) = data.as_object_mut() {
        o.insert(entry.owner.name().to_owned(), Value::Bool(true));
    }
    data
}

impl ChpClient {
    /// Reads CHP's route at decoded `path` as ours: our stamp, JupyterHub's marker, a server
    /// route path, an `http://host:port` target and string `user` and `server_name`.
    fn parse(&self, path: &str, data: &Value) -> Option<RouteEntry> {
        let owner = Owner::TUNNELBOT;
        if data.get(owner.name()) != Some(&Value::Bool(true))
            || data.get("jupyterhub") != Some(&Value::Bool(true))
        {
            return None;
        }
        Some(RouteEntry {
            path: RoutePath::parse(&self.base_url, path)?,
            target: Target::parse(data.get("target")?.as_str()?)?,
            user: data.get("user")?.as_str()?.to_owned(),
            server_name: data.get("server_name")?.as_str()?.to_owned(),
            owner,
        })
    }
}

impl RouteBackend for ChpClient {
    fn list(&self) -> BoxFuture<'_, anyhow::Result<Listing>> {
        Box::pin(async move {
            let resp = self
                .request(reqwest::Method::GET, "")?
                .send()
                .await
                .context("GET /api/routes")?;
            let table: HashMap<String, Value> =
                check(resp, "GET /api/routes").await?.json().await?;
            Ok(Listing {
                hub_present: table
                    .values()
                    .any(|d| d.get("hub") == Some(&Value::Bool(true))),
                ours: table
                    .iter()
                    .filter_map(|(path, data)| self.parse(path, data))
                    .collect(),
            })
        })
    }

    fn get<'a>(&'a self, path: &'a RoutePath) -> BoxFuture<'a, anyhow::Result<Option<RouteEntry>>> {
        Box::pin(async move {
            let path = path.to_string();
            let resp = self
                .request(reqwest::Method::GET, &path)?
                .send()
                .await
                .context("GET route")?;
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            let data: Value = check(resp, "GET route").await?.json().await?;
            Ok(self.parse(&path, &data))
        })
    }

    fn put<'a>(&'a self, entry: &'a RouteEntry) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let resp = self
                .request(reqwest::Method::POST, &entry.path.to_string())?
                .json(&data(entry))
                .send()
                .await
                .context("POST route")?;
            check(resp, "POST route").await?;
            Ok(())
        })
    }

    fn delete<'a>(&'a self, seen: &'a RouteEntry) -> BoxFuture<'a, anyhow::Result<bool>> {
        Box::pin(async move {
            // CHP has no compare-and-delete: the path goes, right after the reconciler's read.
            let resp = self
                .request(reqwest::Method::DELETE, &seen.path.to_string())?
                .send()
                .await
                .context("DELETE route")?;
            // The hub usually deleted it first, on stop.
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(false);
            }
            check(resp, "DELETE route").await?;
            Ok(true)
        })
    }

    /// CHP keeps routes in memory only, and an external CHP's restart goes unnoticed by the
    /// hub until its next `check_routes` (up to 300 s): `POST /hub/api/proxy` makes the hub
    /// restore `/` and its routes at once.
    fn proxy_restarted(&self) -> BoxFuture<'_, anyhow::Result<bool>> {
        Box::pin(async move {
            let Some(hub) = &self.hub else {
                return Ok(false);
            };
            ask_hub_to_restore(&self.http, hub).await?;
            Ok(true)
        })
    }
}

/// `POST /hub/api/proxy`: the hub writes `/` and every running server's route again at once.
/// Shared with the traefik-redis backend, whose Redis can lose the table the same way.
pub async fn ask_hub_to_restore(
    http: &reqwest::Client,
    (url, token): &(String, Secret),
) -> anyhow::Result<()> {
    let resp = http
        .post(format!("{url}/proxy"))
        .header("Authorization", format!("token {}", token.expose()))
        .send()
        .await
        .context("POST /hub/api/proxy")?;
    let status = resp.status();
    if !status.is_success() {
        bail!("POST {url}/proxy: hub answered {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
