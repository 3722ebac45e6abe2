//! The SSH server settings in `ssh::server_config`, each tested for what it protects. A mutation
//! run found every one of them could be deleted with all other tests passing (docs/benchmark.md,
//! "Mutation testing of the trust path"):
//! - keepalive interval and max: a frozen job is dropped after max+1 unanswered probes;
//! - inactivity timeout: a session whose peer went silent ends even with probes left;
//! - max auth attempts: one connection cannot try keys without end;
//! - auth rejection time: a refused key is answered no sooner than the padding;
//! - nodelay: the accepted socket has Nagle off, so small tunnel writes are not held back.
//!
//! The re-key limits are tested with the russh patch that makes them configurable. Times are
//! asserted as lower bounds only: a loaded machine makes things late, never early.

mod common;

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{BrokerProcess, Ssh, TestBroker, echo, eventually, job_args, keygen, ssh_args};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A whole broker config with `ssh` added to its `[ssh]` table.
fn config_text(dir: &Path, tunnel_ip: std::net::IpAddr, ssh: &str) -> String {
    format!(
        "keys_dir = {keys:?}\nstate_dir = {state:?}\n\
         [ssh]\nlisten = \"127.0.0.1:0\"\n{ssh}\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [tunnels]\nbind_address = \"{tunnel_ip}\"\n\
         [chp]\nenabled = false\n{limits}",
        keys = dir.join("keys"),
        state = dir.join("state"),
        limits = common::PROCESS_LIMITS,
    )
}

/// The broker binary with `ssh` settings and debug logs from tunnelbot, where the reason a
/// session ended is written ("session ended with an error", with russh's error).
/// Also returns the address its tunnels listen on.
async fn process_broker(
    ssh: &str,
) -> anyhow::Result<(tempfile::TempDir, BrokerProcess, std::net::IpAddr)> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("tb.toml");
    let tunnel_ip = common::unique_loopback();
    std::fs::write(&config, config_text(dir.path(), tunnel_ip, ssh))?;
    let env = [("RUST_LOG", "info,russh=warn,tunnelbot=debug")];
    let broker = BrokerProcess::start_env(dir.path(), &config, &env).await?;
    Ok((dir, broker, tunnel_ip))
}

/// A connected job, then frozen (SIGSTOP: it answers nothing, not even keepalives); returns
/// the job and the moment it froze.
async fn frozen_job(broker: &BrokerProcess) -> anyhow::Result<(Ssh, Instant, common::Echo)> {
    let issued = broker.issue("frida").await?;
    let notebook = echo("").await?;
    let args = job_args(broker.ssh, &issued.key, &issued.known_hosts, notebook.port);
    let job = Ssh::spawn(&args)?;
    job.allocated_port().await?;
    broker.wait_connected(1).await?;
    let frozen = Instant::now();
    job.signal("STOP")?;
    Ok((job, frozen, notebook))
}

#[tokio::test]
async fn keepalives_drop_a_frozen_job_after_max_plus_one_unanswered_probes() -> anyhow::Result<()> {
    // Probes every second, 5 may go unanswered: the 6th unanswered one drops the session 5-6 s
    // after the freeze. russh's own default (3) would drop it sooner, and the inactivity timeout
    // (8 intervals) later and with another reason.
    let (_dir, broker, _) =
        process_broker("keepalive_interval = \"1s\"\nkeepalive_max = 5").await?;
    let (_job, frozen, _notebook) = frozen_job(&broker).await?;
    eventually("the broker drops the frozen job", async || {
        broker.log_text().contains("session ended with an error")
    })
    .await?;
    let took = frozen.elapsed();
    let log = broker.log_text();
    assert!(log.contains("Keepalive timeout"), "{log}");
    // The last answered probe may have gone out up to one interval before the freeze, and one
    // sent just before it may go unanswered: at least 5 intervals less a little.
    assert!(
        took >= Duration::from_millis(4500),
        "dropped {took:?} after the freeze: fewer than 5 unanswered probes were allowed"
    );
    broker.wait_connected(0).await?;
    Ok(())
}

#[tokio::test]
async fn the_inactivity_timeout_ends_a_session_whose_peer_went_silent_mid_write()
-> anyhow::Result<()> {
    // So many probes allowed that keepalives alone would take 250 s: only the inactivity timeout
    // (8 intervals = 2 s) can end this session within the test.
    let (_dir, broker, tunnel_ip) =
        process_broker("keepalive_interval = \"250ms\"\nkeepalive_max = 1000").await?;
    let issued = broker.issue("ines").await?;
    let notebook = echo("").await?;
    let args = job_args(broker.ssh, &issued.key, &issued.known_hosts, notebook.port);
    let job = Ssh::spawn(&args)?;
    let port = job.allocated_port().await?;
    broker.wait_connected(1).await?;
    let frozen = Instant::now();
    job.signal("STOP")?;
    // A hub client writing into the tunnel: the broker now has writes for a peer that reads
    // nothing.
    let hub_side = SocketAddr::new(tunnel_ip, port);
    let uploader = tokio::spawn(async move {
        if let Ok(mut up) = TcpStream::connect(hub_side).await {
            let chunk = vec![b'u'; 64 * 1024];
            while up.write_all(&chunk).await.is_ok() {}
        }
    });
    eventually("the broker ends the silent session", async || {
        broker.log_text().contains("session ended with an error")
    })
    .await?;
    let took = frozen.elapsed();
    uploader.abort();
    let log = broker.log_text();
    assert!(log.contains("Inactivity timeout"), "{log}");
    // Silence is counted from the last thing the job sent, at most one probe before the freeze.
    assert!(
        took >= Duration::from_millis(1750),
        "ended {took:?} after the freeze: sooner than 8 keepalive intervals"
    );
    Ok(())
}

#[tokio::test]
async fn more_keys_than_max_auth_attempts_are_disconnected() -> anyhow::Result<()> {
    let broker =
        TestBroker::start_text(|dir, ip| Ok(config_text(dir, ip, "max_auth_attempts = 2"))).await?;
    // A real tunnel only for its known_hosts (the host check must pass to reach the login).
    let issued = broker.issue("mallory", "", 600).await?;
    let dir = broker.dir.path();
    let keys = ["k1", "k2", "k3", "k4"]
        .iter()
        .map(|k| keygen(dir, k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut args: Vec<String> = Vec::new();
    for k in &keys[1..] {
        args.extend(["-i".into(), k.display().to_string()]);
    }
    args.extend(ssh_args(
        broker.ssh,
        &keys[0],
        &issued.known_hosts,
        "tunnelbot",
    ));
    let (code, stderr) = common::ssh_run(&args).await?;
    assert_eq!(code, 255, "{stderr}");
    assert!(
        stderr.contains("Too many authentication attempts"),
        "not cut after 2 refused keys:\n{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn a_refused_key_is_answered_no_sooner_than_the_rejection_time() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("oscar", "", 600).await?;
    let stranger = keygen(broker.dir.path(), "stranger")?;
    let args = ssh_args(broker.ssh, &stranger, &issued.known_hosts, "tunnelbot");
    let started = Instant::now();
    let (code, stderr) = common::ssh_run(&args).await?;
    let took = started.elapsed();
    assert_eq!(code, 255, "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    // The refusal is padded to 1 s, so timing cannot tell a near-miss from a stranger.
    assert!(
        took >= Duration::from_secs(1),
        "refused after {took:?}: the 1 s rejection padding is gone"
    );
    Ok(())
}

#[tokio::test]
async fn the_accepted_ssh_socket_has_nagle_off() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let client = TcpStream::connect(broker.ssh).await?;
    let ours = client.local_addr()?;
    // The broker runs in this process, so its end of the connection is one of our descriptors:
    // the socket whose local address is the SSH listener's and whose peer is `client`.
    let nodelay = eventually("the broker has accepted the connection", async || {
        accepted_nodelay(broker.ssh, ours)
    })
    .await?;
    assert!(nodelay, "TCP_NODELAY is off on the broker's side");
    drop(client);
    Ok(())
}

/// TCP_NODELAY of this process's socket from `local` to `peer`, when there is one.
fn accepted_nodelay(local: SocketAddr, peer: SocketAddr) -> anyhow::Result<Option<bool>> {
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: only read through, for this one call; if the descriptor was closed and its
        // number reused meanwhile, the address check below rejects whatever it now names, and
        // getsockopt on a wrong descriptor reads nothing of anyone else's.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let addrs = (sock.local_addr(), sock.peer_addr());
        let (Ok(l), Ok(p)) = addrs else { continue };
        if l.as_socket() == Some(local) && p.as_socket() == Some(peer) {
            return Ok(Some(sock.nodelay()?));
        }
    }
    Ok(None)
}
