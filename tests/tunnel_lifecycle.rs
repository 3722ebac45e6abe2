//! A job's tunnel from issue to end, driven with the real OpenSSH client.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Ssh, TestBroker, carries_nothing, echo, roundtrip};

#[tokio::test]
async fn job_forward_lands_on_its_reserved_port_and_carries_bytes_both_ways() -> anyhow::Result<()>
{
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("alice", "", 600).await?;
    assert!(
        issued.json["private_key"]
            .as_str()
            .unwrap()
            .contains("BEGIN OPENSSH PRIVATE KEY")
    );
    assert_eq!(issued.json["ssh_user"], "tunnelbot");
    assert_eq!(issued.json["ssh_port"], broker.ssh.port());
    let notebook = echo("nb:").await?;
    let job = Ssh::job(&broker, &issued, notebook.port)?;
    assert_eq!(job.allocated_port().await?, issued.port);

    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    let payload = vec![7u8; 200_000];
    let got = roundtrip(hub_side, &payload, payload.len() + 3).await?;
    assert_eq!(&got[..3], b"nb:");
    assert!(got[3..].iter().all(|b| *b == 7));

    let t = broker
        .wait_tunnel(&issued.id, "connected with bytes counted", |t| {
            t["connected"] == true && t["bytes_to_job"].as_u64() >= Some(200_000)
        })
        .await?;
    assert!(t["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(t["connected_since"].is_string());
    assert!(t["bytes_from_job"].as_u64().unwrap() >= 200_000);
    Ok(())
}

#[tokio::test]
async fn exact_reserved_port_is_accepted() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("bob", "gpu", 600).await?;
    let notebook = echo("").await?;
    let job = Ssh::reverse(
        &broker,
        &issued,
        &format!("{}:127.0.0.1:{}", issued.port, notebook.port),
        &[],
    )?;
    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    broker
        .wait_tunnel(&issued.id, "connected", |t| t["connected"] == true)
        .await?;
    assert_eq!(roundtrip(hub_side, b"hello", 5).await?, b"hello");
    drop(job);
    Ok(())
}

#[tokio::test]
async fn dropped_connection_reconnects_to_the_same_port() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("dave", "", 600).await?;
    let notebook = echo("nb:").await?;
    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    for round in 0..3 {
        let mut job = Ssh::job(&broker, &issued, notebook.port)?;
        assert_eq!(job.allocated_port().await?, issued.port, "round {round}");
        assert_eq!(roundtrip(hub_side, b"r", 4).await?, b"nb:r");
        job.child.kill().await?;
        broker
            .wait_tunnel(&issued.id, "disconnected", |t| t["connected"] == false)
            .await?;
        assert!(
            carries_nothing(hub_side).await?,
            "no job connected: the port must carry nothing"
        );
    }
    Ok(())
}

#[tokio::test]
async fn revoke_disconnects_within_a_second_and_frees_the_port() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("erin", "", 600).await?;
    let notebook = echo("").await?;
    let mut job = Ssh::job(&broker, &issued, notebook.port)?;
    job.allocated_port().await?;
    broker
        .wait_tunnel(&issued.id, "connected", |t| t["connected"] == true)
        .await?;

    let started = std::time::Instant::now();
    assert_eq!(broker.revoke(&issued.id).await?, 204);
    assert_eq!(job.exit_code().await?, 255);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        job.stderr().contains("credential revoked"),
        "{}",
        job.stderr()
    );
    let t = broker.tunnel(&issued.id).await?;
    assert_eq!(t["state"], "revoked");
    assert_eq!(t["connected"], false);
    // The listener is closed: nothing accepts on the port any more.
    assert!(
        tokio::net::TcpStream::connect(SocketAddr::new(broker.tunnel_ip, issued.port))
            .await
            .is_err()
    );
    // Revoking again is harmless; the key no longer logs in.
    assert_eq!(broker.revoke(&issued.id).await?, 204);
    let mut again = Ssh::job(&broker, &issued, notebook.port)?;
    assert_eq!(again.exit_code().await?, 255);
    assert!(
        again.stderr().contains("Permission denied"),
        "{}",
        again.stderr()
    );
    Ok(())
}

#[tokio::test]
async fn expiry_disconnects_the_session_and_frees_the_port() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("frank", "", 5).await?;
    let notebook = echo("").await?;
    let mut job = Ssh::job(&broker, &issued, notebook.port)?;
    job.allocated_port().await?;
    assert_eq!(job.exit_code().await?, 255);
    assert!(
        job.stderr().contains("credential expired"),
        "{}",
        job.stderr()
    );
    let t = broker
        .wait_tunnel(&issued.id, "expired", |t| t["state"] == "expired")
        .await?;
    assert_eq!(t["connected"], false);
    assert!(
        tokio::net::TcpStream::connect(SocketAddr::new(broker.tunnel_ip, issued.port))
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn notebook_refusing_a_connection_closes_only_that_connection() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("gina", "", 600).await?;
    // A port nothing listens on: bind, learn, close.
    let dead_port = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()?.port()
    };
    let notebook = echo("ok:").await?;
    let mut job = Ssh::job(&broker, &issued, dead_port)?;
    job.allocated_port().await?;
    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    assert!(carries_nothing(hub_side).await?);
    assert!(carries_nothing(hub_side).await?);
    assert!(
        job.running(),
        "the session must survive a refused connection"
    );
    drop(job);
    broker
        .wait_tunnel(&issued.id, "disconnected", |t| t["connected"] == false)
        .await?;
    let _job = Ssh::job(&broker, &issued, notebook.port)?;
    broker
        .wait_tunnel(&issued.id, "connected", |t| t["connected"] == true)
        .await?;
    assert_eq!(roundtrip(hub_side, b"z", 4).await?, b"ok:z");
    Ok(())
}

#[tokio::test]
async fn shutdown_tells_jobs_and_finishes() -> anyhow::Result<()> {
    let mut broker = TestBroker::start("").await?;
    let issued = broker.issue("hank", "", 600).await?;
    let notebook = echo("").await?;
    let mut job = Ssh::job(&broker, &issued, notebook.port)?;
    job.allocated_port().await?;
    broker.shutdown().await?;
    assert_eq!(job.exit_code().await?, 255);
    assert!(
        job.stderr().contains("broker shutting down"),
        "{}",
        job.stderr()
    );
    Ok(())
}

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
/// (`RekeyLimit`; docs/benchmark.md on why the broker should not be the one to start it): every
/// byte arrives, in order, and the session lives through every re-key.
#[tokio::test]
async fn parallel_downloads_live_through_the_clients_key_re_exchanges() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const EACH: usize = 8 << 20;
    let broker = TestBroker::start("").await?;
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
    let job = Ssh::reverse(
        &broker,
        &issued,
        &format!("0:127.0.0.1:{nb_port}"),
        &["-v", "-o", "RekeyLimit=1M"],
    )?;
    job.allocated_port().await?;

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
    while let Some(r) = downloads.join_next().await {
        r??;
    }
    let rekeys = job
        .stderr()
        .matches("SSH2_MSG_NEWKEYS received")
        .count()
        .saturating_sub(1);
    assert!(rekeys >= 8, "only {rekeys} re-keys:\n{}", job.stderr());
    // Same session, still forwarding.
    assert_eq!(broker.metric("tunnelbot_ssh_sessions_active").await?, 1.0);
    let mut again = tokio::net::TcpStream::connect(hub_side).await?;
    let mut first = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(10), again.read_exact(&mut first)).await??;
    assert_eq!(first[1], 1);
    server.abort();
    Ok(())
}
