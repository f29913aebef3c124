//! Sockets, threads and the per-connection protocol state machine of the NBD server.
//!
//! One accept loop polls every listener (nonblocking, short sleep when idle, so a `stop`
//! flag is noticed within [`POLL_INTERVAL`]); each accepted client runs on its own thread:
//! handshake, then a loop that reads one request, executes it on the connection's own
//! [`BlockConn`] and queues the reply in a buffered writer. Replies are flushed to the socket
//! whenever no complete request is already buffered, so pipelined requests share a syscall
//! but a client waiting for an answer never waits on our buffer.
//!
//! Shutdown: when `stop` is set the listeners are closed (their Unix socket files removed),
//! every live connection gets its read side shut down, which lets it finish the request in
//! hand, send that reply and then see end-of-file; after a grace period any connection still
//! running (for example one whose client stopped reading replies) is shut down both ways.
//! `serve` returns once every connection thread has ended.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::proto::{self, Command, InfoRequest, Limits, OptionHeader, Request};
use super::{BlockConn, BlockTarget};

/// How often the accept loop looks at `stop` and at its listeners when idle.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Longest string the spec allows in names, descriptions and messages.
const MAX_STRING: usize = 4096;

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

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix { listener, .. } => listener.set_nonblocking(true),
        }
    }

    /// Accepts one pending client, `None` when there is none.
    fn accept(&self) -> io::Result<Option<Peer>> {
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

/// A connected client socket.
#[derive(Debug)]
enum Peer {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Peer {
    fn try_clone(&self) -> io::Result<Peer> {
        Ok(match self {
            Peer::Tcp(s) => Peer::Tcp(s.try_clone()?),
            Peer::Unix(s) => Peer::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Peer::Tcp(s) => s.shutdown(how),
            Peer::Unix(s) => s.shutdown(how),
        }
    }

    /// Accepted sockets must block: the connection thread has nothing else to do. Replies are
    /// coalesced by our own buffer, so Nagle would only add latency.
    fn prepare(&self) -> io::Result<()> {
        match self {
            Peer::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)
            }
            Peer::Unix(s) => s.set_nonblocking(false),
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

/// The NBD server: what it exports under which name, and how it stops.
#[derive(Clone, Debug)]
pub struct NbdServer {
    export_name: String,
    description: String,
    read_only: bool,
    max_connections: usize,
    shutdown_grace: Duration,
}

impl Default for NbdServer {
    fn default() -> Self {
        NbdServer {
            export_name: String::new(),
            description: String::new(),
            read_only: false,
            max_connections: 256,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Live connections, by id, so shutdown can reach sockets blocked in a read.
type Registry = Arc<Mutex<HashMap<u64, Peer>>>;

impl NbdServer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Name clients ask for. The empty name (the spec's default export) is always accepted
    /// too; any other name is refused.
    pub fn export_name(mut self, name: impl Into<String>) -> Self {
        self.export_name = name.into();
        self
    }

    /// Human-readable description sent with NBD_INFO_DESCRIPTION (when non-empty).
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }

    /// Advertise READ_ONLY and refuse writes, trims and write-zeroes with EPERM.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Clients beyond this many concurrent connections are closed right after accept, which
    /// bounds the number of threads a client can make us start.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long `serve` lets connections finish after `stop` before closing them hard.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Serves on one TCP address until `stop` is set.
    pub fn serve_tcp<T: BlockTarget>(
        &self,
        addr: &str,
        target: Arc<T>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<()> {
        self.serve(vec![Listener::tcp(addr)?], target, stop)
    }

    /// Serves on one Unix socket path until `stop` is set; the path is removed on return.
    pub fn serve_unix<T: BlockTarget, P: AsRef<Path>>(
        &self,
        path: P,
        target: Arc<T>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<()> {
        self.serve(vec![Listener::unix(path)?], target, stop)
    }

    /// Accepts clients on every listener until `stop` is set, then stops the connections
    /// (see the module documentation) and returns when all have ended. An error is returned
    /// for an invalid configuration or a listener that fails for good; the connections are
    /// still stopped first.
    pub fn serve<T: BlockTarget>(
        &self,
        listeners: Vec<Listener>,
        target: Arc<T>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<()> {
        self.check_config(&*target)?;
        if listeners.is_empty() {
            return Err(invalid("no listener to serve on"));
        }
        for l in &listeners {
            l.set_nonblocking()?;
        }
        let registry: Registry = Arc::default();
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        let mut next_id = 0u64;
        let mut result = Ok(());
        'accept: while !stop.load(Ordering::Acquire) {
            let mut idle = true;
            for l in &listeners {
                let peer = match l.accept() {
                    Ok(Some(p)) => p,
                    Ok(None) => continue,
                    Err(e) if accept_error_is_transient(&e) => {
                        eprintln!("pcache nbd: accept: {e}");
                        continue;
                    }
                    Err(e) => {
                        result = Err(e);
                        break 'accept;
                    }
                };
                idle = false;
                next_id += 1;
                if let Some(h) = self.start(next_id, peer, &registry, &target, &stop) {
                    workers.push(h);
                }
            }
            reap(&mut workers);
            if idle {
                thread::sleep(POLL_INTERVAL);
            }
        }
        // Closing the listeners first makes new clients fail fast instead of queueing.
        drop(listeners);
        shutdown_all(&registry, Shutdown::Read);
        let deadline = Instant::now() + self.shutdown_grace;
        while workers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            thread::sleep(POLL_INTERVAL);
        }
        shutdown_all(&registry, Shutdown::Both);
        for h in workers {
            let _ = h.join();
        }
        result
    }

    fn check_config<T: BlockTarget>(&self, target: &T) -> io::Result<()> {
        let bs = target.block_size();
        if !bs.is_power_of_two() || bs > proto::MAX_PAYLOAD {
            return Err(invalid("block size must be a power of two up to 32 MiB"));
        }
        for s in [&self.export_name, &self.description] {
            if s.len() > MAX_STRING || s.contains('\0') {
                return Err(invalid(
                    "export name and description: at most 4096 bytes, no NUL",
                ));
            }
        }
        Ok(())
    }

    /// Registers a new client and starts its thread; a client over the limit, or one we
    /// cannot start a thread for, is simply closed.
    fn start<T: BlockTarget>(
        &self,
        id: u64,
        peer: Peer,
        registry: &Registry,
        target: &Arc<T>,
        stop: &Arc<AtomicBool>,
    ) -> Option<JoinHandle<()>> {
        let handle = peer.try_clone().and_then(|h| peer.prepare().map(|()| h));
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                eprintln!("pcache nbd: connection {id}: {e}");
                return None;
            }
        };
        {
            let mut live = registry.lock().unwrap_or_else(PoisonError::into_inner);
            if live.len() >= self.max_connections {
                eprintln!("pcache nbd: connection {id} refused: too many clients");
                return None;
            }
            live.insert(id, handle);
        }
        let guard = Deregister {
            id,
            registry: Arc::clone(registry),
        };
        let cfg = self.clone();
        let target = Arc::clone(target);
        let stop = Arc::clone(stop);
        let spawned = thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let _guard = guard;
                if let Err(e) = run_connection(peer, &cfg, &*target, &stop) {
                    if !is_disconnect(&e) {
                        eprintln!("pcache nbd: connection {id}: {e}");
                    }
                }
            });
        match spawned {
            Ok(h) => Some(h),
            Err(e) => {
                // The closure (and with it the guard) was dropped: the entry is gone again.
                eprintln!("pcache nbd: connection {id}: cannot start thread: {e}");
                None
            }
        }
    }
}

/// Removes a connection from the registry when its thread ends, even by panic.
struct Deregister {
    id: u64,
    registry: Registry,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

fn shutdown_all(registry: &Registry, how: Shutdown) {
    let live = registry.lock().unwrap_or_else(PoisonError::into_inner);
    for peer in live.values() {
        let _ = peer.shutdown(how);
    }
}

/// Joins the threads that have ended, so the handle list tracks live connections only.
fn reap(workers: &mut Vec<JoinHandle<()>>) {
    let mut i = 0;
    while i < workers.len() {
        if workers[i].is_finished() {
            let _ = workers.swap_remove(i).join();
        } else {
            i += 1;
        }
    }
}

/// Accept failures that concern one client or a momentary resource shortage; the listener
/// itself is fine.
fn accept_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPERM
        )
    ) || e.kind() == io::ErrorKind::Interrupted
}

/// Errors that only mean the client went away; not worth a log line.
fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// A client broke the protocol in a way that leaves nothing to answer: close it.
fn violation(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn run_connection<T: BlockTarget>(
    peer: Peer,
    cfg: &NbdServer,
    target: &T,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut session = Session {
        rd: BufReader::with_capacity(64 << 10, peer.try_clone()?),
        wr: BufWriter::with_capacity(256 << 10, peer),
        cfg,
    };
    let result = match session.negotiate(target, stop)? {
        Some(conn) => session.transmit(conn, target),
        None => Ok(()),
    };
    // Best effort: the replies already queued still reach a client that is listening.
    let flushed = session.wr.flush();
    result.and(flushed)
}

struct Session<'a> {
    rd: BufReader<Peer>,
    wr: BufWriter<Peer>,
    cfg: &'a NbdServer,
}

impl Session<'_> {
    /// Handshake and option haggling. `Some` when the client entered transmission (the
    /// device handle is opened then, so clients that only list or query cost no channel),
    /// `None` when it aborted or left.
    fn negotiate<T: BlockTarget>(
        &mut self,
        target: &T,
        stop: &AtomicBool,
    ) -> io::Result<Option<T::Conn>> {
        self.wr.write_all(&proto::NBDMAGIC.to_be_bytes())?;
        self.wr.write_all(&proto::IHAVEOPT.to_be_bytes())?;
        self.wr
            .write_all(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())?;
        self.wr.flush()?;
        let mut b4 = [0u8; 4];
        if !read_full_or_eof(&mut self.rd, &mut b4)? {
            return Ok(None);
        }
        let client_flags = u32::from_be_bytes(b4);
        if client_flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
            return Err(violation("unknown client flags"));
        }
        let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
        let mut data = Vec::new();
        loop {
            self.wr.flush()?;
            let mut hb = [0u8; proto::OPTION_HEADER_LEN];
            if !read_full_or_eof(&mut self.rd, &mut hb)? {
                return Ok(None);
            }
            let h = OptionHeader::parse(&hb);
            if h.magic != proto::IHAVEOPT {
                return Err(violation("bad option magic"));
            }
            if h.len > proto::MAX_OPTION_LEN {
                if h.option == proto::OPT_EXPORT_NAME {
                    return Err(violation("oversized export name"));
                }
                self.discard(u64::from(h.len))?;
                self.option_error(h.option, proto::REP_ERR_TOO_BIG, "option too large")?;
                continue;
            }
            data.clear();
            data.resize(h.len as usize, 0);
            self.rd.read_exact(&mut data)?;
            match h.option {
                proto::OPT_EXPORT_NAME => {
                    // This option has no error reply: the spec says to hang up.
                    if !self.name_ok(&data) {
                        return Err(violation("unknown export name"));
                    }
                    if stop.load(Ordering::Acquire) {
                        return Ok(None);
                    }
                    let conn = target.connect()?;
                    self.wr.write_all(&target.size().to_be_bytes())?;
                    self.wr
                        .write_all(&self.transmission_flags(target).to_be_bytes())?;
                    if !no_zeroes {
                        self.wr.write_all(&[0u8; 124])?;
                    }
                    return Ok(Some(conn));
                }
                proto::OPT_ABORT => {
                    // The client may already be gone; the reply is a courtesy.
                    let _ = self.option_reply(h.option, proto::REP_ACK, &[]);
                    let _ = self.wr.flush();
                    return Ok(None);
                }
                proto::OPT_LIST => {
                    if !data.is_empty() {
                        self.option_error(h.option, proto::REP_ERR_INVALID, "LIST takes no data")?;
                        continue;
                    }
                    let name = self.cfg.export_name.as_bytes();
                    let mut rep = Vec::with_capacity(4 + name.len());
                    rep.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    rep.extend_from_slice(name);
                    self.option_reply(h.option, proto::REP_SERVER, &rep)?;
                    self.option_reply(h.option, proto::REP_ACK, &[])?;
                }
                proto::OPT_INFO | proto::OPT_GO => {
                    if let Some(conn) = self.info_or_go(h.option, &data, target, stop)? {
                        return Ok(Some(conn));
                    }
                }
                // TLS, structured replies, metadata contexts, extended headers and anything
                // newer are not implemented; clients fall back to simple replies.
                _ => self.option_error(h.option, proto::REP_ERR_UNSUP, "unsupported option")?,
            }
        }
    }

    /// Answers NBD_OPT_INFO / NBD_OPT_GO; `Some` when a GO succeeded.
    fn info_or_go<T: BlockTarget>(
        &mut self,
        option: u32,
        data: &[u8],
        target: &T,
        stop: &AtomicBool,
    ) -> io::Result<Option<T::Conn>> {
        let Some(req) = InfoRequest::parse(data) else {
            self.option_error(option, proto::REP_ERR_INVALID, "malformed request")?;
            return Ok(None);
        };
        if !self.name_ok(req.name) {
            self.option_error(option, proto::REP_ERR_UNKNOWN, "no such export")?;
            return Ok(None);
        }
        let go = option == proto::OPT_GO;
        let conn = if go {
            if stop.load(Ordering::Acquire) {
                self.option_error(option, proto::REP_ERR_SHUTDOWN, "server shutting down")?;
                return Ok(None);
            }
            match target.connect() {
                Ok(c) => Some(c),
                Err(e) => {
                    // No option error means "device failed"; POLICY with the reason is the
                    // closest, and the client may retry.
                    let msg = format!("cannot open the device: {e}");
                    self.option_error(option, proto::REP_ERR_POLICY, &msg)?;
                    return Ok(None);
                }
            }
        } else {
            None
        };
        let tflags = self.transmission_flags(target);
        self.option_reply(
            option,
            proto::REP_INFO,
            &proto::info_export(target.size(), tflags),
        )?;
        // Block sizes go out whether asked for or not (the spec allows it): a client that
        // ignores them gets EINVAL on unaligned requests, which is what it would get anyway.
        let bs = target.block_size();
        let sizes = proto::info_block_size(bs, bs.max(4096), proto::MAX_PAYLOAD);
        self.option_reply(option, proto::REP_INFO, &sizes)?;
        let mut sent_name = false;
        let mut sent_description = false;
        for info in req.infos {
            if info == proto::INFO_NAME && !sent_name {
                sent_name = true;
                let rep = proto::info_string(proto::INFO_NAME, &self.cfg.export_name);
                self.option_reply(option, proto::REP_INFO, &rep)?;
            } else if info == proto::INFO_DESCRIPTION
                && !sent_description
                && !self.cfg.description.is_empty()
            {
                sent_description = true;
                let rep = proto::info_string(proto::INFO_DESCRIPTION, &self.cfg.description);
                self.option_reply(option, proto::REP_INFO, &rep)?;
            }
        }
        self.option_reply(option, proto::REP_ACK, &[])?;
        Ok(conn)
    }

    fn name_ok(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.cfg.export_name.as_bytes()
    }

    fn transmission_flags<T: BlockTarget>(&self, target: &T) -> u16 {
        let mut f = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH;
        if self.cfg.read_only {
            f |= proto::TFLAG_READ_ONLY;
        } else {
            f |= proto::TFLAG_SEND_FUA | proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES;
        }
        if target.can_multi_conn() {
            f |= proto::TFLAG_CAN_MULTI_CONN;
        }
        f
    }

    fn option_reply(&mut self, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
        // Every payload we build is far below 4 GiB (names are capped at 4096 bytes).
        let len = u32::try_from(data.len()).map_err(|_| invalid("option reply too long"))?;
        self.wr
            .write_all(&proto::option_reply_header(option, reply, len))?;
        self.wr.write_all(data)
    }

    fn option_error(&mut self, option: u32, reply: u32, msg: &str) -> io::Result<()> {
        self.option_reply(option, reply, msg.as_bytes())
    }

    /// Skips `n` bytes of client data without buffering them.
    fn discard(&mut self, n: u64) -> io::Result<()> {
        let copied = io::copy(&mut (&mut self.rd).take(n), &mut io::sink())?;
        if copied < n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// The transmission phase: requests in order, one reply each, until DISC or end of file.
    fn transmit<T: BlockTarget>(&mut self, mut conn: T::Conn, target: &T) -> io::Result<()> {
        let lim = Limits {
            size: target.size(),
            block: target.block_size(),
            max_payload: proto::MAX_PAYLOAD,
            read_only: self.cfg.read_only,
        };
        // Reused for every payload; validation bounds it by `max_payload`.
        let mut buf: Vec<u8> = Vec::new();
        loop {
            if self.rd.buffer().len() < proto::REQUEST_LEN {
                self.wr.flush()?;
            }
            let mut hb = [0u8; proto::REQUEST_LEN];
            if !read_full_or_eof(&mut self.rd, &mut hb)? {
                return Ok(());
            }
            let Some(req) = Request::parse(&hb) else {
                return Err(violation("bad request magic"));
            };
            let verdict = proto::validate(&req, &lim);
            let payload = req.payload_len();
            if payload > lim.max_payload {
                // Refused already (EINVAL); the header framed it, so skipping keeps the stream
                // in sync without holding the data.
                self.discard(u64::from(payload))?;
            } else if payload > 0 {
                let p = grow(&mut buf, payload);
                self.rd.read_exact(p)?;
            }
            let cmd = match verdict {
                Ok(c) => c,
                Err(errno) => {
                    self.wr.write_all(&proto::simple_reply(errno, req.cookie))?;
                    continue;
                }
            };
            let done = match cmd {
                Command::Disc => return Ok(()),
                Command::Read { off, len } => {
                    let p = grow(&mut buf, len);
                    match if len == 0 { Ok(()) } else { conn.read(off, p) } {
                        Ok(()) => {
                            self.wr.write_all(&proto::simple_reply(0, req.cookie))?;
                            self.wr.write_all(p)?;
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                Command::Write { off, len, fua } if len > 0 => {
                    conn.write(off, &buf[..len as usize], fua)
                }
                Command::Flush => conn.flush(),
                Command::Trim { off, len, fua } if len > 0 => conn.trim(off, len, fua),
                Command::WriteZeroes {
                    off,
                    len,
                    may_trim,
                    fua,
                } if len > 0 => conn.write_zeroes(off, len, may_trim, fua),
                // Zero-length writes, trims and zeroings touch nothing.
                _ => Ok(()),
            };
            let errno = done.as_ref().map_or_else(proto::errno_of, |_| 0);
            self.wr.write_all(&proto::simple_reply(errno, req.cookie))?;
        }
    }
}

/// The first `len` bytes of the connection's buffer, growing it if needed (never shrinking:
/// the next request of the same size must not pay for reallocation or zeroing).
fn grow(buf: &mut Vec<u8>, len: u32) -> &mut [u8] {
    let len = len as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// `read_exact`, except that end-of-file before the first byte is a clean `Ok(false)`: the
/// client hung up between messages.
fn read_full_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) if n == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}
