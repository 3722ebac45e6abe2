//! The metrics registry, built once and passed to each component (no global statics).
//!
//! Names start with `tunnelbot_`; counters end in `_total`, histograms in `_seconds`. No label
//! carries a user name: label values are fixed enums, so the series count stays bounded.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the broker exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Credentials issued.
    pub tunnels_issued: IntCounter,
    /// Tunnels whose forward is held by a live session.
    pub tunnels_connected: IntGauge,
    /// SSH connections past the version exchange.
    pub ssh_sessions_active: IntGauge,
    /// Connections waiting for a handshake slot (`limits.max_startups`).
    pub ssh_startups_waiting: IntGauge,
    /// Login decisions, by result and reason.
    pub auth_attempts: IntCounterVec,
    /// `tcpip-forward` decisions, by result and reason.
    pub forward_requests: IntCounterVec,
    /// Refused channel opens and requests, by kind.
    pub refused_requests: IntCounterVec,
    /// Hub-side connections carried right now.
    pub forwarded_connections_active: IntGauge,
    /// Hub-side connections accepted.
    pub forwarded_connections: IntCounter,
    /// Hub-side connections closed at accept, by reason (`no_job`, `over_capacity`).
    pub forwarded_connections_refused: IntCounterVec,
    /// Bytes carried, by direction (`to_job`, `from_job`).
    pub forwarded_bytes: IntCounterVec,
    /// From TCP accept to successful login.
    pub handshake_duration: Histogram,
    /// Route calls to the proxy, by op and result.
    pub route_operations: IntCounterVec,
    /// From forward granted to route registered.
    pub route_register_duration: Histogram,
    /// 1 while the last call to CHP succeeded.
    pub chp_up: IntGauge,
    /// Tunnels ended, by reason (revoked, expired, replaced).
    pub tunnel_revocations: IntCounterVec,
    /// Renewal requests, by result (`ok`, `refused`: ended or a bad request, `error`: the store).
    pub tunnel_renewals: IntCounterVec,
    /// Ports of the range not reserved by a tunnel.
    pub ports_free: IntGauge,
    /// Ports in the configured range.
    pub ports_total: IntGauge,
    /// SSH connections that ended before a login, or failed the protocol.
    pub ssh_connection_errors: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Builds and registers every metric in a fresh registry.
    pub fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> anyhow::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> anyhow::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge = |name: &str, help: &str| -> anyhow::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| -> anyhow::Result<Histogram> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let fast = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let build = IntGaugeVec::new(
            Opts::new("tunnelbot_build_info", "Always 1; the version is a label."),
            &["version"],
        )?;
        registry.register(Box::new(build.clone()))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let metrics = Self {
            tunnels_issued: counter(
                "tunnelbot_tunnels_issued_total",
                "Tunnel credentials issued.",
            )?,
            tunnels_connected: gauge(
                "tunnelbot_tunnels_connected",
                "Tunnels whose forward is held by a live job session.",
            )?,
            ssh_sessions_active: gauge("tunnelbot_ssh_sessions_active", "Open SSH connections.")?,
            ssh_startups_waiting: gauge(
                "tunnelbot_ssh_startups_waiting",
                "Connections waiting for a handshake slot.",
            )?,
            auth_attempts: counter_vec(
                "tunnelbot_auth_attempts_total",
                "SSH public-key logins, by result and reason.",
                &["result", "reason"],
            )?,
            forward_requests: counter_vec(
                "tunnelbot_forward_requests_total",
                "Remote-forward requests, by result and reason.",
                &["result", "reason"],
            )?,
            refused_requests: counter_vec(
                "tunnelbot_refused_requests_total",
                "Refused SSH channel opens and requests, by kind.",
                &["kind"],
            )?,
            forwarded_connections_active: gauge(
                "tunnelbot_forwarded_connections_active",
                "Hub-side connections being carried through tunnels.",
            )?,
            forwarded_connections: counter(
                "tunnelbot_forwarded_connections_total",
                "Hub-side connections accepted on tunnel ports.",
            )?,
            forwarded_connections_refused: counter_vec(
                "tunnelbot_forwarded_connections_refused_total",
                "Hub-side connections closed at accept, by reason.",
                &["reason"],
            )?,
            forwarded_bytes: counter_vec(
                "tunnelbot_forwarded_bytes_total",
                "Bytes carried through tunnels, by direction.",
                &["direction"],
            )?,
            handshake_duration: histogram(
                "tunnelbot_handshake_duration_seconds",
                "From TCP accept to successful login.",
                fast.clone(),
            )?,
            route_operations: counter_vec(
                "tunnelbot_route_operations_total",
                "Calls to the proxy's route API, by operation and result.",
                &["op", "result"],
            )?,
            route_register_duration: histogram(
                "tunnelbot_route_register_duration_seconds",
                "From forward granted to route registered in the proxy.",
                fast,
            )?,
            chp_up: gauge(
                "tunnelbot_chp_up",
                "1 if the last call to the proxy API succeeded.",
            )?,
            tunnel_revocations: counter_vec(
                "tunnelbot_tunnel_revocations_total",
                "Tunnel sessions ended by the broker, by reason.",
                &["reason"],
            )?,
            tunnel_renewals: counter_vec(
                "tunnelbot_tunnel_renewals_total",
                "Tunnel renewal requests, by result.",
                &["result"],
            )?,
            ports_free: gauge(
                "tunnelbot_ports_free",
                "Hub ports not reserved by a tunnel.",
            )?,
            ports_total: gauge(
                "tunnelbot_ports_total",
                "Hub ports in the configured range.",
            )?,
            ssh_connection_errors: counter_vec(
                "tunnelbot_ssh_connection_errors_total",
                "SSH connections that failed, by kind.",
                &["kind"],
            )?,
            registry,
        };
        metrics.touch_known_series();
        Ok(metrics)
    }

    /// Creates every fixed label combination at 0, so the first event is visible to `rate()`.
    fn touch_known_series(&self) {
        let refusals = [
            "unknown_key",
            "expired",
            "revoked",
            "wrong_user",
            "password",
            "host_key",
            "in_use",
            "over_capacity",
        ];
        self.auth_attempts.with_label_values(&["accepted", "ok"]);
        self.auth_attempts
            .with_label_values(&["accepted", "certificate"]);
        for r in refusals
            .into_iter()
            .chain(crate::credentials::CertRefusal::LABELS)
        {
            self.auth_attempts.with_label_values(&["refused", r]);
        }
        self.forward_requests.with_label_values(&["granted", "ok"]);
        for r in crate::grants::ForwardRefusal::LABELS {
            self.forward_requests.with_label_values(&["refused", r]);
        }
        for k in [
            "session",
            "direct_tcpip",
            "direct_streamlocal",
            "x11",
            "forwarded_tcpip",
        ] {
            self.refused_requests.with_label_values(&[k]);
        }
        for r in ["no_job", "over_capacity", "client_cap"] {
            self.forwarded_connections_refused.with_label_values(&[r]);
        }
        for d in ["to_job", "from_job"] {
            self.forwarded_bytes.with_label_values(&[d]);
        }
        for op in ["add", "delete", "list", "hub_restore"] {
            for result in ["ok", "error"] {
                self.route_operations.with_label_values(&[op, result]);
            }
        }
        for r in ["revoked", "expired", "replaced"] {
            self.tunnel_revocations.with_label_values(&[r]);
        }
        for r in ["ok", "refused", "error"] {
            self.tunnel_renewals.with_label_values(&[r]);
        }
        for k in [
            "login_timeout",
            "handshake",
            "session",
            "over_capacity",
            "rate_limited",
            "evicted",
            "no_forward",
        ] {
            self.ssh_connection_errors.with_label_values(&[k]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding to a Vec cannot fail for well-formed metrics; an empty answer is the fallback.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
