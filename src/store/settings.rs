//! `[store]`: which backend keeps the tunnel records, and for Redis, where it is and how the
//! active/standby lease is timed. Checked as it is parsed, so `tunnelbot check` refuses a bad one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::Deserialize;

use crate::secret::Secret;

/// `store.backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One redb file in `state_dir`; one broker.
    #[default]
    Redb,
    /// Redis, shared by an active/standby pair of brokers.
    Redis,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default, try_from = "RawStoreConfig")]
pub struct StoreConfig {
    /// Which backend.
    pub backend: StoreBackend,
    /// `redis://host:port/db`, without a password (that goes in `password_file`).
    pub url: String,
    /// A file (0600) holding the Redis password (`requirepass`), never logged.
    pub password_file: Option<PathBuf>,
    /// Every key this broker pair writes starts with it, so one Redis can hold several pairs.
    pub key_prefix: String,
    /// How long the active broker's lease lasts without a renewal: the longest a failover waits.
    pub lease: Duration,
    /// How often the active broker renews its lease; default a third of `lease`.
    pub renew_interval: Option<Duration>,
    /// This broker's name in the lease; default `<hostname>/<ssh.listen>`.
    pub broker_id: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Redb,
            url: "redis://127.0.0.1:6379/".into(),
            password_file: None,
            key_prefix: "tunnelbot/".into(),
            lease: Duration::from_secs(5),
            renew_interval: None,
            broker_id: None,
        }
    }
}

/// `[store]` as written, before its checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStoreConfig {
    backend: StoreBackend,
    url: String,
    password_file: Option<PathBuf>,
    key_prefix: String,
    #[serde(with = "humantime_serde")]
    lease: Duration,
    #[serde(with = "humantime_serde")]
    renew_interval: Option<Duration>,
    broker_id: Option<String>,
}

impl Default for RawStoreConfig {
    fn default() -> Self {
        let d = StoreConfig::default();
        Self {
            backend: d.backend,
            url: d.url,
            password_file: d.password_file,
            key_prefix: d.key_prefix,
            lease: d.lease,
            renew_interval: d.renew_interval,
            broker_id: d.broker_id,
        }
    }
}

impl TryFrom<RawStoreConfig> for StoreConfig {
    type Error = anyhow::Error;

    fn try_from(raw: RawStoreConfig) -> anyhow::Result<Self> {
        let config = Self {
            backend: raw.backend,
            url: raw.url,
            password_file: raw.password_file,
            key_prefix: raw.key_prefix,
            lease: raw.lease,
            renew_interval: raw.renew_interval,
            broker_id: raw.broker_id,
        };
        config.check()?;
        Ok(config)
    }
}

/// The smallest lease: below it, one slow Redis answer would end the active broker.
const MIN_LEASE: Duration = Duration::from_secs(1);

impl StoreConfig {
    fn check(&self) -> anyhow::Result<()> {
        let url = ::redis::parse_redis_url(&self.url)
            .with_context(|| "store.url is not a redis:// URL".to_owned())?;
        // A password in the URL would be printed wherever the config is: it goes in a file.
        if url.password().is_some() || !url.username().is_empty() {
            bail!(
                "store.url must not carry a user or password: put the password in store.password_file"
            );
        }
        ensure!(
            matches!(url.scheme(), "redis" | "redis+unix" | "unix"),
            "store.url must start with redis:// (TLS is not built in)"
        );
        ensure!(
            !self.key_prefix.is_empty(),
            "store.key_prefix must not be empty: the pair's keys need a name space"
        );
        ensure!(self.lease >= MIN_LEASE, "store.lease must be at least 1s");
        let renew = self.renew_interval();
        ensure!(
            !renew.is_zero() && renew * 2 <= self.lease,
            "store.renew_interval must be above zero and at most half of store.lease"
        );
        if let Some(id) = &self.broker_id {
            ensure!(
                !id.is_empty() && !id.contains(':') && !id.chars().any(char::is_whitespace),
                "store.broker_id must be non-empty, without ':' or white space"
            );
        }
        Ok(())
    }

    /// How often the lease is renewed.
    pub fn renew_interval(&self) -> Duration {
        self.renew_interval.unwrap_or(self.lease / 3)
    }

    /// The broker's name in the lease: `broker_id`, else `<hostname>/<ssh listen address>`.
    pub fn broker_id(&self, ssh_listen: SocketAddr) -> String {
        if let Some(id) = &self.broker_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        // ':' separates the id from the fencing token in the lease value.
        format!("{host}/{ssh_listen}").replace(':', "_")
    }

    /// The Redis connection details, with the password read from `password_file` (0600).
    pub fn connection_info(&self) -> anyhow::Result<::redis::ConnectionInfo> {
        use ::redis::IntoConnectionInfo;
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .context("store.url")?;
        let Some(path) = &self.password_file else {
            return Ok(info);
        };
        let password: Secret =
            crate::keys::read_secret_file(path).context("store.password_file")?;
        let redis = info
            .redis_settings()
            .clone()
            .set_password(password.expose());
        Ok(info.set_redis_settings(redis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<StoreConfig> {
        #[derive(Deserialize)]
        struct Doc {
            store: StoreConfig,
        }
        Ok(toml::from_str::<Doc>(text)?.store)
    }

    #[test]
    fn defaults_and_a_redis_pair() {
        let d = StoreConfig::default();
        assert_eq!(d.backend, StoreBackend::Redb);
        assert_eq!(d.renew_interval(), Duration::from_secs(5) / 3);
        let c = parse(
            "[store]\nbackend = \"redis\"\nurl = \"redis://10.0.0.5:6380/2\"\nlease = \"3s\"\n\
             broker_id = \"hub-a\"\n",
        )
        .unwrap();
        assert_eq!(c.backend, StoreBackend::Redis);
        assert_eq!(c.lease, Duration::from_secs(3));
        assert_eq!(c.broker_id("127.0.0.1:22".parse().unwrap()), "hub-a");
    }

    #[test]
    fn refusals() {
        for (text, why) in [
            ("url = \"redis://:pw@h/\"", "password"),
            ("url = \"redis://u:pw@h/\"", "password"),
            ("url = \"http://h/\"", "redis"),
            ("key_prefix = \"\"", "key_prefix"),
            ("lease = \"500ms\"", "lease"),
            ("lease = \"4s\"\nrenew_interval = \"3s\"", "renew_interval"),
            ("broker_id = \"a:b\"", "broker_id"),
            ("colour = \"red\"", "unknown field"),
        ] {
            let err = format!("{:#}", parse(&format!("[store]\n{text}\n")).unwrap_err());
            assert!(err.contains(why), "{text}: {err}");
            assert!(!err.contains("pw@"), "the password leaked: {err}");
        }
    }

    #[test]
    fn the_password_comes_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("redis.password");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = StoreConfig {
            password_file: Some(path.clone()),
            ..StoreConfig::default()
        };
        let err = format!("{:#}", config.connection_info().unwrap_err());
        assert!(err.contains("too open") && !err.contains("s3cret"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let info = config.connection_info().unwrap();
        assert_eq!(info.redis_settings().password(), Some("s3cret"));
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn default_id_names_the_host_and_address() {
        let id = StoreConfig::default().broker_id("127.0.0.2:2222".parse().unwrap());
        assert!(id.ends_with("/127.0.0.2_2222"), "{id}");
        assert!(!id.contains(':'));
    }
}
