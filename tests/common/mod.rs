//! Test fixtures: an in-process broker on port 0, the real OpenSSH client, echo backends.
//! Every wait is bounded; nothing sleeps for readiness.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// Upper bound for any single wait in the tests.
pub const WAIT: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A loopback address no other test (in this or another test process) binds tunnels on, so
/// brokers running in parallel never compete for hub ports.
pub fn unique_loopback() -> IpAddr {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    IpAddr::from([
        127,
        100 + (pid % 100) as u8,
        (n / 250) as u8,
        (n % 250 + 1) as u8,
    ])
}

/// A broker running in this process.
pub struct TestBroker {
    pub dir: tempfile::TempDir,
    pub ssh: SocketAddr,
    pub admin: SocketAddr,
    pub token: String,
    pub tunnel_ip: IpAddr,
    pub http: reqwest::Client,
    /// The broker itself, for what the admin API does not reach (a credential reload).
    pub broker: tunnelbot::Broker,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Appended to configs of the broker binary: the default limits need about 30,700 descriptors,
/// more than a test host's hard `RLIMIT_NOFILE` may allow, and `serve` refuses such a config.
pub const PROCESS_LIMITS: &str = "[limits]\nmax_sessions = 1000\n";

/// The config text every test broker starts from; `extra` is appended.
pub fn base_config(dir: &Path, tunnel_ip: IpAddr, extra: &str) -> String {
    format!(
        "keys_dir = {keys:?}\nstate_dir = {state:?}\n\
         [ssh]\nlisten = \"127.0.0.1:0\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [tunnels]\nbind_address = \"{tunnel_ip}\"\n{extra}\n",
        keys = dir.join("keys"),
        state = dir.join("state"),
    )
}

impl TestBroker {
    /// Starts a broker with CHP off; `tunnels` holds extra `[tunnels]` keys.
    pub async fn start(tunnels: &str) -> anyhow::Result<Self> {
        Self::start_with(tunnels, |_, _| Ok("[chp]\nenabled = false\n".into())).await
    }

    /// Starts a broker routing through `chp` under `base_url`.
    pub async fn with_chp(chp: &Chp, base_url: &str) -> anyhow::Result<Self> {
        Self::start_with("", |dir, ip| chp.broker_config(dir, ip, base_url)).await
    }

    /// Starts a broker; `tables` builds the TOML tables after `[tunnels]` from the tunnel address.
    pub async fn start_with(
        tunnels: &str,
        tables: impl FnOnce(&Path, IpAddr) -> anyhow::Result<String>,
    ) -> anyhow::Result<Self> {
        Self::start_text(|dir, tunnel_ip| {
            Ok(format!(
                "{}{}",
                base_config(dir, tunnel_ip, tunnels),
                tables(dir, tunnel_ip)?
            ))
        })
        .await
    }

    /// Starts a broker from the whole config text that `text` builds (for keys in tables that
    /// `base_config` opens, such as `[admin]`).
    pub async fn start_text(
        text: impl FnOnce(&Path, IpAddr) -> anyhow::Result<String>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let tunnel_ip = unique_loopback();
        let text = text(dir.path(), tunnel_ip)?;
        let config = tunnelbot::Config::parse(&text)?;
        config.validate()?;
        let listeners = tunnelbot::Listeners::bind(&config).await?;
        let ssh = listeners.ssh_addr()?;
        let admin = listeners.admin_addr()?;
        let broker = tunnelbot::open(config, ssh).await?;
        let token = std::fs::read_to_string(dir.path().join("keys/admin.token"))?
            .trim()
            .to_owned();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = broker.clone();
        let task = tokio::spawn(tunnelbot::run(broker, listeners, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            dir,
            ssh,
            admin,
            token,
            tunnel_ip,
            http: reqwest::Client::new(),
            broker: handle,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Graceful shutdown, as on SIGTERM; waits (bounded) for it to finish.
    pub async fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .context("shutdown took too long")???;
        }
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// An admin API call with the token; returns status and JSON body (Null when empty).
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        };
        Ok((status, value))
    }

    /// Issues a tunnel and writes its key and known_hosts into a fresh folder.
    pub async fn issue(&self, user: &str, server: &str, ttl: u64) -> anyhow::Result<Issued> {
        let (status, v) = self
            .api(
                reqwest::Method::POST,
                "/api/v1/tunnels",
                Some(json!({"user": user, "server_name": server, "ttl_seconds": ttl})),
            )
            .await?;
        if status != 201 {
            bail!("issue answered {status}: {v}");
        }
        Issued::write(v, self.dir.path())
    }

    pub async fn tunnel(&self, id: &str) -> anyhow::Result<Value> {
        let (status, v) = self
            .api(reqwest::Method::GET, &format!("/api/v1/tunnels/{id}"), None)
            .await?;
        if status != 200 {
            bail!("GET tunnel answered {status}: {v}");
        }
        Ok(v)
    }

    pub async fn revoke(&self, id: &str) -> anyhow::Result<u16> {
        Ok(self
            .api(
                reqwest::Method::DELETE,
                &format!("/api/v1/tunnels/{id}"),
                None,
            )
            .await?
            .0)
    }

    /// Polls the tunnel until `pred` holds.
    pub async fn wait_tunnel(
        &self,
        id: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.tunnel(id).await?;
            if pred(&v) {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("tunnel {id} never became {what}: {v}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of one metric series from `/metrics` (0 when absent).
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await?
            .text()
            .await?;
        metric_value(&text, series)
    }

    /// Waits (bounded) until `series` reads at least `at_least`.
    pub async fn wait_metric(&self, series: &str, at_least: f64) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.metric(series).await?;
            if v >= at_least {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{series} stayed at {v}, below {at_least}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Finds `series` (name plus labels as printed, labels in name order) in a Prometheus text body;
/// a series that is not there is an error, never a silent 0.
pub fn metric_value(text: &str, series: &str) -> anyhow::Result<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .with_context(|| format!("no series {series} in /metrics"))
}

/// An issued tunnel with its key material on disk.
pub struct Issued {
    pub json: Value,
    pub id: String,
    pub port: u16,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
}

impl Issued {
    pub fn write(json: Value, dir: &Path) -> anyhow::Result<Self> {
        let id = json["id"].as_str().context("id")?.to_owned();
        let port = u16::try_from(json["port"].as_u64().context("port")?)?;
        let folder = dir.join(&id);
        std::fs::create_dir_all(&folder)?;
        let key = folder.join("key");
        let known_hosts = folder.join("known_hosts");
        if let Some(pem) = json["private_key"].as_str() {
            write_0600(&key, pem)?;
        }
        std::fs::write(
            &known_hosts,
            format!("{}\n", json["known_hosts"].as_str().context("known_hosts")?),
        )?;
        Ok(Self {
            json,
            id,
            port,
            key,
            known_hosts,
        })
    }
}

pub fn write_0600(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(())
}

/// The stock `ssh` client, as a job runs it, with its stderr collected line by line.
pub struct Ssh {
    pub child: Child,
    lines: Arc<(Mutex<Vec<String>>, Notify)>,
    drained: tokio_util::sync::CancellationToken,
}

/// The job's ssh arguments, without the forwards: pinned host key, batch mode, one identity.
pub fn ssh_args(ssh: SocketAddr, key: &Path, known_hosts: &Path, user: &str) -> Vec<String> {
    let mut a: Vec<String> = vec!["-F".into(), "/dev/null".into(), "-T".into()];
    for o in [
        "IdentitiesOnly=yes",
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        "ConnectTimeout=10",
        "ServerAliveInterval=15",
    ] {
        a.push("-o".into());
        a.push(o.into());
    }
    a.extend([
        "-o".into(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
    ]);
    a.extend(["-i".into(), key.display().to_string()]);
    a.extend([
        "-p".into(),
        ssh.port().to_string(),
        format!("{user}@{}", ssh.ip()),
    ]);
    a
}

/// A job's full ssh arguments: `-N -R 0:127.0.0.1:<notebook_port>`, exit on forward failure.
pub fn job_args(
    ssh: SocketAddr,
    key: &Path,
    known_hosts: &Path,
    notebook_port: u16,
) -> Vec<String> {
    let mut args: Vec<String> = vec!["-N".into(), "-o".into(), "ExitOnForwardFailure=yes".into()];
    args.extend(["-R".into(), format!("0:127.0.0.1:{notebook_port}")]);
    args.extend(ssh_args(ssh, key, known_hosts, "tunnelbot"));
    args
}

impl Ssh {
    /// Starts `ssh` with `args` (options go before the destination, which ssh_args ends with).
    pub fn spawn(args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new("ssh")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("running ssh (is openssh-client installed?)")?;
        let stderr = child.stderr.take().context("stderr")?;
        let lines: Arc<(Mutex<Vec<String>>, Notify)> = Arc::default();
        let sink = Arc::clone(&lines);
        let drained = tokio_util::sync::CancellationToken::new();
        let done = drained.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = r.next_line().await {
                sink.0.lock().unwrap().push(line);
                sink.1.notify_waiters();
            }
            done.cancel();
            sink.1.notify_waiters();
        });
        Ok(Self {
            child,
            lines,
            drained,
        })
    }

    /// A job's reverse tunnel: `-N -R <spec>` with ExitOnForwardFailure unless `extra` says otherwise.
    pub fn reverse(
        broker: &TestBroker,
        issued: &Issued,
        spec: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args: Vec<String> = vec!["-N".into(), "-R".into(), spec.into()];
        if !extra.iter().any(|e| e.contains("ExitOnForwardFailure")) {
            args.extend(["-o".into(), "ExitOnForwardFailure=yes".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(ssh_args(
            broker.ssh,
            &issued.key,
            &issued.known_hosts,
            "tunnelbot",
        ));
        Self::spawn(&args)
    }

    /// The job's usual tunnel, `-R 0:127.0.0.1:<notebook port>`.
    pub fn job(broker: &TestBroker, issued: &Issued, notebook_port: u16) -> anyhow::Result<Self> {
        Self::reverse(broker, issued, &format!("0:127.0.0.1:{notebook_port}"), &[])
    }

    pub fn stderr(&self) -> String {
        self.lines.0.lock().unwrap().join("\n")
    }

    /// Waits until a stderr line contains `needle`; returns that line.
    pub async fn wait_line(&self, needle: &str) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.lines.1.notified();
            if let Some(l) = self
                .lines
                .0
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return Ok(l.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("ssh never printed {needle:?}; stderr:\n{}", self.stderr());
            }
        }
    }

    /// Waits for "Allocated port N" and returns N.
    pub async fn allocated_port(&self) -> anyhow::Result<u16> {
        let line = self.wait_line("Allocated port").await?;
        let n = line.split_whitespace().nth(2).context("port in line")?;
        Ok(n.parse()?)
    }

    /// Waits (bounded) for ssh to exit; returns its exit code.
    pub async fn exit_code(&mut self) -> anyhow::Result<i32> {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .context("ssh did not exit")??;
        // Let the stderr reader take what ssh printed last.
        let _ = tokio::time::timeout(WAIT, self.drained.cancelled()).await;
        Ok(status.code().unwrap_or(-1))
    }

    /// Sends `SIG<name>` (e.g. "STOP", "CONT") to the ssh process.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("ssh already reaped")?;
        let ok = std::process::Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -{name} {pid} failed");
        Ok(())
    }

    /// Whether ssh is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Runs ssh with `args` to completion; returns exit code and stderr.
pub async fn ssh_run(args: &[String]) -> anyhow::Result<(i32, String)> {
    let mut s = Ssh::spawn(args)?;
    let code = s.exit_code().await?;
    Ok((code, s.stderr()))
}

/// A TCP echo server on 127.0.0.1:0 that answers `tag` first, then echoes every byte.
pub struct Echo {
    pub port: u16,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn echo(tag: &'static str) -> anyhow::Result<Echo> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut out = tag.as_bytes().to_vec();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            out.extend_from_slice(&buf[..n]);
                            if s.write_all(&out).await.is_err() {
                                break;
                            }
                            out.clear();
                        }
                    }
                }
            });
        }
    });
    Ok(Echo { port, task })
}

/// Sends `msg` to `addr` and reads until `expect_len` bytes came back (bounded).
pub async fn roundtrip(addr: SocketAddr, msg: &[u8], expect_len: usize) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(WAIT, async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(msg).await?;
        let mut got = vec![0u8; expect_len];
        s.read_exact(&mut got).await?;
        anyhow::Ok(got)
    })
    .await
    .context("roundtrip timed out")?
}

/// Expects `addr` to carry nothing: refused, or closed without an answer.
pub async fn carries_nothing(addr: SocketAddr) -> anyhow::Result<bool> {
    let r = tokio::time::timeout(WAIT, async {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            return anyhow::Ok(true);
        };
        let _ = s.write_all(b"ping").await;
        let mut buf = [0u8; 16];
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => Ok(true),
            Ok(_) => Ok(false),
        }
    })
    .await
    .context("probe timed out")??;
    Ok(r)
}

/// A fresh ed25519 key made by ssh-keygen (for "never-issued key" tests).
pub fn keygen(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(&path)
        .output()?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(path)
}

/// A real configurable-http-proxy process on loopback.
pub struct Chp {
    pub public: SocketAddr,
    pub api: SocketAddr,
    pub token: String,
    child: Option<Child>,
}

/// CHP's binary: `$CHP_BIN`, else what scripts/setup.sh installs.
pub fn chp_bin() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("CHP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(".deps/node/node_modules/.bin/configurable-http-proxy")
        });
    if !path.exists() {
        bail!(
            "configurable-http-proxy not found at {}: run scripts/setup.sh (or set CHP_BIN)",
            path.display()
        );
    }
    Ok(path)
}

/// A port nothing listens on right now. CHP cannot be handed a socket, so it gets a port this
/// way; `Chp::start` retries when another process takes it first.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Chp {
    /// Starts CHP on fresh ports with a fresh token.
    pub async fn start() -> anyhow::Result<Self> {
        let token = format!("chp-{}", std::process::id()) + &free_port()?.to_string();
        for _ in 0..5 {
            let public = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let api = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let mut chp = Self {
                public,
                api,
                token: token.clone(),
                child: None,
            };
            if chp.spawn().await? {
                return Ok(chp);
            }
        }
        bail!("CHP did not start after 5 tries")
    }

    /// (Re)starts the process on the same ports; false when it exited (port taken).
    pub async fn spawn(&mut self) -> anyhow::Result<bool> {
        let mut child = Command::new(chp_bin()?)
            .args([
                "--ip",
                "127.0.0.1",
                "--port",
                &self.public.port().to_string(),
            ])
            .args([
                "--api-ip",
                "127.0.0.1",
                "--api-port",
                &self.api.port().to_string(),
            ])
            .args(["--log-level", "warn"])
            .env("CONFIGPROXY_AUTH_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting configurable-http-proxy")?;
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if child.try_wait()?.is_some() {
                return Ok(false);
            }
            let r = http
                .get(format!("http://{}/api/routes", self.api))
                .header("Authorization", format!("token {}", self.token))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                self.child = Some(child);
                return Ok(true);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("CHP not answering on {}", self.api);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process (routes are in its memory only, so they are gone).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Writes the CHP token to a 0600 file for the broker's `chp.token_file`.
    pub fn token_file(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("chp.token");
        write_0600(&path, &self.token)?;
        Ok(path)
    }

    /// The `[chp]` table pointing a broker at this CHP.
    pub fn broker_config(
        &self,
        dir: &Path,
        tunnel_ip: IpAddr,
        base_url: &str,
    ) -> anyhow::Result<String> {
        Ok(format!(
            "[chp]\nenabled = true\napi_url = \"http://{}\"\ntoken_file = {:?}\nbase_url = \"{base_url}\"\ntarget_host = \"{tunnel_ip}\"\nreconcile_interval = \"200ms\"\n",
            self.api,
            self.token_file(dir)?
        ))
    }

    /// CHP's routing table.
    pub async fn routes(&self) -> anyhow::Result<Value> {
        let r = reqwest::Client::new()
            .get(format!("http://{}/api/routes", self.api))
            .header("Authorization", format!("token {}", self.token))
            .send()
            .await?;
        Ok(r.json().await?)
    }

    /// Polls the table until `pred` holds for the route at `path` (None = absent).
    pub async fn wait_route(
        &self,
        path: &str,
        what: &str,
        pred: impl Fn(Option<&Value>) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let table = self.routes().await?;
            if pred(table.get(path)) {
                return Ok(table);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("route {path} never became {what}: {table}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Adds a route directly, as the hub or another tool would.
    pub async fn add_route(&self, path: &str, data: Value) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .post(format!("http://{}/api/routes{path}", self.api))
            .header("Authorization", format!("token {}", self.token))
            .json(&data)
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            bail!("CHP answered {}", r.status());
        }
        Ok(())
    }

    /// GET through CHP's public port; returns status and body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", self.public))
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    }
}

/// A minimal HTTP backend on 127.0.0.1:0 answering `<tag> <path>` to every request.
pub async fn http_backend(tag: &'static str) -> anyhow::Result<Echo> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                let Ok(Some(request_line)) = lines.next_line().await else {
                    return;
                };
                while let Ok(Some(l)) = lines.next_line().await {
                    if l.is_empty() {
                        break;
                    }
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("?")
                    .to_owned();
                let body = format!("{tag} {path}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = w.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(Echo { port, task })
}

impl Echo {
    /// Wraps a backend task listening on `port`.
    pub fn new(port: u16, task: JoinHandle<()>) -> Self {
        Self { port, task }
    }
}

/// The real `tunnelbot` binary as a child process, with its addresses from the ready file.
pub struct BrokerProcess {
    pub child: Child,
    pub ssh: SocketAddr,
    pub admin: SocketAddr,
    pub token: String,
    /// The broker's stderr (its log).
    pub log: PathBuf,
    dir: PathBuf,
    http: reqwest::Client,
}

impl BrokerProcess {
    /// Starts `tunnelbot serve --config <config>` and waits (bounded) for its ready file.
    pub async fn start(dir: &Path, config: &Path) -> anyhow::Result<Self> {
        // Not under a service manager, even when the test runner is (its socket is not ours).
        Self::start_env(dir, config, &[]).await
    }

    /// `start` with `env` added to the child's environment.
    pub async fn start_env(
        dir: &Path,
        config: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tunnelbot"));
        for var in [
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
        ] {
            command.env_remove(var);
        }
        command.envs(env.iter().copied());
        Self::start_via(dir, config, command).await
    }

    /// As `start`, through `command`: the broker binary, or a wrapper that ends in it (so the
    /// caller can add environment, descriptors, or an `sh -c '... exec "$0" "$@"' BIN`).
    pub async fn start_via(
        dir: &Path,
        config: &Path,
        mut command: Command,
    ) -> anyhow::Result<Self> {
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let log_path = dir.join(format!("broker-{n}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let deadline = tokio::time::Instant::now() + WAIT;
        while !ready.exists() {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("broker exited early: {status}\n{log}");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("broker not ready in time");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&ready)?)?;
        let token = std::fs::read_to_string(dir.join("keys/admin.token"))?
            .trim()
            .to_owned();
        Ok(Self {
            child,
            ssh: v["ssh"].as_str().context("ssh")?.parse()?,
            admin: v["admin"].as_str().context("admin")?.parse()?,
            token,
            log: log_path,
            dir: dir.to_owned(),
            http: reqwest::Client::new(),
        })
    }

    /// SIGTERM, as systemd stops it, and wait (bounded) for the exit.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().context("broker already reaped")?;
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill -TERM {pid} failed");
        Ok(tokio::time::timeout(WAIT, self.child.wait())
            .await
            .context("broker did not exit after SIGTERM")??)
    }

    /// The broker's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET /api/v1/tunnels/<id>.
    pub async fn tunnel(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("http://{}/api/v1/tunnels/{id}", self.admin))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// DELETE /api/v1/tunnels/<id>; the status code.
    pub async fn revoke(&self, id: &str) -> anyhow::Result<u16> {
        Ok(self
            .http
            .delete(format!("http://{}/api/v1/tunnels/{id}", self.admin))
            .bearer_auth(&self.token)
            .send()
            .await?
            .status()
            .as_u16())
    }

    /// SIGKILL (nothing gets saved at exit), and wait until the process is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        tokio::time::timeout(WAIT, self.child.wait()).await??;
        Ok(())
    }

    pub async fn issue(&self, user: &str) -> anyhow::Result<Issued> {
        let v: Value = self
            .http
            .post(format!("http://{}/api/v1/tunnels", self.admin))
            .bearer_auth(&self.token)
            .json(&json!({"user": user}))
            .send()
            .await?
            .json()
            .await?;
        Issued::write(v, &self.dir)
    }

    pub async fn list(&self) -> anyhow::Result<Vec<Value>> {
        let v: Value = self
            .http
            .get(format!("http://{}/api/v1/tunnels", self.admin))
            .bearer_auth(&self.token)
            .send()
            .await?
            .json()
            .await?;
        Ok(v["tunnels"].as_array().cloned().unwrap_or_default())
    }

    /// Waits (bounded) until `n` tunnels are connected.
    pub async fn wait_connected(&self, n: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let connected = self
                .list()
                .await?
                .iter()
                .filter(|t| t["connected"] == true)
                .count();
            if connected >= n {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("only {connected} of {n} tunnels connected");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
