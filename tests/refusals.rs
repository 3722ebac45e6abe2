//! What the SSH server refuses, each with the real OpenSSH client. Where the client keeps its
//! session after a refusal, the test also proves the legitimate forward still works.

mod common;

use std::net::SocketAddr;

use common::{Issued, Ssh, TestBroker, echo, keygen, roundtrip, ssh_args, ssh_run};

async fn broker_and_tunnel(user: &str) -> anyhow::Result<(TestBroker, Issued)> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue(user, "", 600).await?;
    Ok((broker, issued))
}

/// ssh with the issued key, `extra` before the destination; returns exit code and stderr.
async fn run_with(
    broker: &TestBroker,
    issued: &Issued,
    ssh_user: &str,
    extra: &[&str],
) -> anyhow::Result<(i32, String)> {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    args.extend(ssh_args(
        broker.ssh,
        &issued.key,
        &issued.known_hosts,
        ssh_user,
    ));
    ssh_run(&args).await
}

#[tokio::test]
async fn never_issued_key_is_refused() -> anyhow::Result<()> {
    let (broker, issued) = broker_and_tunnel("alice").await?;
    let rogue = keygen(broker.dir.path(), "rogue")?;
    let mut args = vec!["-N".to_string(), "-R".into(), "0:127.0.0.1:9".into()];
    args.extend(ssh_args(
        broker.ssh,
        &rogue,
        &issued.known_hosts,
        "tunnelbot",
    ));
    let (code, err) = ssh_run(&args).await?;
    assert_eq!(code, 255);
    assert!(err.contains("Permission denied (publickey)"), "{err}");
    assert!(
        broker
            .metric("tunnelbot_auth_attempts_total{reason=\"unknown_key\",result=\"refused\"}")
            .await?
            >= 1.0
    );
    Ok(())
}

#[tokio::test]
async fn credential_under_another_ssh_user_is_refused() -> anyhow::Result<()> {
    let (broker, issued) = broker_and_tunnel("alice").await?;
    let (code, err) = run_with(&broker, &issued, "root", &["-N", "-R", "0:127.0.0.1:9"]).await?;
    assert_eq!(code, 255);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        broker
            .metric("tunnelbot_auth_attempts_total{reason=\"wrong_user\",result=\"refused\"}")
            .await?
            >= 1.0
    );
    Ok(())
}

#[tokio::test]
async fn expired_credential_is_refused() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("alice", "", 1).await?;
    broker
        .wait_tunnel(&issued.id, "expired", |t| t["state"] == "expired")
        .await?;
    let (code, err) = run_with(
        &broker,
        &issued,
        "tunnelbot",
        &["-N", "-R", "0:127.0.0.1:9"],
    )
    .await?;
    assert_eq!(code, 255);
    assert!(err.contains("Permission denied"), "{err}");
    Ok(())
}

#[tokio::test]
async fn host_key_is_pinned_by_the_known_hosts_line() -> anyhow::Result<()> {
    let (broker, issued) = broker_and_tunnel("alice").await?;
    // Another broker's known_hosts line does not match this broker's host key.
    let other = TestBroker::start("").await?;
    let other_issued = other.issue("alice", "", 600).await?;
    let mut args = vec!["-N".to_string(), "-R".into(), "0:127.0.0.1:9".into()];
    args.extend(ssh_args(
        broker.ssh,
        &issued.key,
        &other_issued.known_hosts,
        "tunnelbot",
    ));
    let (code, err) = ssh_run(&args).await?;
    assert_eq!(code, 255);
    assert!(
        err.contains("Host key verification failed")
            || err.contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn shell_exec_subsystem_pty_agent_and_x11_are_refused() -> anyhow::Result<()> {
    let (broker, issued) = broker_and_tunnel("alice").await?;
    // Each needs a session channel, which is never opened; the client gives up with 255.
    for extra in [
        vec![],           // shell
        vec!["-tt"],      // pty + shell
        vec!["-A", "-X"], // agent and X11 ride on the session channel
        vec!["-s"],       // subsystem: "sftp" follows the destination below
    ] {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(ssh_args(
            broker.ssh,
            &issued.key,
            &issued.known_hosts,
            "tunnelbot",
        ));
        if extra.contains(&"-s") {
            args.push("sftp".into());
        }
        let (code, err) = ssh_run(&args).await?;
        assert_eq!(code, 255, "{extra:?}: {err}");
        assert!(
            err.contains("administratively prohibited"),
            "{extra:?}: {err}"
        );
    }
    // exec
    let mut args = ssh_args(broker.ssh, &issued.key, &issued.known_hosts, "tunnelbot");
    args.push("id".into());
    let (code, err) = ssh_run(&args).await?;
    assert_eq!(code, 255, "{err}");
    assert!(err.contains("administratively prohibited"), "{err}");
    assert!(
        broker
            .metric("tunnelbot_refused_requests_total{kind=\"session\"}")
            .await?
            >= 5.0
    );
    Ok(())
}

#[tokio::test]
async fn local_forward_is_refused_and_the_reverse_forward_keeps_working() -> anyhow::Result<()> {
    let (broker, issued) = broker_and_tunnel("alice").await?;
    let notebook = echo("nb:").await?;
    // The target stands in for CHP's or the hub's API port on the hub.
    let chp_api = echo("chp:").await?;
    let local = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let local_port = local.local_addr()?.port();
    drop(local);
    let mut job = Ssh::reverse(
        &broker,
        &issued,
        &format!("0:127.0.0.1:{}", notebook.port),
        &["-L", &format!("{local_port}:127.0.0.1:{}", chp_api.port)],
    )?;
    job.allocated_port().await?;
    // Through -L, nothing of the hub's port comes back.
    assert!(common::carries_nothing(SocketAddr::from(([127, 0, 0, 1], local_port))).await?);
    job.wait_line("administratively prohibited").await?;
    assert!(job.running());
    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    assert_eq!(roundtrip(hub_side, b"a", 4).await?, b"nb:a");
    assert!(
        broker
            .metric("tunnelbot_refused_requests_total{kind=\"direct_tcpip\"}")
            .await?
            >= 1.0
    );
    Ok(())
}

#[tokio::test]
async fn other_ports_other_addresses_unix_sockets_and_a_second_listener_are_refused()
-> anyhow::Result<()> {
    let (broker, issued) = broker_and_tunnel("alice").await?;
    let other = broker.issue("bob", "", 600).await?;
    let notebook = echo("nb:").await?;
    let nb = notebook.port;
    let sock = broker.dir.path().join("fwd.sock");
    let refused = [
        format!("{}:127.0.0.1:{nb}", other.port), // another tunnel's port
        format!("{}:127.0.0.1:{nb}", issued.port + 1000), // outside this grant
        format!("0.0.0.0:0:127.0.0.1:{nb}"),      // non-loopback bind address
        format!("[::]:0:127.0.0.1:{nb}"),
        // Loopback, but not where the port listens: granting it would echo back a lie.
        format!("127.0.0.2:0:127.0.0.1:{nb}"),
        format!("[::1]:0:127.0.0.1:{nb}"),
        format!("{}:127.0.0.1:{nb}", sock.display()), // a Unix socket on the hub
        format!("0:localhost:{nb}"), // a second listener, same session (ssh drops exact duplicates)
    ];
    let mut extra: Vec<String> = vec!["-o".into(), "ExitOnForwardFailure=no".into()];
    for r in &refused {
        extra.push("-R".into());
        extra.push(r.clone());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let job = Ssh::reverse(&broker, &issued, &format!("0:127.0.0.1:{nb}"), &extra)?;
    assert_eq!(job.allocated_port().await?, issued.port);
    // One failure line per refused forward.
    let seen = common::eventually("ssh printed one failure per refused forward", async || {
        job.stderr().matches("forwarding failed").count() >= refused.len()
    })
    .await;
    seen.map_err(|e| e.context(format!("ssh stderr:\n{}", job.stderr())))?;
    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    assert_eq!(roundtrip(hub_side, b"k", 4).await?, b"nb:k");
    assert!(!sock.exists());
    let metric = |reason: &str| {
        format!("tunnelbot_forward_requests_total{{reason=\"{reason}\",result=\"refused\"}}")
    };
    assert!(broker.metric(&metric("wrong_port")).await? >= 2.0);
    assert!(broker.metric(&metric("not_loopback")).await? >= 4.0);
    assert!(broker.metric(&metric("unix_socket")).await? >= 1.0);
    assert!(broker.metric(&metric("already_forwarding")).await? >= 1.0);
    Ok(())
}

#[tokio::test]
async fn exit_on_forward_failure_reports_a_wrong_port_clearly() -> anyhow::Result<()> {
    let (broker, issued) = broker_and_tunnel("alice").await?;
    let (code, err) = run_with(
        &broker,
        &issued,
        "tunnelbot",
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("{}:127.0.0.1:9", issued.port + 1),
        ],
    )
    .await?;
    assert_eq!(code, 255);
    assert!(err.contains("remote port forwarding failed"), "{err}");
    Ok(())
}

#[tokio::test]
async fn password_and_keyboard_interactive_are_not_offered() -> anyhow::Result<()> {
    let (broker, issued) = broker_and_tunnel("alice").await?;
    // An askpass that would answer any prompt, so only the server's refusal can stop the login.
    let askpass = broker.dir.path().join("askpass.sh");
    std::fs::write(&askpass, "#!/bin/sh\necho hunter2\n")?;
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let mut args: Vec<String> = [
        "-N",
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "PreferredAuthentications=password,keyboard-interactive",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(ssh_args(
        broker.ssh,
        &issued.key,
        &issued.known_hosts,
        "tunnelbot",
    ));
    // ssh_args sets BatchMode=yes; a later -o cannot override it, so drop it for this run.
    let at = args
        .iter()
        .position(|a| a == "BatchMode=yes")
        .expect("BatchMode in ssh_args");
    args.drain(at - 1..=at);
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(&args)
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(common::WAIT, cmd.output()).await??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(
        err.contains("Permission denied (publickey)"),
        "only publickey may be offered: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn the_brokers_own_host_key_is_never_a_job_key() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let host_public =
        std::fs::read_to_string(broker.dir.path().join("keys/ssh_host_ed25519_key.pub"))?;
    let (status, body) = broker
        .api(
            reqwest::Method::POST,
            "/api/v1/tunnels",
            Some(serde_json::json!({"user": "mallory", "public_key": host_public.trim()})),
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("host key"), "{body}");
    Ok(())
}

#[tokio::test]
async fn compression_is_never_offered_before_login() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = TestBroker::start("").await?;
    let mut s = tokio::net::TcpStream::connect(broker.ssh).await?;
    s.write_all(b"SSH-2.0-probe\r\n").await?;
    // The server's version line, then its KEXINIT in the clear.
    let mut buf = Vec::new();
    let kexinit = tokio::time::timeout(common::WAIT, async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "closed early");
            buf.extend_from_slice(&chunk[..n]);
            let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                continue;
            };
            let packet = &buf[eol + 2..];
            if packet.len() < 4 {
                continue;
            }
            let len = u32::from_be_bytes([packet[0], packet[1], packet[2], packet[3]]) as usize;
            if packet.len() >= 4 + len {
                return Ok(packet[4..4 + len].to_vec());
            }
        }
    })
    .await??;
    // padding length, msg 20, 16-byte cookie, then ten name-lists.
    anyhow::ensure!(kexinit[1] == 20, "not a KEXINIT");
    let mut at = 2 + 16;
    let mut lists = Vec::new();
    for _ in 0..10 {
        let n = u32::from_be_bytes(kexinit[at..at + 4].try_into()?) as usize;
        lists.push(String::from_utf8(kexinit[at + 4..at + 4 + n].to_vec())?);
        at += 4 + n;
    }
    for compression in &lists[6..8] {
        assert!(
            compression
                .split(',')
                .all(|c| c == "none" || c == "zlib@openssh.com"),
            "pre-auth compression offered: {compression}"
        );
    }
    Ok(())
}
