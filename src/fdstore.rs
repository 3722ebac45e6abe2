//! systemd integration: readiness, and the file-descriptor store that keeps every reserved
//! port bound while the broker restarts.
//!
//! A reservation is a listening socket (ports.rs). If it closed with the process, any local
//! user could bind the port during a restart and receive the next request, cookies included.
//! Under systemd (`NOTIFY_SOCKET` set) each reserved listener is also handed to the service
//! manager (`FDSTORE=1`, named `tunnelbot-port-<P>`), which keeps a duplicate while the service
//! restarts and passes it back (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`). The restarted
//! broker adopts those listeners for its restored tunnels instead of binding anew, so the port
//! is never free while its tunnel is issued. A tunnel that ends takes its listener out of the
//! store (`FDSTOREREMOVE=1`); an adopted listener that no live tunnel claims is closed and
//! taken out too. Without `NOTIFY_SOCKET` every call here does nothing.
//!
//! Adopted listeners are recognised by their own address (`getsockname`), not by their name:
//! the socket cannot lie about the port it holds, and a listener bound elsewhere than
//! `tunnels.bind_address` (the config changed) is not ours to serve.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::sync::Mutex;

use tracing::{info, warn};

use crate::port_range::PortRange;

/// The name a reserved port's listener carries in the store.
pub fn fd_name(port: u16) -> String {
    format!("tunnelbot-port-{port}")
}

/// The store, or nothing when the broker does not run under a service manager.
#[derive(Debug, Default)]
pub struct FdStore {
    active: bool,
    /// Listeners handed back at start, by port, until a restored tunnel claims them.
    adopted: Mutex<HashMap<u16, TcpListener>>,
}

impl FdStore {
    /// No store: pushes and removals do nothing, nothing is adopted.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// The store when `NOTIFY_SOCKET` is set, holding the listeners systemd passed to this
    /// process that are TCP listeners on `bind` at a port of `range`. Any other passed
    /// descriptor is closed (where it is a socket) and taken out of the store.
    pub fn from_env(bind: IpAddr, range: PortRange) -> Self {
        let active = std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty());
        if !active {
            return Self::disabled();
        }
        let store = Self {
            active,
            adopted: Mutex::default(),
        };
        store.adopt(bind, range);
        store
    }

    /// Whether a service manager receives the listeners.
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn adopt(&self, bind: IpAddr, range: PortRange) {
        // listenfd also accepts descriptors without LISTEN_PID; systemd always sets it, and a
        // value naming another process means the variables were inherited, not meant for us.
        let for_us = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            == Some(std::process::id());
        if !for_us {
            return;
        }
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .unwrap_or_default()
            .split(':')
            .map(str::to_owned)
            .collect();
        let mut fds = listenfd::ListenFd::from_env();
        let mut adopted = self.lock();
        for idx in 0..fds.len() {
            let name = names.get(idx).map_or("", String::as_str);
            let listener = match fds.take_tcp_listener(idx) {
                Ok(Some(l)) => l,
                Ok(None) => continue,
                Err(e) => {
                    warn!(idx, name, error = %e, "passed descriptor is not a TCP socket; closing it and taking it out of the store");
                    close_other(&mut fds, idx);
                    self.remove_name(name);
                    continue;
                }
            };
            match usable(&listener, bind, range) {
                Ok(port) if !adopted.contains_key(&port) => {
                    if name != fd_name(port) {
                        warn!(port, name, "adopted listener carries another name");
                    }
                    adopted.insert(port, listener);
                }
                Ok(port) => {
                    // Two listeners for one port cannot both be ours to serve; keep the first.
                    warn!(
                        port,
                        name, "second passed listener for one port; closing it"
                    );
                }
                Err(why) => {
                    warn!(
                        name,
                        why,
                        "passed listener is not a tunnel port; closing it and taking it out of the store"
                    );
                    drop(listener);
                    self.remove_name(name);
                }
            }
        }
        if !adopted.is_empty() {
            info!(
                listeners = adopted.len(),
                "adopted tunnel listeners from the service manager"
            );
        }
    }

    /// The adopted listener for `port`, if systemd passed one.
    pub fn take(&self, port: u16) -> Option<TcpListener> {
        self.lock().remove(&port)
    }

    /// Closes every adopted listener that no restored tunnel claimed and takes it out of the
    /// store: its tunnel ended or expired while the broker was down. Returns their ports.
    pub fn release_unclaimed(&self) -> Vec<u16> {
        let unclaimed: Vec<(u16, TcpListener)> = self.lock().drain().collect();
        let mut ports = Vec::with_capacity(unclaimed.len());
        for (port, listener) in unclaimed {
            drop(listener);
            self.remove(port);
            info!(port, "adopted listener matches no live tunnel; closed");
            ports.push(port);
        }
        ports
    }

    /// Hands `listener`, the reservation of `port`, to the service manager.
    pub fn push(&self, port: u16, listener: &TcpListener) {
        if !self.active {
            return;
        }
        let name = fd_name(port);
        let states = [
            sd_notify::NotifyState::FdStore,
            sd_notify::NotifyState::FdName(&name),
        ];
        if let Err(e) = sd_notify::notify_with_fds(&states, &[listener.as_fd()]) {
            warn!(port, error = %e, "could not store the listener with the service manager; a restart frees this port");
        }
    }

    /// Takes `port`'s listener out of the store (its tunnel ended).
    pub fn remove(&self, port: u16) {
        self.remove_name(&fd_name(port));
    }

    fn remove_name(&self, name: &str) {
        if !self.active || name.is_empty() {
            return;
        }
        let states = [
            sd_notify::NotifyState::FdStoreRemove,
            sd_notify::NotifyState::FdName(name),
        ];
        if let Err(e) = sd_notify::notify(&states) {
            warn!(name, error = %e, "could not take a listener out of the service manager's store");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, TcpListener>> {
        // Nothing panics under the lock, so a poisoned map is still consistent.
        self.adopted.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The port `listener` holds, if it is a listening socket on `bind` within `range`.
fn usable(listener: &TcpListener, bind: IpAddr, range: PortRange) -> Result<u16, &'static str> {
    let addr: SocketAddr = listener.local_addr().map_err(|_| "no local address")?;
    if addr.ip() != bind {
        return Err("bound to another address than tunnels.bind_address");
    }
    if !range.contains(addr.port()) {
        return Err("port outside tunnels.ports");
    }
    let socket = socket2::SockRef::from(listener);
    if !socket.is_listener().unwrap_or(false) {
        return Err("not a listening socket");
    }
    // Tokio needs it non-blocking; systemd passes it as it was stored, but be sure.
    listener
        .set_nonblocking(true)
        .map_err(|_| "cannot be made non-blocking")?;
    Ok(addr.port())
}

/// Takes a passed descriptor that is a socket of another kind, so dropping it closes it.
fn close_other(fds: &mut listenfd::ListenFd, idx: usize) {
    if let Ok(Some(s)) = fds.take_unix_listener(idx) {
        drop(s);
    } else if let Ok(Some(s)) = fds.take_udp_socket(idx) {
        drop(s);
    } else if let Ok(Some(s)) = fds.take_unix_datagram(idx) {
        drop(s);
    }
    // Anything else (not a socket) stays open: closing it would need unsafe code, and it holds
    // no port.
}

/// Tells the service manager the broker is ready (`READY=1`).
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        warn!(error = %e, "could not tell the service manager we are ready");
    }
}

/// Tells the service manager the broker is stopping (`STOPPING=1`).
pub fn notify_stopping() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
        warn!(error = %e, "could not tell the service manager we are stopping");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_usable_listeners() {
        assert_eq!(fd_name(20001), "tunnelbot-port-20001");
        let ip = IpAddr::from([127, 0, 0, 1]);
        let l = TcpListener::bind((ip, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let range = PortRange::new(port, port).unwrap();
        assert_eq!(usable(&l, ip, range), Ok(port));
        assert!(usable(&l, IpAddr::from([127, 0, 0, 2]), range).is_err());
        let next = port.wrapping_add(1).max(1);
        let elsewhere = PortRange::new(next, next).unwrap();
        assert!(usable(&l, ip, elsewhere).is_err());
    }

    #[test]
    fn disabled_store_adopts_nothing() {
        let s = FdStore::disabled();
        assert!(!s.is_active());
        assert!(s.take(1).is_none());
        assert!(s.release_unclaimed().is_empty());
    }
}
