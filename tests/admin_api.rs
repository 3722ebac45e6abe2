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
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let (status, v) = broker
            .api(Method::POST, "/api/v1/tunnels", Some(json!({"user": "b"})))
            .await?;
        if status == 201 {
            assert_eq!(v["port"], 24000);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "port never freed: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
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
