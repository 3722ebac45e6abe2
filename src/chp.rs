//! configurable-http-proxy's REST API as a route backend, and the hub's "restore your routes"
//! call. CHP takes `Authorization: token <T>` (lowercase `token`; `Bearer` gets 403).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::config::ChpConfig;
use crate::keys::read_secret_file;
use crate::routes::{BoxFuture, Route, RouteBackend};
use crate::secret::Secret;

/// Bound on one call to CHP or the hub, so a hung proxy cannot stall the route worker.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A CHP API client.
#[derive(Debug)]
pub struct ChpClient {
    http: reqwest::Client,
    api_url: String,
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
        let hub = match (&config.hub_api_url, &config.hub_token_file) {
            (Some(url), Some(file)) => Some((
                url.trim_end_matches('/').to_owned(),
                read_secret_file(file).context("chp.hub_token_file")?,
            )),
            (Some(_), None) | (None, Some(_)) => {
                bail!("chp.hub_api_url and chp.hub_token_file go together")
            }
            (None, None) => None,
        };
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            http,
            api_url: config.api_url.trim_end_matches('/').to_owned(),
            token,
            hub,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self
            .http
            .request(method, format!("{}/api/routes{path}", self.api_url));
        match &self.token {
            Some(t) => req.header("Authorization", format!("token {}", t.expose())),
            None => req,
        }
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
                .request(reqwest::Method::GET, "")
                .send()
                .await
                .context("GET /api/routes")?;
            Ok(check(resp, "GET /api/routes").await?.json().await?)
        })
    }

    fn put<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let resp = self
                .request(reqwest::Method::POST, &route.escaped)
                .json(&route.data())
                .send()
                .await
                .context("POST route")?;
            check(resp, "POST route").await?;
            Ok(())
        })
    }

    fn delete<'a>(&'a self, escaped: &'a str) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let resp = self
                .request(reqwest::Method::DELETE, escaped)
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
