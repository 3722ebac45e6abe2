//! Bytes through an in-process tunnel: hub client → broker → SSH channel → job → and back.
//!
//! This is the path every notebook request takes, so its latency is what a user feels on each
//! click and its cost per byte is what a busy hub pays in CPU. A real broker runs in-process on
//! loopback; a russh client plays the job and echoes every forwarded connection. Measured: the
//! round trip of a small message on an open connection, 1 MiB echoed (each byte crosses the SSH
//! session twice), and a new hub-side connection up to its first byte back.
//! Broker, job and hub client share one multi-thread runtime (a worker per core), so the
//! figures include the job's CPU as well as the broker's; a plain loopback echo with no tunnel,
//! measured in the same run, is the floor to read them against. Loopback only, ports from the
//! OS. Run: `cargo bench --bench tunnel_bytes`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use russh::ChannelMsg;
use russh::client::{self, Msg, Session};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{Channel, Disconnect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tunnelbot::broker::IssueRequest;
use tunnelbot::config::{AdminConfig, RouteBackendKind, RoutesConfig, SshConfig, TunnelsConfig};
use tunnelbot::{Broker, Config, Listeners};

/// Upper bound for any single wait.
const WAIT: Duration = Duration::from_secs(10);

/// The name the no-tunnel figures are reported under.
const DIRECT: &str = "direct_baseline";

/// The job's end: pins the broker's host key and echoes every forwarded connection.
struct EchoJob {
    host_key: PublicKey,
    live: Arc<AtomicUsize>,
}

impl client::Handler for EchoJob {
    type Error = anyhow::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(
            matches!(key, russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } if key.key_data() == self.host_key.key_data()),
        )
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        self.live.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(echo(channel, Arc::clone(&self.live)));
        Ok(())
    }
}

/// Echoes one channel. Reading and writing run apart: a writer waiting for window must never
/// stop the reader, or the client's session loop blocks on the full channel queue and cannot
/// take the very window adjust the writer waits for.
async fn echo(channel: Channel<Msg>, live: Arc<AtomicUsize>) {
    let (mut rd, wr) = channel.split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(msg) = rd.wait().await {
            let data = match msg {
                ChannelMsg::Data { data } => data,
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => continue,
            };
            if tx.send(data).is_err() {
                break;
            }
        }
    });
    let mut cw = wr.make_writer();
    while let Some(data) = rx.recv().await {
        if cw.write_all(&data).await.is_err() {
            break;
        }
    }
    let _ = wr.eof().await;
    let _ = wr.close().await;
    reader.abort();
    live.fetch_sub(1, Ordering::Relaxed);
}

/// One logged-in job session holding its forward.
struct Job {
    handle: client::Handle<EchoJob>,
    /// The hub-side address its forward listens on.
    hub: SocketAddr,
    /// Channels the job is still echoing.
    live: Arc<AtomicUsize>,
}

impl Job {
    fn target(&self, name: &'static str) -> Target {
        Target {
            name,
            addr: self.hub,
            live: Arc::clone(&self.live),
        }
    }
}

/// A broker running in this process, on loopback, with CHP off.
struct Fixture {
    broker: Broker,
    ssh: SocketAddr,
    tunnel_ip: IpAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        // Its own 127.42.x.y (the tests use 127.100-199.x.y), so its hub ports never compete
        // with a test run or another bench run on this machine.
        let pid = std::process::id();
        let tunnel_ip = IpAddr::from([127, 42, (pid / 250 % 250) as u8, (pid % 250 + 1) as u8]);
        let loopback_any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let config = Config {
            keys_dir: dir.path().join("keys"),
            state_dir: dir.path().join("state"),
            ssh: SshConfig {
                listen: loopback_any_port,
                ..SshConfig::default()
            },
            tunnels: TunnelsConfig {
                bind_address: tunnel_ip,
                ..TunnelsConfig::default()
            },
            admin: AdminConfig {
                listen: loopback_any_port,
                ..AdminConfig::default()
            },
            routes: RoutesConfig {
                backend: RouteBackendKind::None,
                ..RoutesConfig::default()
            },
            ..Config::default()
        };
        config.validate()?;
        let listeners = Listeners::bind(&config).await?;
        let ssh = listeners.ssh_addr()?;
        let broker = tunnelbot::open(config, ssh).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tunnelbot::run(broker.clone(), listeners, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            broker,
            ssh,
            tunnel_ip,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        })
    }

    /// Issues a credential and logs a job in with it, offering only `cipher`, then asks for
    /// the forward the way `ssh -R 0:…` does.
    async fn job(&self, user: &str, cipher: russh::cipher::Name) -> anyhow::Result<Job> {
        let issued = self
            .broker
            .issue(IssueRequest {
                user: user.into(),
                server_name: String::new(),
                ttl: Some(Duration::from_secs(3600)),
                public_key: None,
                auth: Default::default(),
                lease_seconds: None,
            })
            .await?;
        let pem = issued.private_key.context("the broker made no key")?;
        let key = PrivateKey::from_openssh(pem.expose())?;
        let config = Arc::new(client::Config {
            // The broker sets TCP_NODELAY on its side; without it here too, Nagle on the
            // job's side would be measured instead of the broker.
            nodelay: true,
            preferred: russh::Preferred {
                cipher: vec![cipher].into(),
                ..russh::Preferred::default()
            },
            ..client::Config::default()
        });
        let live = Arc::new(AtomicUsize::new(0));
        let handler = EchoJob {
            host_key: self.broker.host_key().public_key().clone(),
            live: Arc::clone(&live),
        };
        let mut handle = tokio::time::timeout(WAIT, client::connect(config, self.ssh, handler))
            .await
            .context("ssh connect timed out")??;
        let auth = tokio::time::timeout(
            WAIT,
            handle.authenticate_publickey(
                self.broker.config().ssh.user.clone(),
                PrivateKeyWithHashAlg::new(Arc::new(key), None),
            ),
        )
        .await
        .context("login timed out")??;
        ensure!(auth.success(), "login refused");
        let port = tokio::time::timeout(WAIT, handle.tcpip_forward("localhost", 0))
            .await
            .context("forward request timed out")??;
        ensure!(
            port == u32::from(issued.grant.port()),
            "forward got port {port}"
        );
        let job = Job {
            handle,
            hub: SocketAddr::new(self.tunnel_ip, issued.grant.port()),
            live,
        };
        // Proves the echo works before anything is timed.
        let mut probe = hub_connect(job.hub).await?;
        let mut buf = [0u8; 5];
        let got = roundtrip(&mut probe, b"probe", &mut buf).await?;
        ensure!(got == b"probe", "echo answered {got:?}");
        Ok(job)
    }

    /// Logs the jobs out, then stops the broker; every step bounded.
    async fn stop(mut self, jobs: Vec<Job>) -> anyhow::Result<()> {
        for job in jobs {
            let bye = job
                .handle
                .disconnect(Disconnect::ByApplication, "bench done", "");
            let _ = tokio::time::timeout(WAIT, bye).await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .context("broker shutdown timed out")???;
        }
        Ok(())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A hub-side client, as CHP would open one.
async fn hub_connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .context("hub-side connect timed out")??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Writes `msg` and reads as many bytes back into `buf`.
async fn roundtrip<'b>(
    stream: &mut TcpStream,
    msg: &[u8],
    buf: &'b mut [u8],
) -> anyhow::Result<&'b [u8]> {
    tokio::time::timeout(WAIT, async {
        stream.write_all(msg).await?;
        stream.read_exact(&mut buf[..msg.len()]).await?;
        anyhow::Ok(())
    })
    .await
    .context("round trip timed out")??;
    Ok(&buf[..msg.len()])
}

/// Pushes `payload` and reads the echo at the same time, as a download and upload would.
async fn echo_bulk(stream: &mut TcpStream, payload: &[u8], buf: &mut [u8]) -> anyhow::Result<()> {
    let (mut r, mut w) = stream.split();
    tokio::time::timeout(WAIT, async {
        tokio::try_join!(w.write_all(payload), r.read_exact(buf))?;
        anyhow::Ok(())
    })
    .await
    .context("bulk echo timed out")?
}

/// Waits until at most `bound` connections are still being torn down, so the next timed
/// batch never runs into the tunnel's connection cap.
async fn settle(live: &AtomicUsize, bound: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while live.load(Ordering::Relaxed) > bound {
        if Instant::now() > deadline {
            bail!(
                "{} echo channels never closed",
                live.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

fn must<T>(r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}"))
}

/// A plain TCP echo server on loopback, with no tunnel in between: the floor the tunnel's
/// figures are read against, measured in the same run on the same runtime.
async fn direct_echo(live: Arc<AtomicUsize>) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let _ = sock.set_nodelay(true);
            let live = Arc::clone(&live);
            live.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let (mut r, mut w) = sock.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                live.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    Ok((addr, task))
}

/// Where a benchmark sends its bytes, and how many of its connections are still open.
#[derive(Clone)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    live: Arc<AtomicUsize>,
}

/// An open hub-side connection with its message and receive buffer.
struct Conn {
    stream: TcpStream,
    msg: Vec<u8>,
    buf: Vec<u8>,
}

impl Conn {
    fn open(rt: &Runtime, target: &Target, msg: Vec<u8>) -> Arc<tokio::sync::Mutex<Self>> {
        let stream = must(rt.block_on(hub_connect(target.addr)));
        let buf = vec![0u8; msg.len()];
        Arc::new(tokio::sync::Mutex::new(Self { stream, msg, buf }))
    }
}

/// What one timed step does on an open connection.
#[derive(Clone, Copy)]
enum Step {
    /// `msg` there and back (`roundtrip`).
    RoundTrip,
    /// `msg` pushed while its echo is read (`echo_bulk`).
    EchoBulk,
}

/// `iters` steps on `conn`, timed as one batch on the runtime's workers.
fn timed(rt: &Runtime, conn: &Arc<tokio::sync::Mutex<Conn>>, step: Step, iters: u64) -> Duration {
    let conn = Arc::clone(conn);
    on_workers(rt, async move {
        let mut conn = conn.lock().await;
        let Conn { stream, msg, buf } = &mut *conn;
        let start = Instant::now();
        for _ in 0..iters {
            match step {
                Step::RoundTrip => drop(must(roundtrip(stream, msg, buf).await)),
                Step::EchoBulk => must(echo_bulk(stream, msg, buf).await),
            }
        }
        start.elapsed()
    })
}

/// Runs one timed batch as a task on the runtime's workers. Polled from the bench thread
/// instead, every wake-up would cross threads: about 60 µs per round trip on a 2-vCPU VM,
/// more than the tunnel itself adds.
fn on_workers<F>(rt: &Runtime, batch: F) -> Duration
where
    F: Future<Output = Duration> + Send + 'static,
{
    rt.block_on(rt.spawn(batch))
        .unwrap_or_else(|e| panic!("timed batch failed: {e}"))
}

fn bench(c: &mut Criterion) {
    let rt = must(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(Into::into),
    );
    let fixture = must(rt.block_on(Fixture::start()));
    // chacha20-poly1305 is what a stock OpenSSH job negotiates; aes128-gcm is the broker's own
    // first choice and the cheapest per byte with AES-NI.
    let chacha = must(rt.block_on(fixture.job("bench-chacha", russh::cipher::CHACHA20_POLY1305)));
    let aes = must(rt.block_on(fixture.job("bench-aes", russh::cipher::AES_128_GCM)));
    let direct_live = Arc::new(AtomicUsize::new(0));
    let (direct_addr, direct_task) = must(rt.block_on(direct_echo(Arc::clone(&direct_live))));
    let direct = Target {
        name: DIRECT,
        addr: direct_addr,
        live: direct_live,
    };
    let (chacha_t, aes_t) = (chacha.target("chacha20-poly1305"), aes.target("aes128-gcm"));

    round_trips(c, &rt, &[&chacha_t, &direct]);
    throughput(c, &rt, &[&chacha_t, &aes_t, &direct]);
    connection_setup(c, &rt, &[&chacha_t, &direct]);

    direct_task.abort();
    must(rt.block_on(fixture.stop(vec![chacha, aes])));
}

fn round_trips(c: &mut Criterion, rt: &Runtime, targets: &[&Target]) {
    let mut g = c.benchmark_group("tunnel_rtt");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for target in targets {
        let sizes: &[(&str, usize)] = if target.name == DIRECT {
            &[("64B", 64)]
        } else {
            &[("64B", 64), ("1KiB", 1024)]
        };
        for &(size_name, size) in sizes {
            let conn = Conn::open(rt, target, vec![0x5a; size]);
            g.bench_function(BenchmarkId::new(size_name, target.name), |b| {
                b.iter_custom(|iters| timed(rt, &conn, Step::RoundTrip, iters))
            });
        }
    }
    g.finish();
}

fn throughput(c: &mut Criterion, rt: &Runtime, targets: &[&Target]) {
    const SIZE: usize = 1 << 20;
    let mut g = c.benchmark_group("tunnel_throughput");
    g.throughput(Throughput::Bytes(SIZE as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for target in targets {
        let payload = (0..SIZE).map(|i| (i % 251) as u8).collect();
        let conn = Conn::open(rt, target, payload);
        g.bench_function(BenchmarkId::new("echo_1MiB", target.name), |b| {
            b.iter_custom(|iters| timed(rt, &conn, Step::EchoBulk, iters))
        });
        // Checked once, outside the timing: an echo that mangled bytes would void the figure.
        let conn = conn.blocking_lock();
        assert!(conn.buf == conn.msg, "the echo changed the bytes");
    }
    g.finish();
}

fn connection_setup(c: &mut Criterion, rt: &Runtime, targets: &[&Target]) {
    let mut g = c.benchmark_group("tunnel_connect");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for target in targets {
        g.bench_function(BenchmarkId::new("connect_first_byte", target.name), |b| {
            b.iter_custom(|iters| {
                let target = Target::clone(target);
                on_workers(rt, async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let mut stream = must(hub_connect(target.addr).await);
                        must(roundtrip(&mut stream, b"x", &mut [0u8; 1]).await);
                        total += start.elapsed();
                        // A reset instead of FIN leaves no TIME_WAIT behind: thousands of
                        // connections a second would otherwise run the loopback out of ports.
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        drop(stream);
                        must(settle(&target.live, 64).await);
                    }
                    total
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
