//! The admin API's answers to good and bad requests.

mod common;

use common::TestBroker;
use reqwest::Method;
use serde_json::{Value, json};

async fn post_raw(
    broker: &TestBroker,
    token: Option<&str>,
    body: &str,
) -> anyhow::Result<(u16, Value)> {
    let mut req = broker
        .http
        .post(broker.url("/api/v1/tunnels"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await?))
}

#[tokio::test]
async fn bad_requests_get_a_json_error_that_says_what_is_wrong() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let token = broker.token.clone();
    let cases: [(Option<&str>, &str, u16, &str); 9] = [
        (None, r#"{"user":"a"}"#, 401, "Authorization"),
        (Some("wrong"), r#"{"user":"a"}"#, 401, "wrong admin token"),
        (Some(&token), r#"{"user":"a""#, 400, "EOF"),
        (
            Some(&token),
            r#"{"user":"a","colour":"red"}"#,
            400,
            "unknown field",
        ),
        (Some(&token), r#"{"server_name":"x"}"#, 400, "missing field"),
        (
            Some(&token),
            r#"{"user":""}"#,
            400,
            "user must not be empty",
        ),
        (
            Some(&token),
            r#"{"user":"a","ttl_seconds":99999999}"#,
            400,
            "over the maximum",
        ),
        (
            Some(&token),
            r#"{"user":"a","ttl_seconds":0}"#,
            400,
            "above zero",
        ),
        (
            Some(&token),
            r#"{"user":"a","public_key":"ssh-ed25519 notbase64"}"#,
            400,
            "public_key",
        ),
    ];
    for (tok, body, status, needle) in cases {
        let (got, v) = post_raw(&broker, tok, body).await?;
        assert_eq!(got, status, "{body}: {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
    }
    let (status, v) = broker
        .api(Method::GET, "/api/v1/tunnels/tb_nope", None)
        .await?;
    assert_eq!((status, v["error"].is_string()), (404, true));
    assert_eq!(
        broker
            .api(Method::DELETE, "/api/v1/tunnels/tb_nope", None)
            .await?
            .0,
        404
    );
    assert_eq!(
        broker
            .http
            .get(broker.url("/api/v1/tunnels"))
            .send()
            .await?
            .status()
            .as_u16(),
        401
    );
    Ok(())
}

#[tokio::test]
async fn no_free_port_is_503_and_a_revoke_frees_it() -> anyhow::Result<()> {
    let broker = TestBroker::start("ports = \"24000-24000\"").await?;
    let first = broker.issue("a", "", 60).await?;
    let (status, v) = broker
        .api(Method::POST, "/api/v1/tunnels", Some(json!({"user": "b"})))
        .await?;
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("no free port"), "{v}");
    assert_eq!(broker.metric("tunnelbot_ports_free").await?, 0.0);
    assert_eq!(broker.revoke(&first.id).await?, 204);
    // The port returns to the pool once its listener has closed.
    let v = common::eventually("the freed port can be issued again", async || {
        let (status, v) = broker
            .api(Method::POST, "/api/v1/tunnels", Some(json!({"user": "b"})))
            .await?;
        anyhow::Ok((status == 201).then_some(v))
    })
    .await?;
    assert_eq!(v["port"], 24000);
    Ok(())
}

#[tokio::test]
async fn a_job_supplied_public_key_is_used_and_no_private_key_returned() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let key = common::keygen(broker.dir.path(), "own")?;
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    let (status, v) = broker
        .api(
            Method::POST,
            "/api/v1/tunnels",
            Some(json!({"user": "alice", "server_name": "x", "public_key": public})),
        )
        .await?;
    assert_eq!(status, 201, "{v}");
    assert!(v.get("private_key").is_none());
    let issued = common::Issued::write(v, broker.dir.path())?;
    let notebook = common::echo("own:").await?;
    let args = common::job_args(broker.ssh, &key, &issued.known_hosts, notebook.port);
    let job = common::Ssh::spawn(&args)?;
    assert_eq!(job.allocated_port().await?, issued.port);
    // The same key cannot back a second tunnel.
    let (status, v) = broker
        .api(
            Method::POST,
            "/api/v1/tunnels",
            Some(json!({"user": "bob", "public_key": public})),
        )
        .await?;
    assert_eq!(status, 400, "{v}");
    Ok(())
}

#[tokio::test]
async fn list_health_and_metrics() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let a = broker.issue("alice", "", 600).await?;
    let b = broker.issue("bob", "gpu", 600).await?;
    let (status, v) = broker.api(Method::GET, "/api/v1/tunnels", None).await?;
    assert_eq!(status, 200);
    let ids: Vec<&str> = v["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&a.id.as_str()) && ids.contains(&b.id.as_str()));
    assert!(
        v["tunnels"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.get("private_key").is_none())
    );
    assert_ne!(a.port, b.port);
    let health: Value = broker
        .http
        .get(broker.url("/healthz"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(health["status"], "ok");
    assert_eq!(
        broker
            .http
            .get(broker.url("/readyz"))
            .send()
            .await?
            .status()
            .as_u16(),
        200
    );
    assert_eq!(broker.metric("tunnelbot_tunnels_issued_total").await?, 2.0);
    Ok(())
}

/// A broker whose `[admin]` table gets `keys` too.
async fn broker_with_admin(keys: &'static str) -> anyhow::Result<TestBroker> {
    TestBroker::start_text(move |dir, ip| {
        let line = "[admin]\nlisten = \"127.0.0.1:0\"\n";
        let text = common::base_config(dir, ip, "");
        anyhow::ensure!(text.contains(line), "base_config changed shape");
        Ok(text.replace(line, &format!("{line}{keys}")) + "[chp]\nenabled = false\n")
    })
    .await
}

/// Reads until the server closes the connection (EOF or reset), bounded; returns what came.
async fn until_closed(s: &mut tokio::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(common::WAIT, read_all).await?;
    Ok(got)
}

/// `/readyz` on a fresh connection: Some(status), or None when the connection was refused.
async fn readyz(broker: &TestBroker) -> Option<u16> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(common::WAIT)
        .build()
        .ok()?;
    let r = client.get(broker.url("/readyz")).send().await.ok()?;
    Some(r.status().as_u16())
}

/// Polls `/readyz` until it answers 200, bounded.
async fn readyz_recovers(broker: &TestBroker) -> anyhow::Result<()> {
    common::eventually("/readyz answers 200", async || {
        readyz(broker).await == Some(200)
    })
    .await
}

#[tokio::test]
async fn slow_header_connections_are_cut_and_readyz_answers_meanwhile_and_after()
-> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let broker = broker_with_admin("header_timeout = \"2s\"\nmax_connections = 256\n").await?;
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(broker.admin).await?;
        // Headers begun and never finished.
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await?;
        slow.push(s);
    }
    assert_eq!(readyz(&broker).await, Some(200), "readyz during the flood");
    for s in &mut slow {
        let got = until_closed(s).await?;
        // Cut without an answer to the unfinished request.
        assert!(!String::from_utf8_lossy(&got).contains("200 OK"), "{got:?}");
    }
    readyz_recovers(&broker).await?;
    Ok(())
}

#[tokio::test]
async fn a_body_that_never_comes_gets_408() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let broker = broker_with_admin("body_timeout = \"1s\"\n").await?;
    let mut s = tokio::net::TcpStream::connect(broker.admin).await?;
    let head = format!(
        "POST /api/v1/tunnels HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"user\"",
        broker.token
    );
    s.write_all(head.as_bytes()).await?;
    let got = String::from_utf8_lossy(&until_closed(&mut s).await?).into_owned();
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("admin.body_timeout"), "{got}");
    assert_eq!(broker.metric("tunnelbot_tunnels_issued_total").await?, 0.0);
    Ok(())
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_and_readyz_returns_when_they_go()
-> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let broker = broker_with_admin("max_connections = 4\nheader_timeout = \"1h\"\n").await?;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(broker.admin).await?);
    }
    // Every connection past the cap is closed unanswered, as many as come.
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(broker.admin).await?;
        let _ = s
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        assert!(until_closed(&mut s).await?.is_empty());
    }
    drop(held);
    readyz_recovers(&broker).await?;
    Ok(())
}
