//! Drills under faults: things break around the broker, and it keeps working and loses nothing.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Chp, Issued, Ssh, TestBroker, echo, roundtrip};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnelbot::store::{RedbStore, Store, TunnelRecord};

/// A notebook whose behaviour the first byte picks: `E` echoes, `A` sends 64 KiB then aborts
/// the connection (RST), `N` never reads again.
async fn moody_notebook() -> anyhow::Result<common::Echo> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if s.read_exact(&mut first).await.is_err() {
                    return;
                }
                match first[0] {
                    b'A' => {
                        let _ = s.write_all(&vec![b'x'; 64 * 1024]).await;
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        drop(s);
                    }
                    b'N' => std::future::pending::<()>().await,
                    _ => {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(common::Echo::new(port, task))
}

/// Sends `E` + `n` bytes through `addr` and checks they all come back.
async fn echo_through(addr: SocketAddr, n: usize) -> anyhow::Result<()> {
    let mut msg = vec![b'E'];
    msg.extend(std::iter::repeat_n(7u8, n));
    // The mode byte is consumed; the rest comes back.
    let got = roundtrip(addr, &msg, n).await?;
    anyhow::ensure!(got == msg[1..], "echo mismatch");
    Ok(())
}

#[tokio::test]
async fn a_notebook_aborting_mid_response_closes_only_that_connection() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("alice", "", 600).await?;
    let notebook = moody_notebook().await?;
    let mut job = Ssh::job(&broker, &issued, notebook.port)?;
    job.allocated_port().await?;
    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);

    let mut steady = TcpStream::connect(hub_side).await?;
    steady.write_all(b"Ehello").await?;
    let mut got = [0u8; 5];
    tokio::time::timeout(common::WAIT, steady.read_exact(&mut got)).await??;
    for _ in 0..5 {
        let mut aborting = TcpStream::connect(hub_side).await?;
        aborting.write_all(b"A").await?;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(common::WAIT, aborting.read_to_end(&mut sink)).await?;
        assert!(sink.len() <= 64 * 1024);
    }
    // The long-lived connection on the same tunnel, and the session, are untouched.
    steady.write_all(b"again").await?;
    tokio::time::timeout(common::WAIT, steady.read_exact(&mut got)).await??;
    assert_eq!(&got, b"again");
    assert!(job.running());
    echo_through(hub_side, 100_000).await
}

#[tokio::test]
async fn a_notebook_that_never_reads_stalls_nothing_else() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let stuck = broker.issue("alice", "", 600).await?;
    let other = broker.issue("bob", "", 600).await?;
    let notebook = moody_notebook().await?;
    let _job = Ssh::job(&broker, &stuck, notebook.port)?;
    let _other_job = Ssh::job(&broker, &other, notebook.port)?;
    broker
        .wait_tunnel(&stuck.id, "connected", |t| t["connected"] == true)
        .await?;
    broker
        .wait_tunnel(&other.id, "connected", |t| t["connected"] == true)
        .await?;
    let stuck_side = SocketAddr::new(broker.tunnel_ip, stuck.port);

    // A browser uploading 64 MiB into a notebook that never reads: it blocks, alone.
    let blocked = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&blocked);
    let uploader = tokio::spawn(async move {
        let mut s = TcpStream::connect(stuck_side).await?;
        s.write_all(b"N").await?;
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..64 {
            if tokio::time::timeout(Duration::from_secs(2), s.write_all(&chunk))
                .await
                .is_err()
            {
                flag.store(true, Ordering::Release);
                std::future::pending::<()>().await;
            }
        }
        anyhow::Ok(s)
    });
    common::eventually("the upload blocks", async || {
        blocked.load(Ordering::Acquire)
    })
    .await?;
    // Other connections of the same tunnel, and another tunnel, still carry 4 MiB each.
    echo_through(stuck_side, 4 << 20).await?;
    echo_through(SocketAddr::new(broker.tunnel_ip, other.port), 4 << 20).await?;
    uploader.abort();
    Ok(())
}

/// A job frozen mid-upload (SIGSTOP: it reads nothing, sends nothing, not even the reply to a
/// disconnect) is still cut by a revoke: the broker ends the session itself and frees the port,
/// without the job's help.
#[tokio::test]
async fn revoke_cuts_a_frozen_job_mid_upload() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("frida", "", 600).await?;
    let notebook = moody_notebook().await?;
    let mut job = Ssh::job(&broker, &issued, notebook.port)?;
    let port = job.allocated_port().await?;
    broker
        .wait_tunnel(&issued.id, "connected", |t| t["connected"] == true)
        .await?;
    job.signal("STOP")?;

    // A hub client uploading into the frozen job: its channel open is never answered, and the
    // session has that open outstanding when the revoke comes.
    let mut up = TcpStream::connect(SocketAddr::new(broker.tunnel_ip, port)).await?;
    let uploader = tokio::spawn(async move {
        let chunk = vec![b'E'; 64 * 1024];
        while up.write_all(&chunk).await.is_ok() {}
    });
    broker
        .wait_metric("tunnelbot_forwarded_connections_active", 1.0)
        .await?;

    assert_eq!(broker.revoke(&issued.id).await?, 204);
    broker
        .wait_metric_eq("tunnelbot_ssh_sessions_active", 0.0)
        .await?;
    assert!(
        TcpStream::connect(SocketAddr::new(broker.tunnel_ip, port))
            .await
            .is_err(),
        "the port is closed"
    );
    uploader.abort();

    // Thawed, the job finds its connection gone.
    job.signal("CONT")?;
    assert_eq!(job.exit_code().await?, 255);
    Ok(())
}

#[tokio::test]
async fn killing_the_jobs_connection_100_times_always_gets_the_same_port_and_route()
-> anyhow::Result<()> {
    let chp = Chp::start().await?;
    let broker = TestBroker::with_chp(&chp, "/").await?;
    let issued = broker.issue("flaky", "", 600).await?;
    let notebook = echo("nb:").await?;
    let want = format!("http://{}:{}", broker.tunnel_ip, issued.port);
    let hub_side = SocketAddr::new(broker.tunnel_ip, issued.port);
    for round in 0..100 {
        let mut job = Ssh::job(&broker, &issued, notebook.port)?;
        assert_eq!(job.allocated_port().await?, issued.port, "round {round}");
        if round % 10 == 0 {
            assert_eq!(
                roundtrip(hub_side, b"r", 4).await?,
                b"nb:r",
                "round {round}"
            );
        }
        if let Some(route) = chp.routes().await?.get("/user/flaky") {
            assert_eq!(
                route["target"],
                want.as_str(),
                "round {round}: route pointed elsewhere"
            );
        }
        job.child.kill().await?;
        job.exit_code().await?;
    }
    let _job = Ssh::job(&broker, &issued, notebook.port)?;
    chp.wait_route("/user/flaky", "back", |r| {
        r.is_some_and(|r| r["target"] == want.as_str())
    })
    .await?;
    Ok(())
}

/// The real store, with a switch that makes every write fail (a full or read-only disk).
struct BreakableStore {
    inner: RedbStore,
    broken: Arc<AtomicBool>,
}

impl Store for BreakableStore {
    fn load(&self) -> anyhow::Result<Vec<TunnelRecord>> {
        self.inner.load()
    }
    fn put(&self, record: &TunnelRecord) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.broken.load(Ordering::Acquire),
            "No space left on device (os error 28)"
        );
        self.inner.put(record)
    }
    fn remove(&self, id: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.broken.load(Ordering::Acquire),
            "No space left on device (os error 28)"
        );
        self.inner.remove(id)
    }
}

#[tokio::test]
async fn an_unwritable_store_fails_issuing_clearly_and_live_tunnels_keep_working()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ip = common::unique_loopback();
    let text = common::base_config(dir.path(), ip, "")
        + "[chp]\nenabled = false\n"
        + common::PROCESS_LIMITS;
    let config = tunnelbot::Config::parse(&text)?;
    let listeners = tunnelbot::Listeners::bind(&config).await?;
    let (ssh, admin) = (listeners.ssh_addr()?, listeners.admin_addr()?);
    let broken = Arc::new(AtomicBool::new(false));
    let store = BreakableStore {
        inner: RedbStore::open(&config.state_dir)?,
        broken: Arc::clone(&broken),
    };
    let keys = tunnelbot::keys::Keys::load_or_create(&config.keys_dir)?;
    let metrics = tunnelbot::metrics::Metrics::new()?;
    let broker = tunnelbot::Broker::open(config, keys, Arc::new(store), metrics, ssh).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(tunnelbot::run(broker, listeners, async move {
        let _ = stopped.await;
    }));
    let token = std::fs::read_to_string(dir.path().join("keys/admin.token"))?
        .trim()
        .to_owned();
    let http = reqwest::Client::new();
    let issue = || {
        http.post(format!("http://{admin}/api/v1/tunnels"))
            .bearer_auth(&token)
            .json(&json!({"user": "alice"}))
            .send()
    };
    let issued = Issued::write(issue().await?.json().await?, dir.path())?;
    let notebook = echo("nb:").await?;
    let args = common::job_args(ssh, &issued.key, &issued.known_hosts, notebook.port);
    let job = Ssh::spawn(&args)?;
    job.allocated_port().await?;

    broken.store(true, Ordering::Release);
    let resp = issue().await?;
    assert_eq!(resp.status().as_u16(), 503);
    let body: Value = resp.json().await?;
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("state store unavailable") && msg.contains("No space left"),
        "{msg}"
    );
    // Nothing half-issued: the failed request left no tunnel and no reserved port behind.
    let list: Value = http
        .get(format!("http://{admin}/api/v1/tunnels"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(list["tunnels"].as_array().map(Vec::len), Some(1));
    let free = common::metric_value(
        &http
            .get(format!("http://{admin}/metrics"))
            .send()
            .await?
            .text()
            .await?,
        "tunnelbot_ports_free",
    )?;
    assert_eq!(free, 4999.0);
    // The live tunnel is unaffected.
    assert_eq!(
        roundtrip(SocketAddr::new(ip, issued.port), b"s", 4).await?,
        b"nb:s"
    );
    broken.store(false, Ordering::Release);
    assert_eq!(issue().await?.status().as_u16(), 201);
    let _ = stop.send(());
    tokio::time::timeout(common::WAIT, run).await???;
    Ok(())
}

#[tokio::test]
async fn sigkill_with_100_live_tunnels_then_restart_brings_every_tunnel_back() -> anyhow::Result<()>
{
    const N: usize = 100;
    let dir = tempfile::tempdir()?;
    let ip = common::unique_loopback();
    // A child cannot be handed its listener; reconnecting clients need the same port, so pick one.
    let ssh_port = common::free_port()?;
    let text = common::base_config(dir.path(), ip, "").replace(
        "listen = \"127.0.0.1:0\"\n[admin]",
        &format!("listen = \"127.0.0.1:{ssh_port}\"\n[admin]"),
    ) + "[chp]\nenabled = false\n"
        + common::PROCESS_LIMITS;
    let config = dir.path().join("tb.toml");
    std::fs::write(&config, text)?;
    let mut broker = common::BrokerProcess::start(dir.path(), &config).await?;
    let ssh = SocketAddr::from(([127, 0, 0, 1], ssh_port));
    assert_eq!(broker.ssh, ssh);
    let notebook = echo("nb:").await?;
    let mut issued = Vec::new();
    for i in 0..N {
        issued.push(broker.issue(&format!("user{i}")).await?);
    }
    // Each job reconnects as the job wrapper does: ssh again, after a short pause, forever.
    let jobs: Vec<_> = issued
        .iter()
        .map(|t| {
            let args = common::job_args(ssh, &t.key, &t.known_hosts, notebook.port);
            tokio::spawn(async move {
                loop {
                    if let Ok(mut s) = Ssh::spawn(&args) {
                        let _ = s.child.wait().await;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        })
        .collect();
    broker.wait_connected(N).await?;

    broker.kill().await?;
    let started = Instant::now();
    let restarted = common::BrokerProcess::start(dir.path(), &config).await?;
    restarted.wait_connected(N).await?;
    eprintln!(
        "all {N} tunnels back {:?} after the restart began",
        started.elapsed()
    );
    for t in issued.iter().step_by(10) {
        assert_eq!(
            roundtrip(SocketAddr::new(ip, t.port), b"k", 4).await?,
            b"nb:k"
        );
    }
    let list = restarted.list().await?;
    let ports: std::collections::HashSet<u64> =
        list.iter().filter_map(|t| t["port"].as_u64()).collect();
    assert!(
        issued.iter().all(|t| ports.contains(&u64::from(t.port))),
        "every reservation kept"
    );
    for j in jobs {
        j.abort();
    }
    Ok(())
}
