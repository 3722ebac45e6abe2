//! The hub port pool: a reservation is a bound, listening socket, not a number.
//!
//! Binding at issue time is what makes a reservation true: the spawner is told the port before
//! the job starts, and nothing else on the hub can take it meanwhile. A port some other process
//! holds fails to bind and is skipped. Allocation is next-fit from a moving cursor, so a port
//! just freed is the last to be handed out again (a stale route or browser tab still naming it
//! then reaches nothing rather than someone else's notebook).
//!
//! Every listener the pool binds is also handed to the service manager's descriptor store
//! (fdstore.rs), and a restored reservation takes the listener systemd passed back before it
//! binds anew: a restart never frees a reserved port. `release` takes it out of the store.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use socket2::{Domain, Socket, Type};

use crate::fdstore::FdStore;
use crate::port_range::PortRange;

/// Why no port could be reserved.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every port in the range is reserved or held by another process.
    #[error("no free port in the range {0}")]
    Exhausted(PortRange),
    /// The port is outside the configured range.
    #[error("port {0} is outside the range {1}")]
    OutOfRange(u16, PortRange),
    /// The port is already reserved by another tunnel.
    #[error("port {0} is already reserved")]
    Taken(u16),
    /// The socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address tried.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

impl PoolError {
    /// Whether the port failed because another socket holds it (another process, when the
    /// pool does not hold it itself).
    pub fn held_elsewhere(&self) -> bool {
        matches!(self, Self::Bind { source, .. } if source.kind() == io::ErrorKind::AddrInUse)
    }
}

/// The pool of hub ports; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct PortPool {
    range: PortRange,
    bind: IpAddr,
    inner: Mutex<Inner>,
    store: Arc<FdStore>,
}

#[derive(Debug)]
struct Inner {
    // Indexed by `port - range.first`; one entry per port keeps 10,000 ports at 10 KB.
    reserved: Vec<bool>,
    free: usize,
    cursor: usize,
}

impl PortPool {
    /// A pool over `range`, binding on `bind`.
    pub fn new(range: PortRange, bind: IpAddr) -> Self {
        Self {
            range,
            bind,
            inner: Mutex::new(Inner {
                reserved: vec![false; range.len().get()],
                free: range.len().get(),
                cursor: 0,
            }),
            store: Arc::new(FdStore::disabled()),
        }
    }

    /// The same pool, handing its listeners to `store` and adopting the ones it passed back.
    pub fn with_fd_store(mut self, store: Arc<FdStore>) -> Self {
        self.store = store;
        self
    }

    /// Reserves the next free port and returns it with its listening socket.
    pub fn reserve(&self) -> Result<(u16, TcpListener), PoolError> {
        let mut inner = self.lock();
        let len = inner.reserved.len();
        for step in 0..len {
            let i = (inner.cursor + step) % len;
            if inner.reserved[i] {
                continue;
            }
            let port = self.port_at(i);
            match self.bind(port) {
                Ok(listener) => {
                    inner.reserved[i] = true;
                    inner.free -= 1;
                    inner.cursor = (i + 1) % len;
                    return Ok((port, listener));
                }
                Err(PoolError::Bind { source, .. })
                    if source.kind() == io::ErrorKind::AddrInUse => {}
                Err(e) => return Err(e),
            }
        }
        Err(PoolError::Exhausted(self.range))
    }

    /// Reserves exactly `port`, as a restart must for tunnels issued before it: with the
    /// listener the service manager kept for it when there is one, else by binding it.
    pub fn reserve_exact(&self, port: u16) -> Result<TcpListener, PoolError> {
        if !self.range.contains(port) {
            return Err(PoolError::OutOfRange(port, self.range));
        }
        let i = usize::from(port - self.range.first());
        let mut inner = self.lock();
        if inner.reserved[i] {
            return Err(PoolError::Taken(port));
        }
        let listener = match self.store.take(port) {
            Some(adopted) => adopted,
            None => self.bind(port)?,
        };
        inner.reserved[i] = true;
        inner.free -= 1;
        Ok(listener)
    }

    /// Marks `port` as taken without a socket: its tunnel is known but could not bind it.
    pub fn mark_reserved(&self, port: u16) {
        if self.range.contains(port) {
            let i = usize::from(port - self.range.first());
            let mut inner = self.lock();
            if !inner.reserved[i] {
                inner.reserved[i] = true;
                inner.free -= 1;
            }
        }
    }

    /// Returns `port` to the pool; its socket must already be closed. The service manager is
    /// told to close its copy too; until it has, binding the port fails and `reserve` skips it.
    pub fn release(&self, port: u16) {
        self.store.remove(port);
        if self.range.contains(port) {
            let i = usize::from(port - self.range.first());
            let mut inner = self.lock();
            if inner.reserved[i] {
                inner.reserved[i] = false;
                inner.free += 1;
            }
        }
    }

    /// How many ports are not reserved by a tunnel (some may still be held by other processes).
    pub fn free(&self) -> usize {
        self.lock().free
    }

    /// Binds `port` again for a tunnel that holds it as `mark_reserved`.
    pub fn rebind(&self, port: u16) -> Result<TcpListener, PoolError> {
        self.bind(port)
    }

    fn port_at(&self, i: usize) -> u16 {
        // `i < range.len()`, so the sum stays within u16.
        self.range.first() + u16::try_from(i).unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing panics while the lock is held, so a poisoned lock still holds consistent data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bind(&self, port: u16) -> Result<TcpListener, PoolError> {
        let addr = SocketAddr::new(self.bind, port);
        let bind = || -> io::Result<TcpListener> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            // Lets a restarted broker rebind while old connections sit in TIME_WAIT; a second
            // listener on the port is still refused.
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        };
        let listener = bind().map_err(|source| PoolError::Bind { addr, source })?;
        self.store.push(port, &listener);
        Ok(listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback address only this test process binds on: 127.<1 + pid's high bits>.<pid>.
    /// Fixed ports on it never race another process for a port (the failure of probing for a
    /// free range on 127.0.0.1 and then binding it: another process took it in between), since
    /// no other process binds this address. The integration tests' brokers use 127.100 and up,
    /// the rest of the machine 127.0.0.1. Only a wildcard listener on the same port could still
    /// collide, and that is a fixed property of the host, not a race.
    fn owned_ip() -> IpAddr {
        let pid = std::process::id();
        IpAddr::from([
            127,
            1 + ((pid >> 16) % 64) as u8,
            (pid >> 8) as u8,
            pid as u8,
        ])
    }

    /// The tests of this module run in parallel in one process, so each takes its own ports.
    fn pool(first: u16, last: u16) -> PortPool {
        PortPool::new(PortRange::new(first, last).unwrap(), owned_ip())
    }

    #[test]
    fn reserves_binds_and_releases_next_fit() {
        let (first, last) = (21000, 21002);
        let p = pool(first, last);
        let (a, la) = p.reserve().unwrap();
        let (b, _lb) = p.reserve().unwrap();
        assert_eq!((a, b), (first, first + 1));
        assert!(
            TcpListener::bind((owned_ip(), a)).is_err(),
            "reservation must hold the port"
        );
        assert_eq!(p.free(), 1);
        drop(la);
        p.release(a);
        // Next-fit: the port after the cursor comes before the one just freed.
        let (c, _lc) = p.reserve().unwrap();
        assert_eq!(c, first + 2);
        let (d, _ld) = p.reserve().unwrap();
        assert_eq!(d, a);
        assert!(matches!(p.reserve(), Err(PoolError::Exhausted(_))));
        assert_eq!(last, first + 2);
    }

    #[test]
    fn skips_ports_held_elsewhere() {
        let (first, last) = (21010, 21011);
        let squatter = TcpListener::bind((owned_ip(), first)).unwrap();
        let p = pool(first, last);
        assert_eq!(p.reserve().unwrap().0, last);
        assert!(matches!(p.reserve(), Err(PoolError::Exhausted(_))));
        let held = p.rebind(first).unwrap_err();
        assert!(held.held_elsewhere(), "{held}");
        drop(squatter);
    }

    #[test]
    fn exact_reservations() {
        let (first, last) = (21020, 21021);
        let p = pool(first, last);
        let _l = p.reserve_exact(last).unwrap();
        assert!(matches!(p.reserve_exact(last), Err(PoolError::Taken(_))));
        assert!(matches!(
            p.reserve_exact(first - 1),
            Err(PoolError::OutOfRange(..))
        ));
        assert_eq!(p.reserve().unwrap().0, first);
    }
}
