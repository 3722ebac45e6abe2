//! One live login per credential: a copy of a live job's key is refused, a frozen session is
//! replaced, a login that holds no forward is closed, and revoke or expiry ends every login of
//! the credential, forwarding or not.

mod common;

use std::net::SocketAddr;

use common::{Ssh, TestBroker, echo, roundtrip, ssh_args};

/// `ssh -N` with no forward: a login that holds nothing.
fn idle_login(broker: &TestBroker, issued: &common::Issued) -> anyhow::Result<Ssh> {
    let mut args: Vec<String> = vec!["-N".into()];
    args.extend(ssh_args(
        broker.ssh,
        &issued.key,
        &issued.known_hosts,
        "tunnelbot",
    ));
    Ssh::spawn(&args)
}

/// Waits (bounded) until no SSH session is left on the broker.
async fn no_sessions_left(broker: &TestBroker) -> anyhow::Result<()> {
    broker
        .wait_metric_eq("tunnelbot_ssh_sessions_active", 0.0)
        .await
}

#[tokio::test]
async fn a_copy_of_a_live_jobs_key_cannot_take_its_tunnel() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("carol", "", 600).await?;
    let job_nb = echo("job:").await?;
    let thief_nb = echo("thief:").await?;
    let job = Ssh::job(&broker, &issued, job_nb.port)?;
    assert_eq!(job.allocated_port().await?, issued.port);
    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    assert_eq!(roundtrip(hub_side, b"x", 5).await?, b"job:x");

    // Whoever copied the key logs in while the job is alive: the job answers the probe, so
    // the copy is refused, however often it tries, and the tunnel stays the job's.
    for _ in 0..3 {
        let mut thief = Ssh::job(&broker, &issued, thief_nb.port)?;
        assert_eq!(thief.exit_code().await?, 255);
        assert!(
            thief
                .stderr()
                .contains("credential in use by a live session"),
            "{}",
            thief.stderr()
        );
        assert_eq!(roundtrip(hub_side, b"y", 5).await?, b"job:y");
    }
    assert_eq!(
        broker
            .metric("tunnelbot_auth_attempts_total{reason=\"in_use\",result=\"refused\"}")
            .await?,
        3.0
    );
    assert_eq!(
        broker
            .metric("tunnelbot_tunnel_revocations_total{reason=\"replaced\"}")
            .await?,
        0.0
    );
    Ok(())
}

#[tokio::test]
async fn a_frozen_session_is_replaced_by_the_jobs_next_login_on_the_same_port() -> anyhow::Result<()>
{
    // At capacity, too: the credential's own reconnect takes its holder's room.
    let broker = TestBroker::start_with("", |_, _| {
        Ok("[chp]\nenabled = false\n[limits]\nmax_sessions = 1\n".into())
    })
    .await?;
    let issued = broker.issue("carol", "", 600).await?;
    let first_nb = echo("first:").await?;
    let second_nb = echo("second:").await?;
    let mut first = Ssh::job(&broker, &issued, first_nb.port)?;
    assert_eq!(first.allocated_port().await?, issued.port);
    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    assert_eq!(roundtrip(hub_side, b"x", 7).await?, b"first:x");

    // A half-open session (the job's network went away, or the process froze) answers no
    // probe, so the job's reconnect replaces it within the probe time.
    first.signal("STOP")?;
    let second = Ssh::job(&broker, &issued, second_nb.port)?;
    assert_eq!(second.allocated_port().await?, issued.port);
    assert_eq!(roundtrip(hub_side, b"y", 8).await?, b"second:y");
    assert_eq!(
        broker
            .metric("tunnelbot_tunnel_revocations_total{reason=\"replaced\"}")
            .await?,
        1.0
    );
    // The frozen session was cut under it: when it wakes, it finds its connection gone.
    first.signal("CONT")?;
    assert_eq!(first.exit_code().await?, 255);
    Ok(())
}

#[tokio::test]
async fn revoke_ends_a_login_that_holds_no_forward_even_when_frozen() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("idle", "", 600).await?;
    let mut login = idle_login(&broker, &issued)?;
    broker
        .wait_metric(
            "tunnelbot_auth_attempts_total{reason=\"ok\",result=\"accepted\"}",
            1.0,
        )
        .await?;
    // Frozen: it can neither read the disconnect nor close its end, so the broker must cut it.
    login.signal("STOP")?;
    broker.revoke(&issued.id).await?;
    no_sessions_left(&broker).await?;
    login.signal("CONT")?;
    assert_eq!(login.exit_code().await?, 255);
    Ok(())
}

#[tokio::test]
async fn expiry_ends_a_login_that_holds_no_forward() -> anyhow::Result<()> {
    let broker = TestBroker::start_with("", |_, _| {
        Ok("[chp]\nenabled = false\n[limits]\nforward_grace = \"1h\"\n".into())
    })
    .await?;
    let issued = broker.issue("brief", "", 2).await?;
    let mut login = idle_login(&broker, &issued)?;
    assert_eq!(login.exit_code().await?, 255);
    assert!(
        login.stderr().contains("credential expired"),
        "{}",
        login.stderr()
    );
    Ok(())
}

#[tokio::test]
async fn a_login_that_asks_for_no_forward_is_closed_after_the_forward_grace() -> anyhow::Result<()>
{
    let broker = TestBroker::start_with("", |_, _| {
        Ok("[chp]\nenabled = false\n[limits]\nforward_grace = \"1s\"\n".into())
    })
    .await?;
    let issued = broker.issue("lazy", "", 600).await?;
    let mut login = idle_login(&broker, &issued)?;
    assert_eq!(login.exit_code().await?, 255);
    assert!(
        login.stderr().contains("no forward requested"),
        "{}",
        login.stderr()
    );
    assert_eq!(
        broker
            .metric("tunnelbot_ssh_connection_errors_total{kind=\"no_forward\"}")
            .await?,
        1.0
    );
    // The credential is free again: the job's real login gets its forward.
    let notebook = echo("nb:").await?;
    let job = Ssh::job(&broker, &issued, notebook.port)?;
    assert_eq!(job.allocated_port().await?, issued.port);
    Ok(())
}

#[tokio::test]
async fn an_idle_login_holds_the_credential_against_a_copy_until_it_is_closed() -> anyhow::Result<()>
{
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("hold", "", 600).await?;
    let _idle = idle_login(&broker, &issued)?;
    broker
        .wait_metric(
            "tunnelbot_auth_attempts_total{reason=\"ok\",result=\"accepted\"}",
            1.0,
        )
        .await?;
    // Fifty more logins with the same key: one credential, one session, whatever is tried.
    let mut copies = Vec::new();
    for _ in 0..50 {
        copies.push(idle_login(&broker, &issued)?);
    }
    for copy in &mut copies {
        assert_eq!(copy.exit_code().await?, 255);
    }
    no_more_than_one(&broker).await?;
    Ok(())
}

async fn no_more_than_one(broker: &TestBroker) -> anyhow::Result<()> {
    assert_eq!(broker.metric("tunnelbot_ssh_sessions_active").await?, 1.0);
    assert_eq!(
        broker
            .metric("tunnelbot_auth_attempts_total{reason=\"in_use\",result=\"refused\"}")
            .await?,
        50.0
    );
    Ok(())
}
