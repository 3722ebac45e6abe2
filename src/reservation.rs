//! A hub port reserved for a tunnel that is still being issued. Dropping it gives the port back,
//! so an issue that fails at any later step (a duplicate key, an unwritable store, a panic)
//! leaves nothing reserved without anyone writing the undo by hand.

use std::net::TcpListener;
use std::sync::Arc;

use crate::ports::{PoolError, PortPool};

/// A reserved port and its listening socket, until its tunnel takes them.
#[derive(Debug)]
pub struct Reservation {
    // Fields drop in order: the listener closes before the lease gives the port back, so the
    // pool never hands out a port that is still bound.
    listener: TcpListener,
    lease: Lease,
}

/// Gives the port back when dropped, unless its tunnel took it over.
#[derive(Debug)]
struct Lease {
    pool: Arc<PortPool>,
    port: u16,
    taken: bool,
}

impl Reservation {
    /// Reserves the pool's next free port.
    pub fn take(pool: &Arc<PortPool>) -> Result<Self, PoolError> {
        let (port, listener) = pool.reserve()?;
        Ok(Self {
            listener,
            lease: Lease {
                pool: Arc::clone(pool),
                port,
                taken: false,
            },
        })
    }

    /// The reserved port.
    pub fn port(&self) -> u16 {
        self.lease.port
    }

    /// Hands the listener to its tunnel, which releases the port when it ends.
    pub fn into_listener(self) -> TcpListener {
        let Self {
            listener,
            mut lease,
        } = self;
        lease.taken = true;
        listener
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.taken {
            self.pool.release(self.port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port_range::PortRange;

    #[test]
    fn a_dropped_reservation_frees_its_port_and_a_taken_one_does_not() {
        // A loopback address of its own, so no other process holds these ports.
        let range: PortRange = "41000-41001".parse().unwrap();
        let pool = Arc::new(PortPool::new(range, [127, 203, 77, 1].into()));
        let first = Reservation::take(&pool).unwrap();
        assert_eq!(pool.free(), 1);
        drop(first);
        assert_eq!(pool.free(), 2, "an issue that failed gives its port back");
        let kept = Reservation::take(&pool).unwrap();
        let listener = kept.into_listener();
        assert_eq!(
            pool.free(),
            1,
            "a tunnel that took the listener keeps the port"
        );
        drop(listener);
    }
}
