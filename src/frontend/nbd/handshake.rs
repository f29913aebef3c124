//! The NBD handshake (fixed newstyle): each accepted client's short-lived thread
//! negotiates options (export name, info, structured replies, block sizes),
//! every exchange bounded by `HANDSHAKE_TIMEOUT`, then hands the client to a reactor.
//! Invariants: an option payload is at most 64 KiB; a malformed option gets an NBD error
//! reply, and only an unframeable stream closes the connection.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::thread::{self, JoinHandle};

use super::super::proto::{self, InfoRequest, OptionHeader};
use super::super::reactor::Handoff;
use super::super::sockets::violation;
use super::super::BlockTarget;
use super::*;

/// Registers a new client and starts its handshake thread; a client we cannot register or
/// start a thread for is simply closed.
pub(super) fn start_handshake<T: BlockTarget>(
    id: u64,
    peer: Peer,
    slot: Slot,
    shared: &Arc<Shared<T>>,
) -> Option<JoinHandle<()>> {
    let handle = match peer.try_clone() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("pcache nbd: connection {id}: {e}");
            return None;
        }
    };
    shared
        .registry
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, handle);
    let guard = Deregister {
        id,
        registry: Arc::clone(&shared.registry),
    };
    let shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("nbd-handshake-{id}"))
        .spawn(move || {
            if let Err(e) = handshake(id, peer, slot, guard, &shared) {
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut {
                    eprintln!("pcache nbd: connection {id}: handshake timed out");
                } else if !is_disconnect(&e) {
                    eprintln!("pcache nbd: connection {id}: {e}");
                }
            }
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            // The closure (and with it the guard and the slot) was dropped: all undone.
            eprintln!("pcache nbd: connection {id}: cannot start thread: {e}");
            None
        }
    }
}

/// Runs the handshake of one client and, if it enters transmission, hands it to a reactor.
pub(super) fn handshake<T: BlockTarget>(
    id: u64,
    peer: Peer,
    slot: Slot,
    guard: Deregister,
    shared: &Shared<T>,
) -> io::Result<()> {
    peer.prepare_handshake()?;
    let mut session = Session {
        rd: BufReader::with_capacity(HANDSHAKE_BUF, peer.try_clone()?),
        wr: BufWriter::with_capacity(HANDSHAKE_BUF, peer.try_clone()?),
        cfg: &shared.cfg,
        structured: false,
    };
    let outcome = session.negotiate(&*shared.target, &shared.stop);
    // Best effort on failure: the replies already queued still reach a client that listens.
    let flushed = session.wr.flush();
    let Negotiated::Transmission(conn) = outcome? else {
        return flushed;
    };
    flushed?;
    // Requests the client pipelined behind its last option: the reactor starts with them.
    let pending = session.rd.buffer().to_vec();
    let structured = session.structured;
    drop(session);
    peer.prepare_transmission()?;
    // From here on the reactor owns the socket, including at shutdown.
    drop(guard);
    shared.router.hand_over(Handoff {
        id,
        peer,
        conn,
        pending,
        slot,
        structured,
    });
    Ok(())
}

pub(super) fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// How a handshake ended.
enum Negotiated<C> {
    /// The client aborted or left.
    Left,
    /// The client entered transmission; with its own device handle unless the target
    /// shares handles per reactor.
    Transmission(Option<C>),
}

struct Session<'a> {
    rd: BufReader<Peer>,
    wr: BufWriter<Peer>,
    cfg: &'a NbdServer,
    /// The client asked for structured replies (NBD_OPT_STRUCTURED_REPLY, acknowledged).
    structured: bool,
}

impl Session<'_> {
    /// Handshake and option haggling, up to the client entering transmission (a per-client
    /// device handle is opened then, so clients that only list or query cost no handle) or
    /// leaving.
    fn negotiate<T: BlockTarget>(
        &mut self,
        target: &T,
        stop: &AtomicBool,
    ) -> io::Result<Negotiated<T::Conn>> {
        self.wr.write_all(&proto::NBDMAGIC.to_be_bytes())?;
        self.wr.write_all(&proto::IHAVEOPT.to_be_bytes())?;
        self.wr
            .write_all(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())?;
        self.wr.flush()?;
        let mut b4 = [0u8; 4];
        if !read_full_or_eof(&mut self.rd, &mut b4)? {
            return Ok(Negotiated::Left);
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
                return Ok(Negotiated::Left);
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
                        return Ok(Negotiated::Left);
                    }
                    let conn = if target.share_conns() {
                        None
                    } else {
                        Some(target.connect()?)
                    };
                    self.wr.write_all(&target.size().to_be_bytes())?;
                    self.wr
                        .write_all(&self.transmission_flags(target).to_be_bytes())?;
                    if !no_zeroes {
                        self.wr.write_all(&[0u8; 124])?;
                    }
                    return Ok(Negotiated::Transmission(conn));
                }
                proto::OPT_ABORT => {
                    // The client may already be gone; the reply is a courtesy.
                    let _ = self.option_reply(h.option, proto::REP_ACK, &[]);
                    let _ = self.wr.flush();
                    return Ok(Negotiated::Left);
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
                    if let Some(entered) = self.info_or_go(h.option, &data, target, stop)? {
                        return Ok(entered);
                    }
                }
                proto::OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.option_error(
                            h.option,
                            proto::REP_ERR_INVALID,
                            "STRUCTURED_REPLY takes no data",
                        )?;
                        continue;
                    }
                    self.structured = true;
                    self.option_reply(h.option, proto::REP_ACK, &[])?;
                }
                // TLS, metadata contexts, extended headers and anything newer are not
                // implemented; clients go on without them.
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
    ) -> io::Result<Option<Negotiated<T::Conn>>> {
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
            if target.share_conns() {
                Some(None)
            } else {
                match target.connect() {
                    Ok(c) => Some(Some(c)),
                    Err(e) => {
                        // No option error means "device failed"; POLICY with the reason is
                        // the closest, and the client may retry.
                        let msg = format!("cannot open the device: {e}");
                        self.option_error(option, proto::REP_ERR_POLICY, &msg)?;
                        return Ok(None);
                    }
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
        Ok(conn.map(Negotiated::Transmission))
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
}

/// `read_exact`, except that end-of-file before the first byte is a clean `Ok(false)`: the
/// client hung up between messages.
pub(super) fn read_full_or_eof(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
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
