//! The bridge: one hub-side connection carried over one `forwarded-tcpip` channel, in its own
//! task, with split channel halves so a channel closed under a blocked upload cannot hang it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use russh::ChannelMsg;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::debug;

use crate::link::{Link, Stats};
use crate::metrics::Metrics;

/// Copy buffer per direction per connection.
const COPY_BUF: usize = 32 * 1024;

/// Carries one hub-side connection over one `forwarded-tcpip` channel.
pub(crate) struct Bridge {
    pub(crate) link: Arc<Link>,
    pub(crate) port: u16,
    pub(crate) stats: Arc<Stats>,
    pub(crate) metrics: Metrics,
    pub(crate) write_timeout: Duration,
}

impl Bridge {
    pub(crate) async fn run(self, sock: TcpStream, from: SocketAddr) {
        // Must run to completion: dropping this open while it is pending ends the whole session
        // (russh.md §5), hence its own task and no timeout around it.
        let opened = self
            .link
            .session
            .handle
            .channel_open_forwarded_tcpip(
                self.link.bind_address.clone(),
                u32::from(self.port),
                from.ip().to_string(),
                u32::from(from.port()),
            )
            .await;
        let channel = match opened {
            Ok(c) => c,
            Err(e) => {
                debug!(%from, error = %e, "job refused the connection");
                return;
            }
        };

        let (mut rd, wr) = channel.split();
        let (mut sr, mut sw) = sock.into_split();
        let mut cw = wr.make_writer();
        let to_job = self.metrics.forwarded_bytes.with_label_values(&["to_job"]);
        let from_job = self
            .metrics
            .forwarded_bytes
            .with_label_values(&["from_job"]);
        let stats = &self.stats;
        let link_bytes = &self.link.bytes;
        let up = async {
            let mut buf = vec![0u8; COPY_BUF];
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                stats.bytes_to_job.fetch_add(n as u64, Ordering::Relaxed);
                link_bytes
                    .bytes_to_job
                    .fetch_add(n as u64, Ordering::Relaxed);
                to_job.inc_by(n as u64);
            }
            let _ = wr.eof().await;
        };
        let down = async {
            while let Some(msg) = rd.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        // A hub client that stops reading would otherwise stall the whole SSH
                        // session once russh's per-channel queue fills (russh.md §5).
                        match timeout(self.write_timeout, sw.write_all(&data)).await {
                            Ok(Ok(())) => {}
                            _ => break,
                        }
                        stats
                            .bytes_from_job
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        link_bytes
                            .bytes_from_job
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        from_job.inc_by(data.len() as u64);
                    }
                    ChannelMsg::Eof => {
                        let _ = sw.shutdown().await;
                    }
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
        };
        tokio::pin!(up, down);
        tokio::select! {
            () = &mut up => { (&mut down).await; }
            // The channel is gone: the upload may be waiting for window that never comes.
            () = &mut down => {}
        }
        let _ = wr.close().await;
    }
}

impl Drop for Bridge {
    /// Every way out of `run` (refused open, either side closing) ends the count here.
    fn drop(&mut self) {
        self.stats
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        self.metrics.forwarded_connections_active.dec();
    }
}
