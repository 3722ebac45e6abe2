//! Audit events: one typed enum, and one place (`Event::record`) that writes each event's audit
//! line (`target: "audit"`, an `event` field and the event's own fields) and moves the metric
//! that counts it. Callers describe what happened; they never format an audit line or touch a
//! counter of their own, so the log and the metrics cannot disagree.

use std::net::{IpAddr, SocketAddr};

use tracing::{info, warn};

use crate::credentials::CertLogin;
use crate::grants::{ForwardRefusal, Grant};
use crate::metrics::Metrics;
use crate::record::{EndReason, TunnelRecord};

/// What a refused login presented.
#[derive(Debug, Clone, Copy)]
pub enum Presented<'a> {
    /// A key, by SHA-256 fingerprint.
    Key(&'a str),
    /// A certificate, by key ID and serial.
    Certificate {
        /// Free text from the certificate.
        key_id: &'a str,
        /// The CA's serial.
        serial: u64,
    },
    /// A password (never accepted).
    Password,
    /// A valid credential turned away after the key check (the tunnel it named).
    Tunnel(&'a Grant),
}

/// One audited event.
pub enum Event<'a> {
    /// A tunnel was issued.
    Issued {
        /// The new grant.
        grant: &'a Grant,
        /// Whether the broker made the key (returned once).
        generated_key: bool,
    },
    /// A tunnel's expiry was moved.
    Renewed {
        /// The grant, as renewed.
        grant: &'a Grant,
    },
    /// A tunnel was revoked or expired.
    Ended {
        /// The grant.
        grant: &'a Grant,
        /// Why.
        reason: EndReason,
    },
    /// A tunnel's lease ran out before its expiry.
    LeaseLapsed {
        /// The grant.
        grant: &'a Grant,
    },
    /// A stored tunnel was found expired at start.
    ExpiredWhileDown {
        /// Its record.
        record: &'a TunnelRecord,
    },
    /// A key login settled.
    Connected {
        /// The tunnel its key names.
        grant: &'a Grant,
        /// The job's address.
        peer: SocketAddr,
    },
    /// A certificate login settled.
    CertificateConnected {
        /// What the certificate says.
        login: &'a CertLogin,
        /// The job's address.
        peer: SocketAddr,
    },
    /// A login was refused.
    LoginRefused {
        /// The client's address.
        peer: SocketAddr,
        /// The SSH user name it used (None after the key check).
        ssh_user: Option<&'a str>,
        /// What it presented.
        presented: Presented<'a>,
        /// The metric label.
        reason: &'static str,
        /// Why, for people.
        why: String,
    },
    /// A second login for a credential whose live session answered the probe.
    LoginInUse {
        /// The tunnel.
        grant: &'a Grant,
        /// The newcomer's address.
        peer: SocketAddr,
        /// The live session's number and address.
        holder: (u64, SocketAddr),
    },
    /// A session that stopped answering was replaced by a new login.
    SessionReplaced {
        /// The tunnel.
        grant: &'a Grant,
        /// The old session's number and address.
        old: (u64, SocketAddr),
        /// The new login's address.
        peer: SocketAddr,
    },
    /// The forward moved from one session to another.
    LinkReplaced {
        /// The tunnel id.
        tunnel: &'a str,
        /// Old and new session numbers.
        sessions: (u64, u64),
    },
    /// A `-R` was granted.
    ForwardGranted {
        /// The tunnel.
        grant: &'a Grant,
        /// The job's address.
        peer: SocketAddr,
        /// The hub port.
        port: u16,
    },
    /// A `-R` was refused.
    ForwardRefused {
        /// The tunnel, when the session has one.
        grant: Option<&'a Grant>,
        /// The job's address.
        peer: SocketAddr,
        /// Why.
        refusal: ForwardRefusal,
    },
    /// The job cancelled its forward.
    ForwardCancelled {
        /// The tunnel.
        grant: &'a Grant,
        /// The job's address.
        peer: SocketAddr,
    },
    /// A session holding a forward ended.
    Disconnected {
        /// The tunnel.
        grant: &'a Grant,
        /// The job's address.
        peer: SocketAddr,
        /// Bytes to and from the job over the session.
        bytes: (u64, u64),
        /// How long the forward was held.
        seconds: u64,
        /// Whether a newer session had taken the forward over.
        replaced: bool,
    },
    /// A `-L` (direct-tcpip) was refused.
    DirectTcpipRefused {
        /// The client's address.
        peer: SocketAddr,
        /// Where it wanted to go.
        target: (&'a str, u32),
    },
    /// A reserved port could not be bound.
    PortUnavailable {
        /// The tunnel.
        grant: &'a Grant,
        /// What the bind said.
        error: &'a crate::ports::PoolError,
        /// Why, for people ("port held by another process").
        reason: &'a str,
    },
    /// A reserved port was bound again after being unavailable.
    PortBoundAgain {
        /// The port.
        port: u16,
    },
    /// A certificate's `valid before` passed during its session.
    CertificateExpired {
        /// The session number and address.
        session: (u64, SocketAddr),
    },
    /// A reload withdrew a live session's certificate.
    CertificateRevoked {
        /// The session number and address.
        session: (u64, SocketAddr),
        /// What the certificate says.
        login: &'a CertLogin,
    },
    /// A source passed its failed logins per minute.
    NoisySource {
        /// The source.
        source: IpAddr,
        /// The limit it passed.
        limit: u32,
    },
    /// A tunnel's route was written and seen in the proxy.
    RouteRegistered {
        /// The tunnel id.
        tunnel: &'a str,
        /// The route's path and target, as the proxy shows them.
        path: &'a dyn std::fmt::Display,
        /// Where it sends requests.
        target: &'a dyn std::fmt::Display,
        /// From forward granted to registered.
        after: std::time::Duration,
    },
    /// A route of ours was deleted from the proxy.
    RouteRemoved {
        /// Its path.
        path: &'a dyn std::fmt::Display,
        /// Whether the broker was shutting down.
        shutdown: bool,
    },
    /// SIGHUP reread the credential files.
    CredentialsReloaded {
        /// Certificate sessions cut by it.
        sessions_cut: usize,
    },
}

impl Event<'_> {
    /// Writes the audit line and moves the event's metric.
    pub fn record(&self, metrics: &Metrics) {
        match self {
            Self::Issued {
                grant,
                generated_key,
            } => {
                info!(target: "audit", event = "issue", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), port = grant.port(), fingerprint = %grant.fingerprint(), expires_at = grant.expires_at(), lease_seconds = grant.lease_seconds(), generated_key, auth = grant.auth().as_str(), "tunnel issued");
                metrics.tunnels_issued.inc();
            }
            Self::Renewed { grant } => {
                info!(target: "audit", event = "renew", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), port = grant.port(), expires_at = grant.expires_at(), lease_until = grant.lease_until(), "tunnel renewed");
            }
            Self::Ended { grant, reason } => {
                info!(target: "audit", event = reason.as_str(), tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), port = grant.port(), "tunnel ended");
                metrics
                    .tunnel_revocations
                    .with_label_values(&[reason.as_str()])
                    .inc();
            }
            Self::LeaseLapsed { grant } => {
                info!(target: "audit", event = "lease_lapsed", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), port = grant.port(), renewed_at = grant.renewed_at(), "not renewed within its lease; expiring");
            }
            Self::ExpiredWhileDown { record } => {
                info!(target: "audit", event = "expired", tunnel = %record.id, user = %record.user, server = %record.server_name, port = record.port, "expired while the broker was down");
            }
            Self::Connected { grant, peer } => {
                info!(target: "audit", event = "connect", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), %peer, fingerprint = %grant.fingerprint(), "job logged in");
                metrics
                    .auth_attempts
                    .with_label_values(&["accepted", "ok"])
                    .inc();
            }
            Self::CertificateConnected { login, peer } => {
                info!(target: "audit", event = "connect", user = %login.user, key_id = %login.key_id, serial = login.serial, %peer, auth = "certificate", "job logged in with a certificate");
                metrics
                    .auth_attempts
                    .with_label_values(&["accepted", "certificate"])
                    .inc();
            }
            Self::LoginRefused {
                peer,
                ssh_user,
                presented,
                reason,
                why,
            } => {
                let ssh_user = ssh_user.unwrap_or("-");
                match presented {
                    Presented::Key(fingerprint) => {
                        warn!(target: "audit", event = "auth_refused", %peer, ssh_user, fingerprint, reason, "login refused: {why}");
                    }
                    Presented::Certificate { key_id, serial } => {
                        warn!(target: "audit", event = "auth_refused", %peer, ssh_user, key_id, serial, reason, "certificate login refused: {why}");
                    }
                    Presented::Password => {
                        warn!(target: "audit", event = "auth_refused", %peer, ssh_user, reason, "password login refused");
                    }
                    Presented::Tunnel(grant) => {
                        warn!(target: "audit", event = "auth_refused", tunnel = %grant.id(), %peer, reason, "login refused: {why}");
                    }
                }
                metrics
                    .auth_attempts
                    .with_label_values(&["refused", reason])
                    .inc();
            }
            Self::LoginInUse {
                grant,
                peer,
                holder,
            } => {
                warn!(target: "audit", event = "login_refused_in_use", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), %peer, holder_session = holder.0, holder_peer = %holder.1, "login refused: the credential's live session answered; possible stolen credential");
                metrics
                    .auth_attempts
                    .with_label_values(&["refused", "in_use"])
                    .inc();
            }
            Self::SessionReplaced { grant, old, peer } => {
                info!(target: "audit", event = "session_replaced", tunnel = %grant.id(), user = %grant.user(), old_session = old.0, old_peer = %old.1, %peer, "the previous session did not answer; this login replaces it");
            }
            Self::LinkReplaced { tunnel, sessions } => {
                info!(target: "audit", event = "replaced", tunnel, old_session = sessions.0, new_session = sessions.1, "newer connection replaces the stale one");
                metrics
                    .tunnel_revocations
                    .with_label_values(&["replaced"])
                    .inc();
            }
            Self::ForwardGranted { grant, peer, port } => {
                info!(target: "audit", event = "forward_granted", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), %peer, port, "forward granted");
                metrics
                    .forward_requests
                    .with_label_values(&["granted", "ok"])
                    .inc();
            }
            Self::ForwardRefused {
                grant,
                peer,
                refusal,
            } => {
                let (tunnel, user) = grant.map_or(("-", "-"), |g| (g.id(), g.user()));
                warn!(target: "audit", event = "forward_refused", tunnel, user, %peer, reason = refusal.as_str(), "forward refused: {refusal}");
                metrics
                    .forward_requests
                    .with_label_values(&["refused", refusal.as_str()])
                    .inc();
            }
            Self::ForwardCancelled { grant, peer } => {
                info!(target: "audit", event = "forward_cancelled", tunnel = %grant.id(), %peer, "forward cancelled by the job");
            }
            Self::Disconnected {
                grant,
                peer,
                bytes,
                seconds,
                replaced,
            } => {
                info!(target: "audit", event = "disconnect", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), %peer, bytes_to_job = bytes.0, bytes_from_job = bytes.1, seconds, replaced, "job disconnected");
            }
            Self::DirectTcpipRefused { peer, target } => {
                warn!(target: "audit", event = "direct_tcpip_refused", %peer, host = target.0, port = target.1, "local forward (-L) refused");
                metrics
                    .refused_requests
                    .with_label_values(&["direct_tcpip"])
                    .inc();
            }
            Self::PortUnavailable {
                grant,
                error,
                reason,
            } => {
                warn!(target: "audit", event = "port_unavailable", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), port = grant.port(), %error, "reserved port {}: {reason}; forwards are refused until it is bound again", grant.port());
            }
            Self::PortBoundAgain { port } => {
                info!(target: "audit", event = "port_bound_again", port, "reserved port bound again");
            }
            Self::CertificateExpired { session } => {
                info!(target: "audit", event = "certificate_expired", session = session.0, peer = %session.1, "certificate expired; session closed");
            }
            Self::CertificateRevoked { session, login } => {
                warn!(target: "audit", event = "certificate_revoked", session = session.0, peer = %session.1, user = %login.user, key_id = %login.key_id, serial = login.serial, "certificate revoked; session closed");
            }
            Self::NoisySource { source, limit } => {
                warn!(target: "audit", event = "noisy_source", %source, limit, "source passed its failed logins per minute (reported, not blocked)");
                metrics
                    .ssh_connection_errors
                    .with_label_values(&["rate_limited"])
                    .inc();
            }
            Self::RouteRegistered {
                tunnel,
                path,
                target,
                after,
            } => {
                info!(target: "audit", event = "route_registered", tunnel, path = %path, target = %target, "route registered");
                metrics.route_register_duration.observe(after.as_secs_f64());
            }
            Self::RouteRemoved { path, shutdown } => {
                let why = if *shutdown { " (shutdown)" } else { "" };
                info!(target: "audit", event = "route_removed", path = %path, "route removed{why}");
            }
            Self::CredentialsReloaded { sessions_cut } => {
                info!(target: "audit", event = "credentials_reloaded", sessions_cut, "SIGHUP: CA keys and revocation list read again");
            }
        }
    }
}
