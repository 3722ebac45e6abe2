//! Routes in traefik through Redis follow the tunnels: a real redis-server and a real traefik
//! (its Redis provider), a broker with `[routes] backend = "traefik-redis"`, and stock `ssh -R`
//! jobs. The keys are JupyterHub's `TraefikRedisProxy` keys; a request through traefik reaches
//! the job; revoke removes both trees; an emptied Redis gets the routes back at the next
//! reconcile; a route in the hub's own shape (no stamp) is never touched; no name reaches
//! another route's keys or rule.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use common::{
    Redis, Ssh, TestBroker, Traefik, eventually, http_backend, redis_keys, redis_mset, write_0600,
};

/// A broker writing routes into `redis` (reconcile every 200 ms).
async fn broker(redis: &Redis, extra: &str) -> anyhow::Result<TestBroker> {
    let url = redis.url();
    let extra = extra.to_owned();
    TestBroker::start_with("", move |_: &Path, _: IpAddr| {
        Ok(format!(
            "[routes]\nbackend = \"traefik-redis\"\nreconcile_interval = \"200ms\"\n\
             [traefik_redis]\nurl = \"{url}\"\n{extra}"
        ))
    })
    .await
}

/// The keys of alice's route, as the notes recorded JupyterHub writing them (plus our stamp).
fn alice_keys(target: &str) -> BTreeMap<String, String> {
    let r = "router__2Fuser_2Falice_2F";
    let s = "service__2Fuser_2Falice_2F";
    [
        (format!("jupyterhub/routes/{r}/routespec"), "/user/alice/"),
        (format!("jupyterhub/routes/{r}/target"), target),
        (format!("jupyterhub/routes/{r}/router"), r),
        (format!("jupyterhub/routes/{r}/service"), s),
        (format!("jupyterhub/routes/{r}/data/user"), "alice"),
        (format!("jupyterhub/routes/{r}/data/server_name"), ""),
        (format!("jupyterhub/routes/{r}/data/tunnelbot"), "true"),
        (
            format!("traefik/http/routers/{r}/rule"),
            "( PathPrefix(`/user/alice/`) || Path(`/user/alice`) )",
        ),
        (format!("traefik/http/routers/{r}/entryPoints/0"), "http"),
        (format!("traefik/http/routers/{r}/service"), s),
        (
            format!("traefik/http/services/{s}/loadBalancer/servers/0/url"),
            target,
        ),
        (
            format!("traefik/http/services/{s}/loadBalancer/passHostHeader"),
            "true",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect()
}

/// A route as JupyterHub itself writes it for `user` (no stamp), to `target`.
fn hubs_route(user: &str, target: &str) -> Vec<(String, String)> {
    let r = format!("router__2Fuser_2F{user}_2F");
    let s = format!("service__2Fuser_2F{user}_2F");
    [
        (
            format!("jupyterhub/routes/{r}/routespec"),
            format!("/user/{user}/"),
        ),
        (format!("jupyterhub/routes/{r}/target"), target.into()),
        (format!("jupyterhub/routes/{r}/router"), r.clone()),
        (format!("jupyterhub/routes/{r}/service"), s.clone()),
        (format!("jupyterhub/routes/{r}/data/user"), user.into()),
        (
            format!("jupyterhub/routes/{r}/data/server_name"),
            String::new(),
        ),
        (
            format!("traefik/http/routers/{r}/rule"),
            format!("( PathPrefix(`/user/{user}/`) || Path(`/user/{user}`) )"),
        ),
        (
            format!("traefik/http/routers/{r}/entryPoints/0"),
            "http".into(),
        ),
        (format!("traefik/http/routers/{r}/service"), s.clone()),
        (
            format!("traefik/http/services/{s}/loadBalancer/servers/0/url"),
            target.into(),
        ),
    ]
    .into()
}

async fn wait_keys(
    redis: &Redis,
    pattern: &str,
    what: &str,
    pred: impl Fn(&BTreeMap<String, String>) -> bool,
) -> anyhow::Result<BTreeMap<String, String>> {
    eventually(&format!("keys {pattern} {what}"), async || {
        let keys = redis_keys(redis, pattern).await?;
        anyhow::Ok(pred(&keys).then_some(keys))
    })
    .await
}

#[tokio::test]
async fn request_through_traefik_reaches_the_job_and_revoke_removes_the_route() -> anyhow::Result<()>
{
    let redis = Redis::start().await?;
    let traefik = Traefik::start(&redis).await?;
    let broker = broker(&redis, "").await?;
    let issued = broker.issue("alice", "", 600).await?;
    let notebook = http_backend("alice-nb").await?;
    let job = Ssh::job(&broker, &issued, notebook.port)?;
    job.allocated_port().await?;

    let target = format!("http://{}:{}", broker.tunnel_ip, issued.port);
    let want = alice_keys(&target);
    let all = "*user_2Falice_2F*";
    let got = wait_keys(&redis, all, "are alice's route", |k| *k == want).await?;
    assert_eq!(got, want);
    broker
        .wait_tunnel(&issued.id, "registered", |t| t["route"] == "registered")
        .await?;
    let (status, body) = traefik
        .wait_get("/user/alice/api/status", "reaches the job", |s, _| s == 200)
        .await?;
    assert_eq!(
        (status, body.as_str()),
        (200, "alice-nb /user/alice/api/status")
    );
    let (status, body) = traefik.get("/user/alice").await?;
    assert_eq!((status, body.as_str()), (200, "alice-nb /user/alice"));

    assert_eq!(broker.revoke(&issued.id).await?, 204);
    wait_keys(&redis, all, "are gone after revoke", BTreeMap::is_empty).await?;
    traefik
        .wait_get("/user/alice/api/status", "is 404 after revoke", |s, _| {
            s == 404
        })
        .await?;
    drop(job);
    Ok(())
}

#[tokio::test]
async fn redis_restart_gets_routes_back_and_the_hubs_routes_are_left_alone() -> anyhow::Result<()> {
    let mut redis = Redis::start().await?;
    let traefik = Traefik::start(&redis).await?;
    let broker = broker(&redis, "").await?;
    let issued = broker.issue("carol", "", 600).await?;
    let notebook = http_backend("carol-nb").await?;
    let _job = Ssh::job(&broker, &issued, notebook.port)?;
    let carol = "*user_2Fcarol_2F*";
    wait_keys(&redis, carol, "are written", |k| k.len() == 12).await?;

    // The hub's own route for zed (no stamp, a target in our host and range) and a stale route
    // of ours (stamped, our host, a port in our range, no tunnel).
    let ours_but_gone = format!("http://{}:24999", broker.tunnel_ip);
    let zed = hubs_route("zed", &ours_but_gone);
    redis_mset(&redis, &zed).await?;
    let mut ghost = hubs_route("ghost", &ours_but_gone);
    ghost.push((
        "jupyterhub/routes/router__2Fuser_2Fghost_2F/data/tunnelbot".into(),
        "true".into(),
    ));
    redis_mset(&redis, &ghost).await?;
    wait_keys(&redis, "*ghost*", "removed as stale", BTreeMap::is_empty).await?;
    // A full pass ran after the ghost went: zed is exactly as the hub wrote it.
    let passes = "tunnelbot_route_operations_total{op=\"list\",result=\"ok\"}";
    let seen = broker.metric(passes).await?;
    broker.wait_metric(passes, seen + 2.0).await?;
    let zed_now = redis_keys(&redis, "*zed*").await?;
    assert_eq!(zed_now, zed.into_iter().collect::<BTreeMap<_, _>>());

    // Redis restarts empty: carol's route is back at the next reconcile, and traefik serves it.
    redis.restart().await?;
    wait_keys(&redis, carol, "are restored", |k| k.len() == 12).await?;
    let (status, body) = traefik
        .wait_get("/user/carol/tree", "reaches the job again", |s, _| s == 200)
        .await?;
    assert_eq!((status, body.as_str()), (200, "carol-nb /user/carol/tree"));
    broker
        .wait_tunnel(&issued.id, "registered", |t| t["route"] == "registered")
        .await?;
    Ok(())
}

#[tokio::test]
async fn hostile_names_stay_in_their_own_keys_and_rules() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let traefik = Traefik::start(&redis).await?;
    let broker = broker(&redis, "").await?;
    let notebook = http_backend("nb").await?;
    // Glob characters, our escape character spelling another route's alias, a rule breaker,
    // and a regex in traefik's v2 rule syntax that would match every user's path; every one a
    // name JupyterHub accepts.
    let names = ["a*[x]?", "b_2fuser_2falice", "c`) || host(`x", "{u:.*}"];
    let mut jobs = Vec::new();
    let mut issued = Vec::new();
    for name in names {
        let i = broker.issue(name, "", 600).await?;
        jobs.push(Ssh::job(&broker, &i, notebook.port)?);
        issued.push(i);
    }
    for (name, i) in names.iter().zip(&issued).take(2) {
        broker
            .wait_tunnel(&i.id, "registered", |t| t["route"] == "registered")
            .await
            .map_err(|e| e.context(name.to_string()))?;
    }
    // The rule breakers get no route at all; they are refused on every pass.
    for (name, i) in names.iter().zip(&issued).skip(2) {
        broker
            .wait_tunnel(&i.id, "refused", |t| t["route"] == "error")
            .await
            .map_err(|e| e.context(name.to_string()))?;
    }
    let mut all = redis_keys(&redis, "*").await?;
    all.retain(|k, _| !k.starts_with("traefik/http/routers/sentinel/"));
    let aliases = [
        "_2Fuser_2Fa_252A_255Bx_255D_253F_2F",
        "_2Fuser_2Fb_5F2fuser_5F2falice_2F",
    ];
    assert_eq!(all.len(), 24, "{all:#?}");
    for key in all.keys() {
        let under = aliases.iter().any(|a| {
            key.starts_with(&format!("jupyterhub/routes/router_{a}/"))
                || key.starts_with(&format!("traefik/http/routers/router_{a}/"))
                || key.starts_with(&format!("traefik/http/services/service_{a}/"))
        });
        assert!(under, "{key} is outside the routes' own trees");
    }
    // (Which request paths traefik matches to a rule holding `*[]?` is traefik's business and
    // the same for the hub's own routes; the escape-character name shows routing by alias.)
    let (status, body) = traefik
        .wait_get("/user/b_2fuser_2falice/x", "reaches the job", |s, _| {
            s == 200
        })
        .await?;
    assert_eq!(body, "nb /user/b_2fuser_2falice/x", "{status}");
    // Nothing routes "/" or alice's path: the names did not write rules for them.
    assert_eq!(traefik.get("/").await?.0, 404);
    assert_eq!(traefik.get("/user/alice/").await?.0, 404);
    drop(jobs);
    Ok(())
}

#[tokio::test]
async fn a_password_file_and_custom_prefixes() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let mut c = common::redis_conn(&redis).await?;
    redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "s3cret-redis"])
        .query_async::<()>(&mut c)
        .await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("redis.password");
    write_0600(&file, "s3cret-redis\n")?;
    let broker = broker(
        &redis,
        &format!(
            "password_file = {file:?}\njupyterhub_prefix = \"hub/jh\"\ntraefik_prefix = \"tr\"\nentrypoint = \"web\"\n"
        ),
    )
    .await?;
    let issued = broker.issue("dora", "gpu", 600).await?;
    let notebook = http_backend("nb").await?;
    let _job = Ssh::job(&broker, &issued, notebook.port)?;
    broker
        .wait_tunnel(&issued.id, "registered", |t| t["route"] == "registered")
        .await?;
    let client = redis::Client::open(format!("redis://:s3cret-redis@{}/", redis.addr))?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut c).await?;
    let r = "router__2Fuser_2Fdora_2Fgpu_2F";
    assert!(
        keys.contains(&format!("hub/jh/routes/{r}/data/tunnelbot")),
        "{keys:?}"
    );
    let ep: String = redis::cmd("GET")
        .arg(format!("tr/http/routers/{r}/entryPoints/0"))
        .query_async(&mut c)
        .await?;
    assert_eq!(ep, "web");
    assert_eq!(keys.len(), 12, "{keys:?}");
    Ok(())
}

#[tokio::test]
async fn redis_down_at_start_does_not_stop_tunnels_and_routes_appear_when_it_is_up()
-> anyhow::Result<()> {
    let mut redis = Redis::start().await?;
    redis.kill().await?;
    let broker = broker(&redis, "").await?;
    let issued = broker.issue("erin", "", 600).await?;
    let notebook = common::echo("nb:").await?;
    let job = Ssh::job(&broker, &issued, notebook.port)?;
    assert_eq!(job.allocated_port().await?, issued.port);
    let hub_side = std::net::SocketAddr::new(broker.tunnel_ip, issued.port);
    assert_eq!(common::roundtrip(hub_side, b"x", 4).await?, b"nb:x");
    broker
        .wait_tunnel(&issued.id, "route error", |t| t["route"] == "error")
        .await?;
    assert!(redis.spawn().await?, "redis start");
    wait_keys(&redis, "*user_2Ferin_2F*", "are written", |k| k.len() == 12).await?;
    broker
        .wait_tunnel(&issued.id, "registered", |t| t["route"] == "registered")
        .await?;
    Ok(())
}
