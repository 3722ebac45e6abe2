//! What an operator sees: metrics that move with real traffic, JSON audit lines, readiness,
//! `tunnelbot status`, and no secret in any log line.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::{Issued, Ssh, TestBroker, echo, keygen, roundtrip, ssh_args, ssh_run};
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
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while broker
        .metric("tunnelbot_forwarded_bytes_total{direction=\"from_job\"}")
        .await?
        < 50_000.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "from_job bytes never counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
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
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while broker.metric("tunnelbot_ssh_sessions_active").await? != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "session gauge never went back to 0"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
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

#[tokio::test]
async fn readyz_follows_the_readiness_latch_while_healthz_stays_ok() -> anyhow::Result<()> {
    // A broker that is loaded but not yet serving: the admin app says "not ready".
    let dir = tempfile::tempdir()?;
    let text =
        common::base_config(dir.path(), common::unique_loopback(), "") + "[chp]\nenabled = false\n";
    let config = tunnelbot::Config::parse(&text)?;
    let listeners = tunnelbot::Listeners::bind(&config).await?;
    let broker = tunnelbot::open(config, listeners.ssh_addr()?).await?;
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let app = tunnelbot::admin::router(tunnelbot::admin::AdminState {
        broker,
        ready: ready.clone(),
    });
    let admin = listeners.admin_addr()?;
    let server = tokio::spawn(axum::serve(listeners.admin, app).into_future());
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let http = http.clone();
        async move {
            anyhow::Ok(
                http.get(format!("http://{admin}{path}"))
                    .send()
                    .await?
                    .status()
                    .as_u16(),
            )
        }
    };
    assert_eq!(status("/readyz").await?, 503);
    assert_eq!(status("/healthz").await?, 200);
    ready.store(true, std::sync::atomic::Ordering::Release);
    assert_eq!(status("/readyz").await?, 200);
    server.abort();
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
    let ready = dir.path().join("ready.json");
    let log = dir.path().join("broker.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tunnelbot"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let deadline = std::time::Instant::now() + common::WAIT;
    while !ready.exists() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "broker not ready");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let addrs: Value = serde_json::from_str(&std::fs::read_to_string(&ready)?)?;
    let admin = addrs["admin"].as_str().unwrap_or_default().to_owned();
    let ssh: SocketAddr = addrs["ssh"].as_str().unwrap_or_default().parse()?;
    let token = std::fs::read_to_string(dir.path().join("keys/admin.token"))?
        .trim()
        .to_owned();
    let http = reqwest::Client::new();
    let v: Value = http
        .post(format!("http://{admin}/api/v1/tunnels"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"user": "alice", "server_name": "lab"}))
        .send()
        .await?
        .json()
        .await?;
    let issued = Issued::write(v, dir.path())?;
    let notebook = echo("").await?;
    let args = common::job_args(ssh, &issued.key, &issued.known_hosts, notebook.port);
    let mut job = Ssh::spawn(&args)?;
    job.allocated_port().await?;
    roundtrip(SocketAddr::new(ip, issued.port), b"hello", 5).await?;
    job.child.kill().await?;
    job.exit_code().await?;
    let gone = |t: &Value| t["connected"] == false;
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let t: Value = http
            .get(format!("http://{admin}/api/v1/tunnels/{}", issued.id))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        if gone(&t) {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "never disconnected");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    http.delete(format!("http://{admin}/api/v1/tunnels/{}", issued.id))
        .bearer_auth(&token)
        .send()
        .await?;
    // SIGTERM, so the log ends with an orderly shutdown.
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    let _ = tokio::task::spawn_blocking(move || child.wait()).await?;
    let text = std::fs::read_to_string(&log)?;
    let lines = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<Value>, _>>()?;
    Ok((lines, text, issued, token))
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
