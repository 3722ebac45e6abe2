//! The domain record of one issued tunnel: who it is for, its port, its key or kind of
//! credential, its lifetime and how it ended. The grants, the store and the admin API all speak
//! it; it depends on none of them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One issued tunnel, as stored. Times are Unix seconds. Fields added after the first release
/// have serde defaults, so records written by older versions still load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelRecord {
    /// Opaque id, `tb_` + 32 hex digits.
    pub id: String,
    /// JupyterHub user name.
    pub user: String,
    /// JupyterHub server name; empty for the default server.
    pub server_name: String,
    /// The hub port reserved for this tunnel.
    pub port: u16,
    /// The job's public key, OpenSSH one-line form without comment.
    pub public_key: String,
    /// SHA-256 fingerprint of `public_key`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// When it was issued.
    pub created_at: u64,
    /// When the credential stops working at the latest; a renewal moves it.
    pub expires_at: u64,
    /// Set once the tunnel is revoked or has expired.
    #[serde(default)]
    pub ended: Option<Ended>,
    /// The kind of credential that may publish it (records from before certificates: a key).
    #[serde(default)]
    pub auth: crate::credentials::AuthKind,
    /// The lifetime asked for at issue, in seconds: what a renewal without `ttl_seconds`
    /// extends by. None in records from before renewals existed.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// The lease, in seconds: the tunnel expires this long after its last renewal (or its
    /// issue) unless renewed again. None: no lease.
    #[serde(default)]
    pub lease_seconds: Option<u64>,
    /// The last renewal; None until the first.
    #[serde(default)]
    pub renewed_at: Option<u64>,
}

impl TunnelRecord {
    /// When the lease runs out, if there is one.
    pub fn lease_until(&self) -> Option<u64> {
        self.lease_seconds.map(|lease| {
            self.renewed_at
                .unwrap_or(self.created_at)
                .saturating_add(lease)
        })
    }

    /// When the credential stops working: the hard expiry or the lease, whichever is first.
    pub fn deadline(&self) -> u64 {
        self.lease_until()
            .map_or(self.expires_at, |l| l.min(self.expires_at))
    }
}

/// Why and when a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// Unix seconds.
    pub at: u64,
    /// Why.
    pub reason: EndReason,
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// An admin or the spawner revoked it.
    Revoked,
    /// Its lifetime ran out.
    Expired,
}

impl EndReason {
    /// The lowercase name used in the API, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
