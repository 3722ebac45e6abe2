//! The `tunnelbot` binary as an admin runs it: config checks, the CLI, and a SIGKILL restart.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use common::{Issued, Ssh, echo, roundtrip};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tunnelbot");

fn check(config_text: &str) -> anyhow::Result<(i32, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config_text)?;
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn check_accepts_the_example_and_refuses_bad_configs_with_64() -> anyhow::Result<()> {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/tunnelbot.example.toml"
    ))?;
    assert_eq!(check(&example)?.0, 0);
    for (text, needle) in [
        ("[ssh]\nlisten_adress = \"0.0.0.0:22\"\n", "unknown field"),
        ("[tunnels]\nports = \"30000-20000\"\n", "empty"),
        ("[admin]\nlisten = \"0.0.0.0:8090\"\n", "allow_non_loopback"),
        ("[tunnels]\nmax_ttl = \"forever\"\n", "max_ttl"),
        ("this is not toml", "in config"),
    ] {
        let (code, err) = check(text)?;
        assert_eq!(code, 64, "{text}: {err}");
        assert!(err.contains(needle), "{text}: {err}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--check", "--config", "/nonexistent/tb.toml"])
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    Ok(())
}

fn cli(config: &Path, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn cli_issue_list_revoke_and_state_survives_sigkill() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ip = common::unique_loopback();
    let text = common::base_config(dir.path(), ip, "")
        + "[chp]\nenabled = false\n"
        + common::PROCESS_LIMITS;
    let config = dir.path().join("tb.toml");
    std::fs::write(&config, text)?;
    let broker = common::BrokerProcess::start(dir.path(), &config).await?;
    let url = format!("http://{}", broker.admin);

    let (code, out, err) = cli(
        &config,
        &[
            "issue",
            "--user",
            "alice",
            "--ttl",
            "2h",
            "--json",
            "--admin-url",
            &url,
        ],
    )?;
    assert_eq!(code, 0, "{err}");
    let issued = Issued::write(serde_json::from_str(&out)?, dir.path())?;
    let (code, out, err) = cli(
        &config,
        &[
            "issue",
            "--user",
            "bob",
            "--server",
            "gpu",
            "--admin-url",
            &url,
        ],
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("port") && !out.contains("PRIVATE KEY"),
        "{out}"
    );
    let bob_id = out
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .context("id")?
        .to_owned();
    let (code, out, _) = cli(&config, &["list", "--admin-url", &url])?;
    assert_eq!(code, 0);
    assert!(
        out.contains(&issued.id) && out.contains(&bob_id) && out.contains("alice"),
        "{out}"
    );
    let (code, out, err) = cli(&config, &["revoke", &bob_id, "--admin-url", &url])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"));
    let (code, _, err) = cli(&config, &["revoke", "tb_unknown", "--admin-url", &url])?;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");

    let notebook = echo("nb:").await?;
    let job_args = |ssh| common::job_args(ssh, &issued.key, &issued.known_hosts, notebook.port);
    let job = Ssh::spawn(&job_args(broker.ssh))?;
    assert_eq!(job.allocated_port().await?, issued.port);

    // SIGKILL: no chance to save anything at exit.
    let (ssh_before, mut broker) = (broker.ssh, broker);
    broker.kill().await?;
    drop(job);
    let restarted = common::BrokerProcess::start(dir.path(), &config).await?;
    // A child cannot be handed its listener, so the SSH port moved; the host key must not have.
    assert_ne!(ssh_before.port(), 0);
    let out = cli(
        &config,
        &[
            "list",
            "--json",
            "--admin-url",
            &format!("http://{}", restarted.admin),
        ],
    )?
    .1;
    let list: Value = serde_json::from_str(&out)?;
    let line = list[0]["known_hosts"].as_str().context("known_hosts")?;
    let key_part = |l: &str| l.split_once(' ').map(|(_, k)| k.to_owned());
    assert_eq!(
        key_part(line),
        key_part(issued.json["known_hosts"].as_str().context("kh")?)
    );
    std::fs::write(&issued.known_hosts, format!("{line}\n"))?;
    let job = Ssh::spawn(&job_args(restarted.ssh))?;
    assert_eq!(
        job.allocated_port().await?,
        issued.port,
        "same port after a crash"
    );
    assert_eq!(
        roundtrip(SocketAddr::new(ip, issued.port), b"q", 4).await?,
        b"nb:q"
    );
    // The revocation survived too (`list` was read right after the restart).
    let bob = list
        .as_array()
        .context("list")?
        .iter()
        .find(|t| t["id"] == bob_id.as_str())
        .context("bob kept")?;
    assert_eq!(bob["state"], "revoked");
    Ok(())
}

/// `tunnelbot serve` under `ulimit -n 256` (soft and hard): a config whose limits need more
/// descriptors exits 64 and names the numbers to lower; one that fits starts and is ready.
#[tokio::test]
async fn serve_refuses_a_config_that_cannot_fit_the_descriptor_limit() -> anyhow::Result<()> {
    let serve_limited = |dir: &Path, limits: &str| -> anyhow::Result<tokio::process::Child> {
        let ip = common::unique_loopback();
        let config = dir.join("tb.toml");
        std::fs::write(
            &config,
            common::base_config(dir, ip, limits) + "[chp]\nenabled = false\n",
        )?;
        // bash's `ulimit -n` sets both limits, so the broker cannot raise past 256.
        Ok(tokio::process::Command::new("bash")
            .args(["-c", "ulimit -n 256 && exec \"$@\"", "bash", BIN, "serve"])
            .arg("--config")
            .arg(&config)
            .arg("--ready-file")
            .arg(dir.join("ready.json"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?)
    };

    // The default limits (5000 ports, as many sessions, ...) cannot fit in 256.
    let dir = tempfile::tempdir()?;
    let child = serve_limited(dir.path(), "")?;
    let out = tokio::time::timeout(common::WAIT, child.wait_with_output()).await??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for part in [
        "file descriptors",
        "only 256",
        "tunnels.ports 5000",
        "limits.max_sessions 5000",
        "limits.max_unauthenticated 2048",
        "admin.max_connections 64",
    ] {
        assert!(err.contains(part), "{part:?} not in: {err}");
    }
    assert!(!dir.path().join("ready.json").exists());

    // 10 ports + 10 sessions (one per port at most) + 16 unauthenticated + 64 admin + 64
    // reserved = 164: it starts.
    let dir = tempfile::tempdir()?;
    let mut child = serve_limited(
        dir.path(),
        "ports = \"20000-20009\"\n[limits]\nmax_sessions = 50\nmax_startups = 16\nmax_unauthenticated = 16\n",
    )?;
    let ready = dir.path().join("ready.json");
    let exited = common::eventually("it is ready or has exited", async || {
        if ready.exists() {
            return anyhow::Ok(Some(None));
        }
        Ok(child.try_wait()?.map(Some))
    })
    .await?;
    if let Some(status) = exited {
        let out = child.wait_with_output().await?;
        anyhow::bail!(
            "exited early: {status}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.kill().await?;
    Ok(())
}
