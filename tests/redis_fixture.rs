//! The Redis fixture itself: starts, answers, restarts empty.
#![allow(clippy::unwrap_used)]

mod common;

#[tokio::test]
async fn redis_starts_and_restarts_empty() -> anyhow::Result<()> {
    let mut redis = common::Redis::start().await?;
    let first = redis.addr;
    redis.restart().await?;
    assert_eq!(redis.addr, first);
    Ok(())
}
