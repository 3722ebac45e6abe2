//! Limits that keep one client from exhausting the broker, and traffic that is not SSH at all.
//! Each limit is shown biting, with its metric, and the broker still serving a real job after.

mod common;

use std::net::SocketAddr;

use common::{Issued, Ssh, TestBroker, echo, keygen, roundtrip, ssh_args, ssh_run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn broker_with_limits(limits: &str) -> anyhow::Result<TestBroker> {
    let limits = limits.to_owned();
    TestBroker::start_with("", move |_, _| {
        Ok(format!("[chp]\nenabled = false\n[limits]\n{limits}\n"))
    })
    .await
}

/// Reads until the server closes the connection (bounded); returns what it sent.
async fn read_until_closed(s: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut all = Vec::new();
    tokio::time::timeout(common::WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await?;
    Ok(all)
}

/// A real job still gets its tunnel: the broker survived whatever came before.
async fn job_still_works(broker: &TestBroker) -> anyhow::Result<()> {
    let issued = broker.issue("after", "", 600).await?;
    let notebook = echo("ok:").await?;
    let job = Ssh::job(broker, &issued, notebook.port)?;
    assert_eq!(job.allocated_port().await?, issued.port);
    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    assert_eq!(roundtrip(hub_side, b"1", 4).await?, b"ok:1");
    Ok(())
}

#[tokio::test]
async fn a_client_that_says_nothing_is_dropped_after_the_login_grace() -> anyhow::Result<()> {
    let broker = broker_with_limits("login_grace = \"1s\"").await?;
    let mut silent = TcpStream::connect(broker.ssh).await?;
    let got = read_until_closed(&mut silent).await?;
    assert!(
        got.starts_with(b"SSH-2.0-"),
        "the server speaks first, then gives up"
    );
    // Half a handshake (a version line, then nothing) is dropped the same way.
    let mut half = TcpStream::connect(broker.ssh).await?;
    half.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await?;
    read_until_closed(&mut half).await?;
    assert!(
        broker
            .metric("tunnelbot_ssh_connection_errors_total{kind=\"login_timeout\"}")
            .await?
            >= 2.0
    );
    job_still_works(&broker).await
}

#[tokio::test]
async fn garbage_and_a_huge_packet_length_drop_only_that_connection() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let mut garbage = TcpStream::connect(broker.ssh).await?;
    garbage
        .write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(4096))
        .await?;
    read_until_closed(&mut garbage).await?;

    // A valid version line, then a binary packet claiming 4 GiB.
    let mut huge = TcpStream::connect(broker.ssh).await?;
    huge.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await?;
    huge.write_all(&[0xff, 0xff, 0xff, 0xff, 0x0a, 0x14])
        .await?;
    huge.write_all(&[0u8; 64]).await?;
    read_until_closed(&mut huge).await?;

    let errors = broker
        .metric("tunnelbot_ssh_connection_errors_total{kind=\"handshake\"}")
        .await?
        + broker
            .metric("tunnelbot_ssh_connection_errors_total{kind=\"session\"}")
            .await?;
    assert!(
        errors >= 2.0,
        "both bad connections are counted, got {errors}"
    );
    job_still_works(&broker).await
}

#[tokio::test]
async fn handshakes_beyond_max_startups_wait_their_turn() -> anyhow::Result<()> {
    let broker = broker_with_limits("max_startups = 1").await?;
    // A silent client holds the only handshake slot (the server speaks once it has one)...
    let mut silent = TcpStream::connect(broker.ssh).await?;
    let mut first = [0u8; 8];
    silent.read_exact(&mut first).await?;
    // ...so this job queues instead of failing...
    let issued = broker.issue("patient", "", 600).await?;
    let notebook = echo("").await?;
    let job = Ssh::job(&broker, &issued, notebook.port)?;
    broker
        .wait_metric("tunnelbot_ssh_startups_waiting", 1.0)
        .await?;
    // ...and logs in and forwards once the slot frees.
    drop(silent);
    assert_eq!(job.allocated_port().await?, issued.port);
    assert_eq!(broker.metric("tunnelbot_ssh_startups_waiting").await?, 0.0);
    Ok(())
}

#[tokio::test]
async fn logins_beyond_max_sessions_are_refused_and_waiting_connections_do_not_count()
-> anyhow::Result<()> {
    let broker = broker_with_limits("max_sessions = 1").await?;
    // Connections that never log in use no logged-in room...
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(TcpStream::connect(broker.ssh).await?);
    }
    let issued = broker.issue("only", "", 600).await?;
    let notebook = echo("").await?;
    let job = Ssh::job(&broker, &issued, notebook.port)?;
    assert_eq!(job.allocated_port().await?, issued.port);
    // ...while a second credential's login finds the room taken.
    let other = broker.issue("second", "", 600).await?;
    let mut late = Ssh::job(&broker, &other, notebook.port)?;
    assert_eq!(late.exit_code().await?, 255);
    assert!(
        late.stderr().contains("broker at capacity"),
        "{}",
        late.stderr()
    );
    assert_eq!(
        broker
            .metric("tunnelbot_auth_attempts_total{reason=\"over_capacity\",result=\"refused\"}")
            .await?,
        1.0
    );
    Ok(())
}

#[tokio::test]
async fn failures_from_a_shared_source_never_turn_its_valid_jobs_away() -> anyhow::Result<()> {
    let broker = broker_with_limits("auth_failures_per_minute = 2").await?;
    let issued = broker.issue("victim", "", 600).await?;
    let rogue = keygen(broker.dir.path(), "rogue")?;
    let mut args = vec!["-N".to_string(), "-R".into(), "0:127.0.0.1:9".into()];
    args.extend(ssh_args(
        broker.ssh,
        &rogue,
        &issued.known_hosts,
        "tunnelbot",
    ));
    // Another client behind the same address (a NAT gateway, a ProxyJump host) fails often...
    for _ in 0..6 {
        let (code, err) = ssh_run(&args).await?;
        assert_eq!(code, 255);
        assert!(err.contains("Permission denied"), "{err}");
    }
    // ...which is reported once for the minute...
    assert_eq!(
        broker
            .metric("tunnelbot_ssh_connection_errors_total{kind=\"rate_limited\"}")
            .await?,
        1.0
    );
    // ...and costs the job behind the same address nothing.
    let notebook = echo("ok:").await?;
    let job = Ssh::job(&broker, &issued, notebook.port)?;
    assert_eq!(job.allocated_port().await?, issued.port);
    Ok(())
}

#[tokio::test]
async fn idle_connections_from_the_jobs_own_address_cannot_keep_it_out() -> anyhow::Result<()> {
    // Before logged-in sessions were bounded apart, fifty silent connections held a room of
    // eight and turned every job away.
    let broker = broker_with_limits("max_sessions = 8\nmax_unauthenticated_per_source = 8").await?;
    // A flood of silent connections from the address the job dials from...
    let mut flood = Vec::new();
    for _ in 0..50 {
        flood.push(TcpStream::connect(broker.ssh).await?);
    }
    // ...keeps at most eight of them, and the job gets in.
    job_still_works(&broker).await?;
    assert!(
        broker
            .metric("tunnelbot_ssh_connection_errors_total{kind=\"evicted\"}")
            .await?
            >= 42.0
    );
    drop(flood);
    job_still_works(&broker).await
}

#[tokio::test]
async fn idle_connections_from_many_addresses_cannot_keep_a_job_out() -> anyhow::Result<()> {
    let broker = broker_with_limits("max_sessions = 16\nmax_unauthenticated = 16").await?;
    let mut flood = Vec::new();
    for i in 0..64u8 {
        // Other loopback addresses stand in for many hosts.
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::from(([127, 0, 1, 1 + i % 32], 0)))?;
        flood.push(sock.connect(broker.ssh).await?);
    }
    job_still_works(&broker).await?;
    drop(flood);
    job_still_works(&broker).await
}

#[tokio::test]
async fn a_tunnel_carries_at_most_its_connection_cap() -> anyhow::Result<()> {
    let broker = broker_with_limits("max_connections_per_tunnel = 2").await?;
    let issued: Issued = broker.issue("busy", "", 600).await?;
    let notebook = echo("e:").await?;
    let job = Ssh::job(&broker, &issued, notebook.port)?;
    job.allocated_port().await?;
    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    // Two long-lived connections, proven carried...
    let mut held = Vec::new();
    for i in 0..2u8 {
        let mut s = TcpStream::connect(hub_side).await?;
        s.write_all(&[b'a' + i]).await?;
        let mut got = [0u8; 3];
        tokio::time::timeout(common::WAIT, s.read_exact(&mut got)).await??;
        held.push(s);
    }
    // ...and the third is closed.
    assert!(common::carries_nothing(hub_side).await?);
    assert!(
        broker
            .metric("tunnelbot_forwarded_connections_refused_total{reason=\"over_capacity\"}")
            .await?
            >= 1.0
    );
    drop(held);
    // Once they end, the tunnel carries again.
    broker
        .wait_metric_eq("tunnelbot_forwarded_connections_active", 0.0)
        .await?;
    assert_eq!(roundtrip(hub_side, b"z", 3).await?, b"e:z");
    Ok(())
}
