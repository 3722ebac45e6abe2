//! `TestBroker`: a broker running in this process through `run`, every listener on port 0, and
//! the admin API calls tests make against it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::chp::Chp;
use super::{WAIT, eventually, unique_loopback};

/// A broker running in this process.
pub struct TestBroker {
    pub dir: tempfile::TempDir,
    pub ssh: SocketAddr,
    pub admin: SocketAddr,
    pub token: String,
    pub tunnel_ip: IpAddr,
    pub http: reqwest::Client,
    /// The broker itself, for what the admin API does not reach (a credential reload).
    pub broker: tunnelbot::Broker,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Appended to configs of the broker binary: the default limits need about 30,700 descriptors,
/// more than a test host's hard `RLIMIT_NOFILE` may allow, and `serve` refuses such a config.
pub const PROCESS_LIMITS: &str = "[limits]\nmax_sessions = 1000\n";

/// The config text every test broker starts from; `extra` is appended.
pub fn base_config(dir: &Path, tunnel_ip: IpAddr, extra: &str) -> String {
    format!(
        "keys_dir = {keys:?}\nstate_dir = {state:?}\n\
         [ssh]\nlisten = \"127.0.0.1:0\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [tunnels]\nbind_address = \"{tunnel_ip}\"\n{extra}\n",
        keys = dir.join("keys"),
        state = dir.join("state"),
    )
}

impl TestBroker {
    /// Starts a broker with CHP off; `tunnels` holds extra `[tunnels]` keys.
    pub async fn start(tunnels: &str) -> anyhow::Result<Self> {
        Self::start_with(tunnels, |_, _| Ok("[chp]\nenabled = false\n".into())).await
    }

    /// Starts a broker routing through `chp` under `base_url`.
    pub async fn with_chp(chp: &Chp, base_url: &str) -> anyhow::Result<Self> {
        Self::start_with("", |dir, ip| chp.broker_config(dir, ip, base_url)).await
    }

    /// Starts a broker; `tables` builds the TOML tables after `[tunnels]` from the tunnel address.
    pub async fn start_with(
        tunnels: &str,
        tables: impl FnOnce(&Path, IpAddr) -> anyhow::Result<String>,
    ) -> anyhow::Result<Self> {
        Self::start_text(|dir, tunnel_ip| {
            Ok(format!(
                "{}{}",
                base_config(dir, tunnel_ip, tunnels),
                tables(dir, tunnel_ip)?
            ))
        })
        .await
    }

    /// Starts a broker from the whole config text that `text` builds (for keys in tables that
    /// `base_config` opens, such as `[admin]`).
    pub async fn start_text(
        text: impl FnOnce(&Path, IpAddr) -> anyhow::Result<String>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let tunnel_ip = unique_loopback();
        let text = text(dir.path(), tunnel_ip)?;
        let config = tunnelbot::Config::parse(&text)?;
        config.validate()?;
        let listeners = tunnelbot::Listeners::bind(&config).await?;
        let ssh = listeners.ssh_addr()?;
        let admin = listeners.admin_addr()?;
        let broker = tunnelbot::open(config, ssh).await?;
        let token = std::fs::read_to_string(dir.path().join("keys/admin.token"))?
            .trim()
            .to_owned();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = broker.clone();
        let task = tokio::spawn(tunnelbot::run(broker, listeners, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            dir,
            ssh,
            admin,
            token,
            tunnel_ip,
            http: reqwest::Client::new(),
            broker: handle,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Graceful shutdown, as on SIGTERM; waits (bounded) for it to finish.
    pub async fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .context("shutdown took too long")???;
        }
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// An admin API call with the token; returns status and JSON body (Null when empty).
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        };
        Ok((status, value))
    }

    /// Issues a tunnel and writes its key and known_hosts into a fresh folder.
    pub async fn issue(&self, user: &str, server: &str, ttl: u64) -> anyhow::Result<Issued> {
        let (status, v) = self
            .api(
                reqwest::Method::POST,
                "/api/v1/tunnels",
                Some(json!({"user": user, "server_name": server, "ttl_seconds": ttl})),
            )
            .await?;
        if status != 201 {
            bail!("issue answered {status}: {v}");
        }
        Issued::write(v, self.dir.path())
    }

    pub async fn tunnel(&self, id: &str) -> anyhow::Result<Value> {
        let (status, v) = self
            .api(reqwest::Method::GET, &format!("/api/v1/tunnels/{id}"), None)
            .await?;
        if status != 200 {
            bail!("GET tunnel answered {status}: {v}");
        }
        Ok(v)
    }

    pub async fn revoke(&self, id: &str) -> anyhow::Result<u16> {
        Ok(self
            .api(
                reqwest::Method::DELETE,
                &format!("/api/v1/tunnels/{id}"),
                None,
            )
            .await?
            .0)
    }

    /// Polls the tunnel until `pred` holds.
    pub async fn wait_tunnel(
        &self,
        id: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let found = eventually(&format!("tunnel {id} is {what}"), async || {
            let v = self.tunnel(id).await?;
            anyhow::Ok(pred(&v).then_some(v))
        })
        .await;
        match found {
            Ok(v) => Ok(v),
            // Says where it stopped short, which is what a failing test needs to be read.
            Err(e) => Err(e.context(format!("last seen: {}", self.tunnel(id).await?))),
        }
    }

    /// The value of one metric series from `/metrics`; a series that is not there is an error.
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await?
            .text()
            .await?;
        metric_value(&text, series)
    }

    /// Waits (bounded) until `series` reads at least `at_least`.
    pub async fn wait_metric(&self, series: &str, at_least: f64) -> anyhow::Result<()> {
        self.wait_metric_until(series, &format!("at least {at_least}"), |v| v >= at_least)
            .await
    }

    /// Waits (bounded) until `series` reads exactly `value` (a gauge settling, e.g. back to 0).
    pub async fn wait_metric_eq(&self, series: &str, value: f64) -> anyhow::Result<()> {
        self.wait_metric_until(series, &format!("{value}"), |v| v == value)
            .await
    }

    /// Waits (bounded) until `series` satisfies `pred`, described by `what`.
    pub async fn wait_metric_until(
        &self,
        series: &str,
        what: &str,
        pred: impl Fn(f64) -> bool,
    ) -> anyhow::Result<()> {
        eventually(&format!("{series} is {what}"), async || {
            anyhow::Ok(pred(self.metric(series).await?))
        })
        .await
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Finds `series` (name plus labels as printed, labels in name order) in a Prometheus text body;
/// a series that is not there is an error, never a silent 0.
pub fn metric_value(text: &str, series: &str) -> anyhow::Result<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .with_context(|| format!("no series {series} in /metrics"))
}

/// An issued tunnel with its key material on disk.
pub struct Issued {
    pub json: Value,
    pub id: String,
    pub port: u16,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
}

impl Issued {
    pub fn write(json: Value, dir: &Path) -> anyhow::Result<Self> {
        let id = json["id"].as_str().context("id")?.to_owned();
        let port = u16::try_from(json["port"].as_u64().context("port")?)?;
        let folder = dir.join(&id);
        std::fs::create_dir_all(&folder)?;
        let key = folder.join("key");
        let known_hosts = folder.join("known_hosts");
        if let Some(pem) = json["private_key"].as_str() {
            write_0600(&key, pem)?;
        }
        std::fs::write(
            &known_hosts,
            format!("{}\n", json["known_hosts"].as_str().context("known_hosts")?),
        )?;
        Ok(Self {
            json,
            id,
            port,
            key,
            known_hosts,
        })
    }
}

pub fn write_0600(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(())
}
