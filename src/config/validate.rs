//! Loading, `validate()`, and what the config implies (the tunnel host, the ports jobs see).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};

use super::*;

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
        crate::routes::Settings::read(self.route_sections())?;
        ensure!(
            self.tunnels.lease <= self.tunnels.max_ttl,
            "tunnels.lease ({}) must be at most tunnels.max_ttl ({})",
            humantime::format_duration(self.tunnels.lease),
            humantime::format_duration(self.tunnels.max_ttl)
        );
        self.tunnel_host()?;
        Ok(())
    }

    /// The sections the route layer reads.
    pub fn route_sections(&self) -> crate::routes::Sections<'_> {
        crate::routes::Sections {
            routes: &self.routes,
            chp: &self.chp,
            traefik_redis: &self.traefik_redis,
        }
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
