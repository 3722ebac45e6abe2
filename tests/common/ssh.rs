//! The stock OpenSSH client as a job runs it, with its stderr collected line by line, and
//! `ssh-keygen` for keys the broker never issued.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

use super::WAIT;
use super::broker::{Issued, TestBroker};

/// The stock `ssh` client, as a job runs it, with its stderr collected line by line.
pub struct Ssh {
    pub child: Child,
    lines: Arc<(Mutex<Vec<String>>, Notify)>,
    drained: tokio_util::sync::CancellationToken,
}

/// The job's ssh arguments, without the forwards: pinned host key, batch mode, one identity.
pub fn ssh_args(ssh: SocketAddr, key: &Path, known_hosts: &Path, user: &str) -> Vec<String> {
    let mut a: Vec<String> = vec!["-F".into(), "/dev/null".into(), "-T".into()];
    for o in [
        "IdentitiesOnly=yes",
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        "ConnectTimeout=10",
        "ServerAliveInterval=15",
    ] {
        a.push("-o".into());
        a.push(o.into());
    }
    a.extend([
        "-o".into(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
    ]);
    a.extend(["-i".into(), key.display().to_string()]);
    a.extend([
        "-p".into(),
        ssh.port().to_string(),
        format!("{user}@{}", ssh.ip()),
    ]);
    a
}

/// A job's full ssh arguments: `-N -R 0:127.0.0.1:<notebook_port>`, exit on forward failure.
pub fn job_args(
    ssh: SocketAddr,
    key: &Path,
    known_hosts: &Path,
    notebook_port: u16,
) -> Vec<String> {
    let mut args: Vec<String> = vec!["-N".into(), "-o".into(), "ExitOnForwardFailure=yes".into()];
    args.extend(["-R".into(), format!("0:127.0.0.1:{notebook_port}")]);
    args.extend(ssh_args(ssh, key, known_hosts, "tunnelbot"));
    args
}

impl Ssh {
    /// Starts `ssh` with `args` (options go before the destination, which ssh_args ends with).
    pub fn spawn(args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new("ssh")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("running ssh (is openssh-client installed?)")?;
        let stderr = child.stderr.take().context("stderr")?;
        let lines: Arc<(Mutex<Vec<String>>, Notify)> = Arc::default();
        let sink = Arc::clone(&lines);
        let drained = tokio_util::sync::CancellationToken::new();
        let done = drained.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = r.next_line().await {
                sink.0.lock().unwrap().push(line);
                sink.1.notify_waiters();
            }
            done.cancel();
            sink.1.notify_waiters();
        });
        Ok(Self {
            child,
            lines,
            drained,
        })
    }

    /// A job's reverse tunnel: `-N -R <spec>` with ExitOnForwardFailure unless `extra` says otherwise.
    pub fn reverse(
        broker: &TestBroker,
        issued: &Issued,
        spec: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args: Vec<String> = vec!["-N".into(), "-R".into(), spec.into()];
        if !extra.iter().any(|e| e.contains("ExitOnForwardFailure")) {
            args.extend(["-o".into(), "ExitOnForwardFailure=yes".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(ssh_args(
            broker.ssh,
            &issued.key,
            &issued.known_hosts,
            "tunnelbot",
        ));
        Self::spawn(&args)
    }

    /// The job's usual tunnel, `-R 0:127.0.0.1:<notebook port>`.
    pub fn job(broker: &TestBroker, issued: &Issued, notebook_port: u16) -> anyhow::Result<Self> {
        Self::reverse(broker, issued, &format!("0:127.0.0.1:{notebook_port}"), &[])
    }

    pub fn stderr(&self) -> String {
        self.lines.0.lock().unwrap().join("\n")
    }

    /// Waits until a stderr line contains `needle`; returns that line.
    pub async fn wait_line(&self, needle: &str) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.lines.1.notified();
            if let Some(l) = self
                .lines
                .0
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return Ok(l.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("ssh never printed {needle:?}; stderr:\n{}", self.stderr());
            }
        }
    }

    /// Waits for "Allocated port N" and returns N.
    pub async fn allocated_port(&self) -> anyhow::Result<u16> {
        let line = self.wait_line("Allocated port").await?;
        let n = line.split_whitespace().nth(2).context("port in line")?;
        Ok(n.parse()?)
    }

    /// Waits (bounded) for ssh to exit; returns its exit code.
    pub async fn exit_code(&mut self) -> anyhow::Result<i32> {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .context("ssh did not exit")??;
        // Let the stderr reader take what ssh printed last.
        let _ = tokio::time::timeout(WAIT, self.drained.cancelled()).await;
        Ok(status.code().unwrap_or(-1))
    }

    /// Sends `SIG<name>` (e.g. "STOP", "CONT") to the ssh process.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        super::process::signal(&self.child, name, "ssh")
    }

    /// Whether ssh is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Runs ssh with `args` to completion; returns exit code and stderr.
pub async fn ssh_run(args: &[String]) -> anyhow::Result<(i32, String)> {
    let mut s = Ssh::spawn(args)?;
    let code = s.exit_code().await?;
    Ok((code, s.stderr()))
}

/// A fresh ed25519 key made by ssh-keygen (for "never-issued key" tests).
pub fn keygen(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(&path)
        .output()?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(path)
}
