//! An active/standby pair of real brokers on a real Redis, routing through a real CHP (issue 16).
//!
//! - 50 jobs (stock `ssh -R`, each in a loop that tries broker A, then B, as the job wrapper
//!   does) hold tunnels through A while B stands by and serves nothing. A is SIGKILLed; B takes
//!   the lease once it lapses, every job reconnects to its same hub port on B, every route in
//!   CHP is rewritten to point at B, and a request through each tunnel reaches its notebook.
//!   The times are printed (run with `--nocapture`) and recorded in docs/benchmark.md.
//! - A broker whose Redis vanishes for longer than the lease exits with status 75 and closes
//!   its SSH and hub-port listeners: no split brain.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::Context;
use common::{BrokerProcess, Chp, Echo, Redis, eventually};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const JOBS: usize = 50;
/// Both brokers listen for jobs on this port, each on its own loopback address.
const SSH_PORT: u16 = 2222;

/// One broker's folder and config: its own address, the pair's Redis and the shared CHP.
fn write_config(
    dir: &Path,
    ip: IpAddr,
    id: &str,
    redis: &Redis,
    prefix: &str,
    lease: &str,
    routes: &str,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let text = format!(
        "keys_dir = {keys:?}\nstate_dir = {state:?}\n\
         [ssh]\nlisten = \"{ip}:{SSH_PORT}\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [tunnels]\nbind_address = \"{ip}\"\nports = \"20000-20099\"\n\
         {routes}\
         [limits]\nmax_sessions = 1000\n\
         [store]\nbackend = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\n\
         lease = \"{lease}\"\nbroker_id = \"{id}\"\n",
        keys = dir.join("keys"),
        state = dir.join("state"),
        url = redis.url(),
    );
    let path = dir.join("tb.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The pair shares its host key and admin token: the second broker gets a copy of the first
/// one's keys folder, as an admin copies it to the second host.
fn copy_keys(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (from, to) = (from.join("keys"), to.join("keys"));
    std::fs::create_dir_all(&to)?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(&from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// A job: stock ssh in a loop over both brokers' addresses, a second between attempts (the
/// wrapper's first back-off). Its own process group, so dropping it ends the loop and its ssh.
struct Job {
    child: Child,
}

impl Job {
    fn start(
        hosts: &[IpAddr],
        key: &Path,
        known_hosts: &Path,
        notebook: u16,
    ) -> anyhow::Result<Self> {
        let hosts: Vec<String> = hosts.iter().map(ToString::to_string).collect();
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"while :; do for h in $HOSTS; do ssh "$@" "tunnelbot@$h"; sleep 1; done; done"#)
            .arg("job")
            .args(["-N", "-T", "-F", "/dev/null", "-o", "IdentitiesOnly=yes"])
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .args(["-o", "ExitOnForwardFailure=yes", "-o", "ConnectTimeout=10"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .arg("-i")
            .arg(key)
            .args(["-p", &SSH_PORT.to_string()])
            .args(["-R", &format!("0:127.0.0.1:{notebook}")])
            .env("HOSTS", hosts.join(" "))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self { child })
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

/// known_hosts naming both brokers with the one host key they share.
fn known_hosts_for_both(issued_line: &str, hosts: &[IpAddr]) -> anyhow::Result<String> {
    let key = issued_line
        .split_once(' ')
        .context("a known_hosts line has a host field")?
        .1;
    Ok(hosts
        .iter()
        .map(|h| format!("[{h}]:{SSH_PORT} {key}\n"))
        .collect())
}

/// Tunnel id → (hub port, connected) from a broker's API.
async fn tunnels(broker: &BrokerProcess) -> anyhow::Result<Vec<(String, u16, bool)>> {
    broker
        .list()
        .await?
        .iter()
        .map(|t| {
            Ok((
                t["id"].as_str().context("id")?.to_owned(),
                u16::try_from(t["port"].as_u64().context("port")?)?,
                t["connected"] == true,
            ))
        })
        .collect()
}

/// How many of `users`' routes in CHP point at `ip` on their expected port.
async fn routed_to(chp: &Chp, ip: IpAddr, users: &[(String, u16)]) -> anyhow::Result<usize> {
    let table: Value = chp.routes().await?;
    Ok(users
        .iter()
        .filter(|(user, port)| {
            table[format!("/user/{user}")]["target"] == format!("http://{ip}:{port}").as_str()
        })
        .count())
}

/// Every user's notebook answers through CHP, through its tunnel.
async fn all_reachable(chp: &Chp, users: &[(String, u16)]) -> anyhow::Result<()> {
    for (i, (user, _)) in users.iter().enumerate() {
        let (status, body) = chp.get(&format!("/user/{user}/api")).await?;
        assert_eq!(
            (status, body.as_str()),
            (200, format!("nb{i} /user/{user}/api").as_str())
        );
    }
    Ok(())
}

async fn refuses(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_err()
}

#[tokio::test]
async fn the_standby_takes_over_fifty_live_tunnels() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let chp = Chp::start().await?;
    let tmp = tempfile::tempdir()?;
    let (ip_a, ip_b) = (common::unique_loopback(), common::unique_loopback());
    let prefix = format!("pair{}/", common::next_id());
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a)?;
    std::fs::create_dir_all(&dir_b)?;
    let routes_a = chp.broker_config(&dir_a, ip_a, "/")?;
    let routes_b = chp.broker_config(&dir_b, ip_b, "/")?;
    let config_a = write_config(&dir_a, ip_a, "a", &redis, &prefix, "5s", &routes_a)?;
    let config_b = write_config(&dir_b, ip_b, "b", &redis, &prefix, "5s", &routes_b)?;

    let mut a = BrokerProcess::start(&dir_a, &config_a).await?;
    copy_keys(&dir_a, &dir_b)?;
    let standby = BrokerProcess::launch(&dir_b, &config_b, BrokerProcess::command())?;
    let hosts = [ip_a, ip_b];

    let mut users = Vec::new();
    let mut notebooks: Vec<Echo> = Vec::new();
    let mut jobs = Vec::new();
    for i in 0..JOBS {
        let user = format!("u{i}");
        let issued = a.issue(&user).await?;
        let line = issued.json["known_hosts"].as_str().context("known_hosts")?;
        std::fs::write(&issued.known_hosts, known_hosts_for_both(line, &hosts)?)?;
        let tag: &'static str = Box::leak(format!("nb{i}").into_boxed_str());
        let notebook = common::http_backend(tag).await?;
        jobs.push(Job::start(
            &hosts,
            &issued.key,
            &issued.known_hosts,
            notebook.port,
        )?);
        notebooks.push(notebook);
        users.push((user, issued.port));
    }
    // One more job, which dies with A and never comes back: its route names A.
    let lost = a.issue("lost").await?;
    let line = lost.json["known_hosts"].as_str().context("known_hosts")?;
    std::fs::write(&lost.known_hosts, known_hosts_for_both(line, &hosts)?)?;
    let lost_notebook = common::http_backend("lost").await?;
    let lost_job = Job::start(&hosts, &lost.key, &lost.known_hosts, lost_notebook.port)?;
    let lost_route = [("lost".to_owned(), lost.port)];
    a.wait_connected(JOBS + 1).await?;
    eventually("every route points at A", async || {
        anyhow::Ok(
            routed_to(&chp, ip_a, &users).await? == JOBS
                && routed_to(&chp, ip_a, &lost_route).await? == 1,
        )
    })
    .await?;
    all_reachable(&chp, &users).await?;
    let others = |t: &(String, u16, bool)| t.0 != lost.id;
    let before: Vec<_> = tunnels(&a).await?.into_iter().filter(others).collect();

    // The standby serves nothing: no SSH, no hub port, no admin API (it has no ready file).
    assert!(refuses(SocketAddr::new(ip_b, SSH_PORT)).await);
    assert!(refuses(SocketAddr::new(ip_b, users[0].1)).await);
    assert!(!dir_b.join("ready.json").exists());

    let killed = Instant::now();
    a.kill().await?;
    drop(lost_job);
    let b = standby.ready().await?;
    let active = killed.elapsed();
    b.wait_connected(JOBS).await?;
    let connected = killed.elapsed();
    eventually("every route points at B", async || {
        anyhow::Ok(routed_to(&chp, ip_b, &users).await? == JOBS)
    })
    .await?;
    let routed = killed.elapsed();
    all_reachable(&chp, &users).await?;
    let served = killed.elapsed();

    // Same tunnels, same hub ports, all connected, now on B's address.
    let mut after: Vec<_> = tunnels(&b).await?.into_iter().filter(others).collect();
    let mut before: Vec<_> = before.into_iter().map(|(id, port, _)| (id, port)).collect();
    before.sort();
    after.sort();
    assert!(after.iter().all(|t| t.2), "every tunnel is connected on B");
    let after: Vec<_> = after.into_iter().map(|(id, port, _)| (id, port)).collect();
    assert_eq!(after, before);
    // The lost job's route to A, which nobody serves now, is B's to delete: B holds its tunnel.
    eventually("the lost job's stale route is gone", async || {
        anyhow::Ok(chp.routes().await?.get("/user/lost").is_none())
    })
    .await?;
    let table = chp.routes().await?.to_string();
    assert!(!table.contains(&format!("http://{ip_a}:")), "{table}");
    eprintln!(
        "failover of {JOBS} tunnels, lease 5s: B active after {:.2}s, all {JOBS} jobs \
         reconnected after {:.2}s, all routes on B after {:.2}s, all {JOBS} requests \
         answered after {:.2}s",
        active.as_secs_f64(),
        connected.as_secs_f64(),
        routed.as_secs_f64(),
        served.as_secs_f64()
    );
    drop(jobs);
    Ok(())
}

#[tokio::test]
async fn a_broker_cut_off_from_redis_stops_serving_before_its_lease_lapses() -> anyhow::Result<()> {
    let mut redis = Redis::start().await?;
    let tmp = tempfile::tempdir()?;
    let ip = common::unique_loopback();
    let prefix = format!("cut{}/", common::next_id());
    let config = write_config(
        tmp.path(),
        ip,
        "a",
        &redis,
        &prefix,
        "2s",
        "[routes]\nbackend = \"none\"\n",
    )?;
    let mut a = BrokerProcess::start(tmp.path(), &config).await?;
    let issued = a.issue("alice").await?;
    let line = issued.json["known_hosts"].as_str().context("known_hosts")?;
    std::fs::write(&issued.known_hosts, known_hosts_for_both(line, &[ip])?)?;
    let notebook = common::http_backend("nb").await?;
    let _job = Job::start(&[ip], &issued.key, &issued.known_hosts, notebook.port)?;
    a.wait_connected(1).await?;
    let hub_port = SocketAddr::new(ip, issued.port);
    assert!(!refuses(hub_port).await);

    redis.kill().await?;
    let status = a.wait_exit().await?;
    assert_eq!(status.code(), Some(75), "{}", a.log_text());
    assert!(a.log_text().contains("lease lost"), "{}", a.log_text());
    // Nothing of it is left listening: no logins, no hub port.
    assert!(refuses(a.ssh).await);
    assert!(refuses(hub_port).await);
    Ok(())
}
