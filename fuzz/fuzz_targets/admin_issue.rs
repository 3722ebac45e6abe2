//! `POST /api/v1/tunnels` end to end: arbitrary bytes as the JSON body of an authenticated
//! request, through the real axum router (`admin::router`) and `Broker::issue`, so the checks
//! that are private to the broker (name validation, TTL bounds, the job's public key) are
//! fuzzed too.
//!
//! The answer must be 201 or 400 with a JSON body; never a panic, a 5xx or anything else. On
//! 201 the tunnel must carry names the broker promises to accept only (user non-empty, at most
//! 255 bytes, no '/' or control characters; likewise the server name, which may be empty), the
//! requested names unchanged, a port of the range and a private key exactly when none was
//! sent. It is then revoked (204) and reaped, so ports and keys are reused.
//!
//! `TUNNELBOT_FUZZ_VERBOSE=1` prints each answer (handy when replaying one input).
//!
//! Setup, once per process: a broker on an in-memory store, CHP off, tunnel ports
//! 46000-46999 on 127.0.0.1 (loopback listeners are bound and closed), keys in
//! `$TMPDIR/tunnelbot-fuzz-admin-issue/`.
#![no_main]

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use tunnelbot_fuzz::MemStore;
use tower::ServiceExt;
use tunnelbot::admin::{AdminState, IssueBody, TunnelView, router};
use tunnelbot::keys::Keys;
use tunnelbot::metrics::Metrics;
use tunnelbot::{Broker, Config};


struct Harness {
    rt: tokio::runtime::Runtime,
    broker: Broker,
    app: Router,
    bearer: String,
}

const CONFIG: &str = r#"
[ssh]
listen = "127.0.0.1:0"
[tunnels]
bind_address = "127.0.0.1"
ports = "46000-46999"
retention = "0s"
[routes]
backend = "none"
"#;

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut config = Config::parse(CONFIG).unwrap();
        config.keys_dir = std::env::temp_dir().join("tunnelbot-fuzz-admin-issue");
        config.validate().unwrap();
        let keys = Keys::load_or_create(&config.keys_dir).unwrap();
        let broker = rt
            .block_on(Broker::open(
                config,
                keys,
                Arc::new(MemStore::default()),
                Metrics::new().unwrap(),
                SocketAddr::from(([127, 0, 0, 1], 2222)),
            ))
            .unwrap();
        let bearer = format!("Bearer {}", broker.admin_token().expose());
        let app = router(AdminState {
            broker: broker.clone(),
            ready: Arc::new(AtomicBool::new(true)),
        });
        Harness {
            rt,
            broker,
            app,
            bearer,
        }
    })
}

/// What `Broker::issue` promises about a name it accepted.
fn acceptable_name(name: &str, may_be_empty: bool) -> bool {
    (may_be_empty || !name.is_empty())
        && name.len() <= 255
        && !name.chars().any(|c| c.is_control() || c == '/')
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let sent = serde_json::from_slice::<IssueBody>(data).ok();
    h.rt.block_on(async {
        let req = Request::post("/api/v1/tunnels")
            .header(header::AUTHORIZATION, &h.bearer)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(data.to_vec()))
            .unwrap();
        let resp = h.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        let text = String::from_utf8_lossy(&body);
        if std::env::var_os("TUNNELBOT_FUZZ_VERBOSE").is_some() {
            eprintln!("{status} {text}");
        }
        match status {
            StatusCode::CREATED => {
                let sent =
                    sent.unwrap_or_else(|| panic!("201 for a body IssueBody refuses: {text}"));
                let v: TunnelView = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("201 without a tunnel ({e}): {text}"));
                assert_eq!(v.user, sent.user);
                assert_eq!(v.server_name, sent.server_name);
                assert!(
                    acceptable_name(&v.user, false),
                    "accepted user {:?}",
                    v.user
                );
                assert!(
                    acceptable_name(&v.server_name, true),
                    "accepted server_name {:?}",
                    v.server_name
                );
                assert!((46000..=46999).contains(&v.port), "port {}", v.port);
                assert_eq!(v.state, "active");
                assert_eq!(v.private_key.is_some(), sent.public_key.is_none());
                if let Some(ttl) = sent.ttl_seconds {
                    assert!(
                        ttl > 0 && ttl <= 7 * 24 * 3600,
                        "accepted ttl_seconds {ttl}"
                    );
                }
                let req = Request::delete(format!("/api/v1/tunnels/{}", v.id))
                    .header(header::AUTHORIZATION, &h.bearer)
                    .body(Body::empty())
                    .unwrap();
                let resp = h.app.clone().oneshot(req).await.unwrap();
                assert_eq!(resp.status(), StatusCode::NO_CONTENT, "revoking {}", v.id);
                h.broker.reap().await;
            }
            StatusCode::BAD_REQUEST => {
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("400 without a JSON body ({e}): {text}"));
                assert!(
                    v["error"].is_string(),
                    "400 without an error string: {text}"
                );
            }
            other => panic!("answer {other} to an issue request: {text}"),
        }
    });
});
