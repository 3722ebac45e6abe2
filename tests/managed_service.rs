//! The broker as a JupyterHub-managed service: the binary started with only the environment
//! JupyterHub gives a service (plus the CHP token) finds the hub API and CHP; and the host the
//! proxy must dial (`tunnels.public_host`) is in the tunnel object and in the route target.

mod common;

use common::{Chp, Issued, Ssh, echo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn started_with_the_service_environment_the_broker_calls_the_hub_and_chp()
-> anyhow::Result<()> {
    let chp = Chp::start().await?;
    // Stands in for JupyterHub's API: records each request and answers 200.
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
    let dir = tempfile::tempdir()?;
    let ip = common::unique_loopback();
    // No chp.token_file, hub_api_url or hub_token_file: all of it comes from the environment.
    // The proxy is told to dial "localhost", not the bind address.
    let text = common::base_config(dir.path(), ip, "public_host = \"localhost\"\n")
        + &format!(
            "[chp]\nenabled = true\napi_url = \"http://{}\"\nreconcile_interval = \"200ms\"\n",
            chp.api
        )
        + common::PROCESS_LIMITS;
    let config = dir.path().join("tb.toml");
    std::fs::write(&config, text)?;
    let hub_url = format!("http://{hub_addr}/hub/api");
    let broker = common::BrokerProcess::start_env(
        dir.path(),
        &config,
        &[
            ("JUPYTERHUB_SERVICE_NAME", "tunnelbot"),
            ("JUPYTERHUB_API_URL", &hub_url),
            ("JUPYTERHUB_API_TOKEN", "service-token-from-env"),
            ("CONFIGPROXY_AUTH_TOKEN", &chp.token),
        ],
    )
    .await?;

    // CHP answered the broker (its table has no hub route), so the broker asked the hub,
    // with the service's token.
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
            .contains("authorization: token service-token-from-env"),
        "{request}"
    );

    let issued: Issued = broker.issue("svcuser").await?;
    assert_eq!(issued.json["tunnel_host"], "localhost");
    let notebook = echo("nb:").await?;
    let args = common::job_args(broker.ssh, &issued.key, &issued.known_hosts, notebook.port);
    let job = Ssh::spawn(&args)?;
    job.allocated_port().await?;
    let want = format!("http://localhost:{}", issued.port);
    chp.wait_route("/user/svcuser", "registered at tunnel_host", |r| {
        r.is_some_and(|r: &Value| r["target"] == want.as_str())
    })
    .await?;
    Ok(())
}

#[test]
fn a_bind_to_every_interface_needs_public_host_and_the_old_key_must_agree() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let check = |text: &str| -> anyhow::Result<(i32, String)> {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text)?;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunnelbot"))
            .args(["check", "--config"])
            .arg(&path)
            .env_remove("JUPYTERHUB_API_URL")
            .env_remove("JUPYTERHUB_API_TOKEN")
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let all = "[chp]\nenabled = false\n[tunnels]\nbind_address = \"0.0.0.0\"\n";
    let (code, err) = check(all)?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("tunnels.public_host"), "{err}");
    assert_eq!(
        check(&format!("{all}public_host = \"hub.internal\"\n"))?.0,
        0
    );
    let (code, err) =
        check("[tunnels]\npublic_host = \"a.internal\"\n[chp]\ntarget_host = \"b.internal\"\n")?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("differ"), "{err}");
    let (code, err) = check("[chp]\nhub_api_url = \"http://127.0.0.1:8081/hub/api\"\n")?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("JUPYTERHUB_API_TOKEN"), "{err}");
    Ok(())
}
