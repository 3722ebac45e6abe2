//! OpenSSH user certificates from the site's CA: which CAs are trusted, which certificates are
//! revoked (a KRL), and what a valid certificate says about who logs in.
//!
//! russh checks a certificate's validity period and self-signature before it asks us; everything
//! else a `TrustedUserCAKeys` sshd would check is here: a trusted CA signed it, it is a *user*
//! certificate, a principal maps to a JupyterHub user, its critical options are ones we honour
//! (`source-address`), and it is not revoked.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use anyhow::{Context, bail, ensure};
use russh::keys::ssh_key::Fingerprint;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{Certificate, HashAlg, PublicKey};

use super::krl::{Krl, key_blob};
use crate::config::SshConfig;

/// Why a certificate login was refused; each is an audit reason and a metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertRefusal {
    /// `ssh.trusted_user_ca_keys` is not set.
    #[error("certificates are not accepted here")]
    Disabled,
    /// No trusted CA signed it.
    #[error("signed by an unknown CA")]
    UnknownCa,
    /// A host certificate offered as a user's.
    #[error("not a user certificate")]
    HostCertificate,
    /// Outside its validity period.
    #[error("expired or not yet valid")]
    Expired,
    /// No principal names a JupyterHub user under the configured template.
    #[error("no principal matches")]
    Principal,
    /// The peer is outside the certificate's `source-address`.
    #[error("source address not allowed by the certificate")]
    SourceAddress,
    /// A critical option we do not enforce; the certificate must not be used then.
    #[error("unsupported critical option {0}")]
    CriticalOption(String),
    /// Listed in the KRL (by serial, key ID, or key).
    #[error("certificate revoked")]
    Revoked,
    /// The SSH user name is not the configured one.
    #[error("wrong ssh user")]
    WrongUser,
}

impl CertRefusal {
    /// Every label `as_str` can return.
    pub const LABELS: [&'static str; 9] = [
        "cert_disabled",
        "cert_unknown_ca",
        "cert_host",
        "cert_expired",
        "cert_principal",
        "cert_source_address",
        "cert_critical_option",
        "cert_revoked",
        "wrong_user",
    ];

    /// Metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Disabled => "cert_disabled",
            Self::UnknownCa => "cert_unknown_ca",
            Self::HostCertificate => "cert_host",
            Self::Expired => "cert_expired",
            Self::Principal => "cert_principal",
            Self::SourceAddress => "cert_source_address",
            Self::CriticalOption(_) => "cert_critical_option",
            Self::Revoked => "cert_revoked",
            Self::WrongUser => "wrong_user",
        }
    }
}

/// A certificate login: who it is, and what ends it.
#[derive(Debug, Clone)]
pub struct CertLogin {
    /// The JupyterHub user its principal names.
    pub user: String,
    /// Free text, for logs only.
    pub key_id: String,
    /// The CA's serial number of the certificate.
    pub serial: u64,
    /// The signing CA's key, as KRLs name it.
    pub ca_blob: Vec<u8>,
    /// The certified key, as KRLs name it.
    pub key_blob: Vec<u8>,
    /// Unix seconds after which the certificate (and its session) ends; u64::MAX for never.
    pub valid_before: u64,
    /// Whether it carries `permit-port-forwarding` (sshd allows no `-R` without it).
    pub may_forward: bool,
}

/// How a principal names a JupyterHub user: `prefix{user}suffix`.
#[derive(Debug, Clone)]
struct Template {
    prefix: String,
    suffix: String,
}

impl Template {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let Some((prefix, suffix)) = text.split_once("{user}") else {
            bail!("ssh.certificate_principal {text:?} must contain {{user}}");
        };
        ensure!(
            !suffix.contains("{user}"),
            "ssh.certificate_principal {text:?} must contain {{user}} once"
        );
        Ok(Self {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
        })
    }

    fn user<'a>(&self, principal: &'a str) -> Option<&'a str> {
        let user = principal
            .strip_prefix(&self.prefix)?
            .strip_suffix(&self.suffix)?;
        crate::names::check_user(user).ok().map(|()| user)
    }
}

struct Loaded {
    cas: Vec<TrustedCa>,
    krl: Krl,
}

/// A trusted CA as logins compare it: worked out once per load, not once per login.
struct TrustedCa {
    fingerprint: Fingerprint,
    /// The key's wire encoding, as KRLs and `CertLogin::ca_blob` name it.
    blob: Vec<u8>,
}

/// The trusted CAs and the revocation list, reloaded on SIGHUP.
pub struct Authority {
    ca_file: Option<PathBuf>,
    krl_file: Option<PathBuf>,
    template: Template,
    loaded: RwLock<Loaded>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("ca_file", &self.ca_file)
            .field("krl_file", &self.krl_file)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads `[ssh] trusted_user_ca_keys` and `revoked_keys`; a file that is set must load.
    pub fn load(config: &SshConfig) -> anyhow::Result<Self> {
        let authority = Self {
            ca_file: config.trusted_user_ca_keys.clone(),
            krl_file: config.revoked_keys.clone(),
            template: Template::parse(&config.certificate_principal)?,
            loaded: RwLock::new(Loaded {
                cas: Vec::new(),
                krl: Krl::default(),
            }),
        };
        authority.reload()?;
        Ok(authority)
    }

    /// Reads both files again; on any error the previous lists stay in force.
    pub fn reload(&self) -> anyhow::Result<()> {
        let cas = match &self.ca_file {
            Some(path) => read_cas(path)?
                .iter()
                .map(|k| {
                    Ok(TrustedCa {
                        fingerprint: k.fingerprint(HashAlg::Sha256),
                        blob: key_blob(k.key_data())?,
                    })
                })
                .collect::<anyhow::Result<_>>()?,
            None => Vec::new(),
        };
        let krl = match &self.krl_file {
            Some(path) => Krl::parse(
                &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("ssh.revoked_keys {}", path.display()))?,
            None => Krl::default(),
        };
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Loaded { cas, krl };
        Ok(())
    }

    /// Whether any CA is trusted.
    pub fn enabled(&self) -> bool {
        !self.read().cas.is_empty()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.loaded.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides a certificate login from `peer` at unix time `now`.
    pub fn check(
        &self,
        cert: &Certificate,
        peer: IpAddr,
        now: u64,
    ) -> Result<CertLogin, CertRefusal> {
        let loaded = self.read();
        if loaded.cas.is_empty() {
            return Err(CertRefusal::Disabled);
        }
        // Trusted CA and signature first: nothing else in an unverified certificate means anything.
        let ca = cert.signature_key().fingerprint(HashAlg::Sha256);
        let Some(trusted) = loaded.cas.iter().find(|c| c.fingerprint == ca) else {
            return Err(CertRefusal::UnknownCa);
        };
        // One signature check on the way in; only a refusal checks again, to name its reason.
        if cert.validate_at(now, [&ca]).is_err() {
            return Err(if cert.verify_signature().is_err() {
                CertRefusal::UnknownCa
            } else {
                CertRefusal::Expired
            });
        }
        if cert.cert_type() != CertType::User {
            return Err(CertRefusal::HostCertificate);
        }
        for (name, value) in cert.critical_options().iter() {
            match name.as_str() {
                "source-address" if source_allowed(value, peer) => {}
                "source-address" => return Err(CertRefusal::SourceAddress),
                other => return Err(CertRefusal::CriticalOption(other.to_owned())),
            }
        }
        // An empty principal list means "anyone" to OpenSSH; a job identity needs a name.
        let user = cert
            .valid_principals()
            .iter()
            .find_map(|p| self.template.user(p))
            .ok_or(CertRefusal::Principal)?
            .to_owned();
        let ca_blob = trusted.blob.clone();
        let key_blob = key_blob(cert.public_key()).map_err(|_| CertRefusal::UnknownCa)?;
        let login = CertLogin {
            user,
            key_id: cert.key_id().to_owned(),
            serial: cert.serial(),
            ca_blob,
            key_blob,
            valid_before: cert.valid_before(),
            may_forward: cert.extensions().contains_key("permit-port-forwarding"),
        };
        if revoked(&loaded.krl, &login) {
            return Err(CertRefusal::Revoked);
        }
        Ok(login)
    }

    /// Whether `login` is revoked or its CA no longer trusted by the lists now loaded.
    pub fn withdrawn(&self, login: &CertLogin) -> bool {
        let loaded = self.read();
        let trusted = loaded.cas.iter().any(|c| c.blob == login.ca_blob);
        !trusted || revoked(&loaded.krl, login)
    }
}

fn revoked(krl: &Krl, login: &CertLogin) -> bool {
    krl.cert_revoked(&login.ca_blob, login.serial, &login.key_id)
        || krl.key_revoked(&login.key_blob)
        || krl.key_revoked(&login.ca_blob)
}

/// Reads a `TrustedUserCAKeys`-style file: one OpenSSH public key per line, `#` comments.
fn read_cas(path: &Path) -> anyhow::Result<Vec<PublicKey>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading ssh.trusted_user_ca_keys {}", path.display()))?;
    let mut cas = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        cas.push(PublicKey::from_openssh(line).with_context(|| {
            format!(
                "{} line {}: not an OpenSSH public key",
                path.display(),
                n + 1
            )
        })?);
    }
    ensure!(
        !cas.is_empty(),
        "ssh.trusted_user_ca_keys {} holds no key",
        path.display()
    );
    Ok(cas)
}

/// Whether `peer` is in a `source-address` list: comma-separated addresses or CIDR blocks.
fn source_allowed(list: &str, peer: IpAddr) -> bool {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    list.split(',').any(|entry| {
        let (addr, bits) = match entry.trim().split_once('/') {
            Some((a, b)) => (a, b.parse::<u32>().ok()),
            None => (entry.trim(), None),
        };
        let Ok(net) = addr.parse::<IpAddr>() else {
            return false;
        };
        match (net, peer) {
            (IpAddr::V4(n), IpAddr::V4(p)) => {
                let bits = bits.unwrap_or(32).min(32);
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(n) & mask == u32::from(p) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(p)) => {
                let bits = bits.unwrap_or(128).min(128);
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(n) & mask == u128::from(p) & mask
            }
            _ => false,
        }
    })
}

#[cfg(test)]
#[path = "certs_tests.rs"]
mod tests;
