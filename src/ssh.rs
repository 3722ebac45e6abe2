//! The SSH front door: a thin russh handler that accepts only logins with issued keys and only
//! the one remote forward each key is for. Every decision is the broker's; this file translates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use russh::keys::HashAlg;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::broker::Broker;
use crate::grants::{ForwardRefusal, Grant, check_forward};
use crate::tunnels::{KillSwitch, Link, Stats};

/// How long a session gets to leave after "broker shutting down".
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// The russh server configuration for the broker.
pub fn server_config(broker: &Broker) -> russh::server::Config {
    let ssh = &broker.config().ssh;
    russh::server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_secs(1),
        // OpenSSH always probes with "none" first; padding that probe only delays every login.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![broker.host_key().clone()],
        max_auth_attempts: ssh.max_auth_attempts,
        keepalive_interval: Some(ssh.keepalive_interval),
        keepalive_max: ssh.keepalive_max,
        // Keepalive replies reset it, so a live quiet peer is never cut; it still bounds a
        // write into a dead socket.
        inactivity_timeout: Some(ssh.keepalive_interval * 8),
        nodelay: true,
        preferred: russh::Preferred {
            // AES-GCM costs least per byte on CPUs with AES-NI; aes128-gcm is implemented but not
            // offered by default. The client's order decides, so this mostly widens the offer.
            cipher: std::borrow::Cow::Borrowed(&[
                russh::cipher::AES_128_GCM,
                russh::cipher::AES_256_GCM,
                russh::cipher::CHACHA20_POLY1305,
                russh::cipher::AES_256_CTR,
                russh::cipher::AES_128_CTR,
            ]),
            ..russh::Preferred::default()
        },
        ..Default::default()
    }
}

/// Accepts SSH connections on `listener` until `shutdown`, then disconnects every session and
/// waits for them (bounded) through `tracker`.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let config = Arc::new(server_config(&broker));
    let limits = broker.config().limits.clone();
    let startups = Arc::new(Semaphore::new(limits.max_startups));
    let metrics = broker.metrics().clone();
    loop {
        let (sock, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "ssh accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Refused before any protocol work: a full house, or a source that keeps failing logins.
        if tracker.len() >= limits.max_sessions {
            metrics
                .ssh_connection_errors
                .with_label_values(&["over_capacity"])
                .inc();
            debug!(%peer, "session cap reached; closing");
            continue;
        }
        if broker.source_blocked(peer.ip()) {
            metrics
                .ssh_connection_errors
                .with_label_values(&["rate_limited"])
                .inc();
            debug!(%peer, "too many failed logins from this source; closing");
            continue;
        }
        let conn = Connection {
            broker: broker.clone(),
            config: Arc::clone(&config),
            shutdown: shutdown.clone(),
            startups: Arc::clone(&startups),
            login_grace: limits.login_grace,
        };
        let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("session", id, %peer);
        tracker.spawn(conn.run(sock, peer, id).instrument(span));
    }
    drop(listener);
}

struct Connection {
    broker: Broker,
    config: Arc<russh::server::Config>,
    shutdown: CancellationToken,
    startups: Arc<Semaphore>,
    login_grace: Duration,
}

impl Connection {
    async fn run(self, sock: TcpStream, peer: SocketAddr, session_id: u64) {
        let started = Instant::now();
        let _ = sock.set_nodelay(true);
        let kill = match dup(&sock) {
            Ok(k) => Arc::new(k),
            Err(e) => {
                warn!(error = %e, "cannot duplicate the socket; dropping the connection");
                return;
            }
        };
        let metrics = self.broker.metrics().clone();
        metrics.ssh_sessions_active.inc();
        let (authed_tx, mut authed_rx) = oneshot::channel();
        let handler = Handler {
            broker: self.broker.clone(),
            peer,
            session_id,
            kill: Arc::clone(&kill),
            authed: Some(authed_tx),
            started,
            grant: None,
            link: None,
        };
        let login_deadline = tokio::time::sleep(self.login_grace);
        tokio::pin!(login_deadline);
        let mut logged_in = false;
        let mut shutting_down = false;
        // Waiting for a handshake slot counts against the login deadline too.
        metrics.ssh_startups_waiting.inc();
        let slot = tokio::select! {
            p = Arc::clone(&self.startups).acquire_owned() => Some(p.ok()),
            () = &mut login_deadline => None,
        };
        metrics.ssh_startups_waiting.dec();
        let Some(mut startup) = slot else {
            debug!("no handshake slot within the login grace time");
            metrics
                .ssh_connection_errors
                .with_label_values(&["login_timeout"])
                .inc();
            metrics.ssh_sessions_active.dec();
            return;
        };
        // The version exchange happens inside run_stream, so the login deadline covers it too.
        let running = tokio::select! {
            r = russh::server::run_stream(Arc::clone(&self.config), sock, handler) => r,
            () = &mut login_deadline => {
                debug!("no version line within the login grace time");
                metrics.ssh_connection_errors.with_label_values(&["login_timeout"]).inc();
                metrics.ssh_sessions_active.dec();
                return;
            }
        };
        let mut running = match running {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "ssh handshake failed");
                metrics
                    .ssh_connection_errors
                    .with_label_values(&["handshake"])
                    .inc();
                metrics.ssh_sessions_active.dec();
                kill.disarm();
                return;
            }
        };
        let handle = running.handle();
        let result = loop {
            tokio::select! {
                r = &mut running => break r,
                r = &mut authed_rx, if !logged_in => {
                    // Err: the handler is gone, so the session is ending anyway.
                    logged_in = true;
                    startup = None;
                    let _ = r;
                }
                () = &mut login_deadline, if !logged_in => {
                    info!("no login within the login grace time; dropping");
                    metrics.ssh_connection_errors.with_label_values(&["login_timeout"]).inc();
                    logged_in = true;
                    kill.kill();
                }
                () = self.shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    let h = handle.clone();
                    let k = Arc::clone(&kill);
                    tokio::spawn(async move {
                        let bye = h.disconnect(russh::Disconnect::ByApplication, "broker shutting down".into(), String::new());
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, bye).await;
                        tokio::time::sleep(SHUTDOWN_GRACE).await;
                        k.kill();
                    });
                }
            }
        };
        drop(startup);
        kill.disarm();
        metrics.ssh_sessions_active.dec();
        match result {
            Ok(()) => debug!("session closed"),
            Err(e) => {
                metrics
                    .ssh_connection_errors
                    .with_label_values(&["session"])
                    .inc();
                debug!(error = %format!("{e:#}"), "session ended with an error");
            }
        }
    }
}

fn dup(sock: &TcpStream) -> std::io::Result<KillSwitch> {
    let dup = socket2::SockRef::from(sock).try_clone()?;
    Ok(KillSwitch::new(dup.into()))
}

/// One SSH connection's handler. Drop unlinks its forward, so a session's end always frees the
/// tunnel for the job's next connection.
struct Handler {
    broker: Broker,
    peer: SocketAddr,
    session_id: u64,
    kill: Arc<KillSwitch>,
    authed: Option<oneshot::Sender<()>>,
    started: Instant,
    grant: Option<Arc<Grant>>,
    /// The forward this session holds, if any.
    link: Option<Arc<Link>>,
}

impl Drop for Handler {
    fn drop(&mut self) {
        let (Some(grant), Some(link)) = (&self.grant, &self.link) else {
            return;
        };
        let still_linked = self.broker.unlink(grant, self.session_id);
        let seconds = link.since.elapsed().unwrap_or_default().as_secs();
        info!(
            target: "audit",
            event = "disconnect",
            tunnel = %grant.id(),
            user = %grant.user(),
            server = %grant.server_name(),
            peer = %self.peer,
            bytes_to_job = link.bytes.bytes_to_job.load(Ordering::Relaxed),
            bytes_from_job = link.bytes.bytes_from_job.load(Ordering::Relaxed),
            seconds,
            replaced = !still_linked,
            "job disconnected"
        );
    }
}

impl Handler {
    fn refuse(&self, kind: &'static str) {
        warn!(kind, "refused");
        self.broker
            .metrics()
            .refused_requests
            .with_label_values(&[kind])
            .inc();
    }

    async fn refuse_channel(&self, kind: &'static str, reply: ChannelOpenHandle) {
        self.refuse(kind);
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
    }

    fn forward_refused(&self, refusal: ForwardRefusal) -> Result<bool, anyhow::Error> {
        let (tunnel, user) = self
            .grant
            .as_ref()
            .map_or(("-", "-"), |g| (g.id(), g.user()));
        warn!(target: "audit", event = "forward_refused", tunnel, user, peer = %self.peer, reason = refusal.as_str(), "forward refused: {refusal}");
        self.broker
            .metrics()
            .forward_requests
            .with_label_values(&["refused", refusal.as_str()])
            .inc();
        Ok(false)
    }
}

impl russh::server::Handler for Handler {
    type Error = anyhow::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let fingerprint = key.public_key.fingerprint(HashAlg::Sha256);
        let metrics = self.broker.metrics();
        match self.broker.authenticate(user, key.public_key) {
            Ok(grant) => {
                info!(target: "audit", event = "connect", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), peer = %self.peer, %fingerprint, "job logged in");
                metrics
                    .auth_attempts
                    .with_label_values(&["accepted", "ok"])
                    .inc();
                metrics
                    .handshake_duration
                    .observe(self.started.elapsed().as_secs_f64());
                self.grant = Some(grant);
                Ok(Auth::Accept)
            }
            Err(refusal) => {
                warn!(target: "audit", event = "auth_refused", peer = %self.peer, ssh_user = user, %fingerprint, reason = refusal.as_str(), "login refused: {refusal}");
                self.broker.auth_failed(self.peer.ip());
                metrics
                    .auth_attempts
                    .with_label_values(&["refused", refusal.as_str()])
                    .inc();
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        warn!(target: "audit", event = "auth_refused", peer = %self.peer, ssh_user = user, reason = "password", "password login refused");
        self.broker.auth_failed(self.peer.ip());
        self.broker
            .metrics()
            .auth_attempts
            .with_label_values(&["refused", "password"])
            .inc();
        Ok(Auth::reject())
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(tx) = self.authed.take() {
            let _ = tx.send(());
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(grant) = self.grant.clone() else {
            return self.forward_refused(ForwardRefusal::NotAuthenticated);
        };
        // The request's own faults first, so the refusal names the real reason.
        if let Err(refusal) = check_forward(&grant, address, *port) {
            return self.forward_refused(refusal);
        }
        if self.link.is_some() {
            return self.forward_refused(ForwardRefusal::AlreadyForwarding);
        }
        let link = Arc::new(Link {
            session_id: self.session_id,
            handle: session.handle(),
            bind_address: address.to_owned(),
            peer: self.peer,
            since: SystemTime::now(),
            kill: Arc::clone(&self.kill),
            bytes: Stats::default(),
        });
        match self
            .broker
            .forward(&grant, address, *port, Arc::clone(&link))
        {
            Ok(bound) => {
                self.link = Some(link);
                // Setting the port makes russh append it to the reply of a `-R 0` request, so
                // the client prints "Allocated port".
                *port = u32::from(bound);
                info!(target: "audit", event = "forward_granted", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), peer = %self.peer, port = bound, "forward granted");
                self.broker
                    .metrics()
                    .forward_requests
                    .with_label_values(&["granted", "ok"])
                    .inc();
                Ok(true)
            }
            Err(refusal) => self.forward_refused(refusal),
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        _address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(grant) = self.grant.clone() else {
            return Ok(false);
        };
        if self.link.is_none() || port != u32::from(grant.port()) {
            return Ok(false);
        }
        self.link = None;
        self.broker.unlink(&grant, self.session_id);
        info!(target: "audit", event = "forward_cancelled", tunnel = %grant.id(), peer = %self.peer, "forward cancelled by the job");
        Ok(true)
    }

    async fn streamlocal_forward(
        &mut self,
        _socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.forward_refused(ForwardRefusal::UnixSocket)
    }

    async fn channel_open_session(
        &mut self,
        _c: Channel<Msg>,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel("session", reply).await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _c: Channel<Msg>,
        host: &str,
        port: u32,
        _oa: &str,
        _op: u32,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        warn!(target: "audit", event = "direct_tcpip_refused", peer = %self.peer, host, port, "local forward (-L) refused");
        self.refuse_channel("direct_tcpip", reply).await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _c: Channel<Msg>,
        _path: &str,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel("direct_streamlocal", reply).await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _c: Channel<Msg>,
        _a: &str,
        _p: u32,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel("x11", reply).await;
        Ok(())
    }

    async fn channel_open_forwarded_tcpip(
        &mut self,
        _c: Channel<Msg>,
        _h: &str,
        _p: u32,
        _oa: &str,
        _op: u32,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_channel("forwarded_tcpip", reply).await;
        Ok(())
    }
}
