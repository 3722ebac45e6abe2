//! The traefik-redis backend alone against a real redis-server, no broker: `delete` removes a
//! route only while it is still the one the reconciler read (stamped, the same target), and
//! then only its own keys, without scanning the keyspace; `list` pages through a large table from the
//! client, with no script, and skips what is not a whole route of ours.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Redis, redis_conn, redis_keys, redis_mset};
use tunnelbot::routes::traefik_redis::{TraefikRedis, TraefikRedisConfig};
use tunnelbot::routes::{BaseUrl, ChpConfig, RouteBackend, RouteEntry, RoutePath, Target};

/// A backend on `redis` with JupyterHub's default key layout.
fn backend(redis: &Redis) -> anyhow::Result<TraefikRedis> {
    let config = TraefikRedisConfig {
        url: redis.url(),
        ..TraefikRedisConfig::default()
    };
    TraefikRedis::from_config(&config, &ChpConfig::default(), BaseUrl::new("/")?)
}

fn entry(user: &str, server: &str, port: u16) -> anyhow::Result<RouteEntry> {
    let path = RoutePath::new(&BaseUrl::new("/")?, user, server)?;
    let target = Target::parse(&format!("http://127.0.0.1:{port}")).expect("a target");
    Ok(RouteEntry::new(path, target))
}

/// The SCAN pattern for the keys of `user`'s default server route (the `/` after the alias
/// keeps their named servers out).
fn keys_of(user: &str) -> String {
    format!("*_2Fuser_2F{user}_2F/*")
}

/// Forgets the command counts, so `commands` shows only what runs after.
async fn reset_counts(redis: &Redis) -> anyhow::Result<()> {
    let mut c = redis_conn(redis).await?;
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(&mut c)
        .await?;
    Ok(())
}

/// How many times each command ran since `reset_counts`, the ones scripts call included.
async fn commands(redis: &Redis) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut c = redis_conn(redis).await?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await?;
    // cmdstat_get:calls=3,usec=...
    Ok(info
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect())
}

#[tokio::test]
async fn delete_removes_exactly_a_route_of_ours_without_scanning() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let b = backend(&redis)?;
    let alice = entry("alice", "", 20001)?;
    b.put(&alice).await?;
    // Another writer made traefik's two lists longer than ours.
    let (r, s) = ("router__2Fuser_2Falice_2F", "service__2Fuser_2Falice_2F");
    redis_mset(
        &redis,
        &[
            (
                format!("traefik/http/routers/{r}/entryPoints/1"),
                "https".into(),
            ),
            (
                format!("traefik/http/services/{s}/loadBalancer/servers/1/url"),
                "http://127.0.0.1:20002".into(),
            ),
        ],
    )
    .await?;
    assert_eq!(redis_keys(&redis, &keys_of("alice")).await?.len(), 14);
    // Neighbours whose keys start the same: alice's named server, bob's route.
    b.put(&entry("alice", "gpu", 20003)?).await?;
    b.put(&entry("bob", "", 20004)?).await?;
    let mut others = redis_keys(&redis, "*").await?;
    others.retain(|k, _| !k.contains("_2Falice_2F/"));
    assert_eq!(others.len(), 24);

    reset_counts(&redis).await?;
    assert!(b.delete(&alice).await?);
    // Counted before the checks below, which list keys themselves.
    let ran = commands(&redis).await?;
    assert_eq!(ran.get("scan"), None, "{ran:?}");
    assert_eq!(ran.get("keys"), None, "{ran:?}");
    assert!(ran.get("del").is_some_and(|&n| n >= 16), "{ran:?}");
    assert_eq!(
        redis_keys(&redis, &keys_of("alice")).await?,
        BTreeMap::new()
    );
    assert_eq!(redis_keys(&redis, "*").await?, others);
    assert_eq!(b.get(&alice.path).await?, None);
    // Absent is success, and deletes nothing.
    assert!(!b.delete(&alice).await?);
    assert_eq!(redis_keys(&redis, "*").await?, others);
    Ok(())
}

#[tokio::test]
async fn a_stamped_route_the_hub_rewrote_for_another_target_is_never_deleted() -> anyhow::Result<()>
{
    let redis = Redis::start().await?;
    let b = backend(&redis)?;
    // The hub's add_route MSET over a route of ours leaves our stamp. Targets on another host,
    // a port outside our range, or not a plain `http://host:port`: not ours.
    let foreign = [
        ("zed", "http://localhost:20001"),
        ("yan", "http://127.0.0.1:8888"),
        ("xia", "http://127.0.0.1:20001/x"),
        ("wu", "https://127.0.0.1:20001"),
        ("vic", "http://127.0.0.1:200010"),
    ];
    for (user, target) in foreign {
        let ours = entry(user, "", 20001)?;
        b.put(&ours).await?;
        let r = format!("router__2Fuser_2F{user}_2F");
        let s = format!("service__2Fuser_2F{user}_2F");
        redis_mset(
            &redis,
            &[
                (format!("jupyterhub/routes/{r}/target"), target.into()),
                (
                    format!("traefik/http/services/{s}/loadBalancer/servers/0/url"),
                    target.into(),
                ),
            ],
        )
        .await?;
        let before = redis_keys(&redis, &keys_of(user)).await?;
        assert_eq!(before.len(), 12, "{user}");
        assert_eq!(
            before.get(&format!("jupyterhub/routes/{r}/data/tunnelbot")),
            Some(&"true".to_owned())
        );
        assert!(!b.delete(&ours).await?, "{user}");
        assert_eq!(redis_keys(&redis, &keys_of(user)).await?, before, "{user}");
    }
    // The hub's own route (no stamp) is left alone even with a target of ours.
    let hubs = entry("una", "", 20005)?;
    b.put(&hubs).await?;
    let mut c = redis_conn(&redis).await?;
    redis::cmd("DEL")
        .arg("jupyterhub/routes/router__2Fuser_2Funa_2F/data/tunnelbot")
        .query_async::<()>(&mut c)
        .await?;
    let before = redis_keys(&redis, &keys_of("una")).await?;
    assert_eq!(before.len(), 11);
    assert!(!b.delete(&hubs).await?);
    assert_eq!(redis_keys(&redis, &keys_of("una")).await?, before);
    // Rewritten since the read, even for another port of ours: left alone this time; the
    // reconciler reads it again and passes what it found, which goes.
    let tom = entry("tom", "", 20006)?;
    b.put(&tom).await?;
    redis_mset(
        &redis,
        &[(
            "jupyterhub/routes/router__2Fuser_2Ftom_2F/target".into(),
            "http://127.0.0.1:20099".into(),
        )],
    )
    .await?;
    assert!(!b.delete(&tom).await?);
    assert_eq!(redis_keys(&redis, &keys_of("tom")).await?.len(), 12);
    assert!(b.delete(&entry("tom", "", 20099)?).await?);
    assert_eq!(redis_keys(&redis, &keys_of("tom")).await?, BTreeMap::new());
    Ok(())
}

#[tokio::test]
async fn list_pages_through_many_routes_from_the_client() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let b = backend(&redis)?;
    let mut want = BTreeSet::new();
    for i in 0..1200u16 {
        let e = entry(&format!("u{i}"), "", 20000 + i % 100)?;
        b.put(&e).await?;
        want.insert(e.path.to_string());
    }
    // Half a route, one key that is not a string, and the hub's route: skipped, not fatal.
    let mut c = redis_conn(&redis).await?;
    redis::cmd("HSET")
        .arg(&["jupyterhub/routes/router__2Fuser_2Fh_2F/target", "f", "v"])
        .query_async::<()>(&mut c)
        .await?;
    redis_mset(
        &redis,
        &[
            (
                "jupyterhub/routes/router__2Fuser_2Fhalf_2F/data/tunnelbot".into(),
                "true".into(),
            ),
            (
                "jupyterhub/routes/router__2F/data/hub".into(),
                "true".into(),
            ),
        ],
    )
    .await?;

    reset_counts(&redis).await?;
    let listing = b.list().await?;
    let got: BTreeSet<String> = listing.ours.iter().map(|e| e.path.to_string()).collect();
    assert_eq!(listing.ours.len(), 1200);
    assert_eq!(got, want);
    assert!(listing.hub_present);
    // Paged (8,400 keys, at most 500 per call), and no script holds Redis for the walk.
    let ran = commands(&redis).await?;
    assert!(ran.get("scan").is_some_and(|&n| n > 1), "{ran:?}");
    assert!(ran.get("mget").is_some_and(|&n| n >= 17), "{ran:?}");
    for script in ["eval", "evalsha", "fcall"] {
        assert_eq!(ran.get(script), None, "{ran:?}");
    }
    Ok(())
}
