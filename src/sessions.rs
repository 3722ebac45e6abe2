//! One live login per credential: which session holds each credential, the liveness probe that
//! decides whether a newcomer may take it over, and how a session is told to go.
//!
//! Invariants: a credential (grant id) maps to at most one logged-in session; a second login with
//! the same key replaces the first only when the first fails to answer a probe within
//! `probe_timeout` (its job died, froze or lost its network), so a copy of a live job's key
//! cannot take that job's tunnel and its users' traffic. Revoke and expiry close the holder
//! whether or not it forwards.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use russh::Disconnect;
use russh::server::Handle;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::transport::{Activity, KillSwitch};

/// Bound on handing a disconnect to a session loop that may be stalled.
const DISCONNECT_SEND: Duration = Duration::from_millis(500);
/// Time a told session gets to leave on its own before its socket is cut; with the send bound
/// above, a session is gone within a second of being told.
const DISCONNECT_LEAVE: Duration = Duration::from_millis(500);
/// How often a probe looks for the peer's answer.
const PROBE_POLL: Duration = Duration::from_millis(20);
/// Newcomers racing for one credential re-probe at most this often before being refused.
const CLAIM_ROUNDS: usize = 3;

/// The controls of one SSH connection, made at accept and shared by its handler.
#[derive(Debug, Default)]
pub struct SessionCtl {
    /// Cuts the socket under the session loop.
    pub kill: Arc<KillSwitch>,
    /// What the peer has sent.
    pub activity: Arc<Activity>,
    /// Cancelled when the session has ended.
    pub ended: CancellationToken,
    /// Whether the session holds its forward; the accept side closes a login that holds none
    /// for too long.
    pub forwarding: watch::Sender<bool>,
}

/// Asks the session behind `handle` to go with `reason`, and cuts its socket if it has not gone
/// within a second (a frozen client never reads the message).
pub fn tell_to_go(handle: Handle, ctl: Arc<SessionCtl>, reason: &'static str) {
    tokio::spawn(async move {
        let sent = handle.disconnect(Disconnect::ByApplication, reason.into(), String::new());
        if timeout(DISCONNECT_SEND, sent).await.is_err() {
            warn!("session did not take the disconnect; cutting it");
        } else if timeout(DISCONNECT_LEAVE, ctl.ended.cancelled())
            .await
            .is_ok()
        {
            return;
        }
        ctl.kill.kill();
    });
}

/// A logged-in session.
pub struct LiveSession {
    /// Broker-wide connection number.
    pub id: u64,
    /// Talks to the session loop.
    pub handle: Handle,
    /// The job's address.
    pub peer: SocketAddr,
    /// When it logged in.
    pub since: SystemTime,
    ctl: Arc<SessionCtl>,
}

impl LiveSession {
    /// The session `id` from `peer`, driven through `handle` and `ctl`.
    pub fn new(id: u64, handle: Handle, peer: SocketAddr, ctl: Arc<SessionCtl>) -> Self {
        Self {
            id,
            handle,
            peer,
            since: SystemTime::now(),
            ctl,
        }
    }

    /// Asks the client to go with `reason`, and cuts the socket if it has not gone within a
    /// second (a frozen client never reads the message).
    pub fn disconnect(&self, reason: &'static str) {
        tell_to_go(self.handle.clone(), Arc::clone(&self.ctl), reason);
    }

    /// Resolves once the session has ended.
    pub async fn ended(&self) {
        self.ctl.ended.cancelled().await;
    }

    /// Whether the client answers within `within`: a global request it must reply to is sent,
    /// and any byte read from it afterwards counts as the answer.
    pub async fn answers(&self, within: Duration) -> bool {
        if self.ctl.ended.is_cancelled() {
            return false;
        }
        let before = self.ctl.activity.reads();
        let handle = self.handle.clone();
        // OpenSSH refuses a server's "tcpip-forward"; the refusal is the answer. Its own task, as
        // the send waits while the loop is stalled; it ends with the session at the latest.
        tokio::spawn(async move {
            let _ = handle
                .forward_tcpip("tunnelbot-liveness-probe".into(), 0)
                .await;
        });
        let deadline = Instant::now() + within;
        let mut poll = tokio::time::interval(PROBE_POLL);
        loop {
            tokio::select! {
                () = self.ctl.ended.cancelled() => return false,
                () = tokio::time::sleep_until(deadline) => return false,
                _ = poll.tick() => if self.ctl.activity.reads() > before { return true },
            }
        }
    }
}

/// How a login for a credential was settled.
pub enum Claim {
    /// Nobody held the credential.
    Fresh,
    /// The holder did not answer and was told to go.
    Replaced(Arc<LiveSession>),
    /// The holder answered: the newcomer must go.
    InUse(Arc<LiveSession>),
}

/// The live session of each credential.
pub struct Sessions {
    by_grant: DashMap<String, Arc<LiveSession>>,
    probe_timeout: Duration,
}

impl Sessions {
    /// An empty registry probing holders for `probe_timeout`.
    pub fn new(probe_timeout: Duration) -> Self {
        Self {
            by_grant: DashMap::new(),
            probe_timeout,
        }
    }

    /// Settles a login of `new` for credential `grant` (see the module doc).
    pub async fn claim(&self, grant: &str, new: Arc<LiveSession>) -> Claim {
        for _ in 0..CLAIM_ROUNDS {
            let holder = match self.by_grant.entry(grant.to_owned()) {
                Entry::Vacant(v) => {
                    v.insert(new);
                    return Claim::Fresh;
                }
                Entry::Occupied(o) => Arc::clone(o.get()),
            };
            if holder.id == new.id {
                return Claim::Fresh;
            }
            if holder.answers(self.probe_timeout).await {
                return Claim::InUse(holder);
            }
            // Only the holder that was probed may be replaced; another newcomer may have won.
            if let Entry::Occupied(mut o) = self.by_grant.entry(grant.to_owned())
                && o.get().id == holder.id
            {
                o.insert(new);
                drop(o);
                holder.disconnect(
                    "replaced: the previous session for this credential stopped answering",
                );
                return Claim::Replaced(holder);
            }
            debug!(
                grant,
                "another login took the credential during the probe; probing again"
            );
        }
        // Still contested after every round: whoever holds it now keeps it; a freed credential
        // is taken like any other (and registered, so revoke and expiry reach this session).
        match self.by_grant.entry(grant.to_owned()) {
            Entry::Vacant(v) => {
                v.insert(new);
                Claim::Fresh
            }
            Entry::Occupied(o) => Claim::InUse(Arc::clone(o.get())),
        }
    }

    /// Forgets session `session` of `grant`, if it still holds it.
    pub fn release(&self, grant: &str, session: u64) {
        self.by_grant.remove_if(grant, |_, s| s.id == session);
    }

    /// Tells `grant`'s session, if any, to go with `reason`.
    pub fn close(&self, grant: &str, reason: &'static str) {
        if let Some((_, session)) = self.by_grant.remove(grant) {
            session.disconnect(reason);
        }
    }

    /// Whether `grant` has a live session.
    pub fn holds(&self, grant: &str) -> bool {
        self.by_grant.contains_key(grant)
    }

    /// Logged-in sessions.
    pub fn len(&self) -> usize {
        self.by_grant.len()
    }

    /// Whether no session is logged in.
    pub fn is_empty(&self) -> bool {
        self.by_grant.is_empty()
    }
}

/// An ended credential's one live login is told to go, whether it holds the forward or not.
impl crate::registry::Watcher for Sessions {
    fn changed(&self, change: &crate::registry::Change) {
        if let crate::registry::Change::Ended(record) = change {
            let reason = match record.ended.map(|e| e.reason) {
                Some(crate::record::EndReason::Expired) => "credential expired",
                _ => "credential revoked",
            };
            self.close(&record.id, reason);
        }
    }
}
