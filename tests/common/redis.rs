//! A real `redis-server` (Debian's) on loopback, started by PID, with nothing saved to disk.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::bail;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::daemon::start_answering;
use super::net::free_port;

/// A real redis-server process on 127.0.0.1.
pub struct Redis {
    pub addr: SocketAddr,
    child: Option<Child>,
}

/// redis-server: `$REDIS_SERVER_BIN`, else the one on PATH (scripts/setup-redis-traefik.sh).
pub fn redis_server_bin() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("REDIS_SERVER_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        });
    match path {
        Some(p) if p.exists() => Ok(p),
        _ => bail!(
            "redis-server not found: run scripts/setup-redis-traefik.sh (or set REDIS_SERVER_BIN)"
        ),
    }
}

impl Redis {
    /// Starts redis-server on a fresh port.
    pub async fn start() -> anyhow::Result<Self> {
        for _ in 0..5 {
            let mut redis = Self {
                addr: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
                child: None,
            };
            if redis.spawn().await? {
                return Ok(redis);
            }
        }
        bail!("redis-server did not start after 5 tries")
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// (Re)starts the process on the same port, empty; false when it exited (port taken).
    pub async fn spawn(&mut self) -> anyhow::Result<bool> {
        let mut cmd = Command::new(redis_server_bin()?);
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &self.addr.port().to_string(),
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ])
        .args([
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--dir",
            "/tmp",
        ]);
        let addr = self.addr;
        self.child =
            start_answering(cmd, &format!("redis on {addr}"), async || ping(addr).await).await?;
        Ok(self.child.is_some())
    }

    /// Kills the process; everything it held is gone (nothing is saved).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Kills it and starts an empty one on the same port (bounded retries while the port frees).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        for _ in 0..5 {
            if self.spawn().await? {
                return Ok(());
            }
        }
        bail!("redis-server did not come back on {}", self.addr)
    }
}

async fn ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).await.is_ok() && &buf == b"+PONG\r\n"
}
