//! The pair's lease in Redis: one key naming the active broker and its fencing token.
//!
//! `<prefix>lease` holds `<broker id>:<token>` with a TTL. A broker takes it only when it is
//! absent (`SET NX PX`), after `INCR <prefix>fence` hands it a token larger than any before,
//! both in one script so no token is spent on a failed take. Renewal extends the TTL only
//! while the key still holds this broker's value (compare-and-extend). Every store write
//! checks the same value (`store::RedisStore`), so a broker that lost the lease cannot write.

use std::time::Duration;

use anyhow::Context;
use redis::Script;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use crate::store::StoreConfig;

/// What a store write must find in the lease key: proof this broker is still the active one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The lease key.
    pub key: String,
    /// `<broker id>:<token>`, the value this broker set when it took the lease.
    pub value: String,
    /// The fencing token, from `INCR`: each take gets a larger one.
    pub token: u64,
}

const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'NX', 'PX', ARGV[2])
return token
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// The lease of one broker: take, renew, release. Reconnects after a failed call.
pub struct Lease {
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
    key: String,
    fence_key: String,
    id: String,
    ttl: Duration,
    call_timeout: Duration,
}

impl Lease {
    /// The lease of broker `id` under `config`'s key prefix; connects lazily.
    pub fn new(config: &StoreConfig, id: String) -> anyhow::Result<Self> {
        let client = redis::Client::open(config.connection_info()?).context("store.url")?;
        Ok(Self {
            client,
            conn: None,
            key: format!("{}lease", config.key_prefix),
            fence_key: format!("{}fence", config.key_prefix),
            id,
            ttl: config.lease,
            // A call slower than a renewal period is as good as a failed one.
            call_timeout: config.renew_interval(),
        })
    }

    /// How long the lease lasts unrenewed.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// This broker's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    async fn conn(&mut self) -> anyhow::Result<MultiplexedConnection> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.call_timeout))
            .set_response_timeout(Some(self.call_timeout));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .context("connecting to redis")?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    async fn call<T: redis::FromRedisValue>(
        &mut self,
        script: &str,
        value: &str,
    ) -> anyhow::Result<T> {
        let mut conn = self.conn().await?;
        let ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let result = Script::new(script)
            .key(&self.key)
            .key(&self.fence_key)
            .arg(value)
            .arg(ms)
            .invoke_async(&mut conn)
            .await;
        if result.is_err() {
            // The next call connects afresh (Redis may have restarted).
            self.conn = None;
        }
        result.context("lease call to redis")
    }

    /// Takes the lease if nobody holds it. `Some` with the fence when taken; the lease then
    /// lasts at least `ttl` from the moment this call was made.
    pub async fn try_acquire(&mut self) -> anyhow::Result<Option<Fence>> {
        let id = self.id.clone();
        let token: Option<u64> = self.call(ACQUIRE, &id).await?;
        Ok(token.map(|token| Fence {
            key: self.key.clone(),
            value: format!("{id}:{token}"),
            token,
        }))
    }

    /// Extends the lease by `ttl` if `fence` still holds it; false when another broker (or
    /// nobody) does.
    pub async fn renew(&mut self, fence: &Fence) -> anyhow::Result<bool> {
        let n: i64 = self.call(RENEW, &fence.value).await?;
        Ok(n == 1)
    }

    /// Gives the lease up if `fence` still holds it, so the standby need not wait it out.
    pub async fn release(&mut self, fence: &Fence) -> anyhow::Result<bool> {
        let n: i64 = self.call(RELEASE, &fence.value).await?;
        Ok(n == 1)
    }

    /// Who holds the lease now (`<id>:<token>`), if anyone.
    pub async fn holder(&mut self) -> anyhow::Result<Option<String>> {
        let mut conn = self.conn().await?;
        let v: Option<String> = redis::cmd("GET")
            .arg(&self.key)
            .query_async(&mut conn)
            .await
            .inspect_err(|_| self.conn = None)
            .context("reading the lease")?;
        Ok(v)
    }
}

/// When a holder must stop serving: `margin` before the lease, counted from the start of the
/// last renewal Redis confirmed, can run out. Redis counts the TTL from when it ran the script,
/// which is no earlier than that start, so the broker is gone before anyone can take over.
pub fn stop_by(confirmed_at: Instant, ttl: Duration) -> Instant {
    confirmed_at + ttl - margin(ttl)
}

/// A fifth of the lease: time to close every socket, and room for clocks that run at
/// slightly different rates on the two hosts.
pub fn margin(ttl: Duration) -> Duration {
    ttl / 5
}
