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
