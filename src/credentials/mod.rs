//! Who a login is and which tunnels it may publish: the one seam every kind of credential goes
//! through. Two kinds exist:
//!
//! - an **issued key** (`grants.rs`): the broker made or was given one key per tunnel; the key
//!   names the tunnel, so a login with it may publish exactly that tunnel's port;
//! - an **OpenSSH user certificate** from the site's CA (`certs.rs`, revocations in `krl.rs`): the
//!   certificate names a JupyterHub user, and a login with it may publish any waiting tunnel that
//!   was issued for that user with `"auth": "certificate"`, chosen by port at forward time.

pub mod certs;
pub mod krl;

pub use certs::{Authority, CertLogin, CertRefusal};

use serde::{Deserialize, Serialize};

/// Which kind of credential a tunnel was issued for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    /// A key the broker issued (or the spawner supplied) for this tunnel alone.
    #[default]
    Key,
    /// Any valid certificate from a trusted CA for the tunnel's user.
    Certificate,
}

impl AuthKind {
    /// The API string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Certificate => "certificate",
        }
    }
}

impl std::str::FromStr for AuthKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "key" => Ok(Self::Key),
            "certificate" => Ok(Self::Certificate),
            other => anyhow::bail!("auth must be \"key\" or \"certificate\", not {other:?}"),
        }
    }
}
