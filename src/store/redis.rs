//! Tunnel records in Redis, shared by an active/standby pair of brokers.
//!
//! Each record is a JSON field of one hash, `<prefix>tunnels` (field: the tunnel id), the same
//! JSON the redb store keeps, so grants, reserved ports and ends (revocations, expiries) all
//! move with it. Every write is one script that first checks the pair's lease key still holds
//! this broker's fence (`standby::Fence`): a broker that lost the lease gets an error and
//! writes nothing, however late its write arrives. A write is as durable as Redis makes it:
//! run Redis with `appendonly yes` (README, "standby broker").

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use redis::Script;

use super::Store;
use super::settings::StoreConfig;
use crate::record::TunnelRecord;
use crate::standby::Fence;

const PUT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED this broker no longer holds the lease')
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
";

const REMOVE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED this broker no longer holds the lease')
end
redis.call('HDEL', KEYS[2], ARGV[2])
return 1
";

/// The Redis store of the broker holding `fence`. One blocking connection, made again after
/// any failed call; calls come from `spawn_blocking`.
pub struct RedisStore {
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
    tunnels_key: String,
    fence: Fence,
    timeout: Duration,
}

impl RedisStore {
    /// The store under `config`'s key prefix, writing as the holder of `fence`; connects
    /// lazily.
    pub fn new(config: &StoreConfig, fence: Fence) -> anyhow::Result<Self> {
        let client = redis::Client::open(config.connection_info()?).context("store.url")?;
        Ok(Self {
            client,
            conn: Mutex::new(None),
            tunnels_key: format!("{}tunnels", config.key_prefix),
            fence,
            // An answer slower than the lease is useless: the lease may have passed on.
            timeout: config.lease,
        })
    }

    /// The fence this store writes under.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> anyhow::Result<T> {
        // Nothing panics under the lock, so a poisoned one still holds a usable connection.
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let conn = self
                .client
                .get_connection_with_timeout(self.timeout)
                .context("connecting to redis")?;
            conn.set_read_timeout(Some(self.timeout))?;
            conn.set_write_timeout(Some(self.timeout))?;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_mut() else {
            bail!("no redis connection");
        };
        let result = f(conn);
        if result.is_err() {
            *slot = None;
        }
        Ok(result?)
    }

    fn write(&self, script: &str, id: &str, json: &[u8]) -> anyhow::Result<()> {
        let script = Script::new(script);
        self.with_conn(|c| {
            script
                .key(&self.fence.key)
                .key(&self.tunnels_key)
                .arg(&self.fence.value)
                .arg(id)
                .arg(json)
                .invoke::<i64>(c)
        })
        .map(drop)
    }
}

impl Store for RedisStore {
    fn load(&self) -> anyhow::Result<Vec<TunnelRecord>> {
        let all: Vec<(String, Vec<u8>)> = self
            .with_conn(|c| redis::cmd("HGETALL").arg(&self.tunnels_key).query(c))
            .context("loading tunnels from redis")?;
        all.into_iter()
            .map(|(id, json)| {
                serde_json::from_slice(&json)
                    .with_context(|| format!("decoding stored tunnel {id}"))
            })
            .collect()
    }

    fn put(&self, record: &TunnelRecord) -> anyhow::Result<()> {
        let json = serde_json::to_vec(record)?;
        self.write(PUT, &record.id, &json)
            .context("writing to the redis store")
    }

    fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.write(REMOVE, id, b"")
            .context("deleting from the redis store")
    }
}
