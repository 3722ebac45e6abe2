//! Per-job credentials: who may log in, as which JupyterHub server, and which hub port they get.
//!
//! Invariants: one `Grant` per issued tunnel id; a key fingerprint indexes at most one grant
//! (re-using a key for a second grant is refused at issue); a grant's port never changes. Only
//! `ended` and a renewal's new expiry and renewal time change after issue. This module is plain
//! Rust: the SSH layer asks it questions and translates the answers.

use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::record::{Ended, TunnelRecord};

/// One issued credential and the port it reserves.
#[derive(Debug)]
pub struct Grant {
    /// Fixed at issue; the parts that change live in `live`.
    record: TunnelRecord,
    live: Mutex<Live>,
    /// Held while a change to this grant is written to the store, so a renewal and an end
    /// reach the store in the order they happened (an end written first and then overwritten
    /// by a renewal would resurrect the tunnel at the next start).
    writes: tokio::sync::Mutex<()>,
}

/// What a grant's renewals and end change.
#[derive(Debug, Clone, Copy)]
struct Live {
    ended: Option<Ended>,
    expires_at: u64,
    renewed_at: Option<u64>,
}

impl Grant {
    /// Wraps a stored record.
    pub fn new(record: TunnelRecord) -> Self {
        let live = Mutex::new(Live {
            ended: record.ended,
            expires_at: record.expires_at,
            renewed_at: record.renewed_at,
        });
        Self {
            record,
            live,
            writes: tokio::sync::Mutex::new(()),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tunnel id.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// JupyterHub user.
    pub fn user(&self) -> &str {
        &self.record.user
    }

    /// JupyterHub server name ("" for the default server).
    pub fn server_name(&self) -> &str {
        &self.record.server_name
    }

    /// The reserved hub port.
    pub fn port(&self) -> u16 {
        self.record.port
    }

    /// The job key's SHA-256 fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.record.fingerprint
    }

    /// Which kind of credential may publish it.
    pub fn auth(&self) -> crate::credentials::AuthKind {
        self.record.auth
    }

    /// Whether it has neither ended nor expired at unix time `now`.
    pub fn active_at(&self, now: u64) -> bool {
        self.ended().is_none() && now < self.deadline()
    }

    /// Unix seconds.
    pub fn created_at(&self) -> u64 {
        self.record.created_at
    }

    /// The hard expiry, Unix seconds; renewals move it.
    pub fn expires_at(&self) -> u64 {
        self.live().expires_at
    }

    /// The lifetime asked for at issue, if recorded.
    pub fn ttl_seconds(&self) -> Option<u64> {
        self.record.ttl_seconds
    }

    /// The lease, if the tunnel has one.
    pub fn lease_seconds(&self) -> Option<u64> {
        self.record.lease_seconds
    }

    /// The last renewal, if any.
    pub fn renewed_at(&self) -> Option<u64> {
        self.live().renewed_at
    }

    /// When the lease runs out, if there is one.
    pub fn lease_until(&self) -> Option<u64> {
        let renewed_at = self.live().renewed_at;
        self.record.lease_seconds.map(|lease| {
            renewed_at
                .unwrap_or(self.record.created_at)
                .saturating_add(lease)
        })
    }

    /// When the credential stops working: the expiry or the lease, whichever is first (the
    /// same rule as `TunnelRecord::deadline`, without copying the record on the login path).
    pub fn deadline(&self) -> u64 {
        let expires_at = self.expires_at();
        self.lease_until().map_or(expires_at, |l| l.min(expires_at))
    }

    /// Why and when it ended, if it has.
    pub fn ended(&self) -> Option<Ended> {
        self.live().ended
    }

    /// Ends the grant; returns false if it had already ended (the first reason stands).
    pub fn end(&self, ended: Ended) -> bool {
        let mut live = self.live();
        if live.ended.is_some() {
            return false;
        }
        live.ended = Some(ended);
        true
    }

    /// Applies a renewal that the store has recorded.
    pub fn renewed(&self, expires_at: u64, renewed_at: u64) {
        let mut live = self.live();
        live.expires_at = expires_at;
        live.renewed_at = Some(renewed_at);
    }

    /// The lock a writer of this grant's record holds from reading it to storing it.
    pub fn writes(&self) -> &tokio::sync::Mutex<()> {
        &self.writes
    }

    /// The record as it should be stored now.
    pub fn to_record(&self) -> TunnelRecord {
        let live = *self.live();
        TunnelRecord {
            ended: live.ended,
            expires_at: live.expires_at,
            renewed_at: live.renewed_at,
            ..self.record.clone()
        }
    }
}

/// Why a login was refused; each maps to an audit line and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefusal {
    /// No grant holds this key.
    #[error("unknown key")]
    UnknownKey,
    /// The grant's lifetime is over.
    #[error("credential expired")]
    Expired,
    /// The grant was revoked.
    #[error("credential revoked")]
    Revoked,
    /// The key is valid but the SSH user name is not the configured one.
    #[error("wrong ssh user")]
    WrongUser,
    /// The broker's own host key, which no job may log in with.
    #[error("the broker's host key")]
    HostKey,
}

impl AuthRefusal {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownKey => "unknown_key",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::WrongUser => "wrong_user",
            Self::HostKey => "host_key",
        }
    }
}

/// Why a remote forward was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ForwardRefusal {
    /// The request named another port than the reserved one.
    #[error("port {requested} is not this credential's port {reserved}")]
    WrongPort {
        /// What the client asked for.
        requested: u32,
        /// The grant's port.
        reserved: u16,
    },
    /// The request asked to listen on another address than the tunnels' bind address.
    #[error("bind address is not the tunnels' loopback address")]
    NotLoopback,
    /// This session already holds the forward.
    #[error("this session already holds the forward")]
    AlreadyForwarding,
    /// The request came before a successful login.
    #[error("not authenticated")]
    NotAuthenticated,
    /// The grant ended while the session was up.
    #[error("credential no longer valid")]
    Ended,
    /// The reserved port is not bound by the broker (another process holds it, typically one
    /// that bound it while the broker restarted); it is retried in the background.
    #[error("reserved port {port} unavailable ({reason})")]
    PortUnavailable {
        /// The tunnel's port.
        port: u16,
        /// Why, e.g. "port held by another process".
        reason: &'static str,
    },
    /// Unix-socket forwards are never granted.
    #[error("unix socket forwarding is not allowed")]
    UnixSocket,
    /// The tunnel's live session answered; a second one may not take it.
    #[error("the tunnel is held by a live session")]
    InUse,
    /// A certificate login names no waiting certificate tunnel of its user at this port.
    #[error("no certificate tunnel of this user waits on that port")]
    NoTunnel,
    /// `-R 0` from a certificate login whose user has several waiting tunnels.
    #[error("several certificate tunnels wait for this user: name the port (-R PORT:...)")]
    Ambiguous,
    /// The certificate does not carry `permit-port-forwarding`.
    #[error("the certificate does not permit port forwarding")]
    NotPermitted,
    /// `limits.max_sessions` tunnels are held already.
    #[error("broker at capacity")]
    OverCapacity,
}

impl ForwardRefusal {
    /// Every label `as_str` can return.
    pub const LABELS: [&'static str; 12] = [
        "wrong_port",
        "not_loopback",
        "already_forwarding",
        "not_authenticated",
        "ended",
        "port_unavailable",
        "unix_socket",
        "in_use",
        "no_tunnel",
        "ambiguous",
        "not_permitted",
        "over_capacity",
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WrongPort { .. } => "wrong_port",
            Self::NotLoopback => "not_loopback",
            Self::AlreadyForwarding => "already_forwarding",
            Self::NotAuthenticated => "not_authenticated",
            Self::Ended => "ended",
            Self::PortUnavailable { .. } => "port_unavailable",
            Self::UnixSocket => "unix_socket",
            Self::InUse => "in_use",
            Self::NoTunnel => "no_tunnel",
            Self::Ambiguous => "ambiguous",
            Self::NotPermitted => "not_permitted",
            Self::OverCapacity => "over_capacity",
        }
    }
}

/// Checks a `tcpip-forward` request against the grant: port 0 or exactly the reserved port,
/// and a bind address that names where the port really listens (`bind`), so the reply never
/// claims an address the broker does not use. OpenSSH sends "localhost" when `-R` names none.
pub fn check_forward(
    grant: &Grant,
    bind: std::net::IpAddr,
    address: &str,
    port: u32,
) -> Result<(), ForwardRefusal> {
    if port != 0 && port != u32::from(grant.port()) {
        return Err(ForwardRefusal::WrongPort {
            requested: port,
            reserved: grant.port(),
        });
    }
    let ours = match address {
        "localhost" => bind.is_loopback(),
        other => other.parse::<std::net::IpAddr>() == Ok(bind),
    };
    if !ours {
        return Err(ForwardRefusal::NotLoopback);
    }
    Ok(())
}

/// All grants, indexed by id and by key fingerprint.
#[derive(Debug, Default)]
pub struct Grants {
    by_id: DashMap<String, Arc<Grant>>,
    by_fingerprint: DashMap<String, String>,
}

impl Grants {
    /// Adds `grant`; refuses a key fingerprint another grant already holds. Certificate
    /// tunnels have no key and are not indexed by one.
    pub fn insert(&self, grant: Arc<Grant>) -> Result<(), DuplicateKey> {
        if grant.auth() == crate::credentials::AuthKind::Key {
            match self.by_fingerprint.entry(grant.fingerprint().to_owned()) {
                Entry::Occupied(_) => return Err(DuplicateKey),
                Entry::Vacant(v) => {
                    v.insert(grant.id().to_owned());
                }
            }
        }
        self.by_id.insert(grant.id().to_owned(), grant);
        Ok(())
    }

    /// `user`'s active certificate tunnels at unix time `now`.
    pub fn certificate_tunnels(&self, user: &str, now: u64) -> Vec<Arc<Grant>> {
        self.by_id
            .iter()
            .filter(|g| {
                g.auth() == crate::credentials::AuthKind::Certificate
                    && g.user() == user
                    && g.active_at(now)
            })
            .map(|g| Arc::clone(&g))
            .collect()
    }

    /// The grant `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Grant>> {
        self.by_id.get(id).map(|g| Arc::clone(&g))
    }

    /// Every grant, in no particular order.
    pub fn all(&self) -> Vec<Arc<Grant>> {
        self.by_id.iter().map(|g| Arc::clone(&g)).collect()
    }

    /// How many grants are held (active or ended but retained).
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no grant is held.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Forgets `id` entirely.
    pub fn remove(&self, id: &str) -> Option<Arc<Grant>> {
        let (_, grant) = self.by_id.remove(id)?;
        self.by_fingerprint
            .remove_if(grant.fingerprint(), |_, v| v == id);
        Some(grant)
    }

    /// Decides a login: the key must belong to a live grant and the SSH user must be `ssh_user`.
    pub fn authenticate(
        &self,
        expected_user: &str,
        user: &str,
        fingerprint: &str,
        now: u64,
    ) -> Result<Arc<Grant>, AuthRefusal> {
        let id = self
            .by_fingerprint
            .get(fingerprint)
            .ok_or(AuthRefusal::UnknownKey)?
            .clone();
        let grant = self.get(&id).ok_or(AuthRefusal::UnknownKey)?;
        if let Some(ended) = grant.ended() {
            return Err(match ended.reason {
                crate::store::EndReason::Revoked => AuthRefusal::Revoked,
                crate::store::EndReason::Expired => AuthRefusal::Expired,
            });
        }
        if now >= grant.deadline() {
            return Err(AuthRefusal::Expired);
        }
        if user != expected_user {
            return Err(AuthRefusal::WrongUser);
        }
        Ok(grant)
    }
}

/// The key is already bound to another tunnel.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("this public key is already used by another tunnel")]
pub struct DuplicateKey;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::EndReason;

    fn grant(id: &str, fp: &str, expires_at: u64) -> Arc<Grant> {
        Arc::new(Grant::new(TunnelRecord {
            id: id.into(),
            user: "alice".into(),
            server_name: String::new(),
            port: 20005,
            public_key: String::new(),
            fingerprint: fp.into(),
            created_at: 0,
            expires_at,
            ..TunnelRecord::default()
        }))
    }

    #[test]
    fn authentication_decisions() {
        let g = Grants::default();
        g.insert(grant("a", "fpA", 100)).unwrap();
        g.insert(grant("b", "fpB", 100)).unwrap();
        assert!(g.insert(grant("c", "fpA", 100)).is_err());
        assert_eq!(g.authenticate("tb", "tb", "fpA", 50).unwrap().id(), "a");
        assert_eq!(
            g.authenticate("tb", "tb", "nope", 50).unwrap_err(),
            AuthRefusal::UnknownKey
        );
        assert_eq!(
            g.authenticate("tb", "root", "fpA", 50).unwrap_err(),
            AuthRefusal::WrongUser
        );
        assert_eq!(
            g.authenticate("tb", "tb", "fpA", 100).unwrap_err(),
            AuthRefusal::Expired
        );
        assert!(g.get("b").unwrap().end(Ended {
            at: 1,
            reason: EndReason::Revoked
        }));
        assert!(!g.get("b").unwrap().end(Ended {
            at: 2,
            reason: EndReason::Expired
        }));
        assert_eq!(
            g.authenticate("tb", "tb", "fpB", 50).unwrap_err(),
            AuthRefusal::Revoked
        );
        g.remove("a");
        assert_eq!(
            g.authenticate("tb", "tb", "fpA", 50).unwrap_err(),
            AuthRefusal::UnknownKey
        );
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn forward_requests() {
        let g = grant("a", "fp", 100);
        let bind: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        for ok in [("localhost", 0), ("127.0.0.1", 0), ("127.0.0.1", 20005)] {
            assert_eq!(check_forward(&g, bind, ok.0, ok.1), Ok(()), "{ok:?}");
        }
        assert!(matches!(
            check_forward(&g, bind, "localhost", 20006),
            Err(ForwardRefusal::WrongPort { .. })
        ));
        // Loopback addresses the port does not listen on would be echoed back as a lie.
        for bad in [
            "0.0.0.0",
            "",
            "*",
            "::",
            "::1",
            "127.0.0.2",
            "127.1.2.3",
            "10.1.2.3",
            "hub.example.org",
        ] {
            assert_eq!(
                check_forward(&g, bind, bad, 0),
                Err(ForwardRefusal::NotLoopback),
                "{bad:?}"
            );
        }
        let v6: std::net::IpAddr = "::1".parse().unwrap();
        assert_eq!(check_forward(&g, v6, "::1", 0), Ok(()));
        assert_eq!(check_forward(&g, v6, "localhost", 0), Ok(()));
        assert!(check_forward(&g, v6, "127.0.0.1", 0).is_err());
    }
}
