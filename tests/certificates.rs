//! Certificates from the site's OpenSSH CA, made with `ssh-keygen -s` and used by the stock
//! client: what publishes a certificate tunnel, everything that is refused, and what ends a
//! certificate's session (its `valid before`, a KRL read again).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use common::{Ssh, TestBroker, echo, keygen, roundtrip, ssh_args};
use serde_json::{Value, json};

/// A CA, its KRL and a broker that trusts it.
struct Site {
    broker: TestBroker,
    ca: PathBuf,
    krl: PathBuf,
    known_hosts: PathBuf,
}

fn ssh_keygen(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ssh-keygen")
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "ssh-keygen {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Writes a KRL revoking `spec` lines (e.g. "serial: 7", "id: job-1") under `ca`.
fn write_krl(krl: &Path, ca: &Path, spec: &str) -> anyhow::Result<()> {
    let spec_file = krl.with_extension("spec");
    std::fs::write(&spec_file, spec)?;
    let ca_pub = format!("{}.pub", ca.display());
    ssh_keygen(&[
        "-q",
        "-k",
        "-f",
        &krl.display().to_string(),
        "-s",
        &ca_pub,
        &spec_file.display().to_string(),
    ])
}

impl Site {
    async fn start(principal: &str) -> anyhow::Result<Self> {
        let ca_dir = tempfile::tempdir()?.keep();
        let ca = keygen(&ca_dir, "ca")?;
        let krl = ca_dir.join("revoked.krl");
        write_krl(&krl, &ca, "")?;
        let (ca_pub, krl_text) = (format!("{}.pub", ca.display()), krl.display().to_string());
        let principal = principal.to_owned();
        let broker = TestBroker::start_text(move |dir, ip| {
            Ok(common::base_config(dir, ip, "").replace(
                "[ssh]\n",
                &format!(
                    "[ssh]\ntrusted_user_ca_keys = {ca_pub:?}\nrevoked_keys = {krl_text:?}\n\
                     certificate_principal = {principal:?}\n"
                ),
            ) + "[chp]\nenabled = false\n")
        })
        .await?;
        let known_hosts = ca_dir.join("known_hosts");
        let (_, probe) = broker
            .api(reqwest::Method::GET, "/api/v1/tunnels", None)
            .await?;
        anyhow::ensure!(probe["tunnels"].is_array(), "{probe}");
        Ok(Self {
            broker,
            ca,
            krl,
            known_hosts,
        })
    }

    /// Issues a certificate tunnel for `user`; returns (id, port), checking no key came back.
    async fn issue(&self, user: &str) -> anyhow::Result<(String, u16)> {
        let (status, v) = self
            .broker
            .api(
                reqwest::Method::POST,
                "/api/v1/tunnels",
                Some(json!({"user": user, "auth": "certificate", "ttl_seconds": 600})),
            )
            .await?;
        anyhow::ensure!(status == 201, "{status} {v}");
        anyhow::ensure!(v.get("private_key").is_none_or(Value::is_null), "{v}");
        assert_eq!(v["auth"], "certificate");
        std::fs::write(
            &self.known_hosts,
            format!("{}\n", v["known_hosts"].as_str().context("kh")?),
        )?;
        Ok((
            v["id"].as_str().context("id")?.to_owned(),
            u16::try_from(v["port"].as_u64().context("port")?)?,
        ))
    }

    /// A user key and a certificate for it; `extra` goes to `ssh-keygen -s` (e.g. "-n alice").
    fn certificate(&self, name: &str, signer: &Path, extra: &[&str]) -> anyhow::Result<PathBuf> {
        let dir = self.krl.parent().context("dir")?;
        let key = keygen(dir, name)?;
        let mut args = vec!["-q", "-s"];
        let signer = signer.display().to_string();
        args.push(&signer);
        args.extend(["-I", name]);
        args.extend(extra);
        let public = format!("{}.pub", key.display());
        args.push(&public);
        ssh_keygen(&args)?;
        Ok(key)
    }

    /// The job's ssh with `key` and its certificate, `-R spec`.
    fn job(&self, key: &Path, spec: &str) -> anyhow::Result<Ssh> {
        let cert = format!("{}-cert.pub", key.display());
        let mut args: Vec<String> = vec![
            "-N".into(),
            "-o".into(),
            "ExitOnForwardFailure=yes".into(),
            "-o".into(),
            format!("CertificateFile={cert}"),
            "-R".into(),
            spec.into(),
        ];
        args.extend(ssh_args(
            self.broker.ssh,
            key,
            &self.known_hosts,
            "tunnelbot",
        ));
        Ssh::spawn(&args)
    }

    async fn refusal_count(&self, reason: &str) -> anyhow::Result<f64> {
        self.broker
            .metric(&format!(
                "tunnelbot_auth_attempts_total{{reason=\"{reason}\",result=\"refused\"}}"
            ))
            .await
    }
}

#[tokio::test]
async fn a_certificate_publishes_its_users_tunnel_with_no_key_issued() -> anyhow::Result<()> {
    let site = Site::start("{user}").await?;
    let (_, port) = site.issue("alice").await?;
    let notebook = echo("nb:").await?;
    let key = site.certificate("alice-job", &site.ca, &["-n", "alice", "-V", "-5m:+1h"])?;
    // -R 0: alice has exactly one certificate tunnel waiting, so it is that one.
    let job = site.job(&key, &format!("0:127.0.0.1:{}", notebook.port))?;
    assert_eq!(job.allocated_port().await?, port);
    let hub_side = SocketAddr::new(site.broker.tunnel_ip, port);
    assert_eq!(roundtrip(hub_side, b"c", 4).await?, b"nb:c");
    drop(job);

    // With two waiting, -R 0 is ambiguous and the port must be named.
    let (_, second) = site.issue("alice").await?;
    let mut vague = site.job(&key, &format!("0:127.0.0.1:{}", notebook.port))?;
    assert_eq!(vague.exit_code().await?, 255);
    let _named = site.job(&key, &format!("{second}:127.0.0.1:{}", notebook.port))?;
    // A named port gets no "Allocated port" line: wait for the grant instead.
    site.broker
        .wait_metric(
            "tunnelbot_forward_requests_total{reason=\"ok\",result=\"granted\"}",
            2.0,
        )
        .await?;
    let hub_side = SocketAddr::new(site.broker.tunnel_ip, second);
    assert_eq!(roundtrip(hub_side, b"d", 4).await?, b"nb:d");

    // Another user's certificate publishes none of alice's tunnels.
    let bob = site.certificate("bob-job", &site.ca, &["-n", "bob"])?;
    let mut intruder = site.job(&bob, &format!("{second}:127.0.0.1:{}", notebook.port))?;
    assert_eq!(intruder.exit_code().await?, 255);
    assert!(
        intruder.stderr().contains("remote port forwarding failed"),
        "{}",
        intruder.stderr()
    );
    Ok(())
}

#[tokio::test]
async fn every_certificate_that_should_fail_is_refused_with_its_reason() -> anyhow::Result<()> {
    let site = Site::start("jh-{user}").await?;
    site.issue("alice").await?;
    let rogue_dir = tempfile::tempdir()?;
    let rogue_ca = keygen(rogue_dir.path(), "rogue-ca")?;
    let cases: [(&str, PathBuf, &str); 7] = [
        (
            "unknown CA",
            site.certificate("k1", &rogue_ca, &["-n", "jh-alice"])?,
            "cert_unknown_ca",
        ),
        (
            "principal outside the template",
            site.certificate("k3", &site.ca, &["-n", "alice"])?,
            "cert_principal",
        ),
        (
            "no principal at all",
            site.certificate("k4", &site.ca, &[])?,
            "cert_principal",
        ),
        (
            "source address elsewhere",
            site.certificate(
                "k5",
                &site.ca,
                &["-n", "jh-alice", "-O", "source-address=192.0.2.0/24"],
            )?,
            "cert_source_address",
        ),
        (
            "an option we do not enforce",
            site.certificate("k6", &site.ca, &["-n", "jh-alice", "-O", "verify-required"])?,
            "cert_critical_option",
        ),
        (
            "expired",
            site.certificate("k7", &site.ca, &["-n", "jh-alice", "-V", "-2h:-1h"])?,
            "cert_expired",
        ),
        (
            "not yet valid",
            site.certificate("k8", &site.ca, &["-n", "jh-alice", "-V", "+1h:+2h"])?,
            "cert_expired",
        ),
    ];
    for (what, key, reason) in &cases {
        let before = site.refusal_count(reason).await?;
        let mut job = site.job(key, "0:127.0.0.1:9")?;
        assert_eq!(job.exit_code().await?, 255, "{what}");
        assert!(
            job.stderr().contains("Permission denied"),
            "{what}: {}",
            job.stderr()
        );
        assert!(
            site.refusal_count(reason).await? > before,
            "{what}: {reason}"
        );
    }
    // A host certificate the stock client never offers for a login (a unit test in certs.rs
    // covers our check).
    for (name, extra) in [("k2", &["-h"][..])] {
        let validity = extra.join(" ");
        let mut args = vec!["-n", "jh-alice"];
        args.extend_from_slice(extra);
        let key = site.certificate(name, &site.ca, &args)?;
        let mut job = site.job(&key, "0:127.0.0.1:9")?;
        assert_eq!(job.exit_code().await?, 255, "{validity}");
        assert!(
            job.stderr().contains("Permission denied"),
            "{}",
            job.stderr()
        );
    }
    // The right principal through the template gets in.
    let notebook = echo("ok:").await?;
    let good = site.certificate("k9", &site.ca, &["-n", "jh-alice"])?;
    let job = site.job(&good, &format!("0:127.0.0.1:{}", notebook.port))?;
    job.allocated_port().await?;
    Ok(())
}

#[tokio::test]
async fn a_certificate_session_ends_at_valid_before_and_when_the_krl_revokes_it()
-> anyhow::Result<()> {
    let site = Site::start("{user}").await?;
    let notebook = echo("nb:").await?;

    // Valid for a few seconds more: the session ends when the certificate does.
    let (_, port) = site.issue("alice").await?;
    let brief = site.certificate("brief", &site.ca, &["-n", "alice", "-V", "-1m:+3s"])?;
    let mut job = site.job(&brief, &format!("0:127.0.0.1:{}", notebook.port))?;
    assert_eq!(job.allocated_port().await?, port);
    assert_eq!(job.exit_code().await?, 255);
    assert!(
        job.stderr().contains("certificate expired"),
        "{}",
        job.stderr()
    );

    // A live session whose serial a reloaded KRL names is cut.
    let (_, port) = site.issue("bob").await?;
    let key = site.certificate("bob-job", &site.ca, &["-n", "bob", "-z", "7"])?;
    let mut job = site.job(&key, &format!("0:127.0.0.1:{}", notebook.port))?;
    assert_eq!(job.allocated_port().await?, port);
    write_krl(&site.krl, &site.ca, "serial: 7\n")?;
    assert_eq!(site.broker.broker.reload_credentials()?, 1);
    assert_eq!(job.exit_code().await?, 255);
    assert!(
        job.stderr().contains("certificate revoked"),
        "{}",
        job.stderr()
    );
    // And it cannot come back; a certificate revoked by key ID neither.
    let mut again = site.job(&key, &format!("0:127.0.0.1:{}", notebook.port))?;
    assert_eq!(again.exit_code().await?, 255);
    assert!(site.refusal_count("cert_revoked").await? >= 1.0);
    write_krl(&site.krl, &site.ca, "id: carol-job\n")?;
    site.broker.broker.reload_credentials()?;
    site.issue("carol").await?;
    let carol = site.certificate("carol-job", &site.ca, &["-n", "carol"])?;
    let mut refused = site.job(&carol, &format!("0:127.0.0.1:{}", notebook.port))?;
    assert_eq!(refused.exit_code().await?, 255);
    assert!(site.refusal_count("cert_revoked").await? >= 2.0);
    Ok(())
}

#[tokio::test]
async fn a_certificate_tunnel_is_refused_when_no_ca_is_configured() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let (status, body) = broker
        .api(
            reqwest::Method::POST,
            "/api/v1/tunnels",
            Some(json!({"user": "alice", "auth": "certificate"})),
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("trusted_user_ca_keys"), "{body}");
    Ok(())
}
