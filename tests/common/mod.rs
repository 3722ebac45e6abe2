//! Test fixtures, one file per component:
//! - `broker`  an in-process broker on port 0 (`TestBroker`), issued keys, the metric reader
//! - `process` the real `tunnelbot` binary as a child (`BrokerProcess`)
//! - `ssh`     the stock OpenSSH client as a job runs it (`Ssh`), and `ssh-keygen`
//! - `chp`     a real configurable-http-proxy (`Chp`)
//! - `redis`   a real redis-server (`Redis`)
//! - `net`     echo and HTTP backends, round trips, free ports
//! - `traefik` a real traefik on a `Redis` (`Traefik`), and a client for the keys
//! - `systemd` systemd's notify socket and descriptor store (`FakeSystemd`)
//! - `wait`    `eventually`, the one bounded poll every wait goes through
//!
//! Every wait is bounded by `WAIT`; nothing sleeps for readiness.
// Each test binary uses only some fixtures, so the rest would warn as unused there.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

mod broker;
mod chp;
mod daemon;
mod net;
mod process;
mod redis;
mod ssh;
mod systemd;
mod traefik;
mod wait;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use broker::{Issued, PROCESS_LIMITS, TestBroker, base_config, metric_value, write_0600};
pub use chp::{Chp, chp_bin};
pub use net::{Echo, carries_nothing, echo, free_port, http_backend, roundtrip};
pub use process::{BrokerProcess, Launching};
pub use redis::{Redis, redis_server_bin};
pub use ssh::{Ssh, job_args, keygen, ssh_args, ssh_run};
pub use systemd::{FakeSystemd, Manager};
pub use traefik::{Traefik, redis_conn, redis_keys, redis_mset, traefik_bin};
pub use wait::{POLL, Probe, eventually};

/// Upper bound for any single wait in the tests.
pub const WAIT: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A number no other call in this test process gets (names of log files, loopback addresses).
pub fn next_id() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A loopback address no other test (in this or another test process) binds tunnels on, so
/// brokers running in parallel never compete for hub ports.
pub fn unique_loopback() -> IpAddr {
    let n = next_id();
    let pid = std::process::id();
    IpAddr::from([
        127,
        100 + (pid % 100) as u8,
        (n / 250) as u8,
        (n % 250 + 1) as u8,
    ])
}
