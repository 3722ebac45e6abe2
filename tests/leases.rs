//! Renewals and leases through the admin API, the CLI and a restart: a renewal moves the
//! expiry and restarts the lease, is stored before it answers, and cannot revive an ended
//! tunnel; a tunnel not renewed within its lease expires and its job is cut.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Issued, Ssh, TestBroker, echo};
use reqwest::Method;
use serde_json::{Value, json};
use tunnelbot::store::{RedbStore, Store, TunnelRecord};

fn unix(v: &Value) -> i64 {
    let text = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .unix_timestamp()
}

async fn renew(broker: &TestBroker, id: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
    broker
        .api(Method::POST, &format!("/api/v1/tunnels/{id}/renew"), body)
        .await
}

#[tokio::test]
async fn renew_extends_the_expiry_within_max_ttl_and_refuses_ended_tunnels() -> anyhow::Result<()> {
    let broker = TestBroker::start("default_ttl = \"1h\"\nmax_ttl = \"2h\"\n").await?;
    let t = broker.issue("alice", "", 60).await?;
    assert_eq!(t.json["tunnel_host"], broker.tunnel_ip.to_string());
    assert_eq!(t.json["renewed_at"], Value::Null);
    assert_eq!(t.json["lease_seconds"], Value::Null);

    let (status, v) = renew(&broker, &t.id, Some(json!({"ttl_seconds": 3600}))).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(unix(&v["expires_at"]) - unix(&v["renewed_at"]), 3600);
    assert!(unix(&v["expires_at"]) > unix(&t.json["expires_at"]));
    assert_eq!(broker.tunnel(&t.id).await?["expires_at"], v["expires_at"]);
    // No body: the lifetime as issued (60 s) from now, which would be sooner: never shortened.
    let (status, again) = renew(&broker, &t.id, None).await?;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["expires_at"], v["expires_at"]);

    for (body, needle) in [
        (json!({"ttl_seconds": 7201}), "over the maximum"),
        (json!({"ttl_seconds": 0}), "above zero"),
        (json!({"ttl": 5}), "unknown field"),
    ] {
        let (status, e) = renew(&broker, &t.id, Some(body.clone())).await?;
        assert_eq!(status, 400, "{body}: {e}");
        assert!(e["error"].as_str().unwrap_or("").contains(needle), "{e}");
    }
    let (status, e) = renew(&broker, "tb_unknown", None).await?;
    assert_eq!(status, 404, "{e}");
    assert_eq!(broker.revoke(&t.id).await?, 204);
    let (status, e) = renew(&broker, &t.id, None).await?;
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().unwrap_or("").contains("revoked"), "{e}");
    assert_eq!(broker.tunnel(&t.id).await?["state"], "revoked");

    let ok = "tunnelbot_tunnel_renewals_total{result=\"ok\"}";
    let refused = "tunnelbot_tunnel_renewals_total{result=\"refused\"}";
    assert_eq!(broker.metric(ok).await?, 2.0);
    // Two out-of-bounds lifetimes, the unknown id and the revoked tunnel (a malformed body never
    // reaches the broker).
    assert_eq!(broker.metric(refused).await?, 4.0);
    Ok(())
}

#[tokio::test]
async fn a_tunnel_not_renewed_within_its_lease_expires_and_its_job_is_cut() -> anyhow::Result<()> {
    let broker = TestBroker::start("lease = \"1h\"\n").await?;
    let issue = |body: Value| broker.api(Method::POST, "/api/v1/tunnels", Some(body));
    // tunnels.lease is policy: a request may shorten it, not lengthen or drop it.
    for (body, needle) in [
        (json!({"user": "x", "lease_seconds": 3601}), "tunnels.lease"),
        (json!({"user": "x", "lease_seconds": 0}), "requires a lease"),
    ] {
        let (status, e) = issue(body).await?;
        assert_eq!(status, 400, "{e}");
        assert!(e["error"].as_str().unwrap_or("").contains(needle), "{e}");
    }
    let (status, default) = issue(json!({"user": "carol"})).await?;
    assert_eq!(status, 201, "{default}");
    assert_eq!(default["lease_seconds"], 3600);
    let id = default["id"].as_str().unwrap_or_default();
    let (_, renewed) = renew(&broker, id, None).await?;
    // The lease counts from the last renewal.
    assert_eq!(
        unix(&renewed["lease_until"]) - unix(&renewed["renewed_at"]),
        3600
    );

    let (status, v) = issue(json!({"user": "bob", "lease_seconds": 5})).await?;
    assert_eq!(status, 201, "{v}");
    assert_eq!(unix(&v["lease_until"]) - unix(&v["created_at"]), 5);
    let issued = Issued::write(v, broker.dir.path())?;
    let notebook = echo("nb:").await?;
    let mut job = Ssh::job(&broker, &issued, notebook.port)?;
    job.allocated_port().await?;
    // Nobody renews: the tunnel expires at its lease, hours before its expiry, and the job goes.
    let ended = broker
        .wait_tunnel(&issued.id, "expired", |t| t["state"] == "expired")
        .await?;
    assert!(unix(&ended["expires_at"]) > unix(&ended["lease_until"]) + 3600);
    assert_ne!(job.exit_code().await?, 0);
    assert!(
        job.stderr().contains("credential expired"),
        "{}",
        job.stderr()
    );
    let (status, _) = renew(&broker, &issued.id, None).await?;
    assert_eq!(status, 409);
    Ok(())
}

/// The real store, with a switch that makes every write fail (a full or read-only disk).
struct BreakableStore {
    inner: RedbStore,
    broken: Arc<AtomicBool>,
}

impl Store for BreakableStore {
    fn load(&self) -> anyhow::Result<Vec<TunnelRecord>> {
        self.inner.load()
    }
    fn put(&self, record: &TunnelRecord) -> anyhow::Result<()> {
        anyhow::ensure!(!self.broken.load(Ordering::Acquire), "disk full");
        self.inner.put(record)
    }
    fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.inner.remove(id)
    }
}

#[tokio::test]
async fn a_renewal_the_store_cannot_record_is_503_and_changes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let text = common::base_config(dir.path(), common::unique_loopback(), "lease = \"10m\"\n")
        + "[chp]\nenabled = false\n"
        + common::PROCESS_LIMITS;
    let config = tunnelbot::Config::parse(&text)?;
    let listeners = tunnelbot::Listeners::bind(&config).await?;
    let broken = Arc::new(AtomicBool::new(false));
    let store = BreakableStore {
        inner: RedbStore::open(&config.state_dir)?,
        broken: Arc::clone(&broken),
    };
    let keys = tunnelbot::keys::Keys::load_or_create(&config.keys_dir)?;
    let metrics = tunnelbot::metrics::Metrics::new()?;
    let broker = tunnelbot::Broker::open(
        config,
        keys,
        Arc::new(store),
        metrics,
        listeners.ssh_addr()?,
    )
    .await?;
    let issued = broker
        .issue(tunnelbot::broker::IssueRequest {
            user: "dora".into(),
            ..Default::default()
        })
        .await?;
    let id = issued.grant.id().to_owned();
    let before = issued.grant.to_record();
    let token = broker.admin_token().expose().to_owned();
    let admin = listeners.admin_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(tunnelbot::run(broker.clone(), listeners, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let call = |ttl: u64| {
        http.post(format!("http://{admin}/api/v1/tunnels/{id}/renew"))
            .bearer_auth(&token)
            .json(&json!({"ttl_seconds": ttl}))
            .send()
    };

    broken.store(true, Ordering::Release);
    let resp = call(99).await?;
    assert_eq!(resp.status().as_u16(), 503);
    let body: Value = resp.json().await?;
    assert!(
        body["error"].as_str().unwrap_or("").contains("disk full"),
        "{body}"
    );
    let (grant, _) = broker.get(&id).expect("still there");
    assert_eq!(grant.to_record(), before, "nothing changed");
    assert_eq!(
        broker
            .metrics()
            .tunnel_renewals
            .with_label_values(&["error"])
            .get(),
        1
    );

    broken.store(false, Ordering::Release);
    assert_eq!(call(99).await?.status().as_u16(), 200);
    assert_eq!(grant.renewed_at().map(|_| ()), Some(()));
    let _ = stop.send(());
    tokio::time::timeout(common::WAIT, run).await???;
    Ok(())
}

#[tokio::test]
async fn cli_renew_and_the_lease_survive_a_sigkill_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let text = common::base_config(dir.path(), common::unique_loopback(), "lease = \"30m\"\n")
        + "[chp]\nenabled = false\n"
        + common::PROCESS_LIMITS;
    let config = dir.path().join("tb.toml");
    std::fs::write(&config, text)?;
    let mut broker = common::BrokerProcess::start(dir.path(), &config).await?;
    let t = broker.issue("erin").await?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunnelbot"))
        .arg("--config")
        .arg(&config)
        .args(["renew", &t.id, "--ttl", "10h", "--json", "--admin-url"])
        .arg(format!("http://{}", broker.admin))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let renewed: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        unix(&renewed["expires_at"]) - unix(&renewed["renewed_at"]),
        36000
    );
    assert_eq!(renewed["lease_seconds"], 1800);

    broker.kill().await?;
    let restarted = common::BrokerProcess::start(dir.path(), &config).await?;
    let list = restarted.list().await?;
    let after = list
        .iter()
        .find(|v| v["id"] == t.id.as_str())
        .expect("restored");
    for key in [
        "expires_at",
        "renewed_at",
        "lease_seconds",
        "lease_until",
        "state",
    ] {
        assert_eq!(after[key], renewed[key], "{key}");
    }
    Ok(())
}
