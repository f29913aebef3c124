//! The sockets of the NBD server: listeners (TCP, Unix), accepted peers with their
//! handshake and transmission socket options, the connection slots that cap live
//! connections, and the classification of socket errors. Below both the accept loop
//! (`server`, `handshake`) and the reactors (`reactor`), which share these types.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest wait for any single read or write of the handshake; a client that takes longer
/// (or never speaks) is dropped, so it cannot hold a thread and a connection slot for good.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A bound socket the server accepts clients on.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// The path is removed when the listener is dropped.
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl Listener {
    /// Binds a TCP listener (`"127.0.0.1:10809"`, `"[::]:0"`, ...).
    pub fn tcp<A: ToSocketAddrs>(addr: A) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// Binds a Unix socket at `path`. A leftover socket file that nobody listens on any more
    /// (a previous server was killed) is replaced; a live one is an `AddrInUse` error, and a
    /// path that is not a socket is never deleted.
    pub fn unix<P: AsRef<Path>>(path: P) -> io::Result<Listener> {
        let path = path.as_ref().to_path_buf();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if meta.file_type().is_socket() {
                match UnixStream::connect(&path) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        std::fs::remove_file(&path)?
                    }
                    _ => return Err(io::Error::from(io::ErrorKind::AddrInUse)),
                }
            }
        }
        let listener = UnixListener::bind(&path)?;
        Ok(Listener::Unix { listener, path })
    }

    /// Binds from a command-line style address: `unix:PATH`, or anything containing a `/`
    /// (a socket path), otherwise `host:port` for TCP.
    pub fn bind(spec: &str) -> io::Result<Listener> {
        if let Some(path) = spec.strip_prefix("unix:") {
            Listener::unix(path)
        } else if spec.contains('/') {
            Listener::unix(spec)
        } else {
            Listener::tcp(spec)
        }
    }

    /// The bound TCP address (useful after binding port 0); `None` for Unix sockets.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix { .. } => None,
        }
    }

    pub(super) fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix { listener, .. } => listener.set_nonblocking(true),
        }
    }

    /// Accepts one pending client, `None` when there is none.
    pub(super) fn accept(&self) -> io::Result<Option<Peer>> {
        let peer = match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Peer::Tcp(s)),
            Listener::Unix { listener, .. } => listener.accept().map(|(s, _)| Peer::Unix(s)),
        };
        match peer {
            Ok(p) => Ok(Some(p)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix { listener, .. } => listener.as_fd(),
        }
    }
}

/// A connected client socket.
#[derive(Debug)]
pub(super) enum Peer {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Peer {
    pub(super) fn try_clone(&self) -> io::Result<Peer> {
        Ok(match self {
            Peer::Tcp(s) => Peer::Tcp(s.try_clone()?),
            Peer::Unix(s) => Peer::Unix(s.try_clone()?),
        })
    }

    pub(super) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Peer::Tcp(s) => s.shutdown(how),
            Peer::Unix(s) => s.shutdown(how),
        }
    }

    /// The handshake blocks (its thread has nothing else to do), each exchange bounded by
    /// [`HANDSHAKE_TIMEOUT`]. Replies are coalesced by our own buffers, so Nagle would only
    /// add latency, here and in transmission.
    pub(super) fn prepare_handshake(&self) -> io::Result<()> {
        let t = Some(HANDSHAKE_TIMEOUT);
        match self {
            Peer::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)?;
                s.set_nodelay(true)
            }
            Peer::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// Transmission: a reactor polls the socket and never blocks on it.
    pub(super) fn prepare_transmission(&self) -> io::Result<()> {
        match self {
            Peer::Tcp(s) => {
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)?;
                s.set_nonblocking(true)
            }
            Peer::Unix(s) => {
                s.set_read_timeout(None)?;
                s.set_write_timeout(None)?;
                s.set_nonblocking(true)
            }
        }
    }
}

impl AsFd for Peer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Peer::Tcp(s) => s.as_fd(),
            Peer::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Peer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Peer::Tcp(s) => s.read(buf),
            Peer::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Peer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Peer::Tcp(s) => s.write(buf),
            Peer::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One live connection counted against [`NbdServer::max_connections`]; the count drops when
/// this does, wherever the connection ends (handshake thread or reactor).
pub(super) struct Slot(Arc<AtomicUsize>);

impl Slot {
    pub(super) fn take(live: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(Arc::clone(live)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Errors that only mean the client went away; not worth a log line.
pub(super) fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// A client broke the protocol in a way that leaves nothing to answer: close it.
pub(super) fn violation(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
