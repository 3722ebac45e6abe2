//! Abuse the stock client cannot send, from a raw russh client: password and keyboard-
//! interactive logins tried although not offered, a session channel and stray forwards asked for
//! inside an authenticated session. Each is refused, and the same session's forward still works.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::TestBroker;
use russh::client::{self, AuthResult, Msg, Session};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{Channel, MethodKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Pins the broker's host key and answers forwarded connections itself with `raw:` + echo.
struct Job {
    host_key: PublicKey,
}

impl client::Handler for Job {
    type Error = anyhow::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(
            matches!(key, russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } if key.key_data() == self.host_key.key_data()),
        )
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        tokio::spawn(async move {
            let mut stream = channel.into_stream();
            let mut buf = [0u8; 1024];
            if let Ok(n) = stream.read(&mut buf).await {
                let mut out = b"raw:".to_vec();
                out.extend_from_slice(&buf[..n]);
                let _ = stream.write_all(&out).await;
                let _ = stream.shutdown().await;
            }
        });
        Ok(())
    }
}

async fn connect(broker: &TestBroker, known_hosts: &str) -> anyhow::Result<client::Handle<Job>> {
    let key_text = known_hosts
        .split_once(' ')
        .map(|(_, k)| k)
        .unwrap_or_default();
    let host_key = PublicKey::from_openssh(key_text)?;
    let config = Arc::new(client::Config::default());
    client::connect(config, broker.ssh, Job { host_key }).await
}

#[tokio::test]
async fn refused_requests_leave_the_session_and_its_forward_working() -> anyhow::Result<()> {
    let broker = TestBroker::start("").await?;
    let issued = broker.issue("alice", "", 600).await?;
    let mut session = connect(
        &broker,
        issued.json["known_hosts"].as_str().unwrap_or_default(),
    )
    .await?;

    // Not offered, tried anyway: refused, with only publickey left to try.
    match session
        .authenticate_password("tunnelbot", "hunter2")
        .await?
    {
        AuthResult::Failure {
            remaining_methods, ..
        } => {
            let methods: Vec<MethodKind> = remaining_methods.iter().copied().collect();
            assert_eq!(methods, vec![MethodKind::PublicKey]);
        }
        AuthResult::Success => panic!("password accepted"),
    }
    assert!(
        broker
            .metric("tunnelbot_auth_attempts_total{reason=\"password\",result=\"refused\"}")
            .await?
            >= 1.0
    );
    let ki = session
        .authenticate_keyboard_interactive_start("tunnelbot", None::<String>)
        .await?;
    assert!(
        matches!(ki, client::KeyboardInteractiveAuthResponse::Failure { .. }),
        "keyboard-interactive must fail"
    );

    // The same connection then logs in with its credential.
    let key = PrivateKey::from_openssh(issued.json["private_key"].as_str().unwrap_or_default())?;
    let auth = session
        .authenticate_publickey("tunnelbot", PrivateKeyWithHashAlg::new(Arc::new(key), None))
        .await?;
    assert!(auth.success());

    // Refused inside the session: a session channel (shell/exec/sftp/pty all start there),
    // a direct-tcpip channel (-L) and forwards that are not this credential's.
    assert!(session.channel_open_session().await.is_err());
    assert!(
        session
            .channel_open_direct_tcpip("127.0.0.1", u32::from(broker.admin.port()), "127.0.0.1", 1)
            .await
            .is_err()
    );
    assert!(session.tcpip_forward("0.0.0.0", 0).await.is_err());
    assert!(
        session
            .tcpip_forward("localhost", u32::from(issued.port) + 1)
            .await
            .is_err()
    );

    // ...and the one legitimate forward is granted and carries traffic.
    assert_eq!(
        session.tcpip_forward("localhost", 0).await?,
        u32::from(issued.port)
    );
    assert!(
        session.tcpip_forward("localhost", 0).await.is_err(),
        "a second listener is refused"
    );
    let got = common::roundtrip(SocketAddr::new(broker.tunnel_ip, issued.port), b"hi", 6).await?;
    assert_eq!(got, b"raw:hi");
    assert!(!session.is_closed());
    Ok(())
}
