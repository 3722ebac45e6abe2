//! The state that must survive a crash: every issued tunnel, behind a small `Store` seam.
//!
//! Two backends: the embedded redb file (`redb.rs`, the default) and Redis (`redis.rs`), which
//! two brokers share as an active/standby pair (`crate::standby`). Calls block (disk or
//! network): async callers go through `spawn_blocking`. The records themselves are domain
//! types (`record.rs`); this module only keeps them. `[store]` is read in `settings.rs`.

mod redb;
mod redis;
pub mod settings;

pub use self::redb::RedbStore;
pub use self::redis::RedisStore;
pub use self::settings::{StoreBackend, StoreConfig};
pub use crate::record::{EndReason, Ended, TunnelRecord, unix_now};

/// Where tunnel records persist.
pub trait Store: Send + Sync + 'static {
    /// Every stored record.
    fn load(&self) -> anyhow::Result<Vec<TunnelRecord>>;
    /// Inserts or replaces `record`, durably.
    fn put(&self, record: &TunnelRecord) -> anyhow::Result<()>;
    /// Deletes the record `id`, durably; a missing id is not an error.
    fn remove(&self, id: &str) -> anyhow::Result<()>;
}
