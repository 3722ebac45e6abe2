//! The TOML configuration: serde structs, named defaults, one load path, `validate()`.
//!
//! Every key has a default, so an empty file (or no file) is a working config. Unknown keys are
//! refused: a typo in a security setting must not silently fall back to the default.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The whole broker configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Host key and admin token live here (created 0700 on first run).
    pub keys_dir: PathBuf,
    /// The embedded state store lives here.
    pub state_dir: PathBuf,
    /// The SSH listener jobs connect to.
    pub ssh: SshConfig,
    /// The hub-side listeners and the credentials that reserve them.
    pub tunnels: TunnelsConfig,
    /// The loopback admin HTTP API.
    pub admin: AdminConfig,
    /// Proxy routes for live tunnels: which backend, JupyterHub's base URL, the reconcile period.
    pub routes: RoutesConfig,
    /// configurable-http-proxy, the `chp` route backend.
    pub chp: ChpConfig,
    /// traefik through Redis, the `traefik-redis` route backend.
    pub traefik_redis: crate::routes::traefik_redis::TraefikRedisConfig,
    /// Caps that keep one misbehaving client from exhausting the broker.
    pub limits: LimitsConfig,
    /// Threads.
    pub runtime: RuntimeConfig,
    /// Where tunnel records live: the embedded file, or Redis for an active/standby pair.
    pub store: crate::store::StoreConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            keys_dir: PathBuf::from("keys"),
            state_dir: PathBuf::from("state"),
            ssh: SshConfig::default(),
            tunnels: TunnelsConfig::default(),
            admin: AdminConfig::default(),
            routes: RoutesConfig::default(),
            chp: ChpConfig::default(),
            traefik_redis: Default::default(),
            limits: LimitsConfig::default(),
            runtime: RuntimeConfig::default(),
            store: crate::store::StoreConfig::default(),
        }
    }
}

/// `[ssh]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfig {
    /// Where jobs connect. Compute nodes must reach it, hence all interfaces by default.
    pub listen: SocketAddr,
    /// The only SSH user name a credential is accepted under.
    pub user: String,
    /// The host name jobs use to reach the broker; pins the host key in `known_hosts`.
    pub public_host: Option<String>,
    /// The port jobs use, when a NAT or port forward differs from `listen`.
    pub public_port: Option<u16>,
    /// Idle sessions are probed this often; a quiet notebook is never cut.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Unanswered probes before a peer is declared dead.
    pub keepalive_max: usize,
    /// Failed authentications before a connection is dropped.
    pub max_auth_attempts: usize,
    /// OpenSSH CA public keys (one per line) whose user certificates may publish tunnels issued
    /// with `"auth": "certificate"`; reloaded on SIGHUP. None: certificates are refused.
    pub trusted_user_ca_keys: Option<PathBuf>,
    /// An OpenSSH KRL (`ssh-keygen -k`) of revoked certificates and keys; reloaded on SIGHUP,
    /// and live sessions it now names are cut.
    pub revoked_keys: Option<PathBuf>,
    /// How a certificate principal names a JupyterHub user: `{user}` stands for the name.
    pub certificate_principal: String,
    /// Session keys are renewed after this many bytes either way (and after an hour). An
    /// integer, or a string with a binary unit: "256KiB", "512M", "1GiB".
    #[serde(deserialize_with = "byte_size")]
    pub rekey_limit: u64,
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 2222)),
            user: "tunnelbot".into(),
            public_host: None,
            public_port: None,
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 3,
            max_auth_attempts: 6,
            trusted_user_ca_keys: None,
            revoked_keys: None,
            certificate_principal: "{user}".into(),
            rekey_limit: REKEY_LIMIT_MAX,
        }
    }
}

/// russh's own re-key limit and the largest it accepts (`russh::Limits::new`).
pub const REKEY_LIMIT_MAX: u64 = 1 << 30;
/// Two full 32 KiB channel packets between re-keys: below that a session does little but re-key.
pub const REKEY_LIMIT_MIN: u64 = 64 << 10;

/// A byte count: an integer, or a string such as "64KiB", "512M" or "1GiB" (K, M, G are 1024^n).
fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    let parse = |s: &str| -> Option<u64> {
        let s = s.trim();
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(digits);
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" | "KiB" => 10,
            "M" | "MiB" => 20,
            "G" | "GiB" => 30,
            _ => return None,
        };
        n.parse::<u64>().ok()?.checked_mul(1 << shift)
    };
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Text(s) => parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not a byte size such as 1048576, \"256KiB\", \"512M\" or \"1GiB\""
            ))
        }),
    }
}

/// `[tunnels]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelsConfig {
    /// Hub-side listeners bind here; CHP must reach it.
    pub bind_address: IpAddr,
    /// The hub ports credentials reserve from, inclusive.
    pub ports: PortRange,
    /// Credential lifetime when the request names none.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Longest lifetime a request may ask for.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// How long a revoked or expired tunnel stays listed, so a spawner's poll sees why it ended.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Bound on a write to a hub-side client that stopped reading; see `tunnels.rs`.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// A tunnel not renewed for this long expires (`expires_at` stays the hard cap); zero is off.
    /// Also the longest lease an issue request may ask for.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// The host the proxy dials to reach a tunnel's hub port, when not `bind_address` (a proxy
    /// on another host, or a bind to every interface).
    pub public_host: Option<String>,
}

impl Default for TunnelsConfig {
    fn default() -> Self {
        Self {
            bind_address: IpAddr::from([127, 0, 0, 1]),
            // Below Linux's ephemeral range (32768-60999), so outgoing connections never hold one.
            ports: PortRange::DEFAULT,
            default_ttl: Duration::from_secs(8 * 3600),
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            retention: Duration::from_secs(3600),
            write_timeout: Duration::from_secs(10),
            lease: Duration::ZERO,
            public_host: None,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The admin API; it can issue credentials, so loopback unless explicitly opted out.
    pub listen: SocketAddr,
    /// Allow `listen` on a non-loopback address.
    pub allow_non_loopback: bool,
    /// Time a client has to send a request's headers (from its first byte, or from the end of
    /// the previous response); then the connection is closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a client has to send a request's body; then it gets 408.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Where scoped tokens (`spawner-*.token`) are read from; `<keys_dir>/tokens` when unset.
    pub tokens_dir: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            allow_non_loopback: false,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_connections: 64,
            tokens_dir: None,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Logged-in SSH sessions at once (one per credential); a login beyond it is refused.
    pub max_sessions: usize,
    /// Connections in the handshake (not yet logged in) at once; more wait their turn, bounded
    /// by `login_grace`, so a job-array storm queues instead of failing.
    pub max_startups: usize,
    /// Connections not yet logged in, queued or in the handshake, in total; at the bound the
    /// oldest silent one (else the oldest) is closed to make room, so idle connections can
    /// never keep a job out.
    pub max_unauthenticated: usize,
    /// The same bound per source address.
    pub max_unauthenticated_per_source: usize,
    /// Time from TCP accept to a successful login; a silent client is dropped after it.
    #[serde(with = "humantime_serde")]
    pub login_grace: Duration,
    /// A logged-in session that holds no forward for this long is closed.
    #[serde(with = "humantime_serde")]
    pub forward_grace: Duration,
    /// How long a credential's live session gets to answer before a new login replaces it.
    #[serde(with = "humantime_serde")]
    pub liveness_probe_timeout: Duration,
    /// Hub-side connections carried at once by one tunnel; more are closed.
    pub max_connections_per_tunnel: usize,
    /// Failed logins per source address per minute above which the source is reported (an audit
    /// line and a metric, for fail2ban and alerts); 0 disables. Nobody is turned away for it.
    pub auth_failures_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_sessions: 20_000,
            max_startups: 512,
            max_unauthenticated: 2048,
            max_unauthenticated_per_source: 256,
            login_grace: Duration::from_secs(30),
            forward_grace: Duration::from_secs(30),
            liveness_probe_timeout: Duration::from_secs(3),
            max_connections_per_tunnel: 512,
            auth_failures_per_minute: 60,
        }
    }
}

/// `[runtime]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Threads that run every session, tunnel and the admin API; 0 means one per CPU.
    ///
    /// One is the default: a tunnel's packets then never cross threads, which measured 10-30%
    /// less CPU per byte with several busy connections (docs/benchmark.md), and one core carries
    /// several Gbit/s of AES-GCM, far beyond what notebooks send through a hub.
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { worker_threads: 1 }
    }
}

#[cfg(test)]
mod tests;
mod validate;

pub use crate::port_range::PortRange;
pub use crate::routes::{ChpConfig, RouteBackendKind, RoutesConfig};
