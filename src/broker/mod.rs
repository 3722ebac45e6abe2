//! The broker: issues, revokes and expires tunnels, keeping grants, ports, listeners and the
//! store in step. The admin API and the SSH layer both talk to it and to nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{HashAlg, PrivateKey, PublicKey};

use crate::audit::Event;
use crate::config::Config;
use crate::credentials::{Authority, CertLogin};
use crate::fdstore::FdStore;
use crate::grants::{AuthRefusal, ForwardRefusal, Grant, check_forward};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::ports::PortPool;
use crate::record::{EndReason, unix_now};
use crate::registry::{Registry, StoreJournal, Watcher};
use crate::routes::{RouteState, Routes};
use crate::secret::Secret;
use crate::sessions::{Claim, LiveSession, Sessions};
use crate::store::Store;
use crate::tunnels::{Link, LiveStatus};

mod certificates;
mod issue;
mod lifecycle;
mod renew;
pub use issue::{IssueError, IssueRequest, Issued};
pub use renew::RenewError;

/// Why a login whose key was valid was still turned away; the session is told the message.
#[derive(Debug, thiserror::Error)]
pub enum LoginRefusal {
    /// The credential's live session answered the probe.
    #[error("credential in use by a live session")]
    InUse {
        /// The holder's session number.
        holder: u64,
        /// The holder's address.
        holder_peer: SocketAddr,
    },
    /// `limits.max_sessions` credentials are logged in already.
    #[error("broker at capacity")]
    OverCapacity,
    /// The credential was revoked during the login.
    #[error("credential revoked")]
    Revoked,
    /// The credential expired during the login.
    #[error("credential expired")]
    Expired,
}

impl LoginRefusal {
    /// Metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::InUse { .. } => "in_use",
            Self::OverCapacity => "over_capacity",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }

    /// What the client is told (the job wrapper reads it to tell retry from give-up).
    pub fn message(&self) -> &'static str {
        match self {
            Self::InUse { .. } => "credential in use by a live session",
            Self::OverCapacity => "broker at capacity",
            Self::Revoked => "credential revoked",
            Self::Expired => "credential expired",
        }
    }
}

/// Shared handle to the broker.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    keys: Keys,
    registry: Registry,
    sessions: Arc<Sessions>,
    store: Arc<dyn Store>,
    metrics: Metrics,
    ssh_port: u16,
    /// Where the proxy reaches hub ports (`Config::tunnel_host`).
    tunnel_host: String,
    routes: Option<Routes>,
    failures: crate::limits::FailureLimiter,
    authority: Authority,
    /// Certificate logins, for cutting the ones a reloaded KRL or CA list withdraws.
    cert_sessions: dashmap::DashMap<u64, (Arc<LiveSession>, CertLogin)>,
}

impl Broker {
    /// Builds the broker from loaded parts and restores every stored tunnel: reservations are
    /// bound again, expired ones marked, ended ones past retention purged.
    pub async fn open(
        config: Config,
        keys: Keys,
        store: Arc<dyn Store>,
        metrics: Metrics,
        ssh_addr: SocketAddr,
    ) -> anyhow::Result<Self> {
        let fds = Arc::new(FdStore::disabled());
        Self::open_with_fd_store(config, keys, store, metrics, ssh_addr, fds).await
    }

    /// As `open`, with reservations handed to (and restored ones adopted from) the service
    /// manager's descriptor store `fds`; adopted listeners no live tunnel claims are closed.
    pub async fn open_with_fd_store(
        config: Config,
        keys: Keys,
        store: Arc<dyn Store>,
        metrics: Metrics,
        ssh_addr: SocketAddr,
        fds: Arc<FdStore>,
    ) -> anyhow::Result<Self> {
        let ports = Arc::new(
            PortPool::new(config.tunnels.ports, config.tunnels.bind_address)
                .with_fd_store(Arc::clone(&fds)),
        );
        let carry = crate::tunnels::CarryLimits {
            write_timeout: config.tunnels.write_timeout,
            max_connections: u64::try_from(config.limits.max_connections_per_tunnel)
                .unwrap_or(u64::MAX),
        };
        let ssh_port = config.ssh_public_port(ssh_addr);
        let tunnel_host = config.tunnel_host()?;
        metrics
            .ports_total
            .set(i64::try_from(config.tunnels.ports.len().get()).unwrap_or(i64::MAX));
        let routes = crate::routes::build(
            config.route_sections(),
            config.tunnels.ports,
            tunnel_host.clone(),
            metrics.clone(),
        )?;
        let failures = crate::limits::FailureLimiter::new(config.limits.auth_failures_per_minute);
        let sessions = Arc::new(Sessions::new(config.limits.liveness_probe_timeout));
        let authority = Authority::load(&config.ssh)?;
        let mut watchers: Vec<Arc<dyn Watcher>> = vec![Arc::clone(&sessions) as Arc<dyn Watcher>];
        if let Some(routes) = &routes {
            watchers.push(Arc::new(routes.clone()));
        }
        let journal = Arc::new(StoreJournal(Arc::clone(&store)));
        let registry = Registry::new(
            Arc::clone(&ports),
            metrics.clone(),
            carry,
            journal,
            watchers,
        );
        let broker = Self {
            inner: Arc::new(Inner {
                config,
                keys,
                registry,
                sessions,
                store,
                metrics,
                ssh_port,
                tunnel_host,
                failures,
                routes,
                authority,
                cert_sessions: dashmap::DashMap::new(),
            }),
        };
        broker.restore().await?;
        fds.release_unclaimed();
        Ok(broker)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Records an audit event: its line and its metric.
    pub fn audit(&self, event: crate::audit::Event<'_>) {
        event.record(&self.inner.metrics);
    }

    /// The admin API's bearer token.
    pub fn admin_token(&self) -> &Secret {
        &self.inner.keys.admin_token
    }

    /// The host key, for the SSH server.
    pub fn host_key(&self) -> &PrivateKey {
        &self.inner.keys.host_key
    }

    /// The port jobs connect to.
    pub fn ssh_port(&self) -> u16 {
        self.inner.ssh_port
    }

    /// The host the proxy dials to reach a hub port.
    pub fn tunnel_host(&self) -> &str {
        &self.inner.tunnel_host
    }

    /// The `known_hosts` line handed to jobs.
    pub fn known_hosts_line(&self) -> String {
        self.inner.keys.known_hosts_line(
            self.inner.config.ssh.public_host.as_deref(),
            self.inner.ssh_port,
        )
    }

    /// Counts a failed login from `ip` towards its per-minute limit.
    pub fn auth_failed(&self, ip: std::net::IpAddr) {
        if self
            .inner
            .failures
            .record_failure(ip, std::time::Instant::now())
        {
            self.audit(Event::NoisySource {
                source: ip,
                limit: self.inner.config.limits.auth_failures_per_minute,
            });
        }
    }

    /// Decides an SSH public-key login.
    pub fn authenticate(&self, user: &str, key: &PublicKey) -> Result<Arc<Grant>, AuthRefusal> {
        if key.key_data() == self.inner.keys.host_key.public_key().key_data() {
            return Err(AuthRefusal::HostKey);
        }
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        self.inner.registry.authenticate(
            &self.inner.config.ssh.user,
            user,
            &fingerprint,
            unix_now(),
        )
    }

    /// Makes `session` the one live session of `grant`, unless a live holder answers (then the
    /// newcomer is refused) or the broker is full. Returns the holder it replaced, if any.
    pub async fn claim(
        &self,
        grant: &Grant,
        session: Arc<LiveSession>,
    ) -> Result<Option<Arc<LiveSession>>, LoginRefusal> {
        let sessions = &self.inner.sessions;
        if !sessions.holds(grant.id()) && sessions.len() >= self.inner.config.limits.max_sessions {
            return Err(LoginRefusal::OverCapacity);
        }
        let id = session.id;
        let replaced = match sessions.claim(grant.id(), session).await {
            Claim::Fresh => None,
            Claim::Replaced(old) => Some(old),
            Claim::InUse(holder) => {
                return Err(LoginRefusal::InUse {
                    holder: holder.id,
                    holder_peer: holder.peer,
                });
            }
        };
        // A revoke or expiry during the probe closed whoever held the credential then.
        let ended = grant
            .ended()
            .map(|e| e.reason)
            .or_else(|| (unix_now() >= grant.deadline()).then_some(EndReason::Expired));
        if let Some(reason) = ended {
            sessions.release(grant.id(), id);
            return Err(match reason {
                EndReason::Revoked => LoginRefusal::Revoked,
                EndReason::Expired => LoginRefusal::Expired,
            });
        }
        Ok(replaced)
    }

    /// Session `session_id` of `grant` has ended.
    pub fn release(&self, grant: &Grant, session_id: u64) {
        self.inner.sessions.release(grant.id(), session_id);
    }

    /// Decides a `tcpip-forward` request and, if granted, links the session to the tunnel. The
    /// request's own faults are named first, then a session that already forwards
    /// (`already_forwarding`), then a grant that has ended.
    pub fn forward(
        &self,
        grant: &Grant,
        address: &str,
        port: u32,
        link: Arc<Link>,
        already_forwarding: bool,
    ) -> Result<u16, ForwardRefusal> {
        check_forward(grant, self.inner.config.tunnels.bind_address, address, port)?;
        if already_forwarding {
            return Err(ForwardRefusal::AlreadyForwarding);
        }
        if !grant.active_at(unix_now()) {
            return Err(ForwardRefusal::Ended);
        }
        self.inner.registry.link(grant, link)
    }

    /// Unlinks a session from its tunnel (session end or `cancel-tcpip-forward`); false when a
    /// newer session had already taken it over.
    pub fn unlink(&self, grant: &Grant, session_id: u64) -> bool {
        self.inner.registry.unlink(grant.id(), session_id)
    }

    /// Closes every tunnel listener for shutdown (grants stay issued); waits at most `within`.
    pub async fn close_listeners(&self, within: Duration) -> bool {
        self.inner.registry.close_listeners(within).await
    }

    /// The route worker, when route support is on.
    pub fn routes(&self) -> Option<&Routes> {
        self.inner.routes.as_ref()
    }

    /// The proxy route state of tunnel `id`.
    pub fn route_state(&self, id: &str) -> RouteState {
        self.inner
            .routes
            .as_ref()
            .map_or(RouteState::Disabled, |r| r.state(id))
    }

    /// Every tunnel with its live status, newest first.
    pub fn list(&self) -> Vec<(Arc<Grant>, Option<LiveStatus>)> {
        let mut all: Vec<_> = self
            .inner
            .registry
            .all()
            .into_iter()
            .map(|g| {
                let live = self.inner.registry.status(g.id());
                (g, live)
            })
            .collect();
        all.sort_by(|a, b| {
            b.0.created_at()
                .cmp(&a.0.created_at())
                .then_with(|| a.0.id().cmp(b.0.id()))
        });
        all
    }

    /// One tunnel with its live status.
    pub fn get(&self, id: &str) -> Option<(Arc<Grant>, Option<LiveStatus>)> {
        let grant = self.inner.registry.get(id)?;
        let live = self.inner.registry.status(id);
        Some((grant, live))
    }
}
