//! What an operator sees: metrics that move with real traffic, JSON audit lines, readiness,
//! `tunnelbot status`, and no secret in any log line.

mod common;

use std::net::SocketAddr;

use common::{
    BrokerProcess, Issued, Ssh, TestBroker, echo, eventually, keygen, roundtrip, ssh_args, ssh_run,
};
use serde_json::Value;

#[tokio::test]
async fn counters_move_as_the_real_client_connects_is_refused_transfers_and_leaves()
-> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let m = |s: &str| s.to_owned();
    assert_eq!(
        broker
            .metric("tunnelbot_auth_attempts_total{reason=\"unknown_key\",result=\"refused\"}")
            .await?,
        0.0
    );
    assert_eq!(
        broker
            .metric("tunnelbot_build_info{version=\"0.1.0\"}")
            .await?,
        1.0
    );
    assert_eq!(broker.metric("tunnelbot_ports_total").await?, 5000.0);
    let issued = broker.issue("alice", "", 600).await?;
    assert_eq!(broker.metric("tunnelbot_ports_free").await?, 4999.0);

    let rogue = keygen(broker.dir.path(), "rogue")?;
    let mut args = vec![m("-N"), m("-R"), m("0:127.0.0.1:9")];
    args.extend(ssh_args(
        broker.ssh,
        &rogue,
        &issued.known_hosts,
        "tunnelbot",
    ));
    assert_eq!(ssh_run(&args).await?.0, 255);
    assert_eq!(
        broker
            .metric("tunnelbot_auth_attempts_total{reason=\"unknown_key\",result=\"refused\"}")
            .await?,
        1.0
    );

    let notebook = echo("").await?;
    let mut job = Ssh::job(&broker, &issued, notebook.port)?;
    job.allocated_port().await?;
    assert_eq!(
        broker
            .metric("tunnelbot_auth_attempts_total{reason=\"ok\",result=\"accepted\"}")
            .await?,
        1.0
    );
    assert_eq!(
        broker
            .metric("tunnelbot_forward_requests_total{reason=\"ok\",result=\"granted\"}")
            .await?,
        1.0
    );
    assert_eq!(broker.metric("tunnelbot_tunnels_connected").await?, 1.0);
    assert_eq!(broker.metric("tunnelbot_ssh_sessions_active").await?, 1.0);
    assert_eq!(
        broker
            .metric("tunnelbot_handshake_duration_seconds_count")
            .await?,
        1.0
    );

    let payload = vec![1u8; 50_000];
    roundtrip(
        SocketAddr::new(broker.tunnel_ip, issued.port),
        &payload,
        payload.len(),
    )
    .await?;
    assert_eq!(
        broker
            .metric("tunnelbot_forwarded_connections_total")
            .await?,
        1.0
    );
    // The byte counters are bumped as data moves; poll until the echo has gone both ways.
    broker
        .wait_metric(
            "tunnelbot_forwarded_bytes_total{direction=\"from_job\"}",
            50_000.0,
        )
        .await?;
    assert_eq!(
        broker
            .metric("tunnelbot_forwarded_bytes_total{direction=\"to_job\"}")
            .await?,
        50_000.0
    );

    job.child.kill().await?;
    broker
        .wait_tunnel(&issued.id, "disconnected", |t| t["connected"] == false)
        .await?;
    broker
        .wait_metric_eq("tunnelbot_ssh_sessions_active", 0.0)
        .await?;
    assert_eq!(broker.metric("tunnelbot_tunnels_connected").await?, 0.0);
    assert_eq!(broker.revoke(&issued.id).await?, 204);
    assert_eq!(
        broker
            .metric("tunnelbot_tunnel_revocations_total{reason=\"revoked\"}")
            .await?,
        1.0
    );
    Ok(())
}

/// Readiness through `run` and a real SIGTERM: `/readyz` answers 200 while the broker serves and
/// 503 once the drain has begun, while `/healthz` stays 200; then the process exits cleanly. A
/// frozen job holds the drain open for a while: it never answers "broker shutting down", so its
/// session lasts until the broker cuts it.
#[tokio::test]
async fn sigterm_turns_readyz_503_for_the_drain_and_the_process_then_exits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("tb.toml");
    let text = common::base_config(dir.path(), common::unique_loopback(), "")
        + "[chp]\nenabled = false\n"
        + common::PROCESS_LIMITS;
    std::fs::write(&config, text)?;
    let mut broker = BrokerProcess::start(dir.path(), &config).await?;
    assert_eq!(broker.status_of("/readyz").await?, 200);

    let issued = broker.issue("dora").await?;
    let notebook = echo("").await?;
    let args = common::job_args(broker.ssh, &issued.key, &issued.known_hosts, notebook.port);
    let job = Ssh::spawn(&args)?;
    job.allocated_port().await?;
    broker.wait_connected(1).await?;
    job.signal("STOP")?;

    broker.signal("TERM")?;
    // A probe that cannot connect fails the wait at once: the admin API must outlive the drain.
    eventually("/readyz answers 503", async || {
        anyhow::Ok(broker.status_of("/readyz").await? == 503)
    })
    .await?;
    assert_eq!(
        broker.status_of("/healthz").await?,
        200,
        "alive while draining"
    );
    let exit = broker.wait_exit().await?;
    assert!(exit.success(), "{exit}\n{}", broker.log_text());
    let log = broker.log_text();
    assert!(
        log.contains("tunnel listeners closed") && log.contains("stopped"),
        "{log}"
    );
    Ok(())
}

/// Runs the binary with JSON logs through a whole tunnel life; returns the log lines.
async fn json_log_of_a_full_run() -> anyhow::Result<(Vec<Value>, String, Issued, String)> {
    let dir = tempfile::tempdir()?;
    let ip = common::unique_loopback();
    let config = dir.path().join("tb.toml");
    std::fs::write(
        &config,
        common::base_config(dir.path(), ip, "")
            + "[chp]\nenabled = false\n"
            + common::PROCESS_LIMITS,
    )?;
    let mut command = BrokerProcess::command();
    command.args(["--log-format", "json"]);
    let mut broker = BrokerProcess::start_via(dir.path(), &config, command).await?;
    let issued = broker
        .issue_body(serde_json::json!({"user": "alice", "server_name": "lab"}))
        .await?;
    let notebook = echo("").await?;
    let args = common::job_args(broker.ssh, &issued.key, &issued.known_hosts, notebook.port);
    let mut job = Ssh::spawn(&args)?;
    job.allocated_port().await?;
    roundtrip(SocketAddr::new(ip, issued.port), b"hello", 5).await?;
    job.child.kill().await?;
    job.exit_code().await?;
    eventually("the tunnel is disconnected", async || {
        anyhow::Ok(broker.tunnel(&issued.id).await?["connected"] == false)
    })
    .await?;
    assert_eq!(broker.revoke(&issued.id).await?, 204);
    // SIGTERM, so the log ends with an orderly shutdown.
    broker.terminate().await?;
    let text = broker.log_text();
    let lines = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<Value>, _>>()?;
    Ok((lines, text, issued, broker.token.clone()))
}

#[tokio::test]
async fn every_audit_event_is_one_parseable_json_line_and_no_secret_is_logged() -> anyhow::Result<()>
{
    let (lines, text, issued, token) = json_log_of_a_full_run().await?;
    let audit: Vec<&Value> = lines.iter().filter(|l| l["target"] == "audit").collect();
    let event = |name: &str| -> anyhow::Result<&Value> {
        audit
            .iter()
            .copied()
            .find(|l| l["event"] == name)
            .ok_or_else(|| anyhow::anyhow!("no {name} audit line in:\n{text}"))
    };
    let fp = issued.json["fingerprint"].as_str().unwrap_or_default();
    let issue = event("issue")?;
    assert_eq!(
        (
            issue["tunnel"].as_str(),
            issue["user"].as_str(),
            issue["server"].as_str()
        ),
        (Some(issued.id.as_str()), Some("alice"), Some("lab"))
    );
    assert_eq!(issue["fingerprint"], fp);
    assert_eq!(issue["port"], issued.port);
    let connect = event("connect")?;
    assert_eq!(connect["fingerprint"], fp);
    assert!(
        connect["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    );
    assert_eq!(connect["tunnel"], issued.id.as_str());
    assert_eq!(event("forward_granted")?["port"], issued.port);
    let bye = event("disconnect")?;
    assert_eq!(bye["bytes_to_job"], 5);
    assert_eq!(bye["bytes_from_job"], 5);
    assert!(bye["seconds"].is_u64());
    assert_eq!(event("revoked")?["tunnel"], issued.id.as_str());

    // The private key (any line of its base64 body) and the admin token appear nowhere.
    let pem = issued.json["private_key"].as_str().unwrap_or_default();
    for line in pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 20)
    {
        assert!(!text.contains(line), "private key material in the log");
    }
    assert!(!text.contains(&token), "admin token in the log");
    Ok(())
}

#[tokio::test]
async fn status_shows_live_tunnels_and_health() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("alice", "gpu", 600).await?;
    let notebook = echo("").await?;
    let job = Ssh::job(&broker, &issued, notebook.port)?;
    job.allocated_port().await?;
    let config = broker.dir.path().join("tb.toml");
    std::fs::write(
        &config,
        format!("keys_dir = {:?}\n", broker.dir.path().join("keys")),
    )?;
    let url = format!("http://{}", broker.admin);
    // An async child: the broker answering it runs on this same test runtime.
    let run = |json: bool| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tunnelbot"));
        cmd.arg("--config")
            .arg(&config)
            .args(["status", "--admin-url", &url]);
        if json {
            cmd.arg("--json");
        }
        async move {
            let out = tokio::time::timeout(common::WAIT, cmd.output()).await??;
            anyhow::ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            anyhow::Ok(String::from_utf8(out.stdout)?)
        }
    };
    let text = run(false).await?;
    assert!(
        text.contains("ready") && text.contains("1 active, 1 connected"),
        "{text}"
    );
    assert!(
        text.contains("alice") && text.contains("gpu") && text.contains(&issued.port.to_string()),
        "{text}"
    );
    let v: Value = serde_json::from_str(&run(true).await?)?;
    assert_eq!(v["ready"], true);
    assert_eq!(v["tunnels"][0]["connected"], true);
    assert_eq!(v["tunnels"][0]["route"], "disabled");
    Ok(())
}
