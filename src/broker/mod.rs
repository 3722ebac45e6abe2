//! The broker: issues, revokes and expires tunnels, keeping grants, ports, listeners and the
//! store in step. The admin API and the SSH layer both talk to it and to nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::credentials::{AuthKind, Authority, CertLogin};
use crate::fdstore::FdStore;
use crate::grants::{AuthRefusal, ForwardRefusal, Grant, Grants, check_forward};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::ports::{PoolError, PortPool};
use crate::routes::{Route, RouteState, Routes};
use crate::secret::Secret;
use crate::sessions::{Claim, LiveSession, Sessions};
use crate::store::{EndReason, Ended, Store, TunnelRecord, unix_now};
use crate::tunnels::{Link, LiveStatus, Tunnels};

mod certificates;
mod renew;
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

/// What the spawner asks for.
#[derive(Debug, Clone, Default)]
pub struct IssueRequest {
    /// JupyterHub user name.
    pub user: String,
    /// JupyterHub server name, "" for the default server.
    pub server_name: String,
    /// Requested lifetime; the configured default when None.
    pub ttl: Option<Duration>,
    /// The job's own public key (OpenSSH one-line form); the broker makes one when None.
    pub public_key: Option<String>,
    /// Which credential may publish it: an issued key, or the user's CA certificates.
    pub auth: AuthKind,
    /// Lease in seconds; `tunnels.lease` when None (see `lease::issue_lease`).
    pub lease_seconds: Option<u64>,
}

/// A freshly issued tunnel.
#[derive(Debug)]
pub struct Issued {
    /// The grant.
    pub grant: Arc<Grant>,
    /// The private key the broker made, returned once and never stored.
    pub private_key: Option<Secret>,
}

/// Why an issue request failed; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The request itself is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// No hub port is free (503).
    #[error("{0}")]
    NoPort(PoolError),
    /// The state store could not record it (503): nothing was issued.
    #[error("state store unavailable: {0:#}")]
    Store(anyhow::Error),
}

/// Shared handle to the broker.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    keys: Keys,
    grants: Grants,
    tunnels: Tunnels,
    sessions: Sessions,
    ports: Arc<PortPool>,
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
        let tunnels = Tunnels::new(Arc::clone(&ports), metrics.clone(), carry);
        let ssh_port = config.ssh_public_port(ssh_addr);
        let tunnel_host = config.tunnel_host()?;
        metrics
            .ports_total
            .set(i64::try_from(config.tunnels.ports.len().get()).unwrap_or(i64::MAX));
        let routes = if config.chp.enabled {
            let backend = Arc::new(crate::chp::ChpClient::from_config(&config.chp)?);
            Some(Routes::new(
                backend,
                config.chp.base_url.clone(),
                tunnel_host.clone(),
                config.tunnels.ports,
                config.chp.reconcile_interval,
                metrics.clone(),
            ))
        } else {
            None
        };
        let failures = crate::limits::FailureLimiter::new(config.limits.auth_failures_per_minute);
        let sessions = Sessions::new(config.limits.liveness_probe_timeout);
        let authority = Authority::load(&config.ssh)?;
        let broker = Self {
            inner: Arc::new(Inner {
                config,
                keys,
                grants: Grants::default(),
                tunnels,
                sessions,
                ports,
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

    async fn restore(&self) -> anyhow::Result<()> {
        let store = Arc::clone(&self.inner.store);
        let records = tokio::task::spawn_blocking(move || store.load())
            .await
            .context("loading state")??;
        let now = unix_now();
        let (mut active, mut kept) = (0, 0);
        for mut record in records {
            if record.ended.is_none() && now >= record.deadline() {
                record.ended = Some(Ended {
                    at: record.deadline(),
                    reason: EndReason::Expired,
                });
                info!(target: "audit", event = "expired", tunnel = %record.id, user = %record.user, server = %record.server_name, port = record.port, "expired while the broker was down");
                self.persist(record.clone()).await?;
            }
            if let Some(ended) = record.ended {
                if ended
                    .at
                    .saturating_add(self.inner.config.tunnels.retention.as_secs())
                    <= now
                {
                    self.unpersist(record.id.clone()).await?;
                } else {
                    kept += 1;
                    let grant = Arc::new(Grant::new(record));
                    if self.inner.grants.insert(grant).is_err() {
                        warn!("duplicate key in stored ended tunnel; skipped");
                    }
                }
                continue;
            }
            // On failure the tunnel logs why (audit) and retries the bind in the background.
            let listener = self.inner.ports.reserve_exact(record.port);
            if listener.is_err() {
                self.inner.ports.mark_reserved(record.port);
            }
            let grant = Arc::new(Grant::new(record));
            if self.inner.grants.insert(Arc::clone(&grant)).is_err() {
                warn!(tunnel = %grant.id(), "duplicate key in stored tunnel; skipped");
                self.inner.ports.release(grant.port());
                continue;
            }
            self.inner.tunnels.start(grant, listener);
            active += 1;
        }
        self.update_port_gauge();
        info!(active, ended = kept, "state restored");
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
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

    /// Issues a tunnel: validates, reserves a port, persists, then starts serving the port.
    pub async fn issue(&self, req: IssueRequest) -> Result<Issued, IssueError> {
        crate::names::check_user(&req.user).map_err(|e| IssueError::BadRequest(e.to_string()))?;
        crate::names::check_server(&req.server_name)
            .map_err(|e| IssueError::BadRequest(e.to_string()))?;
        let cfg = &self.inner.config.tunnels;
        let ttl = req.ttl.unwrap_or(cfg.default_ttl);
        crate::lease::check_ttl(ttl, cfg).map_err(IssueError::BadRequest)?;
        let lease_seconds =
            crate::lease::issue_lease(req.lease_seconds, cfg).map_err(IssueError::BadRequest)?;
        let id = new_id();
        let (public_text, fingerprint, private_key) = match req.auth {
            AuthKind::Key => self.key_material(req.public_key.as_deref())?,
            AuthKind::Certificate => {
                if req.public_key.is_some() {
                    return Err(IssueError::BadRequest(
                        "a certificate tunnel takes no public_key: the certificate is the key"
                            .into(),
                    ));
                }
                if !self.inner.authority.enabled() {
                    return Err(IssueError::BadRequest(
                        "certificate tunnels need ssh.trusted_user_ca_keys in the broker's config"
                            .into(),
                    ));
                }
                // Never a SHA256 fingerprint, so no key can ever match it.
                (String::new(), format!("certificate:{id}"), None)
            }
        };

        let now = unix_now();
        let expires_at = now
            .checked_add(ttl.as_secs())
            .ok_or_else(|| IssueError::BadRequest("ttl_seconds is too large".into()))?;
        let (port, listener) = self.inner.ports.reserve().map_err(IssueError::NoPort)?;
        let record = TunnelRecord {
            id,
            user: req.user,
            server_name: req.server_name,
            port,
            public_key: public_text,
            fingerprint,
            created_at: now,
            expires_at,
            ended: None,
            auth: req.auth,
            ttl_seconds: Some(ttl.as_secs()),
            lease_seconds,
            renewed_at: None,
        };
        let grant = Arc::new(Grant::new(record.clone()));
        if self.inner.grants.insert(Arc::clone(&grant)).is_err() {
            drop(listener);
            self.inner.ports.release(port);
            return Err(IssueError::BadRequest(
                "this public key is already used by another tunnel".into(),
            ));
        }
        if let Err(e) = self.persist(record).await {
            self.inner.grants.remove(grant.id());
            drop(listener);
            self.inner.ports.release(port);
            error!(error = %format!("{e:#}"), "issue failed: state store unwritable");
            return Err(IssueError::Store(e));
        }
        self.inner.tunnels.start(Arc::clone(&grant), Ok(listener));
        self.inner.metrics.tunnels_issued.inc();
        self.update_port_gauge();
        info!(target: "audit", event = "issue", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), port, fingerprint = %grant.fingerprint(), expires_at = grant.expires_at(), lease_seconds = grant.lease_seconds(), generated_key = private_key.is_some(), auth = grant.auth().as_str(), "tunnel issued");
        Ok(Issued { grant, private_key })
    }

    /// The job key of a key tunnel: the one given, or a fresh one (returned once, never kept).
    fn key_material(
        &self,
        given: Option<&str>,
    ) -> Result<(String, String, Option<Secret>), IssueError> {
        let (public, private_key) = match given {
            Some(text) => {
                let key = PublicKey::from_openssh(text.trim()).map_err(|e| {
                    IssueError::BadRequest(format!("public_key is not an OpenSSH public key: {e}"))
                })?;
                (key, None)
            }
            None => {
                let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
                    .map_err(|e| IssueError::Store(anyhow::anyhow!("generating a key: {e}")))?;
                let pem = key
                    .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                    .map_err(|e| IssueError::Store(anyhow::anyhow!("encoding a key: {e}")))?;
                (key.public_key().clone(), Some(Secret::new(pem.as_str())))
            }
        };
        if public.key_data() == self.inner.keys.host_key.public_key().key_data() {
            return Err(IssueError::BadRequest(
                "public_key is the broker's own host key".into(),
            ));
        }
        let mut public_clean = public.clone();
        public_clean.set_comment("");
        let public_text = public_clean
            .to_openssh()
            .map_err(|e| IssueError::BadRequest(format!("public_key cannot be encoded: {e}")))?;
        let fingerprint = public.fingerprint(HashAlg::Sha256).to_string();
        Ok((public_text, fingerprint, private_key))
    }

    /// Revokes tunnel `id`: refuses its key from now on, disconnects its session, frees its
    /// port. Revoking an ended tunnel is a no-op. The revocation holds in memory even when the
    /// store cannot record it; the error then says so.
    pub async fn revoke(&self, id: &str) -> Result<bool, anyhow::Error> {
        let Some(grant) = self.inner.grants.get(id) else {
            return Ok(false);
        };
        self.end(&grant, EndReason::Revoked).await?;
        Ok(true)
    }

    async fn end(&self, grant: &Arc<Grant>, reason: EndReason) -> anyhow::Result<()> {
        if !grant.end(Ended {
            at: unix_now(),
            reason,
        }) {
            return Ok(());
        }
        let message = match reason {
            EndReason::Revoked => "credential revoked",
            EndReason::Expired => "credential expired",
        };
        self.inner.tunnels.close(grant.id(), message);
        // Also a session that logged in but holds no forward.
        self.inner.sessions.close(grant.id(), message);
        if let Some(routes) = &self.inner.routes {
            routes.unwant(grant.id());
        }
        self.inner
            .metrics
            .tunnel_revocations
            .with_label_values(&[reason.as_str()])
            .inc();
        self.update_port_gauge();
        info!(target: "audit", event = reason.as_str(), tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), port = grant.port(), "tunnel ended");
        // After a renewal in flight has stored its record, so this end is the last write.
        let _writes = grant.writes().lock().await;
        self.persist(grant.to_record())
            .await
            .context("the tunnel is ended in memory, but the state store could not record it")
    }

    /// Ends expired tunnels and forgets ended ones past retention.
    pub async fn reap(&self) {
        let now = unix_now();
        let retention = self.inner.config.tunnels.retention.as_secs();
        for grant in self.inner.grants.all() {
            match grant.ended() {
                None if now >= grant.deadline() => {
                    if grant.deadline() < grant.expires_at() {
                        info!(target: "audit", event = "lease_lapsed", tunnel = %grant.id(), user = %grant.user(), server = %grant.server_name(), port = grant.port(), renewed_at = grant.renewed_at(), "not renewed within its lease");
                    }
                    if let Err(e) = self.end(&grant, EndReason::Expired).await {
                        error!(tunnel = %grant.id(), error = %format!("{e:#}"), "expiry not persisted");
                    }
                }
                Some(ended) if ended.at.saturating_add(retention) <= now => {
                    match self.unpersist(grant.id().to_owned()).await {
                        Ok(()) => {
                            self.inner.grants.remove(grant.id());
                        }
                        // Kept in memory and retried next tick, so the record cannot outlive us on disk.
                        Err(e) => {
                            error!(tunnel = %grant.id(), error = %format!("{e:#}"), "purge not persisted")
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Runs `reap` four times a second until `cancel`, so an expired credential's session is
    /// gone within a second of its end (a quarter to notice, at most a second to close).
    pub async fn run_reaper(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => self.reap().await,
            }
        }
    }

    /// Counts a failed login from `ip` towards its per-minute limit.
    pub fn auth_failed(&self, ip: std::net::IpAddr) {
        if self
            .inner
            .failures
            .record_failure(ip, std::time::Instant::now())
        {
            self.inner
                .metrics
                .ssh_connection_errors
                .with_label_values(&["rate_limited"])
                .inc();
            warn!(target: "audit", event = "noisy_source", source = %ip, limit = self.inner.config.limits.auth_failures_per_minute, "source passed its failed logins per minute (reported, not blocked)");
        }
    }

    /// Decides an SSH public-key login.
    pub fn authenticate(&self, user: &str, key: &PublicKey) -> Result<Arc<Grant>, AuthRefusal> {
        if key.key_data() == self.inner.keys.host_key.public_key().key_data() {
            return Err(AuthRefusal::HostKey);
        }
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        self.inner
            .grants
            .authenticate(&self.inner.config.ssh.user, user, &fingerprint, unix_now())
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

    /// Logged-in sessions.
    pub fn sessions_logged_in(&self) -> usize {
        self.inner.sessions.len()
    }

    /// Decides a `tcpip-forward` request and, if granted, links the session to the tunnel.
    pub fn forward(
        &self,
        grant: &Grant,
        address: &str,
        port: u32,
        link: Arc<Link>,
    ) -> Result<u16, ForwardRefusal> {
        check_forward(grant, self.inner.config.tunnels.bind_address, address, port)?;
        if grant.ended().is_some() || unix_now() >= grant.deadline() {
            return Err(ForwardRefusal::Ended);
        }
        let port = self.inner.tunnels.attach(grant.id(), link)?;
        if let Some(routes) = &self.inner.routes {
            let chp = &self.inner.config.chp;
            routes.want(
                grant.id(),
                Route::for_server(
                    &chp.base_url,
                    grant.user(),
                    grant.server_name(),
                    &self.inner.tunnel_host,
                    port,
                ),
            );
        }
        Ok(port)
    }

    /// Unlinks a session from its tunnel (session end or `cancel-tcpip-forward`); false when a
    /// newer session had already taken it over.
    pub fn unlink(&self, grant: &Grant, session_id: u64) -> bool {
        let detached = self.inner.tunnels.detach(grant.id(), session_id);
        if detached && let Some(routes) = &self.inner.routes {
            routes.unwant(grant.id());
        }
        detached
    }

    /// Closes every tunnel listener for shutdown (grants stay issued); waits at most `within`.
    pub async fn close_listeners(&self, within: Duration) -> bool {
        self.inner.tunnels.close_listeners(within).await
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
            .grants
            .all()
            .into_iter()
            .map(|g| {
                let live = self.inner.tunnels.status(g.id());
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
        let grant = self.inner.grants.get(id)?;
        let live = self.inner.tunnels.status(id);
        Some((grant, live))
    }

    fn update_port_gauge(&self) {
        let free = i64::try_from(self.inner.ports.free()).unwrap_or(i64::MAX);
        self.inner.metrics.ports_free.set(free);
    }

    async fn persist(&self, record: TunnelRecord) -> anyhow::Result<()> {
        let store = Arc::clone(&self.inner.store);
        tokio::task::spawn_blocking(move || store.put(&record))
            .await
            .context("store task")?
    }

    async fn unpersist(&self, id: String) -> anyhow::Result<()> {
        let store = Arc::clone(&self.inner.store);
        tokio::task::spawn_blocking(move || store.remove(&id))
            .await
            .context("store task")?
    }
}

/// `tb_` + 128 random bits in hex: unguessable, so an id alone grants nothing.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("tb_{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `restore` fuzz target: an end time near u64::MAX overflowed the retention sum.
    #[tokio::test]
    async fn restore_survives_extreme_stored_times() {
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::store::RedbStore::open(tmp.path()).unwrap();
        let record = |id: &str, expires_at, ended| TunnelRecord {
            id: id.into(),
            user: "u".into(),
            server_name: String::new(),
            port: 1,
            public_key: String::new(),
            fingerprint: format!("SHA256:{id}"),
            created_at: 0,
            expires_at,
            ended,
            ..TunnelRecord::default()
        };
        store
            .put(&record(
                "a",
                u64::MAX,
                Some(Ended {
                    at: u64::MAX,
                    reason: EndReason::Revoked,
                }),
            ))
            .unwrap();
        store.put(&record("b", 0, None)).unwrap();
        let config = Config::parse("[chp]\nenabled = false\n[tunnels]\nports = \"1-1\"\n").unwrap();
        let keys = Keys::load_or_create(&tmp.path().join("keys")).unwrap();
        let addr: SocketAddr = "127.0.0.1:2222".parse().unwrap();
        let broker = Broker::open(config, keys, Arc::new(store), Metrics::new().unwrap(), addr)
            .await
            .unwrap();
        broker.reap().await;
        assert_eq!(
            broker.get("a").map(|(g, _)| g.ended().map(|e| e.reason)),
            Some(Some(EndReason::Revoked))
        );
        // Expired at time 0: long past retention, so it is purged at restore.
        assert!(broker.get("b").is_none());
    }

    #[test]
    fn ids_are_distinct() {
        let a = new_id();
        assert!(a.starts_with("tb_") && a.len() == 35);
        assert_ne!(a, new_id());
    }
}
