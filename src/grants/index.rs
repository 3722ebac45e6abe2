//! The grant index: by tunnel id, and by key fingerprint for logins.

use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{AuthRefusal, Grant};

/// All grants, indexed by id and by key fingerprint.
#[derive(Debug, Default)]
pub struct Grants {
    by_id: DashMap<String, Arc<Grant>>,
    by_fingerprint: DashMap<String, String>,
}

impl Grants {
    /// Adds `grant`; refuses a key fingerprint another grant already holds. Certificate
    /// tunnels have no key and are not indexed by one.
    pub fn insert(&self, grant: Arc<Grant>) -> Result<(), DuplicateKey> {
        if grant.auth() == crate::credentials::AuthKind::Key {
            match self.by_fingerprint.entry(grant.fingerprint().to_owned()) {
                Entry::Occupied(_) => return Err(DuplicateKey),
                Entry::Vacant(v) => {
                    v.insert(grant.id().to_owned());
                }
            }
        }
        self.by_id.insert(grant.id().to_owned(), grant);
        Ok(())
    }

    /// `user`'s active certificate tunnels at unix time `now`.
    pub fn certificate_tunnels(&self, user: &str, now: u64) -> Vec<Arc<Grant>> {
        self.by_id
            .iter()
            .filter(|g| {
                g.auth() == crate::credentials::AuthKind::Certificate
                    && g.user() == user
                    && g.active_at(now)
            })
            .map(|g| Arc::clone(&g))
            .collect()
    }

    /// The grant `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Grant>> {
        self.by_id.get(id).map(|g| Arc::clone(&g))
    }

    /// Every grant, in no particular order.
    pub fn all(&self) -> Vec<Arc<Grant>> {
        self.by_id.iter().map(|g| Arc::clone(&g)).collect()
    }

    /// Forgets `id` entirely.
    pub fn remove(&self, id: &str) -> Option<Arc<Grant>> {
        let (_, grant) = self.by_id.remove(id)?;
        self.by_fingerprint
            .remove_if(grant.fingerprint(), |_, v| v == id);
        Some(grant)
    }

    /// Decides a login: the key must belong to a live grant and the SSH user must be `ssh_user`.
    pub fn authenticate(
        &self,
        expected_user: &str,
        user: &str,
        fingerprint: &str,
        now: u64,
    ) -> Result<Arc<Grant>, AuthRefusal> {
        let id = self
            .by_fingerprint
            .get(fingerprint)
            .ok_or(AuthRefusal::UnknownKey)?
            .clone();
        let grant = self.get(&id).ok_or(AuthRefusal::UnknownKey)?;
        if let Some(ended) = grant.ended() {
            return Err(match ended.reason {
                crate::store::EndReason::Revoked => AuthRefusal::Revoked,
                crate::store::EndReason::Expired => AuthRefusal::Expired,
            });
        }
        if now >= grant.deadline() {
            return Err(AuthRefusal::Expired);
        }
        if user != expected_user {
            return Err(AuthRefusal::WrongUser);
        }
        Ok(grant)
    }
}

/// The key is already bound to another tunnel.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("this public key is already used by another tunnel")]
pub struct DuplicateKey;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::test_grant as grant;
    use crate::record::{EndReason, Ended};

    #[test]
    fn authentication_decisions() {
        let g = Grants::default();
        g.insert(grant("a", "fpA", 100)).unwrap();
        g.insert(grant("b", "fpB", 100)).unwrap();
        assert!(g.insert(grant("c", "fpA", 100)).is_err());
        assert_eq!(g.authenticate("tb", "tb", "fpA", 50).unwrap().id(), "a");
        assert_eq!(
            g.authenticate("tb", "tb", "nope", 50).unwrap_err(),
            AuthRefusal::UnknownKey
        );
        assert_eq!(
            g.authenticate("tb", "root", "fpA", 50).unwrap_err(),
            AuthRefusal::WrongUser
        );
        assert_eq!(
            g.authenticate("tb", "tb", "fpA", 100).unwrap_err(),
            AuthRefusal::Expired
        );
        assert!(g.get("b").unwrap().end(Ended {
            at: 1,
            reason: EndReason::Revoked
        }));
        assert!(!g.get("b").unwrap().end(Ended {
            at: 2,
            reason: EndReason::Expired
        }));
        assert_eq!(
            g.authenticate("tb", "tb", "fpB", 50).unwrap_err(),
            AuthRefusal::Revoked
        );
        g.remove("a");
        assert_eq!(
            g.authenticate("tb", "tb", "fpA", 50).unwrap_err(),
            AuthRefusal::UnknownKey
        );
        assert_eq!(g.all().len(), 1);
    }
}
