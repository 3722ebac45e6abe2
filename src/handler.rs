//! The russh handler of one SSH connection: logins, the one remote forward, and refusals of
//! everything else. It holds no policy: the broker decides, this file translates the answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use russh::keys::HashAlg;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelOpenFailure};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::broker::{Broker, LoginRefusal};
use crate::grants::{ForwardRefusal, Grant, check_forward};
use crate::sessions::{LiveSession, SessionCtl};
use crate::tunnels::{Link, Stats};

/// One SSH connection's handler. Drop unlinks its forward, so a session's end always frees the
/// tunnel for the job's next connection.
pub(crate) struct Handler {
    broker: Broker,
    peer: SocketAddr,
    session_id: u64,
    ctl: Arc<SessionCtl>,
    authed: Option<oneshot::Sender<()>>,
    started: Instant,
    /// The credential whose key was accepted, until the login is settled.
    pending: Option<Arc<Grant>>,
    /// The credential this session logged in with; set once the login is settled.
    grant: Option<Arc<Grant>>,
    /// This session as the credential's holder.
    live: Option<Arc<LiveSession>>,
    /// The forward this session holds, if any.
    link: Option<Arc<Link>>,
}

impl Drop for Handler {
    fn drop(&mut self) {
        let Some(grant) = &self.grant else { return };
        self.broker.release(grant, self.session_id);
        let Some(link) = &self.link else { return };
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
    /// A handler for connection `session_id` from `peer`; `authed` fires on a successful login.
    pub(crate) fn new(
        broker: Broker,
        peer: SocketAddr,
        session_id: u64,
        ctl: Arc<SessionCtl>,
        authed: oneshot::Sender<()>,
        started: Instant,
    ) -> Self {
        Self {
            broker,
            peer,
            session_id,
            ctl,
            authed: Some(authed),
            started,
            pending: None,
            grant: None,
            live: None,
            link: None,
        }
    }

    /// Settles a login the key check accepted: one live session per credential.
    async fn settle_login(&mut self, grant: Arc<Grant>, session: &mut Session) {
        let metrics = self.broker.metrics().clone();
        let live = Arc::new(LiveSession::new(
            self.session_id,
            session.handle(),
            self.peer,
            Arc::clone(&self.ctl),
        ));
        match self.broker.claim(&grant, Arc::clone(&live)).await {
            Ok(replaced) => {
                if let Some(old) = replaced {
                    info!(target: "audit", event = "session_replaced", tunnel = %grant.id(), user = %grant.user(), old_session = old.id, old_peer = %old.peer, peer = %self.peer, "the credential's previous session did not answer; this login replaces it");
                }
                info!(target: "audit", event = "connect", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), peer = %self.peer, fingerprint = %grant.fingerprint(), "job logged in");
                metrics
                    .auth_attempts
                    .with_label_values(&["accepted", "ok"])
                    .inc();
                metrics
                    .handshake_duration
                    .observe(self.started.elapsed().as_secs_f64());
                self.grant = Some(grant);
                self.live = Some(live);
                if let Some(tx) = self.authed.take() {
                    let _ = tx.send(());
                }
            }
            Err(refusal) => {
                if let LoginRefusal::InUse {
                    holder,
                    holder_peer,
                } = &refusal
                {
                    warn!(target: "audit", event = "login_refused_in_use", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), peer = %self.peer, holder_session = holder, %holder_peer, "login refused: the credential's live session answered; possible stolen credential");
                } else {
                    warn!(target: "audit", event = "auth_refused", tunnel = %grant.id(), peer = %self.peer, reason = refusal.as_str(), "login refused: {refusal}");
                }
                metrics
                    .auth_attempts
                    .with_label_values(&["refused", refusal.as_str()])
                    .inc();
                // Into the write buffer right behind the auth success, so the client reads the
                // reason before any answer to what it sends next; the spawned one cuts a client
                // that does not leave.
                let _ = session.disconnect(russh::Disconnect::ByApplication, refusal.message(), "");
                live.disconnect(refusal.message());
            }
        }
    }

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
        match self.broker.authenticate(user, key.public_key) {
            Ok(grant) => {
                // Not ours yet: `auth_succeeded` settles it against a live holder.
                self.pending = Some(grant);
                Ok(Auth::Accept)
            }
            Err(refusal) => {
                warn!(target: "audit", event = "auth_refused", peer = %self.peer, ssh_user = user, %fingerprint, reason = refusal.as_str(), "login refused: {refusal}");
                self.broker.auth_failed(self.peer.ip());
                self.broker
                    .metrics()
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

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        if let Some(grant) = self.pending.take() {
            self.settle_login(grant, session).await;
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let (Some(grant), Some(live)) = (self.grant.clone(), self.live.clone()) else {
            return self.forward_refused(ForwardRefusal::NotAuthenticated);
        };
        // The request's own faults first, so the refusal names the real reason.
        let bind = self.broker.config().tunnels.bind_address;
        if let Err(refusal) = check_forward(&grant, bind, address, *port) {
            return self.forward_refused(refusal);
        }
        if self.link.is_some() {
            return self.forward_refused(ForwardRefusal::AlreadyForwarding);
        }
        let link = Arc::new(Link {
            session: live,
            bind_address: address.to_owned(),
            since: SystemTime::now(),
            bytes: Stats::default(),
        });
        match self
            .broker
            .forward(&grant, address, *port, Arc::clone(&link))
        {
            Ok(bound) => {
                self.link = Some(link);
                self.ctl.forwarding.send_replace(true);
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
        self.ctl.forwarding.send_replace(false);
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
