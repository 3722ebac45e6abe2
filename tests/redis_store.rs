//! The Redis store and the pair's lease against a real redis-server: records round-trip, a
//! second broker cannot take a held lease, and a broker whose lease passed on can neither
//! renew it nor write.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Redis;
use tunnelbot::record::{EndReason, Ended, TunnelRecord};
use tunnelbot::standby::Lease;
use tunnelbot::store::{RedisStore, Store, StoreBackend, StoreConfig};

fn config(redis: &Redis, lease: Duration) -> StoreConfig {
    StoreConfig {
        backend: StoreBackend::Redis,
        url: redis.url(),
        key_prefix: format!("test{}/", common::next_id()),
        lease,
        ..StoreConfig::default()
    }
}

fn record(id: &str, port: u16) -> TunnelRecord {
    TunnelRecord {
        id: id.into(),
        user: "alice".into(),
        port,
        public_key: "ssh-ed25519 AAAA".into(),
        fingerprint: "SHA256:x".into(),
        created_at: 1,
        expires_at: 2,
        ..TunnelRecord::default()
    }
}

/// Runs a blocking store call off the runtime, as the broker does.
async fn blocking<T: Send + 'static>(
    store: &Arc<RedisStore>,
    f: impl FnOnce(&RedisStore) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&store)).await?
}

#[tokio::test]
async fn records_round_trip_under_the_lease() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let config = config(&redis, Duration::from_secs(5));
    let mut lease = Lease::new(&config, "a".into())?;
    let fence = lease.try_acquire().await?.expect("a free lease is taken");
    assert_eq!(fence.value, format!("a:{}", fence.token));
    let store = Arc::new(RedisStore::new(&config, fence)?);

    blocking(&store, |s| {
        s.put(&record("tb_1", 20001))?;
        s.put(&record("tb_2", 20002))?;
        let mut ended = record("tb_2", 20002);
        ended.ended = Some(Ended {
            at: 3,
            reason: EndReason::Revoked,
        });
        s.put(&ended)?;
        s.remove("tb_1")?;
        s.remove("never-there")
    })
    .await?;
    let all = blocking(&store, |s| s.load()).await?;
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].id.as_str(), all[0].port), ("tb_2", 20002));
    assert_eq!(all[0].ended.map(|e| e.reason), Some(EndReason::Revoked));

    // Another pair under another prefix sees none of it.
    let other = config_with_prefix(&config, "elsewhere/");
    let mut other_lease = Lease::new(&other, "b".into())?;
    let other_fence = other_lease.try_acquire().await?.expect("its own lease");
    let other_store = Arc::new(RedisStore::new(&other, other_fence)?);
    assert!(blocking(&other_store, |s| s.load()).await?.is_empty());
    Ok(())
}

fn config_with_prefix(config: &StoreConfig, prefix: &str) -> StoreConfig {
    StoreConfig {
        key_prefix: prefix.into(),
        ..config.clone()
    }
}

#[tokio::test]
async fn a_held_lease_is_not_taken_and_a_stale_writer_is_refused() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let config = config(&redis, Duration::from_secs(1));
    let mut a = Lease::new(&config, "a".into())?;
    let mut b = Lease::new(&config, "b".into())?;
    let fence_a = a.try_acquire().await?.expect("a takes the free lease");
    assert!(
        b.try_acquire().await?.is_none(),
        "b must not take a held lease"
    );
    assert!(a.renew(&fence_a).await?, "the holder renews");
    let store_a = Arc::new(RedisStore::new(&config, fence_a.clone())?);
    blocking(&store_a, |s| s.put(&record("tb_a", 20001))).await?;

    // a stops renewing (as a paused or cut-off broker would); b takes over once it lapses.
    let fence_b = common::eventually("the lease lapses and b takes it", async || {
        b.try_acquire().await
    })
    .await?;
    assert!(
        fence_b.token > fence_a.token,
        "each take gets a larger token"
    );
    assert_eq!(a.holder().await?, Some(fence_b.value.clone()));

    // a, late: its renewal, write and delete are all refused, and change nothing.
    assert!(!a.renew(&fence_a).await?, "a stale holder cannot renew");
    let put = blocking(&store_a, |s| s.put(&record("tb_late", 20002))).await;
    let err = format!("{:#}", put.expect_err("a stale write must fail"));
    assert!(err.contains("FENCED"), "{err}");
    let del = blocking(&store_a, |s| s.remove("tb_a")).await;
    assert!(del.is_err(), "a stale delete must fail");
    assert!(
        !a.release(&fence_a).await?,
        "a stale holder cannot release b's lease"
    );

    let store_b = Arc::new(RedisStore::new(&config, fence_b.clone())?);
    let ids: Vec<String> = blocking(&store_b, |s| s.load())
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, vec!["tb_a".to_owned()]);
    blocking(&store_b, |s| s.put(&record("tb_b", 20003))).await?;

    // A clean stop gives the lease up: the next broker takes it at once.
    assert!(b.release(&fence_b).await?);
    assert!(a.try_acquire().await?.is_some(), "a released lease is free");
    Ok(())
}

#[tokio::test]
async fn the_store_reconnects_after_a_redis_restart() -> anyhow::Result<()> {
    let mut redis = Redis::start().await?;
    let config = config(&redis, Duration::from_secs(5));
    let mut lease = Lease::new(&config, "a".into())?;
    let fence = lease.try_acquire().await?.expect("free");
    let store = Arc::new(RedisStore::new(&config, fence.clone())?);
    blocking(&store, |s| s.put(&record("tb_1", 20001))).await?;
    redis.restart().await?;
    // The first call finds the old connection dead; the next one connects afresh. The
    // restarted Redis is empty (nothing saved): the lease is gone, so the write is refused
    // rather than landing in a store nobody fences.
    let _ = blocking(&store, |s| s.put(&record("tb_2", 20002))).await;
    let err = blocking(&store, |s| s.put(&record("tb_2", 20002))).await;
    let err = format!("{:#}", err.expect_err("no lease, no write"));
    assert!(err.contains("FENCED"), "{err}");
    let again = common::eventually("the lease is taken again", async || {
        lease.try_acquire().await.ok().flatten()
    })
    .await?;
    let store = Arc::new(RedisStore::new(&config, again)?);
    blocking(&store, |s| s.put(&record("tb_2", 20002))).await?;
    assert_eq!(blocking(&store, |s| s.load()).await?.len(), 1);
    Ok(())
}
