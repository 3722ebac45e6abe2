//! Issuing a tunnel: checks, key material, the port reservation; the registry records it before
//! the answer. Every failure after the reservation drops it, which frees the port.

use std::sync::Arc;
use std::time::Duration;

use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};
use tracing::error;

use super::Broker;
use crate::audit::Event;
use crate::credentials::AuthKind;
use crate::grants::Grant;
use crate::ports::PoolError;
use crate::record::{TunnelRecord, unix_now};
use crate::registry::IssueFailure;
use crate::secret::Secret;

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

impl Broker {
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
        // Every early return below drops the reservation, which frees the port.
        let reservation = self.inner.registry.reserve().map_err(IssueError::NoPort)?;
        let port = reservation.port();
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
        let grant = Arc::new(Grant::new(record));
        self.inner
            .registry
            .issue(Arc::clone(&grant), reservation)
            .await
            .map_err(|e| match e {
                IssueFailure::DuplicateKey => IssueError::BadRequest(e.to_string()),
                IssueFailure::Store(e) => {
                    error!(error = %format!("{e:#}"), "issue failed: state store unwritable");
                    IssueError::Store(e)
                }
            })?;
        self.audit(Event::Issued {
            grant: &grant,
            generated_key: private_key.is_some(),
        });
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

    #[test]
    fn ids_are_distinct() {
        let a = new_id();
        assert!(a.starts_with("tb_") && a.len() == 35);
        assert_ne!(a, new_id());
    }
}
