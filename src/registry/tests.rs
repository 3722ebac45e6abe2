//! The registry against a journal that can fail and a watcher that writes down what it saw.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::grants::test_grant;
use crate::record::EndReason;
use crate::reservation::Reservation;

#[derive(Default)]
struct Log {
    fail: AtomicBool,
    journal: Mutex<Vec<String>>,
    watched: Mutex<Vec<String>>,
}

fn name(change: &Change) -> String {
    match change {
        Change::Issued(r) => format!("issued {}", r.id),
        Change::Renewed(r) => format!("renewed {} {}", r.id, r.expires_at),
        Change::Ended(r) => format!("ended {} {:?}", r.id, r.ended.map(|e| e.reason)),
        Change::Linked { id, .. } => format!("linked {id}"),
        Change::Unlinked { id } => format!("unlinked {id}"),
        Change::Purged { id } => format!("purged {id}"),
    }
}

struct J(Arc<Log>);
impl Journal for J {
    fn record(&self, change: &Change) -> anyhow::Result<()> {
        assert!(change.durable(), "live-only change journalled: {change:?}");
        if self.0.fail.load(Ordering::SeqCst) {
            anyhow::bail!("disk full");
        }
        self.0.journal.lock().unwrap().push(name(change));
        Ok(())
    }
}

struct W(Arc<Log>);
impl Watcher for W {
    fn changed(&self, change: &Change) {
        self.0.watched.lock().unwrap().push(name(change));
    }
}

fn registry(bind: [u8; 4]) -> (Registry, Arc<PortPool>, Arc<Log>) {
    // A loopback address of its own, so no other process holds these ports.
    let range = "41100-41101".parse().unwrap();
    let ports = Arc::new(PortPool::new(range, bind.into()));
    let log = Arc::new(Log::default());
    let carry = CarryLimits {
        write_timeout: Duration::from_secs(1),
        max_connections: 4,
    };
    let r = Registry::new(
        Arc::clone(&ports),
        crate::metrics::Metrics::new().unwrap(),
        carry,
        Arc::new(J(Arc::clone(&log))),
        vec![Arc::new(W(Arc::clone(&log)))],
    );
    (r, ports, log)
}

#[tokio::test]
async fn an_issue_the_journal_refuses_leaves_no_key_and_no_port() {
    let (r, ports, log) = registry([127, 203, 78, 1]);
    log.fail.store(true, Ordering::SeqCst);
    let reservation = Reservation::take(&ports).unwrap();
    let failed = r.issue(test_grant("a", "fpA", u64::MAX), reservation).await;
    assert!(matches!(failed, Err(IssueFailure::Store(_))));
    assert!(r.get("a").is_none());
    assert_eq!(ports.free(), 2, "the port went back");
    assert!(log.watched.lock().unwrap().is_empty(), "nobody heard of it");

    log.fail.store(false, Ordering::SeqCst);
    let reservation = Reservation::take(&ports).unwrap();
    r.issue(test_grant("a", "fpA", u64::MAX), reservation)
        .await
        .unwrap();
    let reservation = Reservation::take(&ports).unwrap();
    let dup = r.issue(test_grant("b", "fpA", u64::MAX), reservation).await;
    assert!(matches!(dup, Err(IssueFailure::DuplicateKey)));
    assert_eq!(ports.free(), 1, "the duplicate's port went back");
    assert!(r.status("a").is_some());
}

#[tokio::test]
async fn every_change_is_journalled_before_watchers_hear_of_it_in_order() {
    let (r, ports, log) = registry([127, 203, 78, 2]);
    let grant = test_grant("a", "fpA", u64::MAX);
    r.issue(Arc::clone(&grant), Reservation::take(&ports).unwrap())
        .await
        .unwrap();
    r.renew(&grant, 77, 5).await.unwrap();
    log.fail.store(true, Ordering::SeqCst);
    assert!(r.renew(&grant, 99, 6).await.is_err());
    assert_eq!(
        grant.expires_at(),
        77,
        "a renewal not recorded changes nothing"
    );
    // An end holds in memory even when it cannot be recorded, and says so.
    let ended = r.end(&grant, EndReason::Revoked, 10).await;
    assert!(matches!(ended, Some(Err(_))));
    assert!(r.status("a").is_none(), "its tunnel is closed");
    assert!(r.end(&grant, EndReason::Expired, 11).await.is_none());
    assert!(r.purge("a").await.is_err());
    assert!(r.get("a").is_some(), "kept until the purge is recorded");
    log.fail.store(false, Ordering::SeqCst);
    r.purge("a").await.unwrap();
    assert!(r.get("a").is_none());
    assert_eq!(
        *log.journal.lock().unwrap(),
        ["issued a", "renewed a 77", "purged a"]
    );
    assert_eq!(
        *log.watched.lock().unwrap(),
        [
            "issued a",
            "renewed a 77",
            "ended a Some(Revoked)",
            "purged a"
        ]
    );
}
