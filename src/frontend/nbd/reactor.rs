//! The transmission phase: reactor threads, each serving many clients with non-blocking
//! sockets, poll(2) and one device handle.
//!
//! A reactor loops: take over the clients handed to it, run the target's background step if
//! it is reactor 0 and the target has one, execute every complete request its clients have
//! buffered, round robin one request per client per round (so clients interleave at request
//! granularity and none starves another), send the replies, then poll the sockets and a
//! [`Waker`] and read what arrived. Requests run to completion one at a time on the
//! reactor's thread, so a reply to FLUSH covers every write answered before it. Only a
//! READ or a WRITE on a shared handle may stay in flight ([`BlockConn::start_read`], a
//! read miss; [`Tried::Started`], a write that goes around the cache): the reactor goes
//! on, polls the handle's completion descriptor too, queues the reply when
//! [`BlockConn::reap`] reports it (replies may leave out of order; NBD matches them by
//! cookie), and once a pass's replies are sent runs [`BlockConn::after_replies`]. A client
//! is not finished while requests of it are in flight.
//!
//! A WRITE the shared handle cannot take yet (a paced or full cache:
//! [`BlockConn::try_write`] hands it back) is parked on its client with a copy of its
//! payload and tried again, oldest first, every pass and at least every
//! [`PARKED_RETRY`]. Meanwhile READs of other ranges pass it, later WRITEs join it in
//! order (up to `client::PARKED_BYTES` per client), and anything else of that client (a READ
//! of a parked range, FLUSH, TRIM, DISC) waits for it: a paced write no longer holds up
//! every client of the reactor, and nothing a client could observe is reordered (NBD
//! orders nothing among requests in flight; these rules keep a client's own writes and
//! its reads of them in order anyway). A client is not finished while writes of it wait.
//!
//! Group commit: before any reply leaves (at the end of the pass, or early when a client's
//! output passes `client::FLUSH_AT`), the handles that executed requests are committed
//! ([`BlockConn::commit`]): one sync covers every write of the pass, and no write is
//! answered before it is durable. A failed commit disconnects the clients of that handle
//! without sending their queued replies (an unanswered write is never a lie).
//!
//! Per client: an input buffer holding at most one request (header and WRITE payload, up to
//! 32 MiB) plus a read chunk, and an output buffer of replies not yet taken by the socket.
//! A client whose output backlog passes `client::OUT_LIMIT` is neither read from nor served until
//! the backlog drains, which bounds the memory a client that does not read its replies can
//! make us hold. READ data is read by the device straight into the output buffer and WRITE
//! data is passed to it straight from the input buffer; both buffers only grow (amortised
//! doubling, bounded), so the hot path allocates nothing per request.
//!
//! Errors: a request that fails validation or on the device gets its NBD error and the
//! connection stays up; an oversized WRITE is refused and its payload skipped without being
//! buffered; a bad magic, end of file or DISC stops reading that client, which is closed
//! once its pending replies are sent (or it took none for the grace period); socket errors
//! close it at once. Only that client is affected.
//!
//! Shutdown: when `halt` is raised the reactor stops reading, executes the requests it holds
//! in full, sends the replies and closes each client; clients still holding replies when the
//! grace period ends are closed anyway, then the thread ends.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) use super::client::Handoff;
use super::client::{Client, Reads, FLUSH_AT};
use super::proto::{self, Limits};
use super::{BlockConn, BlockTarget};
use crate::env::posix::poll::{Interest, PollSet, Waker};

/// How often a reactor tries again a write its handle handed back (`BlockConn::try_write`),
/// at least: poll(2) waits in whole milliseconds.
const PARKED_RETRY: Duration = Duration::from_millis(1);

/// Longest poll when nothing is due: the waker announces clients and shutdown, so this is
/// only a backstop.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How often reactor 0, done with its own clients at shutdown, looks whether the other
/// reactors have ended while it keeps running the background work for them.
const LINGER_POLL: Duration = Duration::from_millis(10);
/// At most this many extra reads per pass to grow a group commit: bounds how long the
/// replies of the first requests of a pass wait for their sync.
const GROUP_ROUNDS: usize = 8;

/// Counts a reactor thread as running until it ends (or never starts: it is made before the
/// thread and moved into it).
pub(super) struct Alive(Arc<AtomicUsize>);

impl Alive {
    pub fn new(running: &Arc<AtomicUsize>) -> Alive {
        running.fetch_add(1, Ordering::AcqRel);
        Alive(Arc::clone(running))
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One reactor thread's state (see the module documentation).
pub(super) struct Reactor<T: BlockTarget> {
    pub index: usize,
    pub target: Arc<T>,
    /// The handle shared by all this reactor's clients (targets that share handles).
    pub shared: Option<T::Conn>,
    pub inbox: Receiver<Handoff<T::Conn>>,
    pub waker: Arc<Waker>,
    /// Raised once by the server to stop; followed by a wake-up.
    pub halt: Arc<AtomicBool>,
    /// Reactors whose thread has not ended yet (this one included).
    pub running: Arc<AtomicUsize>,
    pub limits: Limits,
    pub grace: Duration,
}

impl<T: BlockTarget> Reactor<T> {
    pub fn run(mut self) {
        let mut clients: Vec<Client<T::Conn>> = Vec::new();
        let mut set = PollSet::new();
        let mut deadline: Option<Instant> = None;
        let mut background_due = (self.index == 0 && self.shared.is_some()).then(Instant::now);
        let mut poll_failed = false;
        let mut reads = Reads::default();
        loop {
            if deadline.is_none() && self.halt.load(Ordering::Acquire) {
                deadline = Some(Instant::now() + self.grace);
                for c in &mut clients {
                    c.reading = false;
                }
            }
            self.admit(&mut clients, deadline.is_some());
            if background_due.is_some_and(|due| Instant::now() >= due) {
                background_due = self.background();
            }
            self.execute(&mut clients, &mut reads);
            let now = Instant::now();
            let mut i = 0;
            while i < clients.len() {
                clients[i].send(now);
                if clients[i].finished(&self.limits, now, self.grace) {
                    clients.swap_remove(i).close();
                } else {
                    i += 1;
                }
            }
            // Work the replies must not wait for (caching the data of answered misses).
            if let Some(s) = self.shared.as_mut() {
                s.after_replies();
            }
            if deadline.is_some_and(|d| clients.is_empty() || now >= d) {
                break;
            }

            set.clear();
            set.add(self.waker.as_fd(), Interest::READ);
            for c in &clients {
                set.add(c.peer.as_fd(), c.interest(&self.limits));
            }
            // Requests in flight: their completions wake the reactor too (reaped in `execute`).
            if let Some(fd) = self
                .shared
                .as_ref()
                .filter(|s| s.in_flight() > 0)
                .and_then(|s| s.completions_fd())
            {
                set.add(fd, Interest::READ);
            }
            let mut wait = IDLE_WAIT;
            for t in [background_due, deadline].into_iter().flatten() {
                wait = wait.min(t.saturating_duration_since(now));
            }
            if clients.iter().any(|c| !c.parked.is_empty()) {
                wait = wait.min(PARKED_RETRY);
            }
            if self.shared.as_ref().is_some_and(|s| s.completions_ready()) {
                wait = Duration::ZERO;
            }
            if clients.iter().any(|c| !c.reading) {
                // Clients that no longer read are closed after `grace` without progress.
                wait = wait.min(self.grace);
            }
            let all_ready = match set.wait(wait) {
                Ok(_) => false,
                Err(e) => {
                    // Only resource exhaustion gets here. Every socket operation below is
                    // non-blocking, so pretending everything is ready is always safe; the
                    // pause keeps that from spinning.
                    if !poll_failed {
                        eprintln!("pcache nbd: reactor {}: poll: {e}", self.index);
                        poll_failed = true;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    true
                }
            };
            if all_ready || set.ready(0).read {
                self.waker.reset();
            }
            let now = Instant::now();
            for (i, c) in clients.iter_mut().enumerate() {
                let r = set.ready(i + 1);
                if all_ready || r.read {
                    c.receive(&self.limits, now);
                }
                if all_ready || r.write {
                    c.send(now);
                }
            }
        }
        for c in clients {
            c.close();
        }
        // Clients handed over too late are dropped with the inbox, which closes them.
        // Requests on other reactors may be waiting for background progress (a full cache):
        // keep providing it until they are gone.
        while let Some(due) = background_due {
            if self.running.load(Ordering::Acquire) <= 1 {
                break;
            }
            let now = Instant::now();
            if now >= due {
                background_due = self.background();
            } else {
                std::thread::sleep((due - now).min(LINGER_POLL));
            }
        }
    }

    /// Takes over the clients handed to this reactor; while stopping, closes them instead.
    fn admit(&mut self, clients: &mut Vec<Client<T::Conn>>, stopping: bool) {
        while let Ok(h) = self.inbox.try_recv() {
            if stopping {
                continue;
            }
            if h.conn.is_none() && self.shared.is_none() {
                // The server gives every client a handle one way or the other.
                eprintln!("pcache nbd: connection {}: no device handle", h.id);
                continue;
            }
            clients.push(Client::new(h));
        }
    }

    /// Runs the target's background step; returns when it is due again.
    fn background(&mut self) -> Option<Instant> {
        let conn = self.shared.as_mut()?;
        let again = self.target.background(conn, &self.waker)?;
        Some(Instant::now() + again)
    }

    /// Executes every complete request buffered, one per client per round, then commits
    /// what they did, so every reply queued may be sent. While a commit would sync, it
    /// first reads (without waiting) and executes what the clients sent meanwhile, up to
    /// [`GROUP_ROUNDS`] times: a client at queue depth 32 usually has the rest of its queue
    /// in the socket, and one sync then covers all of it.
    fn execute(&mut self, clients: &mut [Client<T::Conn>], reads: &mut Reads) {
        let mut any = self.reap(clients, reads);
        for c in clients.iter_mut() {
            any |= c.retry_parked(&mut self.shared, reads);
        }
        let mut rounds = 0;
        loop {
            any |= self.execute_buffered(clients, reads);
            if !any || rounds == GROUP_ROUNDS || !self.wants_commit(clients) {
                break;
            }
            rounds += 1;
            let now = Instant::now();
            let mut more = false;
            for c in clients.iter_mut() {
                more |= c.receive(&self.limits, now);
            }
            if !more {
                break;
            }
        }
        // Reads that completed while the others ran: their replies go out with this pass.
        any |= self.reap(clients, reads);
        if any {
            self.commit(clients);
        }
    }

    /// Queues the replies of the requests that completed on the shared handle; returns
    /// whether there were any.
    fn reap(&mut self, clients: &mut [Client<T::Conn>], reads: &mut Reads) -> bool {
        let Some(s) = self.shared.as_mut() else {
            return false;
        };
        if s.in_flight() == 0 {
            return false;
        }
        let mut any = false;
        s.reap(&mut |tag, r| {
            any = true;
            let Some(k) = reads.started.iter().position(|p| p.tag == tag) else {
                return;
            };
            let p = reads.started.swap_remove(k);
            // A client that went away meanwhile gets nothing.
            if let Some(c) = clients.iter_mut().find(|c| c.id == p.client) {
                c.inflight -= 1;
                if p.write {
                    let errno = r.as_ref().map_or_else(proto::errno_of, |_| 0);
                    c.output.put(&proto::simple_reply(errno, p.cookie));
                } else {
                    c.read_done(p.cookie, p.off, r);
                }
            }
        });
        any
    }

    fn wants_commit(&self, clients: &[Client<T::Conn>]) -> bool {
        self.shared.as_ref().is_some_and(|s| s.wants_commit())
            || clients
                .iter()
                .any(|c| c.conn.as_ref().is_some_and(|s| s.wants_commit()))
    }

    /// Executes every complete request buffered, one per client per round; returns whether
    /// it executed any.
    fn execute_buffered(&mut self, clients: &mut [Client<T::Conn>], reads: &mut Reads) -> bool {
        let mut any = false;
        loop {
            let mut progressed = false;
            for c in clients.iter_mut() {
                if c.step(&mut self.shared, &self.limits, reads) {
                    progressed = true;
                    if c.output.len() >= FLUSH_AT {
                        // Its replies may follow requests on the shared handle too.
                        let shared = match self.shared.as_mut() {
                            Some(s) => s.commit(),
                            None => Ok(()),
                        };
                        c.commit(shared);
                        c.send(Instant::now());
                    }
                }
            }
            any |= progressed;
            if !progressed {
                return any;
            }
        }
    }

    /// Commits the shared handle and every client's own; clients whose handle failed to
    /// commit are disconnected with their replies unsent.
    fn commit(&mut self, clients: &mut [Client<T::Conn>]) {
        let shared = match self.shared.as_mut() {
            Some(s) => s.commit(),
            None => Ok(()),
        };
        if let Err(e) = &shared {
            eprintln!(
                "pcache nbd: reactor {}: commit failed, disconnecting its clients: {e}",
                self.index
            );
        }
        for c in clients.iter_mut() {
            c.commit(clone_result(&shared));
        }
    }
}

fn clone_result(r: &io::Result<()>) -> io::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    }
}
