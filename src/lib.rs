//! tunnelbot: an SSH reverse-tunnel broker for JupyterHub on HPC clusters.
//!
//! Layout:
//! - `config`   TOML structs, defaults, `validate()`
//! - `secret`   a string that never prints
//! - `keys`     keys folder: host key and admin token, permissions
//! - `record`   the domain record of one issued tunnel (no dependencies of its own)
//! - `store`    the crash-safe record of issued tunnels (redb, or Redis for a pair), behind
//!   the `Store` seam; the registry's journal; `[store]` in `store::settings`
//! - `standby`  an active/standby pair on one Redis: the lease, its renewal, what losing it does
//! - `port_range` the hub port range, a domain type whose invariant lives in its constructor
//! - `ports`    the hub port pool; a reservation is a bound listener
//! - `fdstore`  systemd: READY=1, and the descriptor store that keeps reserved ports across restarts
//! - `reservation` a port reserved for a tunnel being issued; dropping it frees the port
//! - `limits`   per-source failed-login reporting
//! - `preauth`  connections not logged in yet: bounded in total and per source
//! - `sessions` one live login per credential, the liveness probe, telling a session to go
//! - `credentials` the credential seam: certificates from the site's CA, their KRL
//! - `grants`   issued-key credentials: login and forward decisions (plain Rust)
//! - `lease`    renewal and lease rules (plain Rust); `broker::renew` applies them
//! - `tunnels`  a listener per active grant, linked to the job's session
//! - `link`     a session's hold on a tunnel: the forward and its byte counts
//! - `bridge`   one hub connection carried over one forwarded-tcpip channel
//! - `reload`   SIGHUP: the credential files read again
//! - `routes`   the typed route, the backend seam, the wanted set and its reconcile worker;
//!   `routes::chp` is configurable-http-proxy's REST API as a backend
//! - `names`    which JupyterHub user and server names are accepted (route-safe)
//! - `registry` the one owner of every tunnel's life: grant + live tunnel per id, typed changes
//!   that the journal (store) records and the watchers (routes, sessions) follow
//! - `broker`   the façade the admin API and the SSH edge call: decides, then asks the registry
//! - `ssh`      the SSH accept loop, limits and per-connection lifecycle
//! - `transport` the session's socket: cut from outside (revoke, expiry), quick ACKs at login
//! - `handler`  the thin russh handler: logins, the one forward, refusals
//! - `admin`    the loopback HTTP API, with header/body timeouts and a connection cap
//! - `tokens`   which token may call what: the admin token, spawner tokens from files
//! - `accept`   accept errors: back-off and rate-bounded warnings, for every accept loop
//! - `descriptors` RLIMIT_NOFILE raised at start; a config that cannot fit is refused
//! - `audit`    the audit events: one enum, one place writing each line and moving its metric
//! - `metrics`  the Prometheus registry passed to every component
//! - `cli`      the admin commands, as a client of the admin API
//! - `shutdown` signals
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod accept;
pub mod admin;
pub mod audit;
mod bridge;
pub mod broker;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod descriptors;
pub mod fdstore;
pub mod grants;
mod handler;
pub mod keys;
pub mod lease;
pub mod limits;
pub mod link;
pub mod metrics;
pub mod names;
pub mod port_range;
pub mod ports;
pub mod preauth;
pub mod record;
pub mod registry;
pub mod reload;
pub mod reservation;
pub mod routes;
pub mod secret;
pub mod sessions;
pub mod shutdown;
pub mod ssh;
pub mod standby;
pub mod store;
pub mod tokens;
pub mod transport;
pub mod tunnels;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use broker::Broker;
pub use config::Config;

/// How long sessions get to leave once shutdown starts.
const DRAIN: Duration = Duration::from_secs(8);

/// How long deleting the proxy routes may take at shutdown, before the listeners close anyway.
const WITHDRAW: Duration = Duration::from_secs(3);

/// The listeners `run` serves, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// Jobs connect here.
    pub ssh: TcpListener,
    /// The admin API.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both listeners from the config (port 0 picks a free port).
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let ssh = TcpListener::bind(config.ssh.listen)
            .await
            .with_context(|| format!("binding ssh.listen {}", config.ssh.listen))?;
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("binding admin.listen {}", config.admin.listen))?;
        Ok(Self { ssh, admin })
    }

    /// The SSH listener's actual address.
    pub fn ssh_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.ssh.local_addr()?)
    }

    /// The admin listener's actual address.
    pub fn admin_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.admin.local_addr()?)
    }
}

/// Loads keys and state and restores every stored tunnel; binds nothing but tunnel ports.
pub async fn open(config: Config, ssh_addr: SocketAddr) -> anyhow::Result<Broker> {
    open_with_fd_store(config, ssh_addr, fdstore::FdStore::disabled()).await
}

/// As `open`, keeping tunnel listeners in the service manager's store `fds` and adopting the
/// ones it passed back (`FdStore::from_env`).
pub async fn open_with_fd_store(
    config: Config,
    ssh_addr: SocketAddr,
    fds: fdstore::FdStore,
) -> anyhow::Result<Broker> {
    anyhow::ensure!(
        config.store.backend == store::StoreBackend::Redb,
        "the redis store is opened by the holder of the lease: standby::acquire, then open_with_store"
    );
    let store = store::RedbStore::open(&config.state_dir)?;
    open_with_store(config, ssh_addr, Arc::new(fds), Arc::new(store)).await
}

/// As `open_with_fd_store`, on `store` (the Redis store of the lease holder).
pub async fn open_with_store(
    config: Config,
    ssh_addr: SocketAddr,
    fds: Arc<fdstore::FdStore>,
    store: Arc<dyn store::Store>,
) -> anyhow::Result<Broker> {
    let keys = keys::Keys::load_or_create(&config.keys_dir)?;
    let metrics = metrics::Metrics::new()?;
    Broker::open_with_fd_store(config, keys, store, metrics, ssh_addr, fds).await
}

/// Serves until `shutdown` resolves, then, in this order: deletes the broker's proxy routes
/// (at most 3 s), stops accepting, tells every job "broker shutting down", waits a bounded
/// time for sessions to end, and closes the tunnel listeners last. The proxy therefore never
/// routes to a port the broker has let go.
pub async fn run(
    broker: Broker,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    // The route worker stops first, on its own token, so nothing writes a route once the
    // withdrawal has begun.
    let routes_cancel = CancellationToken::new();
    let sessions = TaskTracker::new();
    let ready = Arc::new(AtomicBool::new(false));

    let reaper = tokio::spawn(broker.clone().run_reaper(cancel.clone()));
    let reloads = tokio::spawn(reload::on_hangup(broker.clone(), cancel.clone()));
    let routes = broker
        .routes()
        .cloned()
        .map(|r| tokio::spawn(r.run(routes_cancel.clone())));
    let ssh = tokio::spawn(ssh::serve(
        listeners.ssh,
        broker.clone(),
        cancel.clone(),
        sessions.clone(),
    ));
    let app = admin::router(admin::AdminState {
        broker: broker.clone(),
        ready: Arc::clone(&ready),
    });
    // The admin API outlives the drain, so /readyz says 503 and /metrics stays readable meanwhile.
    let admin_cancel = CancellationToken::new();
    let admin_stop = admin_cancel.clone();
    let admin_config = broker.config().admin.clone();
    let admin = tokio::spawn(async move {
        admin::serve(listeners.admin, app, &admin_config, admin_cancel).await;
    });
    ready.store(true, Ordering::Release);
    fdstore::notify_ready();
    info!("ready");

    shutdown.await;
    ready.store(false, Ordering::Release);
    fdstore::notify_stopping();
    routes_cancel.cancel();
    if let Some(mut r) = routes {
        // The worker notices between proxy calls; a slow proxy is not waited for past this.
        if tokio::time::timeout(WITHDRAW, &mut r).await.is_err() {
            r.abort();
        }
    }
    if let Some(r) = broker.routes() {
        let withdrawn = r.withdraw(WITHDRAW).await;
        info!(
            withdrawn = withdrawn.unwrap_or(0),
            complete = withdrawn.is_some(),
            "proxy routes withdrawn"
        );
    }
    cancel.cancel();
    let _ = ssh.await;
    sessions.close();
    if tokio::time::timeout(DRAIN, sessions.wait()).await.is_err() {
        warn!(
            left = sessions.len(),
            "sessions still open after the drain time"
        );
    }
    let _ = reaper.await;
    let _ = reloads.await;
    // Last: the routes are gone, so no proxy sends anyone to these ports any more.
    if !broker.close_listeners(Duration::from_secs(2)).await {
        warn!("tunnel listeners did not all close in time");
    }
    info!("tunnel listeners closed");
    admin_stop.cancel();
    // serve() itself gives connections 2 s; this bounds the whole stop.
    if tokio::time::timeout(Duration::from_secs(5), admin)
        .await
        .is_err()
    {
        warn!("admin server did not stop in time");
    }
    info!("stopped");
    Ok(())
}
