//! The reconciler against the fake backend, on a paused clock: a proxy restart, drift, foreign
//! routes, flaps, the hub's route, and a backend that fails for a while.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::fake::{Fake, Stored, Write};
use super::{BaseUrl, RouteState, Routes};
use crate::metrics::Metrics;
use crate::port_range::PortRange;

const INTERVAL: Duration = Duration::from_secs(5);

struct Rig {
    routes: Routes,
    fake: Arc<Fake>,
    cancel: CancellationToken,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A worker over a fake proxy that holds the hub's route; its first pass runs at once.
async fn rig() -> Rig {
    let fake = Arc::new(Fake::new("/"));
    fake.insert("/", Stored::hub_route());
    let routes = Routes::new(
        fake.clone(),
        BaseUrl::new("/").unwrap(),
        "127.0.0.1".into(),
        PortRange::new(20000, 20999).unwrap(),
        INTERVAL,
        Metrics::new().unwrap(),
    );
    let cancel = CancellationToken::new();
    tokio::spawn(routes.clone().run(cancel.clone()));
    settle().await;
    Rig {
        routes,
        fake,
        cancel,
    }
}

/// Lets the worker do what is due now, without moving the clock. The fake never waits, so
/// a bounded number of turns on this one-thread runtime is enough.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Moves the clock one interval and lets the pass run.
async fn next_pass() {
    tokio::time::advance(INTERVAL).await;
    settle().await;
}

fn ours(port: u16, user: &str) -> Stored {
    Stored::stamped(&format!("http://127.0.0.1:{port}"), user)
}

fn deletes(fake: &Fake) -> Vec<String> {
    fake.writes()
        .into_iter()
        .filter_map(|w| match w {
            Write::Delete(p) => Some(p),
            Write::Put(_) => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_restarted_proxy_has_the_routes_back_within_one_interval() {
    let r = rig().await;
    r.routes.want("t1", "alice", "", 20001);
    r.routes.want("t2", "bob", "gpu-1", 20002);
    settle().await;
    assert_eq!(r.fake.route("/user/alice"), Some(ours(20001, "alice")));
    assert_eq!(r.routes.state("t2"), RouteState::Registered);

    r.fake.hub_restores(true);
    r.fake.restart();
    next_pass().await;
    assert_eq!(r.fake.route("/user/alice"), Some(ours(20001, "alice")));
    let bob = r.fake.route("/user/bob/gpu-1").unwrap();
    assert_eq!((bob.server_name.as_str(), bob.stamped), ("gpu-1", true));
    // The hub was told once, and put its route back.
    assert_eq!(r.fake.restarts_reported(), 1);
    assert_eq!(r.fake.route("/"), Some(Stored::hub_route()));
    next_pass().await;
    assert_eq!(r.fake.restarts_reported(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_route_changed_under_us_is_rewritten() {
    let r = rig().await;
    r.routes.want("t1", "alice", "", 20001);
    settle().await;
    let drifts = [
        ours(20005, "alice"),                            // another port of ours
        ours(20001, "mallory"),                          // other data
        Stored::hubs("http://127.0.0.1:20001", "alice"), // the hub's rewrite, stamp dropped
        Stored::stamped("http://10.0.0.9:20001", "alice"),
    ];
    for drift in drifts {
        r.fake.insert("/user/alice", drift.clone());
        next_pass().await;
        assert_eq!(
            r.fake.route("/user/alice"),
            Some(ours(20001, "alice")),
            "after {drift:?}"
        );
    }
    assert!(deletes(&r.fake).is_empty());
}

#[tokio::test(start_paused = true)]
async fn foreign_routes_are_never_touched() {
    let r = rig().await;
    let foreign = [
        // Our exact shape, but no stamp (the hub's, or another tool's).
        ("/user/zed", Stored::hubs("http://127.0.0.1:20003", "zed")),
        // Stamped, but not a server route path.
        ("/services/x", ours(20004, "x")),
        ("/hub", ours(20004, "")),
        ("/user/Zed", ours(20004, "Zed")),
        ("/user/a/b/c", ours(20004, "a")),
        ("/jh/user/ann", ours(20004, "ann")),
        // Stamped, a server route, but not our host or range.
        ("/user/far", ours(30000, "far")),
        (
            "/user/other",
            Stored::stamped("http://10.0.0.9:20004", "other"),
        ),
    ];
    for (path, route) in &foreign {
        r.fake.insert(path, route.clone());
    }
    // A stale route of ours, so the passes below are seen to do something.
    r.fake.insert("/user/ghost", ours(20999, "ghost"));
    r.routes.want("t1", "alice", "", 20001);
    settle().await;
    next_pass().await;
    r.routes.unwant("t1");
    next_pass().await;
    assert_eq!(r.routes.withdraw(INTERVAL).await, Some(0));

    assert_eq!(deletes(&r.fake), ["/user/ghost", "/user/alice"]);
    for (path, route) in &foreign {
        assert_eq!(r.fake.route(path).as_ref(), Some(route), "{path}");
        assert!(
            r.fake
                .writes()
                .iter()
                .all(|w| *w != Write::Put((*path).into())),
            "{path} written"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn flaps_end_in_the_last_state_and_a_rewanted_route_is_not_deleted() {
    let r = rig().await;
    // Before the worker runs at all.
    r.routes.want("t1", "alice", "", 20001);
    r.routes.unwant("t1");
    r.routes.want("t1", "alice", "", 20001);
    settle().await;
    assert_eq!(r.fake.route("/user/alice"), Some(ours(20001, "alice")));
    assert_eq!(r.routes.state("t1"), RouteState::Registered);

    // Registered, then a quick reconnect (the session link drops and comes back).
    r.routes.unwant("t1");
    r.routes.want("t1", "alice", "", 20001);
    settle().await;
    next_pass().await;
    assert_eq!(r.fake.route("/user/alice"), Some(ours(20001, "alice")));
    assert_eq!(r.routes.state("t1"), RouteState::Registered);

    // A newer tunnel takes the path while the old one's delete is queued.
    r.routes.want("t2", "alice", "", 20002);
    r.routes.unwant("t1");
    settle().await;
    next_pass().await;
    assert_eq!(r.fake.route("/user/alice"), Some(ours(20002, "alice")));
    assert!(deletes(&r.fake).is_empty(), "{:?}", r.fake.writes());

    // The last word is "gone".
    r.routes.unwant("t2");
    r.routes.want("t2", "alice", "", 20002);
    r.routes.unwant("t2");
    settle().await;
    assert_eq!(r.fake.route("/user/alice"), None);
    assert_eq!(r.routes.state("t2"), RouteState::Absent);
    next_pass().await;
    assert_eq!(r.fake.route("/user/alice"), None);
}

#[tokio::test(start_paused = true)]
async fn the_hub_route_is_never_touched_and_its_loss_is_reported_not_repeated() {
    let r = rig().await;
    r.fake
        .insert("/hub", Stored::hubs("http://127.0.0.1:8081", ""));
    r.routes.want("t1", "alice", "", 20001);
    settle().await;
    for _ in 0..3 {
        next_pass().await;
    }
    r.routes.unwant("t1");
    settle().await;
    assert_eq!(r.fake.route("/"), Some(Stored::hub_route()));
    assert_eq!(r.fake.restarts_reported(), 0);
    let touched = |p: &str| {
        r.fake
            .writes()
            .iter()
            .any(|w| *w == Write::Put(p.into()) || *w == Write::Delete(p.into()))
    };
    assert!(!touched("/") && !touched("/hub"));

    // The hub's route goes missing and stays so (the hub is down): asked once, then again
    // only after a minute.
    r.fake.restart();
    next_pass().await;
    assert_eq!(r.fake.restarts_reported(), 1);
    for _ in 0..10 {
        next_pass().await;
    }
    assert_eq!(r.fake.restarts_reported(), 1);
    for _ in 0..3 {
        next_pass().await;
    }
    assert_eq!(r.fake.restarts_reported(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failing_backend_is_retried_at_the_next_interval() {
    let r = rig().await;
    r.fake.fail(true);
    r.routes.want("t1", "alice", "", 20001);
    settle().await;
    assert_eq!(r.routes.state("t1"), RouteState::Error);
    next_pass().await;
    assert_eq!(r.routes.state("t1"), RouteState::Error);

    // Back up: nothing happens until the next pass, which writes the route.
    r.fake.fail(false);
    settle().await;
    assert_eq!(r.fake.route("/user/alice"), None);
    next_pass().await;
    assert_eq!(r.fake.route("/user/alice"), Some(ours(20001, "alice")));
    assert_eq!(r.routes.state("t1"), RouteState::Registered);

    // A delete that fails is done by a later pass.
    r.fake.fail(true);
    r.routes.unwant("t1");
    settle().await;
    next_pass().await;
    assert!(r.fake.route("/user/alice").is_some());
    r.fake.fail(false);
    next_pass().await;
    assert_eq!(r.fake.route("/user/alice"), None);
}

#[tokio::test(start_paused = true)]
async fn a_pair_members_stale_route_to_a_tunnel_we_hold_is_deleted_and_nothing_else() {
    use crate::registry::{Change, Watcher};
    let r = rig().await;
    // The other broker of a pair wrote these before it failed over to us.
    r.fake.insert(
        "/user/alice",
        Stored::stamped("http://10.0.0.9:20001", "alice"),
    );
    r.fake
        .insert("/user/bob", Stored::stamped("http://10.0.0.9:20002", "bob"));
    // alice's tunnel on 20001 is ours now (restored); its job has not reconnected.
    r.routes
        .changed(&Change::Issued(crate::record::TunnelRecord {
            id: "t1".into(),
            user: "alice".into(),
            port: 20001,
            ..Default::default()
        }));
    next_pass().await;
    assert_eq!(r.fake.route("/user/alice"), None);
    assert_eq!(
        r.fake.route("/user/bob"),
        Some(Stored::stamped("http://10.0.0.9:20002", "bob")),
        "a route to a tunnel we do not hold is not ours"
    );
    // Another port at alice's path is not her tunnel's: left alone too.
    r.fake.insert(
        "/user/alice",
        Stored::stamped("http://10.0.0.9:20003", "alice"),
    );
    next_pass().await;
    assert!(r.fake.route("/user/alice").is_some());
    // Once purged, the tunnel's path and port are no longer ours.
    r.routes.changed(&Change::Purged { id: "t1".into() });
    r.fake.insert(
        "/user/alice",
        Stored::stamped("http://10.0.0.9:20001", "alice"),
    );
    next_pass().await;
    assert!(r.fake.route("/user/alice").is_some());
}
