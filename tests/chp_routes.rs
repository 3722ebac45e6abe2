//! Routes in a real configurable-http-proxy follow the tunnels: added when the forward is up,
//! removed when it ends, restored after a CHP restart, foreign routes left alone, and no name
//! ever reaches the hub's own routes.

mod common;

use std::time::Duration;

use common::{Chp, Ssh, TestBroker, http_backend};
use serde_json::{Value, json};

fn target(broker: &TestBroker, port: u16) -> String {
    format!("http://{}:{port}", broker.tunnel_ip)
}

#[tokio::test]
async fn request_through_chp_reaches_the_job_and_route_follows_the_tunnel() -> anyhow::Result<()> {
    let chp = Chp::start().await?;
    let broker = TestBroker::with_chp(&chp, "/").await?;
    let issued = broker.issue("alice", "", 600).await?;
    assert_eq!(broker.tunnel(&issued.id).await?["route"], "absent");
    let notebook = http_backend("alice-nb").await?;
    let mut job = Ssh::job(&broker, &issued, notebook.port)?;
    job.allocated_port().await?;

    let want = target(&broker, issued.port);
    let table = chp
        .wait_route("/user/alice", "registered", |r| {
            r.is_some_and(|r| r["target"] == want.as_str())
        })
        .await?;
    let route = &table["/user/alice"];
    assert_eq!(route["jupyterhub"], true);
    assert_eq!(route["user"], "alice");
    assert_eq!(route["server_name"], "");
    broker
        .wait_tunnel(&issued.id, "registered", |t| t["route"] == "registered")
        .await?;
    let (status, body) = chp.get("/user/alice/api/status").await?;
    assert_eq!(
        (status, body.as_str()),
        (200, "alice-nb /user/alice/api/status")
    );
    assert!(
        broker
            .metric("tunnelbot_route_register_duration_seconds_count")
            .await?
            >= 1.0
    );
    assert_eq!(broker.metric("tunnelbot_chp_up").await?, 1.0);

    // The job's connection ends: the route goes.
    job.child.kill().await?;
    chp.wait_route("/user/alice", "removed", |r| r.is_none())
        .await?;
    broker
        .wait_tunnel(&issued.id, "absent", |t| t["route"] == "absent")
        .await?;
    Ok(())
}

#[tokio::test]
async fn revoke_and_expiry_remove_the_route() -> anyhow::Result<()> {
    let chp = Chp::start().await?;
    let broker = TestBroker::with_chp(&chp, "/").await?;
    let notebook = http_backend("nb").await?;
    let revoked = broker.issue("rita", "", 600).await?;
    let expiring = broker.issue("ezra", "", 5).await?;
    let _a = Ssh::job(&broker, &revoked, notebook.port)?;
    let _b = Ssh::job(&broker, &expiring, notebook.port)?;
    chp.wait_route("/user/rita", "registered", |r| r.is_some())
        .await?;
    chp.wait_route("/user/ezra", "registered", |r| r.is_some())
        .await?;
    assert_eq!(broker.revoke(&revoked.id).await?, 204);
    chp.wait_route("/user/rita", "removed after revoke", |r| r.is_none())
        .await?;
    chp.wait_route("/user/ezra", "removed after expiry", |r| r.is_none())
        .await?;
    Ok(())
}

#[tokio::test]
async fn named_servers_under_a_base_url() -> anyhow::Result<()> {
    let chp = Chp::start().await?;
    let broker = TestBroker::with_chp(&chp, "/jh/").await?;
    let issued = broker.issue("bob b@example.org", "gpu-1", 600).await?;
    let notebook = http_backend("bob-gpu").await?;
    let _job = Ssh::job(&broker, &issued, notebook.port)?;
    let want = target(&broker, issued.port);
    let table = chp
        .wait_route("/jh/user/bob b@example.org/gpu-1", "registered", |r| {
            r.is_some_and(|r| r["target"] == want.as_str())
        })
        .await?;
    assert_eq!(
        table["/jh/user/bob b@example.org/gpu-1"]["server_name"],
        "gpu-1"
    );
    let (status, body) = chp.get("/jh/user/bob%20b@example.org/gpu-1/lab").await?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("bob-gpu /jh/user/bob%20b@example.org/gpu-1/lab"),
        "{body}"
    );
    Ok(())
}

#[tokio::test]
async fn chp_restart_gets_routes_back_and_foreign_routes_are_left_alone() -> anyhow::Result<()> {
    let mut chp = Chp::start().await?;
    let broker = TestBroker::with_chp(&chp, "/").await?;
    let issued = broker.issue("carol", "", 600).await?;
    let notebook = http_backend("carol-nb").await?;
    let _job = Ssh::job(&broker, &issued, notebook.port)?;
    chp.wait_route("/user/carol", "registered", |r| r.is_some())
        .await?;

    // Routes the broker does not own: no marker, another target, or a port outside its range.
    chp.add_route("/foreign", json!({"target": "http://127.0.0.1:9"}))
        .await?;
    chp.add_route("/user/zed", json!({"target": "http://127.0.0.1:9", "jupyterhub": true, "user": "zed", "server_name": ""})).await?;
    // A stale route of ours (our marker, our host, a port in our range, no tunnel): removed.
    let stale = format!("http://{}:24999", broker.tunnel_ip);
    chp.add_route(
        "/user/ghost",
        json!({"target": stale, "jupyterhub": true, "user": "ghost", "server_name": "", "tunnelbot": true}),
    )
    .await?;
    chp.wait_route("/user/ghost", "removed as stale", |r| r.is_none())
        .await?;
    // Someone points carol's route elsewhere: it is put back.
    chp.add_route("/user/carol", json!({"target": "http://127.0.0.1:9", "jupyterhub": true, "user": "carol", "server_name": ""})).await?;
    let want = target(&broker, issued.port);
    chp.wait_route("/user/carol", "repaired", |r| {
        r.is_some_and(|r| r["target"] == want.as_str())
    })
    .await?;
    let table = chp.routes().await?;
    assert!(
        table.get("/foreign").is_some() && table.get("/user/zed").is_some(),
        "{table}"
    );

    chp.kill().await?;
    assert!(chp.spawn().await?, "CHP restart");
    // CHP restarted empty: the foreign route, which nobody restores, is gone. (The table is not
    // asserted empty: the broker may already have put carol's route back.)
    assert!(chp.routes().await?.get("/foreign").is_none());
    chp.wait_route("/user/carol", "restored", |r| {
        r.is_some_and(|r| r["target"] == want.as_str())
    })
    .await?;
    let (status, body) = chp.get("/user/carol/tree").await?;
    assert_eq!((status, body.as_str()), (200, "carol-nb /user/carol/tree"));
    Ok(())
}

#[tokio::test]
async fn chp_down_at_start_does_not_stop_tunnels_and_routes_appear_when_it_is_up()
-> anyhow::Result<()> {
    let mut chp = Chp::start().await?;
    chp.kill().await?;
    let broker = TestBroker::with_chp(&chp, "/").await?;
    let issued = broker.issue("dora", "", 600).await?;
    let notebook = common::echo("nb:").await?;
    let job = Ssh::job(&broker, &issued, notebook.port)?;
    assert_eq!(job.allocated_port().await?, issued.port);
    let hub_side = std::net::SocketAddr::new(broker.tunnel_ip, issued.port);
    assert_eq!(common::roundtrip(hub_side, b"x", 4).await?, b"nb:x");
    broker
        .wait_tunnel(&issued.id, "route error", |t| t["route"] == "error")
        .await?;
    assert!(
        broker
            .metric("tunnelbot_route_operations_total{op=\"add\",result=\"error\"}")
            .await?
            >= 1.0
    );
    assert_eq!(broker.metric("tunnelbot_chp_up").await?, 0.0);

    assert!(chp.spawn().await?, "CHP start");
    chp.wait_route("/user/dora", "registered", |r| r.is_some())
        .await?;
    broker
        .wait_tunnel(&issued.id, "registered", |t| t["route"] == "registered")
        .await?;
    Ok(())
}

#[tokio::test]
async fn reconnect_keeps_the_route_on_the_same_port() -> anyhow::Result<()> {
    let chp = Chp::start().await?;
    let broker = TestBroker::with_chp(&chp, "/").await?;
    let issued = broker.issue("erin", "", 600).await?;
    let notebook = http_backend("nb").await?;
    let want = target(&broker, issued.port);
    let first = Ssh::job(&broker, &issued, notebook.port)?;
    chp.wait_route("/user/erin", "registered", |r| r.is_some())
        .await?;
    // The first session freezes (a network cut looks the same); the job's reconnect replaces
    // it without the route changing.
    first.signal("STOP")?;
    let second = Ssh::job(&broker, &issued, notebook.port)?;
    second.allocated_port().await?;
    for _ in 0..10 {
        let table = chp.routes().await?;
        let t: Option<&Value> = table.get("/user/erin").map(|r| &r["target"]);
        assert!(
            t.is_none_or(|t| t == want.as_str()),
            "route pointed elsewhere: {table}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    chp.wait_route("/user/erin", "registered", |r| {
        r.is_some_and(|r| r["target"] == want.as_str())
    })
    .await?;
    first.signal("CONT")?;
    drop(first);
    Ok(())
}

#[tokio::test]
async fn a_restarted_chp_without_the_hub_route_makes_the_broker_ask_the_hub() -> anyhow::Result<()>
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chp = Chp::start().await?;
    // Stands in for JupyterHub's API: records the request and answers 200.
    let hub = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hub_addr = hub.local_addr()?;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = hub.accept().await {
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let _ = seen_tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    });
    let broker = TestBroker::start_with("", |dir, ip| {
        let hub_token = dir.join("hub.token");
        common::write_0600(&hub_token, "hub-secret-token")?;
        Ok(chp.broker_config(dir, ip, "/")?
            + &format!(
                "hub_api_url = \"http://{hub_addr}/hub/api\"\nhub_token_file = {hub_token:?}\n"
            ))
    })
    .await?;
    // CHP's table has no route marked "hub": the broker asks the hub to restore its routes.
    let request = tokio::time::timeout(common::WAIT, seen_rx.recv())
        .await?
        .expect("hub called");
    assert!(
        request.starts_with("POST /hub/api/proxy HTTP/1.1"),
        "{request}"
    );
    assert!(
        request
            .to_lowercase()
            .contains("authorization: token hub-secret-token"),
        "{request}"
    );
    // With the hub route present, passes go by without asking the hub again...
    chp.add_route(
        "/",
        json!({"target": "http://127.0.0.1:9", "jupyterhub": true, "hub": true}),
    )
    .await?;
    let lists = "tunnelbot_route_operations_total{op=\"list\",result=\"ok\"}";
    let seen = broker.metric(lists).await?;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while broker.metric(lists).await? < seen + 3.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reconcile passes stopped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        seen_rx.try_recv().is_err(),
        "hub asked while its route was present"
    );
    // ...and a CHP restart (hub route gone) makes the broker ask again at once.
    let mut chp = chp;
    chp.kill().await?;
    assert!(chp.spawn().await?);
    let again = tokio::time::timeout(common::WAIT, seen_rx.recv())
        .await?
        .expect("hub called again");
    assert!(again.starts_with("POST /hub/api/proxy"), "{again}");
    Ok(())
}

/// The hub's route as JupyterHub 6 writes it (`add_hub_route`): `/` under base_url "/".
fn hub_route() -> Value {
    json!({"target": "http://127.0.0.1:8081", "jupyterhub": true, "hub": true})
}

/// Waits until the broker has finished `n` more reconcile passes (each lists CHP's table).
async fn reconcile_passes(broker: &TestBroker, n: f64) -> anyhow::Result<()> {
    let lists = "tunnelbot_route_operations_total{op=\"list\",result=\"ok\"}";
    let seen = broker.metric(lists).await?;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while broker.metric(lists).await? < seen + n {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "reconcile passes stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn hostile_names_are_refused_and_the_hub_route_survives_them_and_a_tunnels_end()
-> anyhow::Result<()> {
    let chp = Chp::start().await?;
    chp.add_route("/", hub_route()).await?;
    chp.add_route(
        "/hub",
        json!({"target": "http://127.0.0.1:8081", "extra": true}),
    )
    .await?;
    let broker = TestBroker::with_chp(&chp, "/").await?;
    let before = chp.routes().await?;
    let hostile: &[(&str, &str, &str)] = &[
        (".", "", "dots"),
        ("..", "", "dots"),
        ("...", "", "dots"),
        ("%2e%2e", "", "dots"),
        (".%2E", "", "dots"),
        ("../hub", "", "'/'"),
        ("alice/..", "", "'/'"),
        ("a\u{202E}b", "", "bidirectional"),
        ("\u{200B}", "", "zero-width"),
        ("a\u{FEFF}", "", "zero-width"),
        ("a\rb", "", "control"),
        (" ..", "", "white space"),
        ("Alice", "", "lower case"),
        ("alice", ".", "dots"),
        ("alice", "..", "dots"),
        ("alice", "../..", "server name rule"),
        ("alice", "%2e%2e", "server name rule"),
        ("alice", "a\u{2066}", "bidirectional"),
        ("..", "..", "dots"),
    ];
    for (user, server, why) in hostile {
        let (status, body) = broker
            .api(
                reqwest::Method::POST,
                "/api/v1/tunnels",
                Some(json!({"user": user, "server_name": server, "ttl_seconds": 600})),
            )
            .await?;
        assert_eq!(status, 400, "{user:?}/{server:?} was issued: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{user:?}/{server:?}: {error}");
    }
    // A real tunnel comes and goes; the reconcile pass runs meanwhile.
    let issued = broker.issue("alice", "", 600).await?;
    let notebook = http_backend("alice-nb").await?;
    let mut job = Ssh::job(&broker, &issued, notebook.port)?;
    chp.wait_route("/user/alice", "registered", |r| r.is_some())
        .await?;
    job.child.kill().await?;
    chp.wait_route("/user/alice", "removed", |r| r.is_none())
        .await?;
    reconcile_passes(&broker, 3.0).await?;
    let after = chp.routes().await?;
    for path in ["/", "/hub"] {
        let mut was = before[path].clone();
        let mut is = after[path].clone();
        // CHP restamps last_activity on traffic; every key the hub wrote is unchanged.
        for v in [&mut was, &mut is] {
            v.as_object_mut().map(|o| o.remove("last_activity"));
        }
        assert_eq!(was, is, "{path} changed: {after}");
    }
    Ok(())
}

#[tokio::test]
async fn a_route_without_our_marker_is_never_deleted() -> anyhow::Result<()> {
    let chp = Chp::start().await?;
    chp.add_route("/", hub_route()).await?;
    let broker = TestBroker::with_chp(&chp, "/").await?;
    // Our target shape exactly (our host, a port of our range, JupyterHub's keys), no marker.
    let foreign = json!({
        "target": format!("http://{}:24999", broker.tunnel_ip),
        "jupyterhub": true,
        "user": "mallory",
        "server_name": "",
    });
    chp.add_route("/user/mallory", foreign.clone()).await?;
    // The same at the path of a tunnel that then ends: the end leaves the hub's write alone.
    let issued = broker.issue("nina", "", 600).await?;
    let notebook = http_backend("nina-nb").await?;
    let mut job = Ssh::job(&broker, &issued, notebook.port)?;
    let want = target(&broker, issued.port);
    chp.wait_route("/user/nina", "registered with our marker", |r| {
        r.is_some_and(|r| r["tunnelbot"] == true)
    })
    .await?;
    reconcile_passes(&broker, 3.0).await?;
    assert!(chp.routes().await?.get("/user/mallory").is_some());
    job.child.kill().await?;
    chp.wait_route("/user/nina", "removed", |r| r.is_none())
        .await?;
    // The hub writes nina's route again (its check_routes "Adding missing route"), unmarked.
    chp.add_route(
        "/user/nina",
        json!({"target": want, "jupyterhub": true, "user": "nina", "server_name": ""}),
    )
    .await?;
    reconcile_passes(&broker, 3.0).await?;
    let table = chp.routes().await?;
    assert!(table.get("/user/nina").is_some(), "{table}");
    let mut left = table["/user/mallory"].clone();
    left.as_object_mut().map(|o| o.remove("last_activity"));
    assert_eq!(left, foreign);
    assert!(table.get("/").is_some(), "{table}");
    Ok(())
}
