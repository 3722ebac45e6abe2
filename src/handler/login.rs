//! Settling a login once its credential was accepted (one live session per credential), and
//! the tunnel a session's `-R` publishes: its key's, or the one its certificate picks.

use std::sync::Arc;

use russh::server::Session;

use super::Handler;
use crate::audit::{Event, Presented};
use crate::broker::LoginRefusal;
use crate::credentials::CertLogin;
use crate::grants::{ForwardRefusal, Grant};
use crate::sessions::LiveSession;

impl Handler {
    /// Settles a login the key check accepted: one live session per credential.
    pub(super) async fn settle_login(&mut self, grant: Arc<Grant>, session: &mut Session) {
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
                    self.broker.audit(Event::SessionReplaced {
                        grant: &grant,
                        old: (old.id, old.peer),
                        peer: self.peer,
                    });
                }
                self.broker.audit(Event::Connected {
                    grant: &grant,
                    peer: self.peer,
                });
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
                self.broker.audit(match &refusal {
                    LoginRefusal::InUse {
                        holder,
                        holder_peer,
                    } => Event::LoginInUse {
                        grant: &grant,
                        peer: self.peer,
                        holder: (*holder, *holder_peer),
                    },
                    other => Event::LoginRefused {
                        peer: self.peer,
                        ssh_user: None,
                        presented: Presented::Tunnel(&grant),
                        reason: other.as_str(),
                        why: other.to_string(),
                    },
                });
                // Into the write buffer right behind the auth success, so the client reads the
                // reason before any answer to what it sends next; the spawned one cuts a client
                // that does not leave.
                let _ = session.disconnect(russh::Disconnect::ByApplication, refusal.message(), "");
                live.disconnect(refusal.message());
            }
        }
    }

    /// Settles a certificate login: it holds no tunnel until its `-R` names one.
    pub(super) fn settle_certificate(&mut self, login: CertLogin, session: &mut Session) {
        let metrics = self.broker.metrics();
        let live = Arc::new(LiveSession::new(
            self.session_id,
            session.handle(),
            self.peer,
            Arc::clone(&self.ctl),
        ));
        self.broker.audit(Event::CertificateConnected {
            login: &login,
            peer: self.peer,
        });
        metrics
            .handshake_duration
            .observe(self.started.elapsed().as_secs_f64());
        self.broker
            .watch_certificate(Arc::clone(&live), login.clone());
        self.cert = Some(login);
        self.live = Some(live);
        if let Some(tx) = self.authed.take() {
            let _ = tx.send(());
        }
    }

    /// The tunnel this session publishes: its key's, or the one its certificate's `-R` picks.
    pub(super) async fn forward_grant(&mut self, port: u32) -> Result<Arc<Grant>, ForwardRefusal> {
        if let Some(grant) = &self.grant {
            return Ok(Arc::clone(grant));
        }
        let (Some(login), Some(live)) = (self.cert.clone(), self.live.clone()) else {
            return Err(ForwardRefusal::NotAuthenticated);
        };
        let (grant, replaced) = self.broker.certificate_tunnel(&login, port, live).await?;
        if let Some(old) = replaced {
            self.broker.audit(Event::SessionReplaced {
                grant: &grant,
                old: (old.id, old.peer),
                peer: self.peer,
            });
        }
        self.grant = Some(Arc::clone(&grant));
        Ok(grant)
    }
}
