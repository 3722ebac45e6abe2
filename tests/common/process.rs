//! `BrokerProcess`: the real `tunnelbot` binary as a child process, found through its ready
//! file, stopped with real signals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use super::broker::Issued;
use super::{WAIT, eventually, next_id};

/// The real `tunnelbot` binary as a child process, with its addresses from the ready file.
pub struct BrokerProcess {
    pub child: Child,
    pub ssh: SocketAddr,
    pub admin: SocketAddr,
    pub token: String,
    /// The broker's stderr (its log).
    pub log: PathBuf,
    dir: PathBuf,
    http: reqwest::Client,
}

/// A broker process started but not (yet) ready.
pub struct Launching {
    pub child: Child,
    ready: PathBuf,
    pub log: PathBuf,
    dir: PathBuf,
}

impl Launching {
    /// Waits (bounded) for the ready file; fails at once if the process exits first.
    pub async fn ready(mut self) -> anyhow::Result<BrokerProcess> {
        let (ready, log_path) = (&self.ready, &self.log);
        let child = &mut self.child;
        eventually("the broker writes its ready file", async || {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                bail!("broker exited early: {status}\n{log}");
            }
            Ok(ready.exists())
        })
        .await?;
        let v: Value = serde_json::from_str(&std::fs::read_to_string(ready)?)?;
        let token = std::fs::read_to_string(self.dir.join("keys/admin.token"))?
            .trim()
            .to_owned();
        Ok(BrokerProcess {
            child: self.child,
            ssh: v["ssh"].as_str().context("ssh")?.parse()?,
            admin: v["admin"].as_str().context("admin")?.parse()?,
            token,
            log: self.log,
            dir: self.dir,
            http: reqwest::Client::new(),
        })
    }
}

impl BrokerProcess {
    /// Starts `tunnelbot serve --config <config>` and waits (bounded) for its ready file.
    pub async fn start(dir: &Path, config: &Path) -> anyhow::Result<Self> {
        // Not under a service manager, even when the test runner is (its socket is not ours).
        Self::start_env(dir, config, &[]).await
    }

    /// `start` with `env` added to the child's environment.
    pub async fn start_env(
        dir: &Path,
        config: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut command = Self::command();
        command.envs(env.iter().copied());
        Self::start_via(dir, config, command).await
    }

    /// The broker binary, outside any service manager (the test runner's socket and descriptors
    /// are not the broker's); `start_via` adds `serve` and its flags.
    pub fn command() -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tunnelbot"));
        for var in [
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
        ] {
            command.env_remove(var);
        }
        command
    }

    /// As `start`, through `command`: the broker binary, or a wrapper that ends in it (so the
    /// caller can add environment, descriptors, or an `sh -c '... exec "$0" "$@"' BIN`).
    pub async fn start_via(dir: &Path, config: &Path, command: Command) -> anyhow::Result<Self> {
        Self::launch(dir, config, command)?.ready().await
    }

    /// Starts the broker without waiting for it to be ready (a standby is not, until it holds
    /// the lease); `Launching::ready` waits.
    pub fn launch(dir: &Path, config: &Path, mut command: Command) -> anyhow::Result<Launching> {
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let n = next_id();
        let log_path = dir.join(format!("broker-{n}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Launching {
            child,
            ready,
            log: log_path,
            dir: dir.to_owned(),
        })
    }

    /// SIGTERM, as systemd stops it, and wait (bounded) for the exit.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.signal("TERM")?;
        self.wait_exit().await
    }

    /// Sends `SIG<name>` ("TERM", "HUP") and returns at once.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        signal(&self.child, name, "broker")
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let exit = tokio::time::timeout(WAIT, self.child.wait()).await;
        Ok(exit.context("the broker did not exit")??)
    }

    /// GET `path` on the admin API without a token; the status code.
    pub async fn status_of(&self, path: &str) -> anyhow::Result<u16> {
        let r = self.http.get(format!("http://{}{path}", self.admin)).send();
        Ok(r.await?.status().as_u16())
    }

    /// The broker's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET /api/v1/tunnels/<id>.
    pub async fn tunnel(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("http://{}/api/v1/tunnels/{id}", self.admin))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// DELETE /api/v1/tunnels/<id>; the status code.
    pub async fn revoke(&self, id: &str) -> anyhow::Result<u16> {
        Ok(self
            .http
            .delete(format!("http://{}/api/v1/tunnels/{id}", self.admin))
            .bearer_auth(&self.token)
            .send()
            .await?
            .status()
            .as_u16())
    }

    /// SIGKILL (nothing gets saved at exit), and wait until the process is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        tokio::time::timeout(WAIT, self.child.wait()).await??;
        Ok(())
    }

    pub async fn issue(&self, user: &str) -> anyhow::Result<Issued> {
        self.issue_body(json!({"user": user})).await
    }

    /// POST /api/v1/tunnels with `body`; the key and known_hosts written beside the config.
    pub async fn issue_body(&self, body: Value) -> anyhow::Result<Issued> {
        let v: Value = self
            .http
            .post(format!("http://{}/api/v1/tunnels", self.admin))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        Issued::write(v, &self.dir)
    }

    pub async fn list(&self) -> anyhow::Result<Vec<Value>> {
        let v: Value = self
            .http
            .get(format!("http://{}/api/v1/tunnels", self.admin))
            .bearer_auth(&self.token)
            .send()
            .await?
            .json()
            .await?;
        Ok(v["tunnels"].as_array().cloned().unwrap_or_default())
    }

    /// Waits (bounded) until `n` tunnels are connected.
    pub async fn wait_connected(&self, n: usize) -> anyhow::Result<()> {
        eventually(&format!("{n} tunnels are connected"), async || {
            let list = self.list().await?;
            anyhow::Ok(list.iter().filter(|t| t["connected"] == true).count() >= n)
        })
        .await
    }
}

/// Sends `SIG<name>` ("TERM", "STOP") to `child`, the `what` of an error message, and returns at
/// once.
pub fn signal(child: &Child, name: &str, what: &str) -> anyhow::Result<()> {
    let pid = child
        .id()
        .with_context(|| format!("{what} already reaped"))?;
    let ok = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()?
        .success();
    anyhow::ensure!(ok, "kill -{name} {pid} failed");
    Ok(())
}
