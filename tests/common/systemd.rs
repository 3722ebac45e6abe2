//! systemd's side of `sd_notify` and socket activation, enough of it to test the descriptor
//! store across a real restart: it receives `FDSTORE=1` with the listeners and hands them back
//! through `LISTEN_FDS`.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, bail};
use command_fds::{CommandFdExt, FdMapping};
use tokio::process::Command;

use super::WAIT;

const BIN: &str = env!("CARGO_BIN_EXE_tunnelbot");

/// What the fake service manager has been told.
#[derive(Default)]
pub struct Manager {
    /// The descriptor store, in the order the fds arrived, as systemd keeps it.
    pub store: Vec<(String, OwnedFd)>,
    /// Every FDNAME given with FDSTOREREMOVE=1.
    pub removed: Vec<String>,
    pub ready: usize,
    pub stopping: usize,
}

/// systemd's side of `sd_notify`, enough of it for the descriptor store: a datagram socket
/// that receives `FDSTORE=1` with SCM_RIGHTS, `FDSTOREREMOVE=1`, `READY=1` and `STOPPING=1`.
pub struct FakeSystemd {
    path: PathBuf,
    state: Arc<(Mutex<Manager>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The datagram that tells the receiving thread to stop.
const QUIT: &[u8] = b"X-TEST-QUIT=1";

impl FakeSystemd {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path)?;
        let state: Arc<(Mutex<Manager>, Condvar)> = Arc::default();
        let shared = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            loop {
                let mut buf = [0u8; 4096];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
                let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
                let Ok(got) = rustix::net::recvmsg(
                    &socket,
                    &mut [IoSliceMut::new(&mut buf)],
                    &mut control,
                    rustix::net::RecvFlags::CMSG_CLOEXEC,
                ) else {
                    return;
                };
                let mut fds: Vec<OwnedFd> = Vec::new();
                for message in control.drain() {
                    if let rustix::net::RecvAncillaryMessage::ScmRights(rights) = message {
                        fds.extend(rights);
                    }
                }
                let text = String::from_utf8_lossy(&buf[..got.bytes]).into_owned();
                if text.as_bytes() == QUIT {
                    return;
                }
                let fields: HashMap<&str, &str> =
                    text.lines().filter_map(|l| l.split_once('=')).collect();
                let name = fields.get("FDNAME").copied().unwrap_or("stored").to_owned();
                let mut m = shared.0.lock().unwrap();
                if fields.get("FDSTORE") == Some(&"1") {
                    m.store.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
                }
                if fields.get("FDSTOREREMOVE") == Some(&"1") {
                    // systemd closes every stored fd of that name.
                    m.store.retain(|(n, _)| *n != name);
                    m.removed.push(name);
                }
                if fields.get("READY") == Some(&"1") {
                    m.ready += 1;
                }
                if fields.get("STOPPING") == Some(&"1") {
                    m.stopping += 1;
                }
                drop(m);
                shared.1.notify_all();
            }
        });
        Ok(Self {
            path,
            state,
            thread: Some(thread),
        })
    }

    /// Waits (bounded) until `pred` holds for what the manager has been told.
    pub async fn wait(
        &self,
        what: &str,
        pred: impl Fn(&Manager) -> bool + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = Arc::clone(&self.state);
        let what = what.to_owned();
        tokio::task::spawn_blocking(move || {
            let guard = state.0.lock().unwrap();
            let (guard, timeout) = state
                .1
                .wait_timeout_while(guard, WAIT, |m| !pred(m))
                .unwrap();
            if timeout.timed_out() {
                bail!(
                    "service manager never saw {what}: store {:?}, removed {:?}, ready {}",
                    guard.store.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                    guard.removed,
                    guard.ready
                );
            }
            Ok(())
        })
        .await?
    }

    pub fn stored(&self) -> Vec<String> {
        let m = self.state.0.lock().unwrap();
        m.store.iter().map(|(n, _)| n.clone()).collect()
    }

    /// How many STOPPING=1 it received.
    pub fn stopping(&self) -> usize {
        self.state.0.lock().unwrap().stopping
    }

    pub fn removed(&self) -> Vec<String> {
        self.state.0.lock().unwrap().removed.clone()
    }

    /// Puts `fd` into the store under `name`, as if an earlier broker had.
    pub fn put(&self, name: &str, fd: OwnedFd) {
        self.state
            .0
            .lock()
            .unwrap()
            .store
            .push((name.to_owned(), fd));
    }

    /// The broker as systemd starts it: NOTIFY_SOCKET always; the stored fds as 3, 4, ...
    /// with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (set by `sh` to its own pid, which
    /// `exec` hands to the broker). systemd keeps its copies; the child gets duplicates.
    pub fn command(&self) -> anyhow::Result<Command> {
        let m = self.state.0.lock().unwrap();
        let mut command = Command::new("sh");
        command
            .args(["-c", r#"LISTEN_PID=$$ exec "$0" "$@""#, BIN])
            .env("NOTIFY_SOCKET", &self.path)
            .env_remove("LISTEN_PID");
        if m.store.is_empty() {
            command
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_FDNAMES");
            return Ok(command);
        }
        let mut mappings = Vec::new();
        let mut names = Vec::new();
        for (i, (name, fd)) in m.store.iter().enumerate() {
            mappings.push(FdMapping {
                parent_fd: fd.try_clone()?,
                child_fd: 3 + i32::try_from(i)?,
            });
            names.push(name.clone());
        }
        command
            .env("LISTEN_FDS", m.store.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .fd_mappings(mappings)?;
        Ok(command)
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        if let Ok(s) = UnixDatagram::unbound() {
            let _ = s.send_to(QUIT, &self.path);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
