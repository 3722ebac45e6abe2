//! The russh handler of one SSH connection: logins, the one remote forward, and refusals of
//! everything else. It holds no policy: the broker decides, this file translates the answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use russh::keys::Certificate;
use russh::keys::HashAlg;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelOpenFailure};
use tokio::sync::oneshot;
use tracing::warn;

use crate::audit::{Event, Presented};
use crate::broker::Broker;
use crate::credentials::CertLogin;
use crate::grants::{ForwardRefusal, Grant};
use crate::sessions::{LiveSession, SessionCtl};
use crate::tunnels::{Link, Stats};

mod login;

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
    /// A certificate login, until it is settled.
    pending_cert: Option<CertLogin>,
    /// The certificate this session logged in with; its tunnel is chosen at `-R` time.
    cert: Option<CertLogin>,
    /// The credential this session logged in with; set once the login is settled.
    grant: Option<Arc<Grant>>,
    /// This session as the credential's holder.
    live: Option<Arc<LiveSession>>,
    /// The forward this session holds, if any.
    link: Option<Arc<Link>>,
}

impl Drop for Handler {
    fn drop(&mut self) {
        if self.cert.is_some() {
            self.broker.release_certificate(self.session_id);
        }
        let Some(grant) = &self.grant else { return };
        self.broker.release(grant, self.session_id);
        let Some(link) = &self.link else { return };
        let still_linked = self.broker.unlink(grant, self.session_id);
        self.broker.audit(Event::Disconnected {
            grant,
            peer: self.peer,
            bytes: (
                link.bytes.bytes_to_job.load(Ordering::Relaxed),
                link.bytes.bytes_from_job.load(Ordering::Relaxed),
            ),
            seconds: link.since.elapsed().unwrap_or_default().as_secs(),
            replaced: !still_linked,
        });
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
            pending_cert: None,
            cert: None,
            grant: None,
            live: None,
            link: None,
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
        self.broker.audit(Event::ForwardRefused {
            grant: self.grant.as_deref(),
            peer: self.peer,
            refusal,
        });
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
                let fingerprint = fingerprint.to_string();
                self.broker.audit(Event::LoginRefused {
                    peer: self.peer,
                    ssh_user: Some(user),
                    presented: Presented::Key(&fingerprint),
                    reason: refusal.as_str(),
                    why: refusal.to_string(),
                });
                self.broker.auth_failed(self.peer.ip());
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        match self
            .broker
            .authenticate_certificate(user, certificate, self.peer.ip())
        {
            Ok(login) => {
                self.pending_cert = Some(login);
                Ok(Auth::Accept)
            }
            Err(refusal) => {
                self.broker.audit(Event::LoginRefused {
                    peer: self.peer,
                    ssh_user: Some(user),
                    presented: Presented::Certificate {
                        key_id: certificate.key_id(),
                        serial: certificate.serial(),
                    },
                    reason: refusal.as_str(),
                    why: refusal.to_string(),
                });
                self.broker.auth_failed(self.peer.ip());
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        self.broker.audit(Event::LoginRefused {
            peer: self.peer,
            ssh_user: Some(user),
            presented: Presented::Password,
            reason: "password",
            why: "password".into(),
        });
        self.broker.auth_failed(self.peer.ip());
        Ok(Auth::reject())
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        if let Some(grant) = self.pending.take() {
            self.settle_login(grant, session).await;
        } else if let Some(login) = self.pending_cert.take() {
            self.settle_certificate(login, session);
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(live) = self.live.clone() else {
            return self.forward_refused(ForwardRefusal::NotAuthenticated);
        };
        let grant = match self.forward_grant(*port).await {
            Ok(g) => g,
            Err(refusal) => return self.forward_refused(refusal),
        };
        let link = Arc::new(Link {
            session: live,
            bind_address: address.to_owned(),
            since: SystemTime::now(),
            bytes: Stats::default(),
        });
        match self.broker.forward(
            &grant,
            address,
            *port,
            Arc::clone(&link),
            self.link.is_some(),
        ) {
            Ok(bound) => {
                self.link = Some(link);
                self.ctl.forwarding.send_replace(true);
                // Setting the port makes russh append it to the reply of a `-R 0` request, so
                // the client prints "Allocated port".
                *port = u32::from(bound);
                self.broker.audit(Event::ForwardGranted {
                    grant: &grant,
                    peer: self.peer,
                    port: bound,
                });
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
        self.broker.audit(Event::ForwardCancelled {
            grant: &grant,
            peer: self.peer,
        });
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
        self.broker.audit(Event::DirectTcpipRefused {
            peer: self.peer,
            target: (host, port),
        });
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
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
