//! A local user on the hub cannot capture a tunnel's port across a broker restart (issue 13).
//!
//! Three drills with the real binary:
//! - under systemd, the test plays the service manager (`NOTIFY_SOCKET` receiving the
//!   listeners, `LISTEN_FDS` handing them back) while another local client tries to bind the
//!   tunnel's port the whole time: it never can, and the job's reconnect lands on the same port;
//! - on SIGTERM the broker deletes its routes from a real CHP before it closes its listeners;
//! - without systemd, a port another process took while the broker was down is refused with
//!   "port held by another process", shown in the admin API, and never routed to.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use common::{BrokerProcess, Chp, FakeSystemd, Issued, Ssh, echo, roundtrip};

/// Another local user trying, again and again, to bind a tunnel's port, plainly and with
/// SO_REUSEPORT (which would let it share a listener that had it set).
struct Squatter {
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Option<String>>>,
}

impl Squatter {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicU64::new(0));
        let (halt, count) = (Arc::clone(&stop), Arc::clone(&attempts));
        let thread = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                if std::net::TcpListener::bind(addr).is_ok() {
                    return Some(format!("bound {addr}"));
                }
                if bind_reuseport(addr).is_ok() {
                    return Some(format!("bound {addr} with SO_REUSEPORT"));
                }
                count.fetch_add(1, Ordering::Relaxed);
                // An attack cadence, not a readiness wait: fast enough to hit any gap a restart
                // could leave, slow enough to leave the two cores to the broker.
                std::thread::sleep(Duration::from_micros(200));
            }
            None
        });
        Self {
            stop,
            attempts,
            thread: Some(thread),
        }
    }

    /// Stops; returns how often it tried, or what it captured.
    fn finish(mut self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let captured = self.thread.take().context("thread")?.join().unwrap();
        if let Some(what) = captured {
            bail!("another local process captured the port: {what}");
        }
        Ok(self.attempts.load(Ordering::Relaxed))
    }
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(16)?;
    Ok(s)
}

fn write_config(dir: &Path, ip: IpAddr, tables: &str) -> anyhow::Result<PathBuf> {
    let text =
        common::base_config(dir, ip, "ports = \"20000-20009\"") + tables + common::PROCESS_LIMITS;
    let path = dir.join("tb.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The job's `ssh -R`, with known_hosts as this broker hands it out (a restarted broker
/// listens on another SSH port; its host key is the same).
async fn job(broker: &BrokerProcess, issued: &Issued, notebook_port: u16) -> anyhow::Result<Ssh> {
    let t = broker.tunnel(&issued.id).await?;
    let line = t["known_hosts"].as_str().context("known_hosts")?;
    std::fs::write(&issued.known_hosts, format!("{line}\n"))?;
    Ssh::spawn(&common::job_args(
        broker.ssh,
        &issued.key,
        &issued.known_hosts,
        notebook_port,
    ))
}

#[tokio::test]
async fn under_systemd_no_restart_ever_frees_a_tunnels_port() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ip = common::unique_loopback();
    let config = write_config(dir.path(), ip, "[chp]\nenabled = false\n")?;
    let systemd = FakeSystemd::start(dir.path())?;

    let mut first = BrokerProcess::start_via(dir.path(), &config, systemd.command()?).await?;
    systemd.wait("READY=1", |m| m.ready == 1).await?;
    let issued = first.issue("alice").await?;
    let port = issued.port;
    let name = format!("tunnelbot-port-{port}");
    let wanted = name.clone();
    systemd
        .wait("the tunnel's listener stored", move |m| {
            m.store.iter().any(|(n, _)| *n == wanted)
        })
        .await?;

    let hub_side = SocketAddr::new(ip, port);
    let notebook = echo("nb:").await?;
    let job1 = job(&first, &issued, notebook.port).await?;
    assert_eq!(job1.allocated_port().await?, port);
    assert_eq!(roundtrip(hub_side, b"ping", 7).await?, b"nb:ping");

    let squatter = Squatter::start(hub_side);
    let status = first.terminate().await?;
    assert!(status.success(), "{status}\n{}", first.log_text());
    drop(job1);
    assert_eq!(systemd.stopping(), 1, "STOPPING=1 at shutdown");
    // The broker is gone; the store's copy still holds the port.
    assert!(
        !systemd.removed().contains(&name),
        "{:?}",
        systemd.removed()
    );
    assert!(std::net::TcpListener::bind(hub_side).is_err());

    // Also in the store: a tunnel port whose tunnel no longer exists, and a socket that is no
    // tunnel port at all. The restarted broker must close both and take them out.
    let stale_port = if port == 20009 { 20008 } else { 20009 };
    let stale = std::net::TcpListener::bind((ip, stale_port))?;
    systemd.put(&format!("tunnelbot-port-{stale_port}"), stale.into());
    let stray = std::net::TcpListener::bind((ip, 0))?;
    systemd.put("stray", stray.into());

    let second = BrokerProcess::start_via(dir.path(), &config, systemd.command()?).await?;
    systemd.wait("READY=1 again", |m| m.ready == 2).await?;
    let stale_name = format!("tunnelbot-port-{stale_port}");
    let wanted = stale_name.clone();
    systemd
        .wait("the unclaimed listeners removed", move |m| {
            m.removed.contains(&wanted) && m.removed.iter().any(|n| n == "stray")
        })
        .await?;
    assert_eq!(
        systemd.stored(),
        vec![name.clone()],
        "only the live tunnel's port"
    );
    // The broker closed its copy before asking for the removal: the stale port is free.
    drop(std::net::TcpListener::bind((ip, stale_port)).context("stale port still held")?);

    let t = second.tunnel(&issued.id).await?;
    assert_eq!(
        (t["listening"].as_bool(), &t["listen_error"]),
        (Some(true), &serde_json::Value::Null),
        "{t}"
    );
    let job2 = job(&second, &issued, notebook.port).await?;
    assert_eq!(
        job2.allocated_port().await?,
        port,
        "the reconnect lands on the same port"
    );
    assert_eq!(roundtrip(hub_side, b"pong", 7).await?, b"nb:pong");
    let attempts = squatter.finish()?;
    assert!(attempts > 0);
    assert!(
        second.log_text().contains("adopted tunnel listeners"),
        "{}",
        second.log_text()
    );

    // The tunnel ends: its listener leaves the store and the port is free again.
    assert_eq!(second.revoke(&issued.id).await?, 204);
    let wanted = name.clone();
    systemd
        .wait("the ended tunnel's listener removed", move |m| {
            m.removed.contains(&wanted)
        })
        .await?;
    assert!(systemd.stored().is_empty(), "{:?}", systemd.stored());
    drop(std::net::TcpListener::bind(hub_side).context("port still held after the tunnel ended")?);
    Ok(())
}

/// A job connected through a broker routing with a real CHP.
async fn routed(
    chp: &Chp,
    dir: &Path,
    ip: IpAddr,
) -> anyhow::Result<(PathBuf, BrokerProcess, Issued, common::Echo, Ssh)> {
    let config = write_config(dir, ip, &chp.broker_config(dir, ip, "/")?)?;
    let broker = BrokerProcess::start(dir, &config).await?;
    let issued = broker.issue("alice").await?;
    let notebook = common::http_backend("nb").await?;
    let job = job(&broker, &issued, notebook.port).await?;
    assert_eq!(job.allocated_port().await?, issued.port);
    let target = format!("http://{ip}:{}", issued.port);
    chp.wait_route("/user/alice", "routed to the tunnel", |r| {
        r.is_some_and(|r| r["target"] == target.as_str())
    })
    .await?;
    let (status, body) = chp.get("/user/alice/lab").await?;
    assert_eq!((status, body.as_str()), (200, "nb /user/alice/lab"));
    Ok((config, broker, issued, notebook, job))
}

#[tokio::test]
async fn sigterm_deletes_the_routes_before_the_listeners_close() -> anyhow::Result<()> {
    let chp = Chp::start().await?;
    let dir = tempfile::tempdir()?;
    let ip = common::unique_loopback();
    let (_config, mut broker, _issued, _notebook, _job) = routed(&chp, dir.path(), ip).await?;

    let status = broker.terminate().await?;
    assert!(status.success(), "{status}");
    // Nobody else deletes routes: gone now means deleted by the broker before it exited.
    let table = chp.routes().await?;
    assert!(table.get("/user/alice").is_none(), "{table}");
    let log = broker.log_text();
    let withdrawn = log
        .find("proxy routes withdrawn")
        .context("no withdrawal logged")?;
    let closed = log
        .find("tunnel listeners closed")
        .context("no listener close logged")?;
    assert!(
        withdrawn < closed,
        "routes must go before the listeners:\n{log}"
    );
    assert!(log.contains("withdrawn=1"), "{log}");
    Ok(())
}

#[tokio::test]
async fn a_port_taken_during_a_restart_is_refused_and_never_routed() -> anyhow::Result<()> {
    let chp = Chp::start().await?;
    let dir = tempfile::tempdir()?;
    let ip = common::unique_loopback();
    let (config, mut first, issued, notebook, job1) = routed(&chp, dir.path(), ip).await?;
    let port = issued.port;

    assert!(first.terminate().await?.success());
    drop(job1);
    // Without systemd the port is free now, and a local user takes it, serving HTTP.
    let intruder = tokio::net::TcpListener::bind((ip, port)).await?;
    let intruder = intruder_http(intruder);
    assert!(chp.routes().await?.get("/user/alice").is_none());

    let second = BrokerProcess::start(dir.path(), &config).await?;
    let held = "port held by another process";
    let log = second.log_text();
    assert!(
        log.lines().any(|l| l.contains("port_unavailable")
            && l.contains(&port.to_string())
            && l.contains(held)),
        "no audit line naming port {port}:\n{log}"
    );
    let t = second.tunnel(&issued.id).await?;
    assert_eq!(t["listening"], false, "{t}");
    assert_eq!(t["listen_error"], held, "{t}");

    // The job's reconnect is refused, with the reason in the audit log.
    let mut refused = job(&second, &issued, notebook.port).await?;
    refused.wait_line("remote port forwarding failed").await?;
    assert_ne!(refused.exit_code().await?, 0);
    let log = second.log_text();
    let expected = format!("reserved port {port} unavailable (port held by another process)");
    assert!(
        log.lines()
            .any(|l| l.contains("forward_refused") && l.contains(&expected)),
        "{log}"
    );
    // No route was written, so the proxy never sends anyone to the intruder.
    assert!(chp.routes().await?.get("/user/alice").is_none());
    let (_, body) = chp.get("/user/alice/lab").await?;
    assert!(!body.contains("intruder"), "{body}");

    // The intruder leaves: the background bind takes the port back and the job gets through.
    drop(intruder);
    wait_listening(&second, &issued.id).await?;
    let job3 = job(&second, &issued, notebook.port).await?;
    assert_eq!(job3.allocated_port().await?, port);
    let target = format!("http://{ip}:{port}");
    chp.wait_route("/user/alice", "routed again", |r| {
        r.is_some_and(|r| r["target"] == target.as_str())
    })
    .await?;
    let (status, body) = chp.get("/user/alice/lab").await?;
    assert_eq!((status, body.as_str()), (200, "nb /user/alice/lab"));
    Ok(())
}

/// Serves `listener` as an HTTP server answering `intruder <path>`; dropping it closes the port.
fn intruder_http(listener: tokio::net::TcpListener) -> common::Echo {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let body = "intruder";
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    common::Echo::new(port, task)
}

/// Polls (bounded) until the tunnel's port is held by the broker again.
async fn wait_listening(broker: &BrokerProcess, id: &str) -> anyhow::Result<()> {
    common::eventually(&format!("tunnel {id} listens again"), async || {
        anyhow::Ok(broker.tunnel(id).await?["listening"] == true)
    })
    .await
}
