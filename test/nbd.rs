//! The NBD front end against an in-memory device: the protocol spoken by hand over raw
//! sockets (handshake, every command, every error path, misbehaving clients, shutdown), then
//! real clients nobody here wrote (nbdinfo, qemu-io, fio's nbd engine) when installed; a
//! missing client prints a visible SKIP line instead of failing.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use pcache::frontend::nbd::{BlockConn, BlockTarget, Listener, NbdServer};

// Wire constants, written out independently of the server's `proto` module on purpose.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const T_HAS_FLAGS: u16 = 1;
const T_READ_ONLY: u16 = 1 << 1;
const T_FLUSH: u16 = 1 << 2;
const T_FUA: u16 = 1 << 3;
const T_TRIM: u16 = 1 << 5;
const T_WRITE_ZEROES: u16 = 1 << 6;
const T_MULTI_CONN: u16 = 1 << 8;

const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const TRIM: u16 = 4;
const CACHE: u16 = 5;
const WRITE_ZEROES: u16 = 6;
const BLOCK_STATUS: u16 = 7;
const F_FUA: u16 = 1;
const F_NO_HOLE: u16 = 2;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;
const ESHUTDOWN: u32 = 108;

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// The in-memory device.

#[derive(Default)]
struct Stats {
    connects: AtomicU64,
    flushes: AtomicU64,
    fua_writes: AtomicU64,
    trims: AtomicU64,
    zeroes_may_trim: AtomicU64,
    zeroes_no_hole: AtomicU64,
    /// Calls the server should never have made (out of range or unaligned).
    bad_calls: AtomicU64,
    /// errno returned by any operation touching `fail_at`.
    fail_errno: AtomicI32,
}

#[derive(Clone)]
struct Mem {
    data: Arc<Mutex<Vec<u8>>>,
    block: u32,
    multi_conn: bool,
    fail_at: Option<u64>,
    stats: Arc<Stats>,
}

impl Mem {
    fn new(size: u64, block: u32) -> Mem {
        Mem {
            data: Arc::new(Mutex::new(vec![0; size as usize])),
            block,
            multi_conn: true,
            fail_at: None,
            stats: Arc::default(),
        }
    }

    fn bytes(&self, off: u64, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[off as usize..off as usize + len].to_vec()
    }

    fn fill(&self, off: u64, len: usize, byte: u8) {
        self.data.lock().unwrap()[off as usize..off as usize + len].fill(byte);
    }

    fn stat(&self, f: impl Fn(&Stats) -> &AtomicU64) -> u64 {
        f(&self.stats).load(Ordering::SeqCst)
    }
}

struct MemConn(Mem);

impl MemConn {
    fn check(&self, off: u64, len: u64) -> io::Result<()> {
        let m = &self.0;
        let b = u64::from(m.block);
        let size = m.data.lock().unwrap().len() as u64;
        if off % b != 0 || len % b != 0 || off.checked_add(len).is_none_or(|e| e > size) {
            m.stats.bad_calls.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::other("server passed a bad range"));
        }
        if let Some(f) = m.fail_at {
            if off <= f && f < off + len {
                let errno = m.stats.fail_errno.load(Ordering::SeqCst);
                return Err(if errno == 0 {
                    io::Error::other("injected")
                } else {
                    io::Error::from_raw_os_error(errno)
                });
            }
        }
        Ok(())
    }
}

impl BlockConn for MemConn {
    fn read(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(off, buf.len() as u64)?;
        let d = self.0.data.lock().unwrap();
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }

    fn write(&mut self, off: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.check(off, data.len() as u64)?;
        self.0.data.lock().unwrap()[off as usize..off as usize + data.len()].copy_from_slice(data);
        if fua {
            self.0.stats.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.stats.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn trim(&mut self, off: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.check(off, len)?;
        self.0.fill(off, len as usize, 0);
        self.0.stats.trims.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write_zeroes(&mut self, off: u64, len: u64, may_trim: bool, _fua: bool) -> io::Result<()> {
        self.check(off, len)?;
        self.0.fill(off, len as usize, 0);
        let counter = if may_trim {
            &self.0.stats.zeroes_may_trim
        } else {
            &self.0.stats.zeroes_no_hole
        };
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl BlockTarget for Mem {
    type Conn = MemConn;

    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn block_size(&self) -> u32 {
        self.block
    }

    fn connect(&self) -> io::Result<MemConn> {
        self.stats.connects.fetch_add(1, Ordering::SeqCst);
        Ok(MemConn(self.clone()))
    }

    fn can_multi_conn(&self) -> bool {
        self.multi_conn
    }
}

// ---------------------------------------------------------------------------------------
// A running server on a Unix socket and a TCP port.

struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<io::Result<()>>>,
    sock: PathBuf,
    port: u16,
    mem: Mem,
}

fn unique_path(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("pcache-nbd-{}-{tag}-{n}.sock", std::process::id()))
}

impl Server {
    fn start(mem: Mem, cfg: NbdServer) -> Server {
        let sock = unique_path("srv");
        let listeners = vec![
            Listener::unix(&sock).expect("bind unix"),
            Listener::tcp("127.0.0.1:0").expect("bind tcp"),
        ];
        let port = listeners[1].local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, target) = (Arc::clone(&stop), Arc::new(mem.clone()));
        let handle = thread::spawn(move || cfg.serve(listeners, target, st));
        Server {
            stop,
            handle: Some(handle),
            sock,
            port,
            mem,
        }
    }

    fn raw(&self) -> Raw {
        Raw::unix(&self.sock)
    }

    /// A client that completed NBD_OPT_GO on the default export.
    fn client(&self) -> Raw {
        let mut c = self.raw();
        c.handshake(3);
        c.go_ok("");
        c
    }

    /// Stops the server and returns how long `serve` took to return.
    fn shutdown(&mut self) -> Duration {
        let t = Instant::now();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("serve panicked").expect("serve failed");
        }
        assert_eq!(
            self.mem.stat(|s| &s.bad_calls),
            0,
            "server passed bad ranges"
        );
        t.elapsed()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !thread::panicking() {
            self.shutdown();
        } else {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}

// ---------------------------------------------------------------------------------------
// A hand-written client.

enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Raw {
    s: Sock,
}

struct Reply {
    error: u32,
    cookie: u64,
}

impl Raw {
    fn unix(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect unix");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw { s: Sock::Unix(s) }
    }

    fn tcp(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect tcp");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s: Sock::Tcp(s) }
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    /// Sends what the server still accepts; a misbehaving client may be hung up on midway.
    fn send_lossy(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).expect("recv");
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }

    /// Reads the greeting, checks it, sends the client flags.
    fn handshake(&mut self, client_flags: u32) {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        assert_eq!(self.u16(), 3, "FIXED_NEWSTYLE | NO_ZEROES");
        self.send(&client_flags.to_be_bytes());
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// (option, reply type, data)
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        let opt = self.u32();
        let typ = self.u32();
        let len = self.u32();
        assert!(len < 1 << 20, "absurd option reply length {len}");
        (opt, typ, self.recv(len as usize))
    }

    fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Sends INFO or GO, returns every NBD_REP_INFO payload and the final reply type.
    fn info(&mut self, opt: u32, name: &str, infos: &[u16]) -> (Vec<Vec<u8>>, u32) {
        self.option(opt, &Self::info_data(name, infos));
        let mut got = Vec::new();
        loop {
            let (o, typ, data) = self.option_reply();
            assert_eq!(o, opt);
            if typ == REP_INFO {
                got.push(data);
            } else {
                return (got, typ);
            }
        }
    }

    /// GO that must succeed; returns (size, transmission flags).
    fn go_ok(&mut self, name: &str) -> (u64, u16) {
        let (infos, end) = self.info(OPT_GO, name, &[]);
        assert_eq!(end, REP_ACK);
        let export = infos
            .iter()
            .find(|d| d[0..2] == INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        assert_eq!(export.len(), 12);
        (
            u64::from_be_bytes(export[2..10].try_into().unwrap()),
            u16::from_be_bytes(export[10..12].try_into().unwrap()),
        )
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, off: u64, len: u32, payload: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    fn reply(&mut self) -> Reply {
        assert_eq!(self.u32(), REPLY_MAGIC);
        let error = self.u32();
        let cookie = self.u64();
        Reply { error, cookie }
    }

    /// One request, its reply's error (checking the cookie), and the read data on success.
    fn cmd(&mut self, flags: u16, kind: u16, off: u64, len: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        static COOKIE: AtomicU64 = AtomicU64::new(1);
        let cookie = COOKIE.fetch_add(1, Ordering::SeqCst);
        self.request(flags, kind, cookie, off, len, payload);
        let r = self.reply();
        assert_eq!(r.cookie, cookie);
        let data = if kind == READ && r.error == 0 {
            self.recv(len as usize)
        } else {
            Vec::new()
        };
        (r.error, data)
    }

    fn read(&mut self, off: u64, len: u32) -> Vec<u8> {
        let (e, d) = self.cmd(0, READ, off, len, &[]);
        assert_eq!(e, 0, "read {off}+{len}");
        d
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let (e, _) = self.cmd(0, WRITE, off, data.len() as u32, data);
        assert_eq!(e, 0, "write {off}+{}", data.len());
    }

    /// True when the server closed the connection (end of file or reset) within the timeout.
    fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                // Leftover bytes (e.g. an ACK) before the close.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Handshake and options.

#[test]
fn handshake_list_info_go() {
    let srv = Server::start(
        Mem::new(4 * MIB, 512),
        NbdServer::new().export_name("pc0").description("test disk"),
    );
    let mut c = srv.raw();
    c.handshake(3);

    c.option(OPT_LIST, &[]);
    let (o, typ, data) = c.option_reply();
    assert_eq!((o, typ), (OPT_LIST, REP_SERVER));
    assert_eq!(&data[..4], &3u32.to_be_bytes());
    assert_eq!(&data[4..], b"pc0");
    assert_eq!(c.option_reply().1, REP_ACK);

    c.option(OPT_LIST, b"x");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);

    let (infos, end) = c.info(
        OPT_INFO,
        "",
        &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
    );
    assert_eq!(end, REP_ACK);
    let find = |t: u16| {
        infos
            .iter()
            .find(|d| d[0..2] == t.to_be_bytes())
            .unwrap_or_else(|| panic!("info {t} missing"))
            .clone()
    };
    let export = find(INFO_EXPORT);
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        4 * MIB
    );
    let flags = u16::from_be_bytes(export[10..12].try_into().unwrap());
    let want = T_HAS_FLAGS | T_FLUSH | T_FUA | T_TRIM | T_WRITE_ZEROES | T_MULTI_CONN;
    assert_eq!(flags, want);
    let bs = find(INFO_BLOCK_SIZE);
    let be = |i: usize| u32::from_be_bytes(bs[i..i + 4].try_into().unwrap());
    assert_eq!((be(2), be(6), be(10)), (512, 4096, 32 << 20));
    assert_eq!(&find(INFO_NAME)[2..], b"pc0");
    assert_eq!(&find(INFO_DESCRIPTION)[2..], b"test disk");
    assert_eq!(
        srv.mem.stat(|s| &s.connects),
        0,
        "INFO must not open the device"
    );

    // Unknown name, malformed body, options we do not implement, an oversized option.
    assert_eq!(c.info(OPT_INFO, "other", &[]).1, REP_ERR_UNKNOWN);
    assert_eq!(c.info(OPT_GO, "other", &[]).1, REP_ERR_UNKNOWN);
    let mut bad = Raw::info_data("pc0", &[INFO_NAME]);
    bad.push(0);
    c.option(OPT_INFO, &bad);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.option(OPT_INFO, &[0xff, 0xff, 0xff, 0xff, 0, 0]);
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    for opt in [OPT_STARTTLS, 9, 10, 11, 4, 1234, u32::MAX] {
        c.option(opt, &[]);
        let (o, typ, _) = c.option_reply();
        assert_eq!((o, typ), (opt, REP_ERR_UNSUP), "option {opt}");
    }
    c.option(OPT_INFO, &vec![0u8; 200_000]);
    assert_eq!(c.option_reply().1, REP_ERR_TOO_BIG);

    // Still in sync: GO by the configured name enters transmission.
    assert_eq!(c.go_ok("pc0"), (4 * MIB, want));
    assert_eq!(srv.mem.stat(|s| &s.connects), 1);
    srv.mem.fill(0, 512, 0x42);
    assert_eq!(c.read(0, 512), vec![0x42; 512]);
}

/// With structured replies negotiated, a READ comes back as one chunk flagged DONE:
/// data as OFFSET_DATA (its offset, then the bytes), all-zero data as OFFSET_HOLE (offset
/// and size, no bytes), a refusal as ERROR; other commands keep simple replies.
#[test]
fn structured_replies_answer_reads_with_chunks() {
    const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
    let srv = Server::start(Mem::new(4 * MIB, 512), NbdServer::new().export_name("pc0"));
    let mut c = srv.raw();
    c.handshake(3);
    c.option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    c.go_ok("pc0");
    // (flags, type, cookie, payload) of the next chunk.
    let chunk = |c: &mut Raw| {
        assert_eq!(c.u32(), STRUCTURED_MAGIC);
        let (flags, ty, cookie) = (c.u16(), c.u16(), c.u64());
        let len = c.u32() as usize;
        (flags, ty, cookie, c.recv(len))
    };
    let data = pattern(1, 8192);
    c.write(4096, &data); // a simple reply
    c.request(0, READ, 7, 4096, 8192, &[]);
    let (flags, ty, cookie, p) = chunk(&mut c);
    assert_eq!((flags, ty, cookie), (1, 1, 7), "OFFSET_DATA, DONE");
    assert_eq!(&p[..8], &4096u64.to_be_bytes());
    assert_eq!(&p[8..], &data[..]);
    // Never written, and written with zeros: holes, no data on the wire.
    c.write(0, &[0; 512]);
    for (cookie, off, len) in [(8u64, 65536u64, 65536u32), (9, 0, 512), (10, 0, 4096)] {
        c.request(0, READ, cookie, off, len, &[]);
        let (flags, ty, k, p) = chunk(&mut c);
        assert_eq!((flags, ty, k), (1, 2, cookie), "OFFSET_HOLE, DONE");
        assert_eq!(&p[..8], &off.to_be_bytes());
        assert_eq!(&p[8..], &len.to_be_bytes());
    }
    // Partly zero is data.
    c.request(0, READ, 11, 0, 8192, &[]);
    let (_, ty, _, p) = chunk(&mut c);
    assert_eq!((ty, p.len()), (1, 8 + 8192));
    assert_eq!(&p[8 + 4096..], &data[..4096]);
    // Past the end: an ERROR chunk with the errno and no message.
    c.request(0, READ, 12, 4 * MIB, 512, &[]);
    let (flags, ty, k, p) = chunk(&mut c);
    assert_eq!((flags, ty, k, p.len()), (1, (1 << 15) + 1, 12, 6));
    assert_ne!(u32::from_be_bytes(p[..4].try_into().unwrap()), 0);
    assert_eq!(&p[4..], &[0, 0]);
    // Still in sync, and FLUSH keeps its simple reply.
    assert_eq!(c.cmd(0, FLUSH, 0, 0, &[]).0, 0);
}

#[test]
fn export_name_option_with_and_without_zeroes() {
    let srv = Server::start(Mem::new(MIB, 512), NbdServer::new().export_name("pc0"));
    for (client_flags, pad) in [(1u32, 124usize), (3, 0)] {
        for name in ["", "pc0"] {
            let mut c = srv.raw();
            c.handshake(client_flags);
            c.option(OPT_EXPORT_NAME, name.as_bytes());
            assert_eq!(c.u64(), MIB);
            assert_eq!(c.u16() & T_HAS_FLAGS, T_HAS_FLAGS);
            assert_eq!(c.recv(pad), vec![0; pad]);
            c.write(512, &[7; 512]);
            assert_eq!(c.read(512, 512), vec![7; 512]);
        }
    }
    // No error reply exists for EXPORT_NAME: an unknown name hangs up.
    let mut c = srv.raw();
    c.handshake(3);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed());
}

#[test]
fn abort_and_broken_handshakes_close_only_that_client() {
    let srv = Server::start(Mem::new(MIB, 512), NbdServer::new());
    let mut good = srv.client();

    let mut c = srv.raw();
    c.handshake(3);
    c.option(OPT_ABORT, &[]);
    let (o, typ, _) = c.option_reply();
    assert_eq!((o, typ), (OPT_ABORT, REP_ACK));
    assert!(c.is_closed());

    let mut c = srv.raw();
    c.handshake(1 << 5);
    assert!(c.is_closed(), "unknown client flags");

    let mut c = srv.raw();
    c.handshake(3);
    c.send(&[0xde; 16]);
    assert!(c.is_closed(), "bad option magic");

    let mut c = srv.raw();
    c.handshake(3);
    drop(c); // hang up mid-negotiation

    let mut c = srv.raw();
    c.handshake(3);
    let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    hdr.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&hdr);
    assert!(c.is_closed(), "oversized export name");

    good.write(0, &[1; 512]);
    assert_eq!(srv.client().read(0, 512), vec![1; 512]);
}

// ---------------------------------------------------------------------------------------
// Commands.

#[test]
fn every_command_round_trips() {
    let srv = Server::start(Mem::new(4 * MIB, 512), NbdServer::new());
    let mem = srv.mem.clone();
    let mut c = srv.client();

    let data = pattern(1, 8192);
    c.write(4096, &data);
    assert_eq!(c.read(4096, 8192), data);
    assert_eq!(mem.bytes(4096, 8192), data);

    let (e, _) = c.cmd(F_FUA, WRITE, MIB, 512, &[9; 512]);
    assert_eq!(e, 0);
    assert_eq!(mem.stat(|s| &s.fua_writes), 1);

    assert_eq!(c.cmd(0, FLUSH, 0, 0, &[]).0, 0);
    assert_eq!(mem.stat(|s| &s.flushes), 1);

    assert_eq!(c.cmd(0, TRIM, 4096, 4096, &[]).0, 0);
    assert_eq!(mem.stat(|s| &s.trims), 1);
    assert_eq!(mem.bytes(4096, 4096), vec![0; 4096]);
    assert_eq!(mem.bytes(8192, 4096), data[4096..]);

    mem.fill(2 * MIB, 65536, 0xff);
    assert_eq!(c.cmd(0, WRITE_ZEROES, 2 * MIB, 32768, &[]).0, 0);
    assert_eq!(
        c.cmd(F_NO_HOLE | F_FUA, WRITE_ZEROES, 2 * MIB + 32768, 32768, &[])
            .0,
        0
    );
    assert_eq!(mem.stat(|s| &s.zeroes_may_trim), 1);
    assert_eq!(mem.stat(|s| &s.zeroes_no_hole), 1);
    assert_eq!(mem.bytes(2 * MIB, 65536), vec![0; 65536]);

    // Trims and write-zeroes may exceed the 32 MiB payload limit: they carry no payload.
    let big = Server::start(Mem::new(64 * MIB, 4096), NbdServer::new());
    let mut b = big.client();
    assert_eq!(b.cmd(0, WRITE_ZEROES, 0, 48 << 20, &[]).0, 0);
    assert_eq!(b.cmd(0, TRIM, 0, 40 << 20, &[]).0, 0);
    // The largest payload allowed, both ways.
    let max = pattern(2, 32 << 20);
    b.write(16 * MIB, &max);
    assert!(b.read(16 * MIB, 32 << 20) == max);

    // Zero-length requests succeed without touching the device.
    assert_eq!(c.cmd(0, READ, 0, 0, &[]), (0, vec![]));
    assert_eq!(c.cmd(0, WRITE, 0, 0, &[]).0, 0);
    assert_eq!(c.cmd(0, TRIM, 4 * MIB, 0, &[]).0, 0);

    // Pipelined requests are answered in order, each with its cookie.
    c.request(0, WRITE, 100, 0, 512, &[5; 512]);
    c.request(0, READ, 101, 0, 512, &[]);
    c.request(0, FLUSH, 102, 0, 0, &[]);
    let r = c.reply();
    assert_eq!((r.error, r.cookie), (0, 100));
    let r = c.reply();
    assert_eq!((r.error, r.cookie), (0, 101));
    assert_eq!(c.recv(512), vec![5; 512]);
    let r = c.reply();
    assert_eq!((r.error, r.cookie), (0, 102));

    c.request(0, DISC, 103, 0, 0, &[]);
    assert!(c.is_closed());
}

#[test]
fn bad_requests_get_errors_and_keep_the_connection() {
    let srv = Server::start(Mem::new(MIB, 512), NbdServer::new());
    let mut c = srv.client();
    c.write(0, &[3; 512]);

    let cases: &[(&str, u16, u64, u32, usize, u32)] = &[
        ("read past end", READ, MIB, 512, 0, EINVAL),
        ("read straddling end", READ, MIB - 512, 1024, 0, EINVAL),
        ("read offset overflow", READ, u64::MAX - 511, 512, 0, EINVAL),
        ("write past end", WRITE, MIB, 512, 512, ENOSPC),
        (
            "write offset overflow",
            WRITE,
            u64::MAX - 511,
            512,
            512,
            ENOSPC,
        ),
        ("write-zeroes past end", WRITE_ZEROES, MIB, 512, 0, ENOSPC),
        ("trim past end", TRIM, MIB - 512, 1024, 0, EINVAL),
        ("unaligned read offset", READ, 100, 512, 0, EINVAL),
        ("unaligned read length", READ, 0, 100, 0, EINVAL),
        ("unaligned write", WRITE, 0, 100, 100, EINVAL),
        ("unaligned trim", TRIM, 512, 1000, 0, EINVAL),
        ("unaligned write-zeroes", WRITE_ZEROES, 1, 512, 0, EINVAL),
        ("oversized read", READ, 0, (32 << 20) + 512, 0, EINVAL),
        (
            "oversized write",
            WRITE,
            0,
            (32 << 20) + 512,
            (32 << 20) + 512,
            EINVAL,
        ),
        ("unknown command", 42, 0, 512, 0, EINVAL),
        ("cache not advertised", CACHE, 0, 512, 0, EINVAL),
        (
            "block status not negotiated",
            BLOCK_STATUS,
            0,
            512,
            0,
            EINVAL,
        ),
    ];
    for &(what, kind, off, len, payload, want) in cases {
        let (e, _) = c.cmd(0, kind, off, len, &vec![0xee; payload]);
        assert_eq!(e, want, "{what}");
        // Still framed correctly, and the refused write left no trace.
        assert_eq!(c.read(0, 512), vec![3; 512], "after {what}");
    }
    // A read larger than any buffer we would allocate: refused before allocating.
    assert_eq!(c.cmd(0, READ, 0, u32::MAX, &[]).0, EINVAL);
    assert_eq!(c.read(0, 512), vec![3; 512]);
}

#[test]
fn device_errors_map_to_nbd_errors() {
    let mut mem = Mem::new(MIB, 512);
    mem.fail_at = Some(8192);
    let srv = Server::start(mem, NbdServer::new());
    let mut c = srv.client();
    let cases = [
        (libc::EIO, EIO),
        (libc::ENOSPC, ENOSPC),
        (libc::EDQUOT, ENOSPC),
        (libc::EROFS, EPERM),
        (libc::EOPNOTSUPP, ENOTSUP),
        (libc::ESHUTDOWN, ESHUTDOWN),
        (libc::ENOENT, EIO),
        (0, EIO),
    ];
    for (errno, want) in cases {
        srv.mem.stats.fail_errno.store(errno, Ordering::SeqCst);
        assert_eq!(
            c.cmd(0, READ, 8192, 512, &[]).0,
            want,
            "read, errno {errno}"
        );
        assert_eq!(
            c.cmd(0, WRITE, 4096, 8192, &[1; 8192]).0,
            want,
            "write, errno {errno}"
        );
        assert_eq!(
            c.cmd(0, TRIM, 8192, 512, &[]).0,
            want,
            "trim, errno {errno}"
        );
        assert_eq!(
            c.cmd(0, WRITE_ZEROES, 0, 16384, &[]).0,
            want,
            "zero, errno {errno}"
        );
    }
    assert_eq!(c.read(0, 512), vec![0; 512], "still in sync");
}

#[test]
fn block_size_4096_refuses_512_aligned_requests() {
    let srv = Server::start(Mem::new(MIB, 4096), NbdServer::new());
    let mut c = srv.raw();
    c.handshake(3);
    let (infos, end) = c.info(OPT_INFO, "", &[INFO_BLOCK_SIZE]);
    assert_eq!(end, REP_ACK);
    let bs = infos
        .iter()
        .find(|d| d[0..2] == INFO_BLOCK_SIZE.to_be_bytes())
        .unwrap();
    assert_eq!(&bs[2..6], &4096u32.to_be_bytes());
    assert_eq!(&bs[6..10], &4096u32.to_be_bytes());
    c.go_ok("");
    assert_eq!(c.cmd(0, READ, 512, 4096, &[]).0, EINVAL);
    assert_eq!(c.cmd(0, READ, 0, 512, &[]).0, EINVAL);
    assert_eq!(c.cmd(0, WRITE, 0, 512, &[1; 512]).0, EINVAL);
    c.write(4096, &[4; 4096]);
    assert_eq!(c.read(4096, 4096), vec![4; 4096]);
}

#[test]
fn read_only_export_refuses_writes() {
    let mut mem = Mem::new(MIB, 512);
    mem.multi_conn = false;
    let srv = Server::start(mem, NbdServer::new().read_only(true));
    let mut c = srv.raw();
    c.handshake(3);
    let (_, flags) = c.go_ok("");
    assert_eq!(flags, T_HAS_FLAGS | T_READ_ONLY | T_FLUSH);
    assert_eq!(c.cmd(0, WRITE, 0, 512, &[1; 512]).0, EPERM);
    assert_eq!(c.cmd(0, TRIM, 0, 512, &[]).0, EPERM);
    assert_eq!(c.cmd(0, WRITE_ZEROES, 0, 512, &[]).0, EPERM);
    assert_eq!(c.cmd(0, FLUSH, 0, 0, &[]).0, 0);
    assert_eq!(c.read(0, 512), vec![0; 512]);
}

// ---------------------------------------------------------------------------------------
// Misbehaving clients, many clients, shutdown.

#[test]
fn bad_magic_closes_only_that_connection() {
    let srv = Server::start(Mem::new(MIB, 512), NbdServer::new());
    let mut a = srv.client();
    let mut b = srv.client();
    a.write(0, &[0xaa; 512]);
    b.send(&[0u8; 28]);
    assert!(b.is_closed());
    assert_eq!(a.read(0, 512), vec![0xaa; 512]);
    assert_eq!(srv.client().read(0, 512), vec![0xaa; 512]);
}

#[test]
fn random_garbage_never_hurts_the_server() {
    let srv = Server::start(Mem::new(MIB, 512), NbdServer::new());
    let mut keeper = srv.client();
    let seed = 0x5eed_u64;
    println!("garbage seed {seed:#x}");
    for i in 0..300u64 {
        let junk = pattern(seed + i, (i as usize * 37) % 300 + 1);
        let mut c = srv.raw();
        match i % 3 {
            // Garbage instead of client flags and options.
            0 => c.send_lossy(&junk),
            // Plausible options with random fields.
            1 => {
                c.handshake(3);
                let mut opt = IHAVEOPT.to_be_bytes().to_vec();
                opt.extend_from_slice(&u32::from(junk[0] % 12).to_be_bytes());
                opt.extend_from_slice(&(junk.len() as u32 - 1).to_be_bytes());
                opt.extend_from_slice(&junk[1..]);
                c.send_lossy(&opt);
            }
            // Requests with a valid magic and random fields, then garbage.
            _ => {
                c.handshake(3);
                c.go_ok("");
                for chunk in junk.chunks(24) {
                    let mut f = [0u8; 24];
                    f[..chunk.len()].copy_from_slice(chunk);
                    let mut req = REQUEST_MAGIC.to_be_bytes().to_vec();
                    req.extend_from_slice(&f);
                    // Kind in the known range, so every branch gets visited.
                    req[7] %= 9;
                    c.send_lossy(&req);
                }
            }
        }
        drop(c);
    }
    keeper.write(512, &[6; 512]);
    assert_eq!(srv.client().read(512, 512), vec![6; 512]);
}

#[test]
fn many_clients_at_once_over_unix_and_tcp() {
    let srv = Server::start(Mem::new(8 * MIB, 512), NbdServer::new());
    let workers: Vec<_> = (0..6u64)
        .map(|i| {
            let mut c = if i % 2 == 0 {
                Raw::unix(&srv.sock)
            } else {
                Raw::tcp(srv.port)
            };
            thread::spawn(move || {
                c.handshake(3);
                c.go_ok("");
                let base = i * MIB;
                for j in 0..40u64 {
                    let off = base + (j % 16) * 65536;
                    let data = pattern(i * 1000 + j, 65536);
                    c.write(off, &data);
                    assert_eq!(c.read(off, 65536), data);
                }
                assert_eq!(c.cmd(0, FLUSH, 0, 0, &[]).0, 0);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(srv.mem.stat(|s| &s.connects), 6);
}

#[test]
fn stop_ends_serve_even_with_idle_and_half_open_clients() {
    let mut srv = Server::start(Mem::new(MIB, 512), NbdServer::new());
    let mut idle = srv.client();
    let mut half = srv.raw();
    half.handshake(3);
    let mut silent = srv.raw(); // never even reads the greeting
    thread::sleep(Duration::from_millis(100));
    let took = srv.shutdown();
    assert!(took < Duration::from_secs(3), "serve took {took:?} to stop");
    assert!(!srv.sock.exists(), "socket file left behind");
    assert!(idle.is_closed());
    assert!(half.is_closed());
    assert!(silent.is_closed());
    assert!(UnixStream::connect(&srv.sock).is_err());
    assert!(TcpStream::connect(("127.0.0.1", srv.port)).is_err());
}

#[test]
fn listener_replaces_stale_socket_but_not_live_one_or_file() {
    let path = unique_path("stale");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // leaves the file behind
    assert!(path.exists());
    let live = Listener::bind(path.to_str().unwrap()).expect("stale socket replaced");
    let err = Listener::unix(&path).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    drop(live);
    assert!(!path.exists(), "listener removes its socket");
    std::fs::write(&path, b"not a socket").unwrap();
    assert!(Listener::unix(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn invalid_configuration_is_refused() {
    let stop = Arc::new(AtomicBool::new(true));
    let r = NbdServer::new().serve(
        vec![Listener::tcp("127.0.0.1:0").unwrap()],
        Arc::new(Mem::new(MIB, 1000)),
        Arc::clone(&stop),
    );
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    let r = NbdServer::new().export_name("x".repeat(5000)).serve(
        vec![Listener::tcp("127.0.0.1:0").unwrap()],
        Arc::new(Mem::new(MIB, 512)),
        stop,
    );
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidInput);
}

// ---------------------------------------------------------------------------------------
// Real clients.

fn have(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    if !found {
        println!("SKIP: {bin} not installed");
        eprintln!("SKIP: {bin} not installed");
    }
    found
}

/// Runs a client with a deadline so a server bug shows as a failure, not a hung test.
fn run(cmd: &mut Proc) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}\n--- stderr ---\n{}",
        t_out.join().unwrap(),
        t_err.join().unwrap()
    );
    match status {
        Some(st) => (st.success(), text),
        None => (false, format!("TIMED OUT\n{text}")),
    }
}

fn unix_uri(srv: &Server, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", srv.sock.display())
}

#[test]
fn nbdinfo_reports_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let srv = Server::start(
        Mem::new(8 * MIB, 512),
        NbdServer::new()
            .export_name("pc0")
            .description("pcache test"),
    );
    for uri in [
        unix_uri(&srv, "pc0"),
        format!("nbd://127.0.0.1:{}/", srv.port),
    ] {
        let (ok, out) = run(Proc::new("nbdinfo").args(["--json", &uri]));
        assert!(ok, "nbdinfo {uri}:\n{out}");
        let json = out.split("\n--- stderr ---").next().unwrap();
        let v: serde_json::Value = serde_json::from_str(json).expect("nbdinfo JSON");
        let e = &v["exports"][0];
        assert_eq!(e["export-size"], 8 * MIB, "{out}");
        for flag in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_multi_conn",
        ] {
            assert_eq!(e[flag], true, "{flag} in {out}");
        }
        assert_eq!(e["is_read_only"], false, "{out}");
        assert_eq!(e["block_size_minimum"], 512, "{out}");
    }
    let (ok, out) = run(Proc::new("nbdinfo").args(["--list", &unix_uri(&srv, "")]));
    assert!(ok && out.contains("pc0"), "nbdinfo --list:\n{out}");
}

#[test]
fn qemu_io_writes_and_reads_patterns() {
    if !have("qemu-io") {
        return;
    }
    let srv = Server::start(Mem::new(4 * MIB, 512), NbdServer::new());
    let uris = [unix_uri(&srv, ""), format!("nbd://127.0.0.1:{}", srv.port)];
    for (i, uri) in uris.iter().enumerate() {
        let p = 0xa0 + i as u8;
        let cmds = [
            format!("write -P {p:#x} 0 64k"),
            "write -P 0x5a 1M 128k".to_string(),
            format!("read -P {p:#x} 0 64k"),
            "read -v 0 512".to_string(),
            "write -z 64k 64k".to_string(),
            "read -P 0 64k 64k".to_string(),
            "discard 1M 64k".to_string(),
            "write -P 0x33 -f 2M 4k".to_string(),
            "flush".to_string(),
            "read -P 0x5a 1088k 64k".to_string(),
        ];
        let mut cmd = Proc::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in &cmds {
            cmd.args(["-c", c]);
        }
        cmd.arg(uri);
        let (ok, out) = run(&mut cmd);
        assert!(ok, "qemu-io on {uri} failed:\n{out}");
        assert!(
            !out.contains("failed") && !out.contains("error"),
            "qemu-io on {uri}:\n{out}"
        );
        let dump = format!("00000000:  {p:02x} {p:02x} {p:02x} {p:02x}");
        assert!(
            out.contains(&dump),
            "hex dump of read -v missing ({dump}):\n{out}"
        );
        let m = &srv.mem;
        assert_eq!(m.bytes(0, 65536), vec![p; 65536]);
        assert_eq!(m.bytes(65536, 65536), vec![0; 65536]);
        assert_eq!(m.bytes(MIB, 65536), vec![0; 65536], "discarded range");
        assert_eq!(m.bytes(MIB + 65536, 65536), vec![0x5a; 65536]);
        assert_eq!(m.bytes(2 * MIB, 4096), vec![0x33; 4096]);
        srv.mem.fill(0, 4 * MIB as usize, 0);
    }
    assert!(srv.mem.stat(|s| &s.flushes) >= 2);
    assert!(srv.mem.stat(|s| &s.fua_writes) >= 2);
}

#[test]
fn fio_nbd_engine_verifies_random_writes() {
    if !have("fio") {
        return;
    }
    let (_, help) = run(Proc::new("fio").arg("--enghelp"));
    if !help.split_whitespace().any(|w| w == "nbd") {
        println!("SKIP: fio without nbd engine");
        eprintln!("SKIP: fio without nbd engine");
        return;
    }
    let srv = Server::start(Mem::new(16 * MIB, 512), NbdServer::new());
    for uri in [unix_uri(&srv, ""), format!("nbd://127.0.0.1:{}/", srv.port)] {
        let (ok, out) = run(Proc::new("fio")
            .args([
                "--name=pcache-nbd",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--verify=crc32c",
                "--bs=4k",
                "--size=8m",
                "--iodepth=16",
                // fio would otherwise drop a verify state file into the working directory.
                "--verify_state_save=0",
            ])
            .current_dir(std::env::temp_dir()));
        assert!(ok, "fio on {uri} failed:\n{out}");
        assert!(!out.contains("verify: bad"), "fio on {uri}:\n{out}");
        assert!(out.contains("err= 0"), "fio on {uri}:\n{out}");
        // The verify pass read everything back.
        assert!(
            out.contains("READ: bw="),
            "fio on {uri} did not verify:\n{out}"
        );
    }
}
