//! Backends and probes on loopback: a TCP echo, a tiny HTTP server, a round trip, a port that
//! carries nothing.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::WAIT;

/// A TCP echo server on 127.0.0.1:0 that answers `tag` first, then echoes every byte.
pub struct Echo {
    pub port: u16,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn echo(tag: &'static str) -> anyhow::Result<Echo> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut out = tag.as_bytes().to_vec();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            out.extend_from_slice(&buf[..n]);
                            if s.write_all(&out).await.is_err() {
                                break;
                            }
                            out.clear();
                        }
                    }
                }
            });
        }
    });
    Ok(Echo { port, task })
}

/// Sends `msg` to `addr` and reads until `expect_len` bytes came back (bounded).
pub async fn roundtrip(addr: SocketAddr, msg: &[u8], expect_len: usize) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(WAIT, async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(msg).await?;
        let mut got = vec![0u8; expect_len];
        s.read_exact(&mut got).await?;
        anyhow::Ok(got)
    })
    .await
    .context("roundtrip timed out")?
}

/// Expects `addr` to carry nothing: refused, or closed without an answer.
pub async fn carries_nothing(addr: SocketAddr) -> anyhow::Result<bool> {
    let r = tokio::time::timeout(WAIT, async {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            return anyhow::Ok(true);
        };
        let _ = s.write_all(b"ping").await;
        let mut buf = [0u8; 16];
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => Ok(true),
            Ok(_) => Ok(false),
        }
    })
    .await
    .context("probe timed out")??;
    Ok(r)
}

/// A port nothing listens on right now. CHP cannot be handed a socket, so it gets a port this
/// way; `Chp::start` retries when another process takes it first.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A minimal HTTP backend on 127.0.0.1:0 answering `<tag> <path>` to every request.
pub async fn http_backend(tag: &'static str) -> anyhow::Result<Echo> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                let Ok(Some(request_line)) = lines.next_line().await else {
                    return;
                };
                while let Ok(Some(l)) = lines.next_line().await {
                    if l.is_empty() {
                        break;
                    }
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("?")
                    .to_owned();
                let body = format!("{tag} {path}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = w.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(Echo { port, task })
}

impl Echo {
    /// Wraps a backend task listening on `port`.
    pub fn new(port: u16, task: JoinHandle<()>) -> Self {
        Self { port, task }
    }
}
