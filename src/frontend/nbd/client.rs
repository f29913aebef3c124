//! One NBD client in transmission, as a reactor (`reactor`) serves it: its socket, an
//! input buffer holding at most one request plus a read chunk, an output buffer of
//! replies not yet taken by the socket, the WRITEs its shared handle handed back to wait
//! (parked), and the requests of it in flight on that handle ([`Reads`]).
//!
//! Invariants: a client executes its requests in order, one at a time; parked WRITEs are
//! passed only by READs of other ranges and joined only by WRITEs (in order, within
//! [`PARKED_BYTES`]); the buffers only grow (amortised doubling, bounded by
//! [`MAX_INPUT`] and [`MAX_OUTPUT`]), so the hot path allocates nothing per request; a
//! client whose output passes [`OUT_LIMIT`] is neither read from nor served. The
//! reactor's module documentation gives the whole protocol.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::bytequeue::ByteQueue;
use super::proto::{self, Command, Limits, Request, REQUEST_LEN};
use super::sockets::{is_disconnect, violation, Peer, Slot};
use super::{BlockConn, Filled, Tried};
use crate::env::posix::block::is_zero;
use crate::env::posix::poll::Interest;

/// Replies are sent once this much is queued even while more requests are being executed,
/// so a long batch does not hold back the replies it already produced.
pub(super) const FLUSH_AT: usize = 256 << 10;
/// Payload bytes of WRITEs one client may have waiting (one WRITE of any size may).
pub(super) const PARKED_BYTES: usize = 8 << 20;
/// Smallest read from a socket: enough for many pipelined small requests per syscall.
pub(super) const READ_CHUNK: usize = 64 << 10;
/// Output backlog past which a client is neither read from nor served.
pub(super) const OUT_LIMIT: usize = 4 << 20;
/// Largest input buffer: one maximal WRITE plus a read chunk.
pub(super) const MAX_INPUT: usize = REQUEST_LEN + proto::MAX_PAYLOAD as usize + READ_CHUNK;
/// Largest output buffer: a backlog just under the limit plus one maximal READ reply.
pub(super) const MAX_OUTPUT: usize =
    OUT_LIMIT + proto::read_head_len(true) + proto::MAX_PAYLOAD as usize;

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

/// Requests started on the shared handle and not yet answered (`BlockConn::start_read`,
/// [`Tried::Started`]).
#[derive(Default)]
pub(super) struct Reads {
    pub next_tag: u64,
    pub started: Vec<Started>,
}

impl Reads {
    /// Records that the request `tag` (from `next_tag`) of `c` is in flight.
    pub fn track<C>(&mut self, c: &mut Client<C>, cookie: u64, off: u64, write: bool) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.started.push(Started {
            tag,
            client: c.id,
            cookie,
            off,
            write,
        });
        c.inflight += 1;
    }
}

pub(super) struct Started {
    pub tag: u64,
    pub client: u64,
    pub cookie: u64,
    pub off: u64,
    pub write: bool,
}

/// One client in transmission.
pub(super) struct Client<C> {
    pub id: u64,
    pub peer: Peer,
    pub conn: Option<C>,
    pub input: ByteQueue,
    pub output: ByteQueue,
    /// Payload bytes of a refused oversized WRITE still to be read and dropped.
    pub skip: u64,
    /// More input is welcome (false after end of file, DISC, a framing error, shutdown).
    pub reading: bool,
    /// Buffered requests may still be executed (false after DISC or a framing error).
    pub executing: bool,
    /// The socket failed: close at once.
    pub dead: bool,
    /// Why the connection ended, logged when it closes (unless the client just left).
    pub error: Option<io::Error>,
    /// Last time the socket moved data; a client that no longer reads is closed when it
    /// takes no replies for the grace period.
    pub last_progress: Instant,
    /// Its requests in flight on the shared handle (answered by `Reactor::reap`).
    pub inflight: usize,
    /// WRITEs the shared handle handed back to wait (`BlockConn::try_write`), in
    /// arrival order, tried again in that order; later WRITEs join them while they
    /// wait (up to PARKED_BYTES), and READs of other ranges pass them.
    pub parked: VecDeque<Parked>,
    pub parked_bytes: usize,
    /// Payload buffers of WRITEs no longer waiting, reused.
    pub spare: Vec<Vec<u8>>,
    /// Structured replies were negotiated: READ replies are chunks (`proto::read_reply`).
    pub structured: bool,
    pub _slot: Slot,
}

/// A WRITE waiting on its reactor (`Client::parked`).
pub(super) struct Parked {
    cookie: u64,
    off: u64,
    data: Vec<u8>,
    fua: bool,
    /// When it was parked; None until it was first tried (it was parked behind others).
    since: Option<Instant>,
}

impl<C: BlockConn> Client<C> {
    pub fn new(h: Handoff<C>) -> Client<C> {
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
            inflight: 0,
            parked: VecDeque::new(),
            parked_bytes: 0,
            spare: Vec::new(),
            structured: h.structured,
            _slot: h.slot,
        }
    }

    pub fn interest(&self, lim: &Limits) -> Interest {
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
    pub fn receive(&mut self, lim: &Limits, now: Instant) -> bool {
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
    pub fn send(&mut self, now: Instant) {
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
    pub fn commit(&mut self, shared: io::Result<()>) {
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

    pub fn finished(&self, lim: &Limits, now: Instant, grace: Duration) -> bool {
        if self.dead {
            return true;
        }
        if self.reading {
            return false;
        }
        let idle = self.output.is_empty()
            && !self.has_request(lim)
            && self.inflight == 0
            && self.parked.is_empty();
        idle || now.duration_since(self.last_progress) > grace
    }

    pub fn close(self) {
        if let Some(e) = &self.error {
            if !is_disconnect(e) {
                eprintln!("pcache nbd: connection {}: {e}", self.id);
            }
        }
    }

    /// Queues the reply of a read that completed later (`BlockConn::start_read`).
    pub fn read_done(&mut self, cookie: u64, off: u64, r: io::Result<&[u8]>) {
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
    /// wait; returns whether any ran or started (the replies of those that ran are
    /// queued).
    pub fn retry_parked(&mut self, shared: &mut Option<C>, reads: &mut Reads) -> bool {
        let mut any = false;
        while let Some(p) = self.parked.front_mut() {
            let Some(conn) = shared.as_mut().filter(|_| !self.dead) else {
                break;
            };
            // None on its first try (it was parked behind others untried).
            let waited = p.since.map(|t| t.elapsed());
            match conn.try_write(p.off, &p.data, p.fua, waited, reads.next_tag) {
                Tried::Wait => {
                    p.since.get_or_insert_with(Instant::now);
                    break;
                }
                Tried::Done(r) => {
                    let errno = r.as_ref().map_or_else(proto::errno_of, |_| 0);
                    self.output.put(&proto::simple_reply(errno, p.cookie));
                }
                Tried::Started => {
                    let (cookie, off) = (p.cookie, p.off);
                    reads.track(self, cookie, off, true);
                }
            }
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
    pub fn step(&mut self, shared: &mut Option<C>, lim: &Limits, reads: &mut Reads) -> bool {
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
                    match conn.start_read(off, &mut room[hl..hl + len], reads.next_tag) {
                        Some(r) => r,
                        None => {
                            // In flight: the reply is queued when it completes.
                            reads.track(self, req.cookie, off, false);
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
                    conn.try_write(off, body, fua, None, reads.next_tag)
                } else {
                    Tried::Wait
                };
                match tried {
                    Tried::Done(r) => r,
                    Tried::Started => {
                        // In flight: the reply is queued when it completes.
                        reads.track(self, req.cookie, off, true);
                        self.input.consume(total);
                        return true;
                    }
                    Tried::Wait => {
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
