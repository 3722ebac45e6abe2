//! The TOML configuration: serde structs, named defaults, one load path, `validate()`.
//!
//! Every key has a default, so an empty file (or no file) is a working config. Unknown keys are
//! refused: a typo in a security setting must not silently fall back to the default.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
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
            // Written out (this module may): 20000 <= 24999, neither is 0.
            ports: PortRange {
                first: 20000,
                last: 24999,
            },
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

/// `[routes]`. Read (with `[chp]`'s deprecated keys) only by `routes::Settings`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesConfig {
    /// Which proxy holds the routes.
    pub backend: RouteBackendKind,
    /// JupyterHub's `base_url`.
    pub base_url: String,
    /// How often the proxy's table is compared with the live tunnels.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        Self {
            backend: RouteBackendKind::Chp,
            base_url: "/".into(),
            reconcile_interval: Duration::from_secs(5),
        }
    }
}

/// `routes.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteBackendKind {
    /// configurable-http-proxy's REST API (`[chp]`).
    Chp,
    /// No routes: the spawner alone drives them.
    None,
}

/// `[chp]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChpConfig {
    /// Deprecated: `routes.backend`. `false` still turns routes off.
    pub enabled: Option<bool>,
    /// CHP's REST API.
    pub api_url: String,
    /// A file holding CHP's token; when unset, `CONFIGPROXY_AUTH_TOKEN` is read.
    pub token_file: Option<PathBuf>,
    /// Deprecated: `routes.base_url`, still read.
    pub base_url: Option<String>,
    /// The host written into route targets: the older name of `tunnels.public_host`, kept as
    /// an alias; the two must agree when both are set.
    pub target_host: Option<String>,
    /// Deprecated: `routes.reconcile_interval`, still read.
    #[serde(with = "humantime_serde::option")]
    pub reconcile_interval: Option<Duration>,
    /// JupyterHub's API (`http://hub:8081/hub/api`), to ask the hub to restore its own routes
    /// after a CHP restart.
    pub hub_api_url: Option<String>,
    /// A file holding a hub API token with the `proxy` scope.
    pub hub_token_file: Option<PathBuf>,
}

impl Default for ChpConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            api_url: "http://127.0.0.1:8001".into(),
            token_file: None,
            base_url: None,
            target_host: None,
            reconcile_interval: None,
            hub_api_url: None,
            hub_token_file: None,
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

/// An inclusive port range written `"20000-29999"`: never empty and never holding port 0, since
/// `new` is the only way to make one (parsing and deserializing go through it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// The ports `first..=last`; refused when that holds no port or includes port 0.
    pub fn new(first: u16, last: u16) -> anyhow::Result<Self> {
        ensure!(
            first > 0,
            "port range {first}-{last} must not include port 0"
        );
        ensure!(first <= last, "port range {first}-{last} is empty");
        Ok(Self { first, last })
    }

    /// First port, inclusive.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// Last port, inclusive.
    pub fn last(&self) -> u16 {
        self.last
    }

    /// How many ports the range holds; at least one, so there is no `is_empty` to ask.
    pub fn len(&self) -> NonZeroUsize {
        // `first <= last` by construction, so the count is at least 1.
        NonZeroUsize::MIN.saturating_add(usize::from(self.last - self.first))
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (a, b) = s
            .split_once('-')
            .with_context(|| format!("port range {s:?} must look like \"20000-29999\""))?;
        let first: u16 = a
            .trim()
            .parse()
            .with_context(|| format!("bad port {a:?}"))?;
        let last: u16 = b
            .trim()
            .parse()
            .with_context(|| format!("bad port {b:?}"))?;
        Self::new(first, last)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

impl Config {
    /// Reads, parses and validates `path`, or returns the embedded defaults when `path` is None.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let config = match path {
            None => Self::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config {}", path.display()))?;
                Self::parse(&text).with_context(|| format!("in config {}", path.display()))?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without validating it.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// Checks what serde cannot: relations between keys and security opt-ins.
    pub fn validate(&self) -> anyhow::Result<()> {
        let admin = self.admin.listen.ip();
        if !admin.is_loopback() && !self.admin.allow_non_loopback {
            bail!(
                "admin.listen = {} is not a loopback address; the admin API issues credentials, \
                 so set admin.allow_non_loopback = true if you really mean it",
                self.admin.listen
            );
        }
        ensure!(
            !self.admin.header_timeout.is_zero() && !self.admin.body_timeout.is_zero(),
            "admin.header_timeout and admin.body_timeout must be above zero"
        );
        ensure!(
            self.admin.max_connections > 0,
            "admin.max_connections must be at least 1"
        );
        ensure!(!self.ssh.user.is_empty(), "ssh.user must not be empty");
        ensure!(
            !self.ssh.keepalive_interval.is_zero(),
            "ssh.keepalive_interval must be above zero: dead peers would never be detected"
        );
        ensure!(
            self.ssh.keepalive_max > 0,
            "ssh.keepalive_max must be at least 1"
        );
        ensure!(
            self.ssh.max_auth_attempts > 0,
            "ssh.max_auth_attempts must be at least 1"
        );
        ensure!(
            (REKEY_LIMIT_MIN..=REKEY_LIMIT_MAX).contains(&self.ssh.rekey_limit),
            "ssh.rekey_limit is {} bytes; it must be between 64KiB and 1GiB",
            self.ssh.rekey_limit
        );
        ensure!(
            !self.tunnels.max_ttl.is_zero(),
            "tunnels.max_ttl must be above zero"
        );
        ensure!(
            !self.tunnels.default_ttl.is_zero() && self.tunnels.default_ttl <= self.tunnels.max_ttl,
            "tunnels.default_ttl ({}) must be above zero and at most tunnels.max_ttl ({})",
            humantime::format_duration(self.tunnels.default_ttl),
            humantime::format_duration(self.tunnels.max_ttl)
        );
        ensure!(
            !self.tunnels.write_timeout.is_zero(),
            "tunnels.write_timeout must be above zero"
        );
        let l = &self.limits;
        ensure!(
            l.max_sessions > 0 && l.max_startups > 0 && l.max_connections_per_tunnel > 0,
            "limits.max_sessions, max_startups and max_connections_per_tunnel must be at least 1"
        );
        ensure!(
            !l.login_grace.is_zero(),
            "limits.login_grace must be above zero"
        );
        ensure!(
            l.max_unauthenticated > 0 && l.max_unauthenticated_per_source > 0,
            "limits.max_unauthenticated and max_unauthenticated_per_source must be at least 1"
        );
        ensure!(
            !l.forward_grace.is_zero() && !l.liveness_probe_timeout.is_zero(),
            "limits.forward_grace and liveness_probe_timeout must be above zero"
        );
        ensure!(
            self.runtime.worker_threads <= 1024,
            "runtime.worker_threads is {}; at most 1024 (0 = one per CPU)",
            self.runtime.worker_threads
        );
        let ssh_port = self.ssh.listen.port();
        ensure!(
            !self.tunnels.ports.contains(ssh_port),
            "tunnels.ports {} contains ssh.listen's port {ssh_port}",
            self.tunnels.ports
        );
        ensure!(
            !self.tunnels.ports.contains(self.admin.listen.port()),
            "tunnels.ports {} contains admin.listen's port {}",
            self.tunnels.ports,
            self.admin.listen.port()
        );
        crate::routes::Settings::from_config(self)?;
        ensure!(
            self.tunnels.lease <= self.tunnels.max_ttl,
            "tunnels.lease ({}) must be at most tunnels.max_ttl ({})",
            humantime::format_duration(self.tunnels.lease),
            humantime::format_duration(self.tunnels.max_ttl)
        );
        self.tunnel_host()?;
        Ok(())
    }

    /// The host the proxy dials to reach hub ports, as it goes into `http://<host>:<port>`
    /// (an IPv6 address in brackets): `tunnels.public_host`, else its alias `chp.target_host`,
    /// else `tunnels.bind_address`. A bind to every interface names no host, so it needs one.
    pub fn tunnel_host(&self) -> anyhow::Result<String> {
        let public = self
            .tunnels
            .public_host
            .as_deref()
            .map(|h| url_host(h).context("tunnels.public_host"))
            .transpose()?;
        let alias = self
            .chp
            .target_host
            .as_deref()
            .map(|h| url_host(h).context("chp.target_host"))
            .transpose()?;
        match (public, alias) {
            (Some(p), Some(a)) if p != a => bail!(
                "tunnels.public_host {p:?} and chp.target_host {a:?} differ: both name the host \
                 the proxy dials to reach tunnels; set only tunnels.public_host"
            ),
            (Some(h), _) | (None, Some(h)) => Ok(h),
            (None, None) => {
                let ip = self.tunnels.bind_address;
                ensure!(
                    !ip.is_unspecified(),
                    "tunnels.bind_address {ip} listens on every interface and names no host: \
                     set tunnels.public_host to the name or address the proxy dials"
                );
                url_host(&ip.to_string())
            }
        }
    }

    /// Where scoped tokens are read from.
    pub fn tokens_dir(&self) -> PathBuf {
        self.admin
            .tokens_dir
            .clone()
            .unwrap_or_else(|| self.keys_dir.join("tokens"))
    }

    /// The port jobs are told to connect to.
    pub fn ssh_public_port(&self, bound: SocketAddr) -> u16 {
        self.ssh.public_port.unwrap_or(bound.port())
    }
}

/// `host` as it goes into a URL: an IPv6 address bracketed, anything that would change the
/// URL's meaning (scheme, port, path, user info, white space) refused.
fn url_host(host: &str) -> anyhow::Result<String> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok(format!("[{bare}]"));
    }
    ensure!(
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'),
        "{host:?} must be a host name or an IP address (letters, digits, '-', '.', '_')"
    );
    Ok(host.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        let c = Config::parse("").unwrap();
        c.validate().unwrap();
        assert_eq!(c.ssh.listen.port(), 2222);
        assert_eq!(c.ssh.user, "tunnelbot");
        assert_eq!(c.tunnels.ports, PortRange::new(20000, 24999).unwrap());
        assert_eq!(c.tunnels.default_ttl, Duration::from_secs(8 * 3600));
        assert!(c.admin.listen.ip().is_loopback());
    }

    #[test]
    fn example_config_parses_and_equals_the_defaults() {
        let text = include_str!("../config/tunnelbot.example.toml");
        let c = Config::parse(text).unwrap();
        c.validate().unwrap();
        let d = Config::default();
        assert_eq!(format!("{c:?}"), format!("{d:?}"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::parse("[ssh]\nlisten_addr = \"0.0.0.0:22\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
        assert!(Config::parse("typo = 1\n").is_err());
    }

    #[test]
    fn port_ranges() {
        assert_eq!("1-1".parse::<PortRange>().unwrap().len().get(), 1);
        assert_eq!(
            "20000-29999".parse::<PortRange>().unwrap().len().get(),
            10000
        );
        assert_eq!(Config::default().tunnels.ports.len().get(), 5000);
        assert_eq!(PortRange::new(65535, 65535).unwrap().len().get(), 1);
        assert!(PortRange::new(0, 10).is_err());
        assert!(PortRange::new(10, 9).is_err());
        for bad in ["", "5", "9-5", "0-10", "a-b", "1-70000", "-"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?} parsed");
        }
        let err = Config::parse("[tunnels]\nports = \"30000-20000\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("empty"), "{err:#}");
    }

    #[test]
    fn non_loopback_admin_needs_opt_in() {
        let c = Config::parse("[admin]\nlisten = \"0.0.0.0:8090\"\n").unwrap();
        let err = c.validate().unwrap_err();
        assert!(format!("{err:#}").contains("allow_non_loopback"), "{err:#}");
        let c = Config::parse("[admin]\nlisten = \"0.0.0.0:8090\"\nallow_non_loopback = true\n")
            .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn durations_and_ttls() {
        let c = Config::parse("[tunnels]\ndefault_ttl = \"2h\"\nmax_ttl = \"1d\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.tunnels.max_ttl, Duration::from_secs(86400));
        let c = Config::parse("[tunnels]\ndefault_ttl = \"2d\"\nmax_ttl = \"1d\"\n").unwrap();
        assert!(c.validate().is_err());
        assert!(Config::parse("[tunnels]\nmax_ttl = \"soon\"\n").is_err());
    }

    #[test]
    fn worker_threads() {
        assert_eq!(Config::default().runtime.worker_threads, 1);
        let c = Config::parse("[runtime]\nworker_threads = 0\n").unwrap();
        c.validate().unwrap();
        let c = Config::parse("[runtime]\nworker_threads = 5000\n").unwrap();
        let err = c.validate().unwrap_err();
        assert!(format!("{err:#}").contains("worker_threads"), "{err:#}");
        assert!(Config::parse("[runtime]\nworker_threads = -1\n").is_err());
    }

    #[test]
    fn rekey_limit_sizes() {
        assert_eq!(Config::default().ssh.rekey_limit, 1 << 30);
        for (text, bytes) in [
            ("65536", 65536),
            ("\"256KiB\"", 256 << 10),
            ("\"512M\"", 512 << 20),
            ("\"1GiB\"", 1 << 30),
        ] {
            let c = Config::parse(&format!("[ssh]\nrekey_limit = {text}\n")).unwrap();
            c.validate().unwrap();
            assert_eq!(c.ssh.rekey_limit, bytes, "{text}");
        }
        for too_far in ["\"32KiB\"", "\"2G\"", "0"] {
            let c = Config::parse(&format!("[ssh]\nrekey_limit = {too_far}\n")).unwrap();
            let err = c.validate().unwrap_err();
            assert!(format!("{err:#}").contains("rekey_limit"), "{err:#}");
        }
        for bad in ["\"1 TB\"", "\"lots\"", "\"KiB\"", "-1", "\"99999999999G\""] {
            assert!(
                Config::parse(&format!("[ssh]\nrekey_limit = {bad}\n")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn ssh_port_inside_tunnel_range_is_refused() {
        let c = Config::parse("[ssh]\nlisten = \"0.0.0.0:20001\"\n").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn chp_token_files_are_checked_up_front() {
        let c = Config::parse("[chp]\ntoken_file = \"/nonexistent/chp.token\"\n").unwrap();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("chp.token_file"));
    }

    #[test]
    fn tunnel_host_from_public_host_alias_or_bind() {
        let host = |text: &str| Config::parse(text).unwrap().tunnel_host();
        assert_eq!(host("").unwrap(), "127.0.0.1");
        assert_eq!(
            host("[tunnels]\nbind_address = \"::1\"\n").unwrap(),
            "[::1]"
        );
        let all = "[tunnels]\nbind_address = \"0.0.0.0\"\n";
        assert!(format!("{:#}", host(all).unwrap_err()).contains("public_host"));
        assert_eq!(
            host(&format!("{all}public_host = \"hub.internal\"\n")).unwrap(),
            "hub.internal"
        );
        // The old key still works, and agreeing with the new one is fine; differing is refused.
        assert_eq!(
            host("[chp]\ntarget_host = \"10.0.0.5\"\n").unwrap(),
            "10.0.0.5"
        );
        let both = |a: &str, b: &str| {
            host(&format!(
                "[tunnels]\npublic_host = \"{a}\"\n[chp]\ntarget_host = \"{b}\"\n"
            ))
        };
        assert_eq!(both("h", "h").unwrap(), "h");
        assert_eq!(both("::1", "[::1]").unwrap(), "[::1]");
        assert!(format!("{:#}", both("a", "b").unwrap_err()).contains("differ"));
        for bad in ["", "h:80", "http://h", "a b", "u@h", "h/x"] {
            let text = format!("[tunnels]\npublic_host = {bad:?}\n");
            assert!(Config::parse(&text).unwrap().validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lease_is_bounded_by_max_ttl() {
        let c = Config::parse("[tunnels]\nlease = \"5m\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.tunnels.lease, Duration::from_secs(300));
        assert!(Config::default().tunnels.lease.is_zero());
        let c = Config::parse("[tunnels]\nlease = \"8d\"\n").unwrap();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("tunnels.lease"));
    }

    #[test]
    fn base_url_shape() {
        for section in ["routes", "chp"] {
            let c = Config::parse(&format!("[{section}]\nbase_url = \"/jh\"\n")).unwrap();
            assert!(c.validate().is_err(), "{section}");
            for bad in ["/a?b/", "/a#/", "/a b/", "/a%20/", "/a/../", "//"] {
                let c = Config::parse(&format!("[{section}]\nbase_url = {bad:?}\n")).unwrap();
                assert!(c.validate().is_err(), "{section}: {bad}");
            }
        }
        // Routes off: nothing about them is checked.
        for off in ["[routes]\nbackend = \"none\"\n", "[chp]\nenabled = false\n"] {
            let c = Config::parse(&format!("{off}base_url = \"/jh\"\n")).unwrap();
            c.validate().unwrap();
        }
    }
}
