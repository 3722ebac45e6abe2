//! Per-job credentials: who may log in, as which JupyterHub server, and which hub port they get.
//!
//! Invariants: one `Grant` per issued tunnel id; a key fingerprint indexes at most one grant
//! (re-using a key for a second grant is refused at issue); a grant's port never changes. Only
//! `ended` and a renewal's new expiry and renewal time change after issue. This module is plain
//! Rust: the SSH layer asks it questions and translates the answers.

use std::sync::Mutex;

use crate::record::{Ended, TunnelRecord};

mod index;
mod refusals;

pub use index::{DuplicateKey, Grants};
pub use refusals::{AuthRefusal, ForwardRefusal, check_forward};

/// One issued credential and the port it reserves.
#[derive(Debug)]
pub struct Grant {
    /// Fixed at issue; the parts that change live in `live`.
    record: TunnelRecord,
    live: Mutex<Live>,
    /// Held while a change to this grant is written to the store, so a renewal and an end
    /// reach the store in the order they happened (an end written first and then overwritten
    /// by a renewal would resurrect the tunnel at the next start).
    writes: tokio::sync::Mutex<()>,
}

/// What a grant's renewals and end change.
#[derive(Debug, Clone, Copy)]
struct Live {
    ended: Option<Ended>,
    expires_at: u64,
    renewed_at: Option<u64>,
}

impl Grant {
    /// Wraps a stored record.
    pub fn new(record: TunnelRecord) -> Self {
        let live = Mutex::new(Live {
            ended: record.ended,
            expires_at: record.expires_at,
            renewed_at: record.renewed_at,
        });
        Self {
            record,
            live,
            writes: tokio::sync::Mutex::new(()),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tunnel id.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// JupyterHub user.
    pub fn user(&self) -> &str {
        &self.record.user
    }

    /// JupyterHub server name ("" for the default server).
    pub fn server_name(&self) -> &str {
        &self.record.server_name
    }

    /// The reserved hub port.
    pub fn port(&self) -> u16 {
        self.record.port
    }

    /// The job key's SHA-256 fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.record.fingerprint
    }

    /// Which kind of credential may publish it.
    pub fn auth(&self) -> crate::credentials::AuthKind {
        self.record.auth
    }

    /// Whether it has neither ended nor expired at unix time `now`.
    pub fn active_at(&self, now: u64) -> bool {
        self.ended().is_none() && now < self.deadline()
    }

    /// Unix seconds.
    pub fn created_at(&self) -> u64 {
        self.record.created_at
    }

    /// The hard expiry, Unix seconds; renewals move it.
    pub fn expires_at(&self) -> u64 {
        self.live().expires_at
    }

    /// The lifetime asked for at issue, if recorded.
    pub fn ttl_seconds(&self) -> Option<u64> {
        self.record.ttl_seconds
    }

    /// The lease, if the tunnel has one.
    pub fn lease_seconds(&self) -> Option<u64> {
        self.record.lease_seconds
    }

    /// The last renewal, if any.
    pub fn renewed_at(&self) -> Option<u64> {
        self.live().renewed_at
    }

    /// When the lease runs out, if there is one.
    pub fn lease_until(&self) -> Option<u64> {
        let renewed_at = self.live().renewed_at;
        self.record.lease_seconds.map(|lease| {
            renewed_at
                .unwrap_or(self.record.created_at)
                .saturating_add(lease)
        })
    }

    /// When the credential stops working: the expiry or the lease, whichever is first (the
    /// same rule as `TunnelRecord::deadline`, without copying the record on the login path).
    pub fn deadline(&self) -> u64 {
        let expires_at = self.expires_at();
        self.lease_until().map_or(expires_at, |l| l.min(expires_at))
    }

    /// Why and when it ended, if it has.
    pub fn ended(&self) -> Option<Ended> {
        self.live().ended
    }

    /// Ends the grant; returns false if it had already ended (the first reason stands).
    pub fn end(&self, ended: Ended) -> bool {
        let mut live = self.live();
        if live.ended.is_some() {
            return false;
        }
        live.ended = Some(ended);
        true
    }

    /// Applies a renewal that the store has recorded.
    pub fn renewed(&self, expires_at: u64, renewed_at: u64) {
        let mut live = self.live();
        live.expires_at = expires_at;
        live.renewed_at = Some(renewed_at);
    }

    /// The lock a writer of this grant's record holds from reading it to storing it.
    pub fn writes(&self) -> &tokio::sync::Mutex<()> {
        &self.writes
    }

    /// The record as it should be stored now.
    pub fn to_record(&self) -> TunnelRecord {
        let live = *self.live();
        TunnelRecord {
            ended: live.ended,
            expires_at: live.expires_at,
            renewed_at: live.renewed_at,
            ..self.record.clone()
        }
    }
}

/// A grant for unit tests: user alice, port 20005, key fingerprint `fp`.
#[cfg(test)]
pub(crate) fn test_grant(id: &str, fp: &str, expires_at: u64) -> std::sync::Arc<Grant> {
    std::sync::Arc::new(Grant::new(TunnelRecord {
        id: id.into(),
        user: "alice".into(),
        server_name: String::new(),
        port: 20005,
        public_key: String::new(),
        fingerprint: fp.into(),
        created_at: 0,
        expires_at,
        ..TunnelRecord::default()
    }))
}
