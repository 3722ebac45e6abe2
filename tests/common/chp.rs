//! A real configurable-http-proxy process on loopback, and the calls tests make to its API.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::process::{Child, Command};

use super::broker::write_0600;
use super::daemon::start_answering;
use super::eventually;
use super::net::free_port;

/// A real configurable-http-proxy process on loopback.
pub struct Chp {
    pub public: SocketAddr,
    pub api: SocketAddr,
    pub token: String,
    child: Option<Child>,
}

/// CHP's binary: `$CHP_BIN`, else what scripts/setup.sh installs.
pub fn chp_bin() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("CHP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(".deps/node/node_modules/.bin/configurable-http-proxy")
        });
    if !path.exists() {
        bail!(
            "configurable-http-proxy not found at {}: run scripts/setup.sh (or set CHP_BIN)",
            path.display()
        );
    }
    Ok(path)
}

impl Chp {
    /// Starts CHP on fresh ports with a fresh token.
    pub async fn start() -> anyhow::Result<Self> {
        let token = format!("chp-{}", std::process::id()) + &free_port()?.to_string();
        for _ in 0..5 {
            let public = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let api = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let mut chp = Self {
                public,
                api,
                token: token.clone(),
                child: None,
            };
            if chp.spawn().await? {
                return Ok(chp);
            }
        }
        bail!("CHP did not start after 5 tries")
    }

    /// (Re)starts the process on the same ports; false when it exited (port taken).
    pub async fn spawn(&mut self) -> anyhow::Result<bool> {
        let mut cmd = Command::new(chp_bin()?);
        cmd.args([
            "--ip",
            "127.0.0.1",
            "--port",
            &self.public.port().to_string(),
        ])
        .args([
            "--api-ip",
            "127.0.0.1",
            "--api-port",
            &self.api.port().to_string(),
        ])
        .args(["--log-level", "warn"])
        .env("CONFIGPROXY_AUTH_TOKEN", &self.token);
        let http = reqwest::Client::new();
        let (api, token) = (self.api, self.token.clone());
        self.child = start_answering(cmd, &format!("CHP on {api}"), async || {
            let r = http
                .get(format!("http://{api}/api/routes"))
                .header("Authorization", format!("token {token}"))
                .send()
                .await;
            r.is_ok_and(|r| r.status().is_success())
        })
        .await?;
        Ok(self.child.is_some())
    }

    /// Kills the process (routes are in its memory only, so they are gone).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Writes the CHP token to a 0600 file for the broker's `chp.token_file`.
    pub fn token_file(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("chp.token");
        write_0600(&path, &self.token)?;
        Ok(path)
    }

    /// The `[chp]` table pointing a broker at this CHP.
    pub fn broker_config(
        &self,
        dir: &Path,
        tunnel_ip: IpAddr,
        base_url: &str,
    ) -> anyhow::Result<String> {
        Ok(format!(
            "[chp]\nenabled = true\napi_url = \"http://{}\"\ntoken_file = {:?}\nbase_url = \"{base_url}\"\ntarget_host = \"{tunnel_ip}\"\nreconcile_interval = \"200ms\"\n",
            self.api,
            self.token_file(dir)?
        ))
    }

    /// CHP's routing table.
    pub async fn routes(&self) -> anyhow::Result<Value> {
        let r = reqwest::Client::new()
            .get(format!("http://{}/api/routes", self.api))
            .header("Authorization", format!("token {}", self.token))
            .send()
            .await?;
        Ok(r.json().await?)
    }

    /// Polls the table until `pred` holds for the route at `path` (None = absent).
    pub async fn wait_route(
        &self,
        path: &str,
        what: &str,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> anyhow::Result<Value> {
        let found = eventually(&format!("route {path} is {what}"), async || {
            let table = self.routes().await?;
            anyhow::Ok(pred(table.get(path)).then_some(table))
        })
        .await;
        match found {
            Ok(table) => Ok(table),
            // Says where it stopped short, which is what a failing test needs to be read.
            Err(e) => Err(e.context(format!("last table: {}", self.routes().await?))),
        }
    }

    /// Adds a route directly, as the hub or another tool would.
    pub async fn add_route(&self, path: &str, data: Value) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .post(format!("http://{}/api/routes{path}", self.api))
            .header("Authorization", format!("token {}", self.token))
            .json(&data)
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!("CHP answered {}", r.status());
        }
        Ok(())
    }

    /// GET through CHP's public port; returns status and body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", self.public))
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    }
}
