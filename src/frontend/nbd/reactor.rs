//! The transmission phase: reactor threads, each serving many clients with non-blocking
//! sockets, poll(2) and one device handle.
//!
//! A reactor loops: take over the clients handed to it, run the target's background step if
//! it is reactor 0 and the target has one, execute every complete request its clients have
//! buffered, round robin one request per client per round (so clients interleave at request
//! granularity and none starves another), send the replies, then poll the sockets and a
//! [`Waker`] and read what arrived. Requests run to completion one at a time on the
//! reactor's thread, so a reply to FLUSH covers every write answered before it. Only a
//! READ on a shared handle may stay in flight ([`BlockConn::start_read`]): the reactor
//! goes on, polls the handle's completion descriptor too, queues the reply when
//! [`BlockConn::reap`] reports it (replies may leave out of order; NBD matches them by
//! cookie), and once a pass's replies are sent runs [`BlockConn::after_replies`]. A client
//! is not finished while reads of it are in flight.
//!
//! A WRITE the shared handle cannot take yet (a paced or full cache:
//! [`BlockConn::try_write`] hands it back) is parked on its client with a copy of its
//! payload and tried again, oldest first, every pass and at least every
//! [`PARKED_RETRY`]. Meanwhile READs of other ranges pass it, later WRITEs join it in
//! order (up to [`PARKED_BYTES`] per client), and anything else of that client (a READ
//! of a parked range, FLUSH, TRIM, DISC) waits for it: a paced write no longer holds up
//! every client of the reactor, and nothing a client could observe is reordered (NBD
//! orders nothing among requests in flight; these rules keep a client's own writes and
//! its reads of them in order anyway). A client is not finished while writes of it wait.
//!
//! Group commit: before any reply leaves (at the end of the pass, or early when a client's
//! output passes [`FLUSH_AT`]), the handles that executed requests are committed
//! ([`BlockConn::commit`]): one sync covers every write of the pass, and no write is
//! answered before it is durable. A failed commit disconnects the clients of that handle
//! without sending their queued replies (an unanswered write is never a lie).
//!
//! Per client: an input buffer holding at most one request (header and WRITE payload, up to
//! 32 MiB) plus a read chunk, and an output buffer of replies not yet taken by the socket.
//! A client whose output backlog passes [`OUT_LIMIT`] is neither read from nor served until
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

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bytequeue::ByteQueue;
use super::proto::{self, Command, Limits, Request, REQUEST_LEN};
use super::sockets::{is_disconnect, violation, Peer, Slot};
use super::{BlockConn, BlockTarget, Filled};
use crate::env::posix::block::is_zero;
use crate::env::posix::poll::{Interest, PollSet, Waker};

/// How often a reactor tries again a write its handle handed back (`BlockConn::try_write`),
/// at least: poll(2) waits in whole milliseconds.
const PARKED_RETRY: Duration = Duration::from_millis(1);
/// Payload bytes of WRITEs one client may have waiting (one WRITE of any size may).
const PARKED_BYTES: usize = 8 << 20;

/// Smallest read from a socket: enough for many pipelined small requests per syscall.
const READ_CHUNK: usize = 64 << 10;
/// Replies are sent once this much is queued even while more requests are being executed,
/// so a long batch does not hold back the replies it already produced.
const FLUSH_AT: usize = 256 << 10;
/// Output backlog past which a client is neither read from nor served.
const OUT_LIMIT: usize = 4 << 20;
/// Largest input buffer: one maximal WRITE plus a read chunk.
const MAX_INPUT: usize = REQUEST_LEN + proto::MAX_PAYLOAD as usize + READ_CHUNK;
/// Largest output buffer: a backlog just under the limit plus one maximal READ reply.
const MAX_OUTPUT: usize = OUT_LIMIT + proto::read_head_len(true) + proto::MAX_PAYLOAD as usize;
/// Longest poll when nothing is due: the waker announces clients and shutdown, so this is
/// only a backstop.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How often reactor 0, done with its own clients at shutdown, looks whether the other
/// reactors have ended while it keeps running the background work for them.
const LINGER_POLL: Duration = Duration::from_millis(10);
/// At most this many extra reads per pass to grow a group commit: bounds how long the
/// replies of the first requests of a pass wait for their sync.
const GROUP_ROUNDS: usize = 8;

/// A client that finished its handshake, on its way to a reactor.
pub(super) struct Handoff<C> {
    pub id: u64,
    /// Non-blocking already.
    pub peer: Peer,
    /// The client's own device handle, unless the target shares one per reactor.
    pub conn: Option<C>,
    /// Bytes the handshake read past the client's last option (pipelined requests).
    pub pending: Vec<u8>,
    pub slot: Slot,
    /// Structured replies were negotiated: READs are answered with chunks.
    pub structured: bool,
}

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
            // Reads in flight: their completions wake the reactor too (reaped in `execute`).
            if let Some(fd) = self
                .shared
                .as_ref()
                .filter(|s| s.reads_in_flight() > 0)
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
            any |= c.retry_parked(&mut self.shared);
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

    /// Queues the replies of the reads that completed on the shared handle; returns
    /// whether there were any.
    fn reap(&mut self, clients: &mut [Client<T::Conn>], reads: &mut Reads) -> bool {
        let Some(s) = self.shared.as_mut() else {
            return false;
        };
        if s.reads_in_flight() == 0 {
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
                c.reads -= 1;
                c.read_done(p.cookie, p.off, r);
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

/// Reads started on the shared handle and not yet answered (`BlockConn::start_read`).
#[derive(Default)]
struct Reads {
    next_tag: u64,
    started: Vec<Started>,
}

struct Started {
    tag: u64,
    client: u64,
    cookie: u64,
    off: u64,
}

fn clone_result(r: &io::Result<()>) -> io::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    }
}

/// One client in transmission.
struct Client<C> {
    id: u64,
    peer: Peer,
    conn: Option<C>,
    input: ByteQueue,
    output: ByteQueue,
    /// Payload bytes of a refused oversized WRITE still to be read and dropped.
    skip: u64,
    /// More input is welcome (false after end of file, DISC, a framing error, shutdown).
    reading: bool,
    /// Buffered requests may still be executed (false after DISC or a framing error).
    executing: bool,
    /// The socket failed: close at once.
    dead: bool,
    /// Why the connection ended, logged when it closes (unless the client just left).
    error: Option<io::Error>,
    /// Last time the socket moved data; a client that no longer reads is closed when it
    /// takes no replies for the grace period.
    last_progress: Instant,
    /// Its reads in flight on the shared handle (answered by `Reactor::reap`).
    reads: usize,
    /// WRITEs the shared handle handed back to wait (`BlockConn::try_write`), in
    /// arrival order, tried again in that order; later WRITEs join them while they
    /// wait (up to PARKED_BYTES), and READs of other ranges pass them.
    parked: VecDeque<Parked>,
    parked_bytes: usize,
    /// Payload buffers of WRITEs no longer waiting, reused.
    spare: Vec<Vec<u8>>,
    /// Structured replies were negotiated: READ replies are chunks (`proto::read_reply`).
    structured: bool,
    _slot: Slot,
}

/// A WRITE waiting on its reactor (`Client::parked`).
struct Parked {
    cookie: u64,
    off: u64,
    data: Vec<u8>,
    fua: bool,
    /// When it was parked; None until it was first tried (it was parked behind others).
    since: Option<Instant>,
}

impl<C: BlockConn> Client<C> {
    fn new(h: Handoff<C>) -> Client<C> {
        Client {
            id: h.id,
            peer: h.peer,
            conn: h.conn,
            input: ByteQueue::from_vec(h.pending, MAX_INPUT),
            output: ByteQueue::new(MAX_OUTPUT),
            skip: 0,
            reading: true,
            executing: true,
            dead: false,
            error: None,
            last_progress: Instant::now(),
            reads: 0,
            parked: VecDeque::new(),
            parked_bytes: 0,
            spare: Vec::new(),
            structured: h.structured,
            _slot: h.slot,
        }
    }

    fn interest(&self, lim: &Limits) -> Interest {
        Interest {
            read: self.wants_input(lim),
            write: !self.output.is_empty(),
        }
    }

    /// Whether to read more: not while a request waits for the output backlog to drain, so
    /// the input holds at most one request plus a chunk.
    fn wants_input(&self, lim: &Limits) -> bool {
        self.reading && !self.dead && self.output.len() < OUT_LIMIT && !self.has_request(lim)
    }

    /// Bytes still missing for the next request to be complete (a header if none is
    /// buffered; an oversized WRITE counts as its header only, its payload is skipped).
    fn missing(&self, lim: &Limits) -> usize {
        let data = self.input.data();
        let need = match data.first_chunk::<REQUEST_LEN>().and_then(Request::parse) {
            Some(req) if req.payload_len() <= lim.max_payload => {
                REQUEST_LEN + req.payload_len() as usize
            }
            _ => REQUEST_LEN,
        };
        need.saturating_sub(data.len())
    }

    /// Reads what the socket has, into room for at least the rest of the current request;
    /// returns whether it read any bytes.
    fn receive(&mut self, lim: &Limits, now: Instant) -> bool {
        // Readiness may also be a hang-up or an error, reported whatever we asked for.
        if !self.wants_input(lim) {
            return false;
        }
        let room = self.input.spare(self.missing(lim).max(READ_CHUNK));
        match self.peer.read(room) {
            Ok(0) => {
                self.reading = false;
                self.last_progress = now;
            }
            Ok(n) => {
                self.input.commit(n);
                self.last_progress = now;
                let dropped = self
                    .input
                    .len()
                    .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                self.input.consume(dropped);
                self.skip -= dropped as u64;
                return true;
            }
            Err(e) if would_block(&e) => {}
            Err(e) => self.fail(e),
        }
        false
    }

    /// Writes queued replies until the socket takes no more.
    fn send(&mut self, now: Instant) {
        while !self.dead && !self.output.is_empty() {
            match self.peer.write(self.output.data()) {
                Ok(0) => self.fail(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.output.consume(n);
                    self.last_progress = now;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if would_block(&e) => return,
                Err(e) => self.fail(e),
            }
        }
    }

    fn fail(&mut self, e: io::Error) {
        self.dead = true;
        self.error.get_or_insert(e);
    }

    /// Commits the client's own handle; `shared` is the outcome of committing the shared
    /// one. On failure the client dies with its queued replies unsent.
    fn commit(&mut self, shared: io::Result<()>) {
        let r = match self.conn.as_mut() {
            Some(own) => own.commit(),
            None => shared,
        };
        if let Err(e) = r {
            self.output.consume(self.output.len());
            self.fail(e);
        }
    }

    /// A framing error: nothing more can be parsed; send what is queued, then close.
    fn hang_up(&mut self, e: io::Error) {
        self.reading = false;
        self.executing = false;
        self.error.get_or_insert(e);
    }

    /// Whether a complete request (or one to refuse without its payload) is buffered.
    fn has_request(&self, lim: &Limits) -> bool {
        self.executing
            && !self.dead
            && self.skip == 0
            && self.input.len() >= REQUEST_LEN
            && self.missing(lim) == 0
    }

    fn finished(&self, lim: &Limits, now: Instant, grace: Duration) -> bool {
        if self.dead {
            return true;
        }
        if self.reading {
            return false;
        }
        let idle = self.output.is_empty()
            && !self.has_request(lim)
            && self.reads == 0
            && self.parked.is_empty();
        idle || now.duration_since(self.last_progress) > grace
    }

    fn close(self) {
        if let Some(e) = &self.error {
            if !is_disconnect(e) {
                eprintln!("pcache nbd: connection {}: {e}", self.id);
            }
        }
    }

    /// Queues the reply of a read that completed later (`BlockConn::start_read`).
    fn read_done(&mut self, cookie: u64, off: u64, r: io::Result<&[u8]>) {
        let (data, errno) = r.map_or_else(|e| (&[][..], proto::errno_of(&e)), |d| (d, 0));
        let zero = self.structured && is_zero(data); // a hole chunk: nothing to copy
        let head = proto::read_head_len(self.structured);
        let room = self
            .output
            .spare((head + data.len()).max(proto::READ_REPLY_MIN));
        if !zero {
            room[head..head + data.len()].copy_from_slice(data);
        }
        let n = proto::read_reply(room, self.structured, cookie, off, data.len(), errno, zero);
        self.output.commit(n);
    }

    /// Tries the parked WRITEs again, oldest first, up to the first that must still
    /// wait; returns whether any ran (their replies are queued).
    fn retry_parked(&mut self, shared: &mut Option<C>) -> bool {
        let mut any = false;
        while let Some(p) = self.parked.front_mut() {
            let Some(conn) = shared.as_mut().filter(|_| !self.dead) else {
                break;
            };
            // None on its first try (it was parked behind others untried).
            let waited = p.since.map(|t| t.elapsed());
            let Some(r) = conn.try_write(p.off, &p.data, p.fua, waited) else {
                p.since.get_or_insert_with(Instant::now);
                break;
            };
            let errno = r.as_ref().map_or_else(proto::errno_of, |_| 0);
            self.output.put(&proto::simple_reply(errno, p.cookie));
            let p = self.parked.pop_front().expect("front exists");
            self.parked_bytes -= p.data.len();
            self.spare.push(p.data);
            any = true;
        }
        any
    }

    /// Executes the next buffered request, if it is complete and the output backlog allows;
    /// returns whether it did. A read on the shared handle may be left in flight (`reads`),
    /// its reply queued when it completes.
    fn step(&mut self, shared: &mut Option<C>, lim: &Limits, reads: &mut Reads) -> bool {
        if !self.has_request(lim) || self.output.len() >= OUT_LIMIT {
            return false;
        }
        let data = self.input.data();
        let Some(req) = data.first_chunk::<REQUEST_LEN>().and_then(Request::parse) else {
            self.hang_up(violation("bad request magic"));
            return true;
        };
        let verdict = proto::validate(&req, lim);
        let payload = req.payload_len();
        if payload > lim.max_payload {
            // Refused already (EINVAL); the header framed it, so skipping keeps the stream
            // in sync without holding the data.
            let errno = verdict.err().unwrap_or(proto::EINVAL);
            self.output.put(&proto::simple_reply(errno, req.cookie));
            let total = REQUEST_LEN as u64 + u64::from(payload);
            let here = self.input.len().min(REQUEST_LEN + payload as usize);
            self.input.consume(here);
            self.skip = total - here as u64;
            return true;
        }
        let total = REQUEST_LEN + payload as usize;
        let body = &data[REQUEST_LEN..total];
        let cmd = match verdict {
            Ok(c) => c,
            Err(errno) => {
                // A refused READ still gets a READ's reply form (a chunk when structured).
                let chunk = self.structured && req.kind == proto::CMD_READ;
                let room = self.output.spare(proto::READ_REPLY_MIN);
                let n = proto::read_reply(room, chunk, req.cookie, req.offset, 0, errno, false);
                self.output.commit(n);
                self.input.consume(total);
                return true;
            }
        };
        if !self.parked.is_empty() {
            // Waiting WRITEs are passed only by READs of other ranges and joined by
            // WRITEs (kept in order behind them, within PARKED_BYTES); anything else
            // waits for them, as it would have with them run to completion.
            let passes = match cmd {
                Command::Read { off, len } => self
                    .parked
                    .iter()
                    .all(|p| off + u64::from(len) <= p.off || off >= p.off + p.data.len() as u64),
                Command::Write { len, .. } => self.parked_bytes + len as usize <= PARKED_BYTES,
                _ => false,
            };
            if !passes {
                return false;
            }
        }
        let own = self.conn.is_some();
        let Some(conn) = self.conn.as_mut().or(shared.as_mut()) else {
            self.fail(io::Error::other("no device handle"));
            return true;
        };
        let done = match cmd {
            Command::Disc => {
                self.reading = false;
                self.executing = false;
                self.input.consume(total);
                return true;
            }
            Command::Read { off, len } => {
                // The device reads straight into the reply.
                let len = len as usize;
                let hl = proto::read_head_len(self.structured);
                let room = self.output.spare((hl + len).max(proto::READ_REPLY_MIN));
                let r = if len == 0 {
                    Ok(Filled::Data)
                } else if own {
                    conn.read(off, &mut room[hl..hl + len])
                        .map(|()| Filled::Data)
                } else {
                    let tag = reads.next_tag;
                    match conn.start_read(off, &mut room[hl..hl + len], tag) {
                        Some(r) => r,
                        None => {
                            // In flight: the reply is queued when it completes.
                            reads.next_tag += 1;
                            reads.started.push(Started {
                                tag,
                                client: self.id,
                                cookie: req.cookie,
                                off,
                            });
                            self.reads += 1;
                            self.input.consume(total);
                            return true;
                        }
                    }
                };
                let errno = r.as_ref().map_or_else(proto::errno_of, |_| 0);
                // Zero as the handle said, or (for a hole chunk) as the data shows.
                let zero = match r {
                    Ok(Filled::Zero) => true,
                    Ok(Filled::Data) => self.structured && is_zero(&room[hl..hl + len]),
                    Err(_) => false,
                };
                let sent =
                    proto::read_reply(room, self.structured, req.cookie, off, len, errno, zero);
                self.output.commit(sent);
                self.input.consume(total);
                return true;
            }
            Command::Write { off, len, fua } if len > 0 && own => conn.write(off, body, fua),
            Command::Write { off, len, fua } if len > 0 => {
                // Behind waiting WRITEs it waits too (never tried before them).
                let first = self.parked.is_empty();
                let tried = if first {
                    conn.try_write(off, body, fua, None)
                } else {
                    None
                };
                match tried {
                    Some(r) => r,
                    None => {
                        // Kept here, tried again each pass (`retry_parked`); the input
                        // moves on so READs behind it are served meanwhile.
                        let mut data = self.spare.pop().unwrap_or_default();
                        data.clear();
                        data.extend_from_slice(body);
                        self.parked_bytes += data.len();
                        self.parked.push_back(Parked {
                            cookie: req.cookie,
                            off,
                            data,
                            fua,
                            since: first.then(Instant::now),
                        });
                        self.input.consume(total);
                        return true;
                    }
                }
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
        self.output.put(&proto::simple_reply(errno, req.cookie));
        self.input.consume(total);
        true
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
