//! Why a login or a forward is refused, and the forward request's own check.

use super::Grant;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::test_grant as grant;

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
