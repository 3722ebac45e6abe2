//! The SSH transport under a tunnel: every offered cipher carries it, and parallel downloads
//! live through key re-exchanges started by either side (the russh patch in patches/).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use common::{Ssh, TestBroker, echo, roundtrip};

#[tokio::test]
async fn every_offered_cipher_carries_a_tunnel() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let notebook = echo("c:").await?;
    for cipher in [
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com",
        "aes128-ctr",
    ] {
        // Server names are slugs (JupyterHub 6): the cipher name with its "@" and "." as "-".
        let issued = broker
            .issue("ciph", &cipher.replace(['@', '.'], "-"), 600)
            .await?;
        let job = Ssh::reverse(
            &broker,
            &issued,
            &format!("0:127.0.0.1:{}", notebook.port),
            &["-c", cipher],
        )?;
        assert_eq!(job.allocated_port().await?, issued.port, "{cipher}");
        let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
        assert_eq!(roundtrip(hub_side, b"q", 3).await?, b"c:q", "{cipher}");
    }
    Ok(())
}

/// Four downloads at once through one tunnel (every channel with a full window in flight) while
/// the job's client re-keys every MiB, as the job wrapper has it re-key before the broker would
/// (`RekeyLimit`, belt and braces since the russh patch; docs/benchmark.md, finding 2): every
/// byte arrives, in order, and the session lives through every re-key.
#[tokio::test]
async fn parallel_downloads_live_through_the_clients_key_re_exchanges() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let job = four_parallel_downloads(&broker, &["-o", "RekeyLimit=1M"], false).await?;
    let rekeys = re_exchanges(&job);
    assert!(rekeys >= 8, "only {rekeys} re-keys:\n{}", job.stderr());
    Ok(())
}

/// The same four downloads with no `RekeyLimit` on the client and the broker re-keying every
/// 256 KiB it reads, so the broker starts every re-exchange. The first one is forced to meet four
/// full windows in flight: a relay holds what the job sends until every channel has spent its
/// whole window (4 x 2 MiB), then lets it through at once, so the broker's KEXINIT goes out
/// after its first 256 KiB with ~7.75 MiB still ahead of the job's answer. Unpatched russh 0.65.1
/// ends the session there ("Pending buffer limit reached" above 2 windows; patches/README.md).
#[tokio::test]
async fn parallel_downloads_live_through_the_brokers_key_re_exchanges() -> anyhow::Result<()> {
    let broker = TestBroker::start_text(|dir, tunnel_ip| {
        Ok(common::base_config(dir, tunnel_ip, "")
            .replace("[ssh]\n", "[ssh]\nrekey_limit = \"256KiB\"\n")
            + "[chp]\nenabled = false\n")
    })
    .await?;
    let job = four_parallel_downloads(&broker, &[], true).await?;
    let rekeys = re_exchanges(&job);
    // The forced one and more (at 256 KiB each, but up to four windows arrive while one runs):
    // every one started by the broker (OpenSSH's own limit is gigabytes), its KEXINIT first.
    let started_by_broker = job
        .stderr()
        .split("SSH2_MSG_NEWKEYS received")
        .skip(1)
        .filter(|kex| {
            let received = kex.find("SSH2_MSG_KEXINIT received");
            let sent = kex.find("SSH2_MSG_KEXINIT sent");
            matches!((received, sent), (Some(r), Some(s)) if r < s)
        })
        .count();
    assert!(
        rekeys >= 2 && started_by_broker >= rekeys,
        "{rekeys} re-keys, {started_by_broker} started by the broker:\n{}",
        job.stderr()
    );
    Ok(())
}

/// Re-exchanges the job's `ssh -v` went through after the first key exchange.
fn re_exchanges(job: &Ssh) -> usize {
    job.stderr()
        .matches("SSH2_MSG_NEWKEYS received")
        .count()
        .saturating_sub(1)
}

/// A job (`ssh -v` with `extra`) whose notebook sends 8 MiB of a counting pattern on every
/// connection; four hub clients download at once through its tunnel and each gets every byte in
/// order. Then the same session still forwards. Returns the job, still running. With `hold`, the
/// job reaches the broker through a [`HoldingRelay`] that holds its first four windows.
async fn four_parallel_downloads(
    broker: &TestBroker,
    extra: &[&str],
    hold: bool,
) -> anyhow::Result<Ssh> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const EACH: usize = 8 << 20;
    // russh's default channel window, which the broker keeps: what the job may send on a fresh
    // channel before the broker has read any of it.
    const WINDOW: usize = 2 << 20;
    let issued = broker.issue("rita", "", 600).await?;
    // The notebook: every connection gets EACH bytes of a counting pattern, then EOF.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let nb_port = listener.local_addr()?.port();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let data: Vec<u8> = (0..EACH).map(|i| (i % 251) as u8).collect();
                let _ = s.write_all(&data).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let spec = format!("0:127.0.0.1:{nb_port}");
    let mut opts = vec!["-v"];
    opts.extend_from_slice(extra);
    let relay = match hold {
        true => Some(HoldingRelay::start(broker.ssh).await?),
        false => None,
    };
    let mut job = match &relay {
        None => Ssh::reverse(broker, &issued, &spec, &opts)?,
        Some(relay) => relay.ssh(&issued, &spec, &opts)?,
    };
    job.allocated_port().await?;
    if let Some(relay) = &relay {
        relay.hold();
    }

    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    let mut downloads = tokio::task::JoinSet::new();
    for _ in 0..4 {
        downloads.spawn(async move {
            let mut s = tokio::net::TcpStream::connect(hub_side).await?;
            let mut got = Vec::with_capacity(EACH);
            tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut got)).await??;
            anyhow::ensure!(got.len() == EACH, "got {} of {EACH} bytes", got.len());
            anyhow::ensure!(
                got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8),
                "bytes out of order"
            );
            anyhow::Ok(())
        });
    }
    if let Some(relay) = &relay {
        // Every channel's whole first window, encrypted (so a little more), is held.
        relay
            .release_after(4 * WINDOW)
            .await
            .with_context(|| job.stderr())?;
    }
    while let Some(r) = downloads.join_next().await {
        if let Err(e) = r? {
            anyhow::bail!("{e:#}; the job's ssh:\n{}", job.stderr());
        }
    }
    // Same session, still forwarding.
    assert!(job.running(), "the job's ssh exited:\n{}", job.stderr());
    assert_eq!(broker.metric("tunnelbot_ssh_sessions_active").await?, 1.0);
    let mut again = tokio::net::TcpStream::connect(hub_side).await?;
    let mut first = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(10), again.read_exact(&mut first)).await??;
    assert_eq!(first[1], 1);
    server.abort();
    Ok(job)
}

/// A loopback TCP relay in front of the broker's SSH port for one job connection. While held, what
/// the job sends is kept (the job sees a pipe without end); released, it goes through at once and
/// after it everything flows. The broker-to-job direction always flows.
struct HoldingRelay {
    addr: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    held: tokio::sync::watch::Receiver<usize>,
}

impl HoldingRelay {
    async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (open, mut gate) = tokio::sync::watch::channel(true);
        let (held_tx, held) = tokio::sync::watch::channel(0usize);
        tokio::spawn(async move {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(broker) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut br, mut bw) = broker.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut br, &mut cw).await });
            let mut kept = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            let mut is_open = true;
            loop {
                tokio::select! {
                    r = cr.read(&mut buf) => {
                        let n = match r {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if is_open {
                            if bw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        } else {
                            kept.extend_from_slice(&buf[..n]);
                            held_tx.send_replace(kept.len());
                        }
                    }
                    changed = gate.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        is_open = *gate.borrow_and_update();
                        if is_open && bw.write_all(&std::mem::take(&mut kept)).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = bw.shutdown().await;
        });
        Ok(Self { addr, open, held })
    }

    /// The job's ssh through the relay: `-N -R spec`, then `opts`, as `Ssh::reverse` has it.
    fn ssh(&self, issued: &common::Issued, spec: &str, opts: &[&str]) -> anyhow::Result<Ssh> {
        // The issued known_hosts pins the key for the broker's port: the same key at ours.
        let line = std::fs::read_to_string(&issued.known_hosts)?;
        let (_, key) = line.split_once(' ').context("known_hosts line")?;
        let known_hosts = issued.known_hosts.with_extension("relay");
        std::fs::write(&known_hosts, format!("[*]:{} {key}", self.addr.port()))?;
        let mut all: Vec<String> = vec!["-N".into(), "-R".into(), spec.into()];
        all.extend(opts.iter().map(|o| o.to_string()));
        all.extend(["-o".into(), "ExitOnForwardFailure=yes".into()]);
        all.extend(common::ssh_args(
            self.addr,
            &issued.key,
            &known_hosts,
            "tunnelbot",
        ));
        Ssh::spawn(&all)
    }

    fn hold(&self) {
        self.open.send_replace(false);
    }

    /// Waits (bounded) until more than `bytes` are held, then lets them through.
    async fn release_after(&self, bytes: usize) -> anyhow::Result<()> {
        let mut held = self.held.clone();
        let waited = tokio::time::timeout(common::WAIT, held.wait_for(|n| *n > bytes))
            .await
            .is_ok_and(|r| r.is_ok());
        let got = *held.borrow();
        self.open.send_replace(true);
        anyhow::ensure!(
            waited,
            "the relay held only {got} bytes, not more than {bytes}"
        );
        Ok(())
    }
}
