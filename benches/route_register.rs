//! Forward granted → route live, against a real local CHP (the target: p50 ≤ 5 ms).
//!
//! `want` is what the broker calls when a forward is granted; the route counts as live when the
//! worker has had CHP's 201 for the POST. Also the bare POST, to show what is CHP's own cost.
//! Needs CHP: `scripts/setup.sh` installs it (or set `CHP_BIN`). Run: `cargo bench --bench route_register`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tunnelbot::config::{ChpConfig, PortRange};
use tunnelbot::metrics::Metrics;
use tunnelbot::routes::chp::ChpClient;
use tunnelbot::routes::{BaseUrl, RouteBackend, RouteEntry, RoutePath, RouteState, Routes, Target};

/// The route the broker writes for `user`'s default server on hub port `port`.
fn entry(user: &str, port: u16) -> RouteEntry {
    let root = BaseUrl::new("/").unwrap_or_else(|e| panic!("{e}"));
    let path = RoutePath::new(&root, user, "").unwrap_or_else(|e| panic!("{e}"));
    let target = Target {
        host: "127.0.0.1".into(),
        port,
    };
    RouteEntry::new(path, target)
}

struct ChpProcess(Child);

impl Drop for ChpProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn start_chp(token: &str) -> (ChpProcess, SocketAddr) {
    let bin = std::env::var_os("CHP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(".deps/node/node_modules/.bin/configurable-http-proxy")
        });
    let (public, api) = (free_port(), free_port());
    let child = Command::new(&bin)
        .args([
            "--ip",
            "127.0.0.1",
            "--port",
            &public.to_string(),
            "--api-ip",
            "127.0.0.1",
            "--api-port",
            &api.to_string(),
        ])
        .args(["--log-level", "warn"])
        .env("CONFIGPROXY_AUTH_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {} (run scripts/setup.sh): {e}", bin.display()));
    let addr = SocketAddr::from(([127, 0, 0, 1], api));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "CHP did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (ChpProcess(child), addr)
}

fn bench(c: &mut Criterion) {
    let token = "bench-token-0123456789";
    let (_chp, api) = start_chp(token);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let token_file = dir.path().join("t");
    tunnelbot::keys::write_private_file(&token_file, token.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let config = ChpConfig {
        api_url: format!("http://{api}"),
        token_file: Some(token_file),
        ..ChpConfig::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap_or_else(|e| panic!("{e}"));
    let root = BaseUrl::new("/").unwrap_or_else(|e| panic!("{e}"));
    let client =
        Arc::new(ChpClient::from_config(&config, root.clone()).unwrap_or_else(|e| panic!("{e}")));
    // A realistic table: 500 other users' routes.
    rt.block_on(async {
        for i in 0..500u16 {
            let r = entry(&format!("user{i}"), 20000 + i);
            client.put(&r).await.unwrap_or_else(|e| panic!("{e}"));
        }
    });

    let mut g = c.benchmark_group("route");
    let mut n = 0u32;
    g.bench_function("chp_post", |b| {
        b.to_async(&rt).iter(|| {
            n += 1;
            let r = entry("bench", 21000 + (n % 500) as u16);
            let client = Arc::clone(&client);
            async move { client.put(&r).await.unwrap_or_else(|e| panic!("{e}")) }
        })
    });

    let metrics = Metrics::new().unwrap_or_else(|e| panic!("{e}"));
    let range = PortRange::new(20000, 29999).unwrap_or_else(|e| panic!("{e}"));
    let routes = Routes::new(
        client.clone(),
        root,
        "127.0.0.1".into(),
        range,
        Duration::from_secs(3600),
        metrics,
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    rt.spawn(routes.clone().run(cancel.clone()));
    let mut m = 0u32;
    g.bench_function("forward_granted_to_route_live", |b| {
        b.to_async(&rt).iter(|| {
            m += 1;
            let id = format!("tb_{m}");
            let user = format!("live{}", m % 200);
            let port = 22000 + (m % 500) as u16;
            let routes = routes.clone();
            async move {
                routes.want(&id, &user, "", port);
                while routes.state(&id) != RouteState::Registered {
                    tokio::task::yield_now().await;
                }
                routes.unwant(&id);
            }
        })
    });
    g.finish();
    cancel.cancel();
}

criterion_group!(benches, bench);
criterion_main!(benches);
