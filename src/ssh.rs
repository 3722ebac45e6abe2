//! The SSH front door: the russh server configuration, the accept loop with its limits, and one
//! task per connection that bounds the login and ends the session on revoke or shutdown. What
//! happens inside a session is `handler.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use russh::{MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

use crate::accept::AcceptErrors;
use crate::broker::Broker;
use crate::handler::Handler;
use crate::preauth::{PreAuth, Ticket};
use crate::sessions::{SessionCtl, tell_to_go};
use crate::transport::Transport;

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
        // No `nodelay`: russh applies it only in `run_on_socket`; the accepted socket gets
        // TCP_NODELAY in `Connection::run` (tests/ssh_settings.rs checks it).
        // Re-key after `ssh.rekey_limit` bytes either way (default russh's own 1 GiB) or 1 h.
        // A re-exchange the broker starts while the client has a window of data in flight on
        // several channels used to end the session in russh 0.65.1 ("pending buffer limit
        // reached"); the in-tree patch (patches/README.md) allows the window the client holds on
        // every channel, and tests/tunnel_lifecycle.rs forces that case. The job wrapper's
        // `RekeyLimit=512M 30m` (the client re-keys first) stays as belt and braces for a broker
        // built without the patch.
        limits: rekey_limits(ssh.rekey_limit),
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
            // Compression only once logged in (zlib@openssh.com), never before: inflating what an
            // unauthenticated peer sends is work and risk nobody needs.
            compression: std::borrow::Cow::Borrowed(&[
                russh::compression::NONE,
                russh::compression::ZLIB_LEGACY,
            ]),
            ..russh::Preferred::default()
        },
        ..Default::default()
    }
}

/// russh's re-key limits with `ssh.rekey_limit` bytes either way and its own hour; clamped to
/// what `russh::Limits::new` accepts (config validation already refuses more).
fn rekey_limits(bytes: u64) -> russh::Limits {
    use crate::config::{REKEY_LIMIT_MAX, REKEY_LIMIT_MIN};
    let bytes = usize::try_from(bytes.clamp(REKEY_LIMIT_MIN, REKEY_LIMIT_MAX)).unwrap_or(1 << 30);
    russh::Limits::new(bytes, bytes, russh::Limits::default().rekey_time_limit)
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
    let preauth = Arc::new(PreAuth::new(
        limits.max_unauthenticated,
        limits.max_unauthenticated_per_source,
    ));
    let metrics = broker.metrics().clone();
    let mut accept_errors = AcceptErrors::new("ssh");
    loop {
        let (sock, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(a) => {
                    accept_errors.accepted();
                    a
                }
                Err(e) => {
                    accept_errors.pause(&e).await;
                    continue;
                }
            },
        };
        let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
        let ctl = Arc::new(SessionCtl::default());
        // Room for the newcomer is made among connections that have not logged in; logged-in
        // sessions are bounded apart (limits.max_sessions, at login).
        let (ticket, evicted) = preauth.admit(
            id,
            peer.ip(),
            Arc::clone(&ctl.activity),
            Arc::clone(&ctl.kill),
        );
        if evicted > 0 {
            metrics
                .ssh_connection_errors
                .with_label_values(&["evicted"])
                .inc_by(evicted as u64);
            debug!(%peer, evicted, "unauthenticated connections at their bound; closed the idlest");
        }
        let conn = Connection {
            broker: broker.clone(),
            config: Arc::clone(&config),
            shutdown: shutdown.clone(),
            startups: Arc::clone(&startups),
            login_grace: limits.login_grace,
            forward_grace: limits.forward_grace,
        };
        let span = info_span!("session", id, %peer);
        tracker.spawn(conn.run(sock, peer, id, ctl, ticket).instrument(span));
    }
    drop(listener);
}

struct Connection {
    broker: Broker,
    config: Arc<russh::server::Config>,
    shutdown: CancellationToken,
    startups: Arc<Semaphore>,
    login_grace: Duration,
    forward_grace: Duration,
}

impl Connection {
    async fn run(
        self,
        sock: TcpStream,
        peer: SocketAddr,
        session_id: u64,
        ctl: Arc<SessionCtl>,
        ticket: Ticket,
    ) {
        let started = Instant::now();
        let _ = sock.set_nodelay(true);
        let metrics = self.broker.metrics().clone();
        metrics.ssh_sessions_active.inc();
        let _ended = EndedOnDrop(ctl.ended.clone());
        let evicted = ticket.evicted().clone();
        let mut ticket = Some(ticket);
        let (authed_tx, mut authed_rx) = oneshot::channel();
        let login_deadline = tokio::time::sleep(self.login_grace);
        tokio::pin!(login_deadline);
        let mut logged_in = false;
        let mut shutting_down = false;
        // Waiting for a handshake slot counts against the login deadline too. A client that
        // speaks while it waits is marked, so idle ones are the first evicted.
        metrics.ssh_startups_waiting.inc();
        let mut spoke = false;
        let slot = loop {
            tokio::select! {
                p = Arc::clone(&self.startups).acquire_owned() => break Some(p.ok()),
                () = &mut login_deadline => break None,
                () = evicted.cancelled() => break None,
                r = sock.readable(), if !spoke => {
                    spoke = true;
                    if r.is_ok() {
                        ctl.activity.saw_bytes();
                    }
                }
            }
        };
        metrics.ssh_startups_waiting.dec();
        let Some(mut startup) = slot else {
            if !evicted.is_cancelled() {
                debug!("no handshake slot within the login grace time");
                metrics
                    .ssh_connection_errors
                    .with_label_values(&["login_timeout"])
                    .inc();
            }
            metrics.ssh_sessions_active.dec();
            return;
        };
        let handler = Handler::new(
            self.broker.clone(),
            peer,
            session_id,
            Arc::clone(&ctl),
            authed_tx,
            started,
        );
        let sock = Transport::watched(sock, Arc::clone(&ctl.kill), Arc::clone(&ctl.activity));
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
                return;
            }
        };
        let handle = running.handle();
        let mut forwarding = ctl.forwarding.subscribe();
        let idle_deadline = tokio::time::sleep(self.forward_grace);
        tokio::pin!(idle_deadline);
        let mut idle_closed = false;
        let result = loop {
            tokio::select! {
                r = &mut running => break r,
                r = &mut authed_rx, if !logged_in => {
                    // Err: the handler is gone, so the session is ending anyway.
                    logged_in = true;
                    startup = None;
                    ticket = None;
                    idle_deadline.as_mut().reset(tokio::time::Instant::now() + self.forward_grace);
                    let _ = r;
                }
                () = &mut login_deadline, if !logged_in => {
                    info!("no login within the login grace time; dropping");
                    metrics.ssh_connection_errors.with_label_values(&["login_timeout"]).inc();
                    logged_in = true;
                    ctl.kill.kill();
                }
                r = forwarding.changed(), if logged_in && !idle_closed => {
                    if r.is_ok() && !*forwarding.borrow_and_update() {
                        idle_deadline.as_mut().reset(tokio::time::Instant::now() + self.forward_grace);
                    }
                }
                () = &mut idle_deadline, if logged_in && !idle_closed && !*forwarding.borrow() => {
                    info!("logged in but no forward within the forward grace time; closing");
                    metrics.ssh_connection_errors.with_label_values(&["no_forward"]).inc();
                    idle_closed = true;
                    tell_to_go(handle.clone(), Arc::clone(&ctl), "no forward requested");
                }
                () = self.shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    let h = handle.clone();
                    let k = Arc::clone(&ctl.kill);
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
        drop(ticket);
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

/// Marks the session ended however the connection task leaves.
struct EndedOnDrop(CancellationToken);

impl Drop for EndedOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
