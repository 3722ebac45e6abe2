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
use tracing::{Instrument, debug, info, info_span, warn};

use crate::broker::Broker;
use crate::handler::Handler;
use crate::transport::{KillSwitch, Transport};

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
        // russh's own re-key limits (1 GiB either way, 1 h), stated because the job's ssh is told
        // to re-key at half of them (RekeyLimit in the wrapper and the README): a re-exchange the
        // server starts while the client has more than two channel windows of data in flight is
        // ended by russh 0.65 as "pending buffer limit reached", taking every download of the
        // session with it; one the client starts has no such race. These stay as the backstop
        // for clients that do not re-key.
        limits: russh::Limits::default(),
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
        let kill = Arc::new(KillSwitch::default());
        let sock = Transport::new(sock, Arc::clone(&kill));
        let metrics = self.broker.metrics().clone();
        metrics.ssh_sessions_active.inc();
        let (authed_tx, mut authed_rx) = oneshot::channel();
        let handler = Handler::new(
            self.broker.clone(),
            peer,
            session_id,
            Arc::clone(&kill),
            authed_tx,
            started,
        );
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
