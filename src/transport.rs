//! The SSH connection's socket as the russh session loop sees it: it can be cut from outside the
//! loop (revoke, expiry, a login that never comes, shutdown), and it ACKs at once during the
//! handshake.
//!
//! Cutting works by failing the loop's next read and write and waking it, so the loop ends and
//! drops the socket itself. That costs no file descriptor; the earlier design kept a `dup` of
//! every socket for a `shutdown(2)`, one descriptor per tunnel more (and descriptors, not memory,
//! are what bounds how many tunnels one process holds). It also cannot hit a recycled descriptor
//! number, which a raw-fd `shutdown` after the session's own close could.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Reads after which quick ACKs stop: enough for the version exchange, key exchange and login.
///
/// Linux delays the ACK of a segment that brings no reply, by up to 40 ms. OpenSSH sends its
/// KEXINIT and its key-exchange init back to back without waiting for a reply in between, and
/// with Nagle on the client's socket the second waits for the ACK of the first: a ~40 ms stall
/// in a share of all setups (docs/benchmark.md). `TCP_QUICKACK` is not sticky, so it is set again
/// after each of the first reads. After login, data flows both ways and ACKs ride on it.
const QUICKACK_READS: u8 = 16;

/// Ends one SSH connection from outside its session loop.
#[derive(Debug, Default)]
pub struct KillSwitch {
    killed: AtomicBool,
    /// The tasks parked on the transport's read and write, to wake when killed.
    parked: Mutex<[Option<Waker>; 2]>,
}

const READ: usize = 0;
const WRITE: usize = 1;

impl KillSwitch {
    /// Makes every later read and write of the transport fail, and wakes the session loop so it
    /// sees that now. Idempotent; harmless after the session has ended.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()));
        for waker in parked.into_iter().flatten() {
            waker.wake();
        }
    }

    fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// Remembers who waits on `side`; re-checks afterwards so a `kill` racing with this is not
    /// lost.
    fn park(&self, side: usize, waker: &Waker) -> bool {
        {
            let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
            match &mut parked[side] {
                Some(w) if w.will_wake(waker) => {}
                slot => *slot = Some(waker.clone()),
            }
        }
        self.is_killed()
    }
}

/// What the peer has sent, counted where the session loop reads it: the one proof of life that
/// a stalled or half-open peer cannot fake, since the kernel ACKs for a stopped process but only
/// a running client sends.
#[derive(Debug, Default)]
pub struct Activity {
    reads: AtomicU64,
}

impl Activity {
    /// Reads that brought bytes so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Counts bytes seen outside the session loop (a connection still queued for a handshake).
    pub fn saw_bytes(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
}

/// The accepted TCP stream, wrapped for the session loop.
pub struct Transport {
    inner: TcpStream,
    kill: Arc<KillSwitch>,
    activity: Arc<Activity>,
    quickack_reads: u8,
}

impl Transport {
    /// Wraps `inner`; `kill` cuts it.
    pub fn new(inner: TcpStream, kill: Arc<KillSwitch>) -> Self {
        Self::watched(inner, kill, Arc::default())
    }

    /// Wraps `inner`, counting the peer's reads in `activity`.
    pub fn watched(inner: TcpStream, kill: Arc<KillSwitch>, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            kill,
            activity,
            quickack_reads: QUICKACK_READS,
        }
    }
}

fn killed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection cut by the broker",
    )
}

/// Polls `io` unless the switch is thrown; on `Pending`, parks the waker on `side`.
fn guarded<T>(
    kill: &KillSwitch,
    side: usize,
    cx: &mut Context<'_>,
    io: impl FnOnce(&mut Context<'_>) -> Poll<io::Result<T>>,
) -> Poll<io::Result<T>> {
    if kill.is_killed() {
        return Poll::Ready(Err(killed()));
    }
    match io(cx) {
        Poll::Pending if kill.park(side, cx.waker()) => Poll::Ready(Err(killed())),
        other => other,
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = guarded(&this.kill, READ, cx, |cx| {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        });
        if buf.filled().len() > before {
            this.activity.saw_bytes();
        }
        if this.quickack_reads > 0 && matches!(polled, Poll::Ready(Ok(()))) {
            this.quickack_reads -= 1;
            if buf.filled().len() > before {
                // Best effort: a socket that refuses it only costs the stall it would have saved.
                let _ = socket2::SockRef::from(&this.inner).set_quickack(true);
            }
        }
        polled
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        guarded(&this.kill, WRITE, cx, |cx| {
            Pin::new(&mut this.inner).poll_write(cx, buf)
        })
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        guarded(&this.kill, WRITE, cx, |cx| {
            Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        guarded(&this.kill, WRITE, cx, |cx| {
            Pin::new(&mut this.inner).poll_flush(cx)
        })
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Shutting down a cut connection is what the caller wants anyway.
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    #[tokio::test]
    async fn carries_bytes_until_killed() {
        let (mut peer, sock) = pair().await;
        let kill = Arc::new(KillSwitch::default());
        let mut t = Transport::new(sock, Arc::clone(&kill));
        peer.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        t.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
        t.write_all(b"pong").await.expect("write");
        peer.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"pong");

        kill.kill();
        let err = t.read(&mut buf).await.expect_err("killed read");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        let err = t.write(b"x").await.expect_err("killed write");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn kill_wakes_a_parked_reader_and_the_peer_sees_the_close() {
        let (mut peer, sock) = pair().await;
        let kill = Arc::new(KillSwitch::default());
        let mut t = Transport::new(sock, Arc::clone(&kill));
        // A session loop parked on a read from a peer that never sends.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            let r = t.read(&mut buf).await;
            drop(t);
            r
        });
        // Only a parked reader exercises the wake-up; bounded like every wait here.
        for _ in 0..10_000 {
            if kill.parked.lock().expect("lock")[READ].is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            kill.parked.lock().expect("lock")[READ].is_some(),
            "reader parked"
        );
        kill.kill();
        let r = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("woken within the bound")
            .expect("task");
        assert_eq!(
            r.expect_err("aborted").kind(),
            io::ErrorKind::ConnectionAborted
        );
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), peer.read(&mut buf))
            .await
            .expect("close seen within the bound")
            .unwrap_or(0);
        assert_eq!(n, 0, "the peer sees the connection end");
    }
}
