//! A live SSH session's hold on a tunnel: the forward it was granted and the bytes it carried.
//! Shared by the tunnel's accept loop (`tunnels.rs`) and each carried connection (`bridge.rs`),
//! so neither needs the other.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

use crate::sessions::LiveSession;

/// A live SSH session holding a tunnel's forward.
pub struct Link {
    /// The session.
    pub session: Arc<LiveSession>,
    /// The exact address string the client sent; forwarded channels must echo it.
    pub bind_address: String,
    /// When the forward was granted.
    pub since: SystemTime,
    /// Bytes this session carried: hub clients to the job, and back.
    pub bytes: Stats,
}

/// Byte and connection counts of one tunnel (since the broker started) or of one session.
#[derive(Debug, Default)]
pub struct Stats {
    /// Hub clients to the job.
    pub bytes_to_job: AtomicU64,
    /// The job to hub clients.
    pub bytes_from_job: AtomicU64,
    /// Connections currently carried.
    pub connections_active: AtomicU64,
}
