//! Listeners, the accept loop and the handshake of the NBD server, and how `serve` starts and
//! stops the reactors that run the transmission phase (`reactor`).
//!
//! Threads: the caller of [`NbdServer::serve`] runs the accept loop, polling every listener
//! (a `stop` flag set by another thread is noticed within [`POLL_INTERVAL`]). Each accepted
//! client gets a short-lived handshake thread: the handshake is a few small blocking
//! exchanges, each bounded by [`HANDSHAKE_TIMEOUT`], so a slow or silent client delays nobody
//! else. A client that enters transmission is handed, with any bytes the handshake read past
//! its last option, to reactor `k` (round robin over the clients that reach transmission)
//! through a channel and that reactor's [`Waker`]; the handshake thread then ends. The
//! number of live connections (handshaking or transmitting) is capped by
//! [`NbdServer::max_connections`], which also bounds the handshake threads.
//!
//! Targets that share handles ([`BlockTarget::share_conns`]) get one handle per reactor,
//! opened before the first client is accepted, so an unopenable device fails `serve` at once
//! instead of failing every client.
//!
//! Shutdown: when `stop` is set the listeners are closed (their Unix socket files removed)
//! and the reactors are told to stop: each stops reading, executes the requests it already
//! holds in full, sends their replies and closes its clients, giving up on clients that do
//! not take their replies within the grace period. Handshaking clients get their read side
//! shut down, which ends their handshake at once; after the grace period any still running
//! are shut down both ways. `serve` returns once every thread it started has ended.

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::proto::{self, Limits};
use super::reactor::{Alive, Handoff, Reactor};
pub use super::sockets::Listener;
use super::sockets::{is_disconnect, Peer, Slot};
use super::BlockTarget;
use crate::env::posix::poll::{Interest, PollSet, Waker};

/// How often the accept loop looks at `stop` when no client arrives.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Longest string the spec allows in names, descriptions and messages.
const MAX_STRING: usize = 4096;
/// Read buffer of a handshake; what it holds past the last option goes to the reactor.
const HANDSHAKE_BUF: usize = 64 << 10;
/// More reactor threads than this would only waste memory: the machine has no such core count.
const MAX_REACTORS: usize = 1024;

/// The NBD server: what it exports under which name, how many reactor threads serve it, and
/// how it stops.
#[derive(Clone, Debug)]
pub struct NbdServer {
    export_name: String,
    description: String,
    read_only: bool,
    max_connections: usize,
    shutdown_grace: Duration,
    reactors: usize,
}

impl Default for NbdServer {
    fn default() -> Self {
        NbdServer {
            export_name: String::new(),
            description: String::new(),
            read_only: false,
            max_connections: 256,
            shutdown_grace: Duration::from_secs(5),
            reactors: thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Connections still in their handshake, by id, so shutdown can reach sockets blocked in a
/// read. Reactors look after the connections in transmission themselves.
type Registry = Arc<Mutex<HashMap<u64, Peer>>>;

/// Where handshake threads hand clients over: one lane (channel and waker) per reactor.
struct Router<C> {
    lanes: Vec<(Sender<Handoff<C>>, Arc<Waker>)>,
    next: AtomicUsize,
}

impl<C> Router<C> {
    /// Gives a client to the next reactor in turn. If that reactor is gone (shutdown), the
    /// client is dropped, which closes it.
    fn hand_over(&self, h: Handoff<C>) {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        // `serve` starts at least one reactor; without one the client is just closed.
        let Some((tx, waker)) = turn
            .checked_rem(self.lanes.len())
            .and_then(|k| self.lanes.get(k))
        else {
            return;
        };
        if tx.send(h).is_ok() {
            waker.wake();
        }
    }
}

/// What a handshake thread needs, shared by all of them.
struct Shared<T: BlockTarget> {
    cfg: NbdServer,
    target: Arc<T>,
    stop: Arc<AtomicBool>,
    router: Router<T::Conn>,
    registry: Registry,
}

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

    /// Clients beyond this many concurrent connections (handshaking or transmitting) are
    /// closed right after accept, which bounds the handshake threads and buffers a client
    /// can make us hold.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long `serve` lets connections finish after `stop` before closing them hard.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Number of reactor threads serving the transmission phase (default: one per core).
    pub fn reactors(mut self, n: usize) -> Self {
        self.reactors = n.clamp(1, MAX_REACTORS);
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
    /// for an invalid configuration, a shared device handle that cannot be opened, or a
    /// listener that fails for good; the connections are still stopped first.
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
        // The reactors have their own stop flag, raised by this thread only, so that they
        // can also be stopped when starting them fails half-way.
        let halt = Arc::new(AtomicBool::new(false));
        let mut reactors: Vec<(Arc<Waker>, JoinHandle<()>)> = Vec::new();
        let started = self.start_reactors(&target, &halt, &mut reactors);
        let result = match started {
            Ok(router) => self.accept_loop(&listeners, router, &target, &stop),
            Err(e) => Err(e),
        };
        // Closing the listeners first makes new clients fail fast instead of queueing.
        drop(listeners);
        halt.store(true, Ordering::Release);
        for (waker, _) in &reactors {
            waker.wake();
        }
        for (_, h) in reactors {
            let _ = h.join();
        }
        result
    }

    /// Opens the shared handles (all of them before any thread starts, so a failure leaves
    /// nothing behind) and starts one thread per reactor; returns the router that feeds them.
    fn start_reactors<T: BlockTarget>(
        &self,
        target: &Arc<T>,
        halt: &Arc<AtomicBool>,
        started: &mut Vec<(Arc<Waker>, JoinHandle<()>)>,
    ) -> io::Result<Router<T::Conn>> {
        let mut conns = Vec::with_capacity(self.reactors);
        for _ in 0..self.reactors {
            conns.push(if target.share_conns() {
                Some(target.connect()?)
            } else {
                None
            });
        }
        let limits = Limits {
            size: target.size(),
            block: target.block_size(),
            max_payload: proto::MAX_PAYLOAD,
            read_only: self.read_only,
        };
        let mut lanes = Vec::with_capacity(self.reactors);
        let running = Arc::new(AtomicUsize::new(0));
        for (index, shared) in conns.into_iter().enumerate() {
            let (tx, inbox) = mpsc::channel();
            let waker = Arc::new(Waker::new()?);
            let reactor = Reactor {
                index,
                target: Arc::clone(target),
                shared,
                inbox,
                waker: Arc::clone(&waker),
                halt: Arc::clone(halt),
                running: Arc::clone(&running),
                limits,
                grace: self.shutdown_grace,
            };
            let alive = Alive::new(&running);
            let h = thread::Builder::new()
                .name(format!("nbd-reactor-{index}"))
                .spawn(move || {
                    let _alive = alive;
                    reactor.run()
                })?;
            started.push((Arc::clone(&waker), h));
            lanes.push((tx, waker));
        }
        Ok(Router {
            lanes,
            next: AtomicUsize::new(0),
        })
    }

    /// Accepts until `stop` (or a listener fails for good), starting a handshake thread per
    /// client; then ends the handshakes still running (see the module documentation).
    fn accept_loop<T: BlockTarget>(
        &self,
        listeners: &[Listener],
        router: Router<T::Conn>,
        target: &Arc<T>,
        stop: &Arc<AtomicBool>,
    ) -> io::Result<()> {
        let shared = Arc::new(Shared {
            cfg: self.clone(),
            target: Arc::clone(target),
            stop: Arc::clone(stop),
            router,
            registry: Arc::default(),
        });
        let live = Arc::new(AtomicUsize::new(0));
        let mut handshakes: Vec<JoinHandle<()>> = Vec::new();
        let mut set = PollSet::new();
        let mut next_id = 0u64;
        let mut result = Ok(());
        'accept: while !stop.load(Ordering::Acquire) {
            set.clear();
            for l in listeners {
                set.add(l.as_fd(), Interest::READ);
            }
            if let Err(e) = set.wait(POLL_INTERVAL) {
                result = Err(e);
                break;
            }
            for (i, l) in listeners.iter().enumerate() {
                if !set.ready(i).read {
                    continue;
                }
                let peer = match l.accept() {
                    Ok(Some(p)) => p,
                    Ok(None) => continue,
                    Err(e) if accept_error_is_transient(&e) => {
                        eprintln!("pcache nbd: accept: {e}");
                        // EMFILE and friends stay readable: do not spin on them.
                        thread::sleep(POLL_INTERVAL);
                        continue;
                    }
                    Err(e) => {
                        result = Err(e);
                        break 'accept;
                    }
                };
                next_id += 1;
                let Some(slot) = Slot::take(&live, self.max_connections) else {
                    eprintln!("pcache nbd: connection {next_id} refused: too many clients");
                    continue;
                };
                if let Some(h) = start_handshake(next_id, peer, slot, &shared) {
                    handshakes.push(h);
                }
            }
            reap(&mut handshakes);
        }
        shutdown_all(&shared.registry, Shutdown::Read);
        let deadline = Instant::now() + self.shutdown_grace;
        while handshakes.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            thread::sleep(POLL_INTERVAL);
        }
        shutdown_all(&shared.registry, Shutdown::Both);
        for h in handshakes {
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
}

/// Removes a connection from the registry when its handshake ends, even by panic.
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

/// Joins the threads that have ended, so the handle list tracks live handshakes only.
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

#[path = "handshake.rs"]
mod handshake;
use handshake::*;
