//! Certificate logins on the broker: deciding them, choosing the tunnel a certificate login
//! publishes, and cutting a certificate's session when it expires or a reload withdraws it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use russh::keys::Certificate;

use super::{Broker, LoginRefusal};
use crate::audit::Event;
use crate::credentials::{CertLogin, CertRefusal};
use crate::grants::{ForwardRefusal, Grant};
use crate::record::unix_now;
use crate::sessions::LiveSession;

impl Broker {
    /// Decides a certificate login under SSH user `user` from `peer`.
    pub fn authenticate_certificate(
        &self,
        user: &str,
        cert: &Certificate,
        peer: IpAddr,
    ) -> Result<CertLogin, CertRefusal> {
        if user != self.inner.config.ssh.user {
            return Err(CertRefusal::WrongUser);
        }
        self.inner.authority.check(cert, peer, unix_now())
    }

    /// Keeps `session` under watch for its certificate's life: it is told to go when the
    /// certificate's `valid before` passes, or when a reload revokes it or drops its CA.
    pub fn watch_certificate(&self, session: Arc<LiveSession>, login: CertLogin) {
        let valid_before = login.valid_before;
        self.inner
            .cert_sessions
            .insert(session.id, (Arc::clone(&session), login));
        if valid_before == u64::MAX {
            return;
        }
        let until = SystemTime::UNIX_EPOCH + Duration::from_secs(valid_before);
        let left = until
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let metrics = self.inner.metrics.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = session.ended() => {}
                () = tokio::time::sleep(left) => {
                    Event::CertificateExpired { session: (session.id, session.peer) }.record(&metrics);
                    session.disconnect("certificate expired");
                }
            }
        });
    }

    /// Certificate session `session_id` has ended.
    pub fn release_certificate(&self, session_id: u64) {
        self.inner.cert_sessions.remove(&session_id);
    }

    /// The tunnel a certificate login publishes with `-R port` (0: its user's one waiting
    /// certificate tunnel), made `session`'s own as a key login's would be. Returns the session
    /// it replaced, if any.
    pub async fn certificate_tunnel(
        &self,
        login: &CertLogin,
        port: u32,
        session: Arc<LiveSession>,
    ) -> Result<(Arc<Grant>, Option<Arc<LiveSession>>), ForwardRefusal> {
        if !login.may_forward {
            return Err(ForwardRefusal::NotPermitted);
        }
        let mut waiting = self
            .inner
            .registry
            .certificate_tunnels(&login.user, unix_now());
        let grant = if port == 0 {
            waiting.retain(|g| !self.inner.sessions.holds(g.id()));
            match waiting.len() {
                0 => return Err(ForwardRefusal::NoTunnel),
                1 => waiting.pop().ok_or(ForwardRefusal::NoTunnel)?,
                _ => return Err(ForwardRefusal::Ambiguous),
            }
        } else {
            waiting
                .into_iter()
                .find(|g| u32::from(g.port()) == port)
                .ok_or(ForwardRefusal::NoTunnel)?
        };
        let replaced = self.claim(&grant, session).await.map_err(|r| match r {
            LoginRefusal::InUse { .. } => ForwardRefusal::InUse,
            LoginRefusal::OverCapacity => ForwardRefusal::OverCapacity,
            LoginRefusal::Revoked | LoginRefusal::Expired => ForwardRefusal::Ended,
        })?;
        Ok((grant, replaced))
    }

    /// Reads the CA list and the KRL again (SIGHUP) and cuts every certificate session they
    /// now withdraw; returns how many. On a read error the old lists stay in force.
    pub fn reload_credentials(&self) -> anyhow::Result<usize> {
        self.inner.authority.reload()?;
        let mut cut = 0;
        for entry in self.inner.cert_sessions.iter() {
            let (session, login) = entry.value();
            if self.inner.authority.withdrawn(login) {
                self.audit(Event::CertificateRevoked {
                    session: (session.id, session.peer),
                    login,
                });
                session.disconnect("certificate revoked");
                cut += 1;
            }
        }
        Ok(cut)
    }
}
