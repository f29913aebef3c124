//! Tests of the reactor side of the NBD server that the protocol battery in `test/nbd.rs`
//! (whose device opens one handle per client) does not reach: handles shared per reactor,
//! the background hook of reactor 0, requests pipelined behind the handshake, and a client
//! that stops reading its replies while another on the same reactor keeps being served.

use super::proto::{self, Request};
use super::{BlockConn, BlockTarget, Filled, Listener, NbdServer, Tried};
use crate::env::posix::block::is_zero;
use crate::env::posix::poll::Waker;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Counters {
    connects: AtomicUsize,
    background: AtomicUsize,
    /// Writes executed, and how many of them a commit covered.
    writes: AtomicUsize,
    committed: AtomicUsize,
    commits: AtomicUsize,
    /// While true, `commit` waits (a slow sync); the test lowers it.
    hold: Mutex<bool>,
    hold_cv: std::sync::Condvar,
    /// While true, reads and first tries of writes from SLOW_FROM on stay in flight
    /// (`start_read`, `Tried::Started`) until `release`; the handle's waker is kept in `waker` so the test can wake the reactor.
    slow: AtomicBool,
    release: AtomicBool,
    waker: Mutex<Option<Arc<Waker>>>,
    /// Calls of `after_replies`.
    after: AtomicUsize,
    /// While true, `try_write` hands every write back (a paced cache).
    busy: AtomicBool,
    /// `try_write` calls that were a write's first try (`waited` None).
    first_tries: AtomicUsize,
}

/// Where the slow reads start (`Counters::slow`).
const SLOW_FROM: u64 = 1 << 20;

/// An in-memory device whose handles are shared per reactor.
#[derive(Clone)]
struct Shared {
    data: Arc<Mutex<Vec<u8>>>,
    counters: Arc<Counters>,
}

/// A handle: the device, its requests in flight (tag, offset, length, a write's data),
/// and the waker its completions poll on.
struct SharedConn(Shared, Vec<(u64, u64, usize, Option<Vec<u8>>)>, Arc<Waker>);

impl BlockConn for SharedConn {
    fn start_read(&mut self, off: u64, buf: &mut [u8], tag: u64) -> Option<io::Result<Filled>> {
        if self.0.counters.slow.load(Ordering::SeqCst) && off >= SLOW_FROM {
            self.1.push((tag, off, buf.len(), None));
            return None;
        }
        if let Err(e) = self.read(off, buf) {
            return Some(Err(e));
        }
        if is_zero(buf) {
            // As the volume does for a hole: say so and leave the buffer (scribbled here,
            // so a reply built from it would show).
            buf.fill(0x5a);
            return Some(Ok(Filled::Zero));
        }
        Some(Ok(Filled::Data))
    }
    fn reap(&mut self, done: &mut dyn FnMut(u64, io::Result<&[u8]>)) {
        self.2.reset();
        if !self.0.counters.release.load(Ordering::SeqCst) {
            return;
        }
        let mut d = self.0.data.lock().unwrap();
        for (tag, off, len, write) in self.1.drain(..) {
            let range = off as usize..off as usize + len;
            match write {
                Some(w) => {
                    d[range].copy_from_slice(&w);
                    done(tag, Ok(&[]));
                }
                None => done(tag, Ok(&d[range])),
            }
        }
    }
    fn in_flight(&self) -> usize {
        self.1.len()
    }
    fn completions_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(self.2.as_fd())
    }
    fn after_replies(&mut self) {
        self.0.counters.after.fetch_add(1, Ordering::SeqCst);
    }
    fn try_write(
        &mut self,
        off: u64,
        data: &[u8],
        fua: bool,
        waited: Option<Duration>,
        tag: u64,
    ) -> Tried {
        let c = &self.0.counters;
        if waited.is_none() {
            c.first_tries.fetch_add(1, Ordering::SeqCst);
            if c.slow.load(Ordering::SeqCst) && off >= SLOW_FROM {
                self.1.push((tag, off, data.len(), Some(data.to_vec())));
                return Tried::Started;
            }
        }
        if c.busy.load(Ordering::SeqCst) {
            return Tried::Wait;
        }
        Tried::Done(self.write(off, data, fua))
    }

    fn read(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.0.data.lock().unwrap();
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write(&mut self, off: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.0.data.lock().unwrap()[off as usize..off as usize + data.len()].copy_from_slice(data);
        self.0.counters.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn commit(&mut self) -> io::Result<()> {
        let c = &self.0.counters;
        if c.writes.load(Ordering::SeqCst) == c.committed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut hold = c.hold.lock().unwrap();
        while *hold {
            hold = c.hold_cv.wait(hold).unwrap();
        }
        c.commits.fetch_add(1, Ordering::SeqCst);
        c.committed
            .store(c.writes.load(Ordering::SeqCst), Ordering::SeqCst);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&mut self, _off: u64, _len: u64, _fua: bool) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, off: u64, len: u64, _may: bool, _fua: bool) -> io::Result<()> {
        self.0.data.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }
}

impl BlockTarget for Shared {
    type Conn = SharedConn;
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn connect(&self) -> io::Result<SharedConn> {
        self.counters.connects.fetch_add(1, Ordering::SeqCst);
        let w = Arc::new(Waker::new()?);
        *self.counters.waker.lock().unwrap() = Some(Arc::clone(&w));
        Ok(SharedConn(self.clone(), Vec::new(), w))
    }
    fn share_conns(&self) -> bool {
        true
    }
    fn background(&self, _conn: &mut SharedConn, _wake: &Arc<Waker>) -> Option<Duration> {
        self.counters.background.fetch_add(1, Ordering::SeqCst);
        Some(Duration::from_millis(5))
    }
}

struct Running {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<io::Result<()>>>,
    sock: PathBuf,
    target: Shared,
}

impl Running {
    fn start(size: usize, reactors: usize) -> Running {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let sock =
            std::env::temp_dir().join(format!("pcache-reactor-{}-{n}.sock", std::process::id()));
        let target = Shared {
            data: Arc::new(Mutex::new(vec![0; size])),
            counters: Arc::default(),
        };
        let listeners = vec![Listener::unix(&sock).unwrap()];
        let stop = Arc::new(AtomicBool::new(false));
        let (st, t) = (Arc::clone(&stop), Arc::new(target.clone()));
        let cfg = NbdServer::new()
            .reactors(reactors)
            .shutdown_grace(Duration::from_secs(1));
        let handle = Some(thread::spawn(move || cfg.serve(listeners, t, st)));
        Running {
            stop,
            handle,
            sock,
            target,
        }
    }

    fn stop(&mut self) -> Duration {
        let t = Instant::now();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().unwrap().unwrap();
        }
        t.elapsed()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if !thread::panicking() {
            self.stop();
        }
    }
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; proto::REQUEST_LEN] {
    Request {
        flags: 0,
        kind,
        cookie,
        offset,
        len,
    }
    .encode()
}

/// The client half of a fixed-newstyle handshake ending in NBD_OPT_GO, as bytes to send.
fn go_option() -> Vec<u8> {
    let mut b = (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    b.extend_from_slice(&6u32.to_be_bytes());
    b.extend_from_slice(&[0; 6]); // empty name, no info requests
    b
}

struct Client(UnixStream);

impl Client {
    /// Connects and sends the handshake plus `then` in one write, before reading anything.
    fn connect(sock: &PathBuf, then: &[u8]) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client(s);
        let mut out = go_option();
        out.extend_from_slice(then);
        c.0.write_all(&out).unwrap();
        let greeting = c.recv(18);
        assert_eq!(&greeting[..8], &proto::NBDMAGIC.to_be_bytes());
        loop {
            let h = c.recv(20);
            let reply = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            c.recv(len as usize);
            if reply == proto::REP_ACK {
                return c;
            }
            assert_eq!(reply, proto::REP_INFO);
        }
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }

    /// Reads one simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let r = self.recv(16);
        assert_eq!(&r[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }

    fn write(&mut self, cookie: u64, off: u64, data: &[u8]) {
        let mut b = request(proto::CMD_WRITE, cookie, off, data.len() as u32).to_vec();
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
        assert_eq!(self.reply(), (0, cookie));
    }

    fn read(&mut self, cookie: u64, off: u64, len: u32) -> Vec<u8> {
        self.0
            .write_all(&request(proto::CMD_READ, cookie, off, len))
            .unwrap();
        assert_eq!(self.reply(), (0, cookie));
        self.recv(len as usize)
    }
}

#[test]
fn shared_handles_are_opened_once_per_reactor_and_reactor_0_runs_background() {
    let mut srv = Running::start(1 << 20, 2);
    let workers: Vec<_> = (0..4u64)
        .map(|i| {
            let sock = srv.sock.clone();
            thread::spawn(move || {
                let mut c = Client::connect(&sock, &[]);
                for j in 0..50u64 {
                    let off = i * 65536 + (j % 8) * 4096;
                    let data = vec![(i * 50 + j) as u8; 4096];
                    c.write(j, off, &data);
                    assert_eq!(c.read(j, off, 4096), data);
                }
                c.0.write_all(&request(proto::CMD_FLUSH, 99, 0, 0)).unwrap();
                assert_eq!(c.reply(), (0, 99));
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let counters = Arc::clone(&srv.target.counters);
    assert_eq!(
        counters.connects.load(Ordering::SeqCst),
        2,
        "one per reactor"
    );
    thread::sleep(Duration::from_millis(50));
    assert!(counters.background.load(Ordering::SeqCst) > 1);
    assert!(srv.stop() < Duration::from_secs(3));
}

/// A read the handle reports as all zero (`Filled::Zero`, buffer not written) reaches a
/// client without structured replies as zeros.
#[test]
fn a_read_reported_zero_is_sent_as_zeros() {
    let srv = Running::start(1 << 20, 1);
    let mut c = Client::connect(&srv.sock, &[]);
    assert_eq!(c.read(1, 8192, 4096), vec![0; 4096]);
    c.write(2, 8192, &[3; 512]);
    assert_eq!(c.read(3, 8192, 512), vec![3; 512]);
}

#[test]
fn requests_pipelined_behind_the_handshake_and_disc_are_served_in_order() {
    let srv = Running::start(1 << 20, 1);
    let mut burst = request(proto::CMD_WRITE, 1, 4096, 512).to_vec();
    burst.extend_from_slice(&[7; 512]);
    burst.extend_from_slice(&request(proto::CMD_READ, 2, 4096, 512));
    burst.extend_from_slice(&request(proto::CMD_DISC, 3, 0, 0));
    let mut c = Client::connect(&srv.sock, &burst);
    assert_eq!(c.reply(), (0, 1));
    assert_eq!(c.reply(), (0, 2));
    assert_eq!(c.recv(512), vec![7; 512]);
    let mut rest = Vec::new();
    c.0.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "DISC closes after the replies");
}

#[test]
fn a_client_not_reading_replies_does_not_stall_its_reactor() {
    let mut srv = Running::start(8 << 20, 1);
    // 256 reads of 1 MiB: far more reply data than socket buffers and the output backlog
    // hold, so the server must stop serving (and reading) this client.
    let mut hog = Client::connect(&srv.sock, &[]);
    let mut reqs = Vec::new();
    for i in 0..256u64 {
        reqs.extend_from_slice(&request(proto::CMD_READ, i, 0, 1 << 20));
    }
    hog.0.write_all(&reqs).unwrap();
    let t = Instant::now();
    let mut c = Client::connect(&srv.sock, &[]);
    for j in 0..20u64 {
        c.write(j, 4096 * j, &[j as u8; 4096]);
        assert_eq!(c.read(j, 4096 * j, 4096), vec![j as u8; 4096]);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The hog still gets every reply, in order, once it reads.
    for i in 0..256u64 {
        assert_eq!(hog.reply(), (0, i));
        hog.recv(1 << 20);
    }
    // Shutdown does not wait for a client that stopped reading beyond the grace period.
    hog.0.write_all(&reqs).unwrap();
    let took = srv.stop();
    assert!(took < Duration::from_secs(4), "stop took {took:?}");
}

#[test]
fn writes_of_one_pass_share_one_commit_and_no_reply_precedes_it() {
    let srv = Running::start(1 << 20, 1);
    let counters = Arc::clone(&srv.target.counters);
    *counters.hold.lock().unwrap() = true;
    // 16 writes in one small burst with the handshake: the reactor finds them all in one
    // pass.
    let mut burst = Vec::new();
    for i in 0..16u64 {
        burst.extend_from_slice(&request(proto::CMD_WRITE, i, i * 4096, 512));
        burst.extend_from_slice(&[i as u8; 512]);
    }
    let mut c = Client::connect(&srv.sock, &burst);
    // Executed, but the commit is held: not one reply may arrive.
    let t = Instant::now();
    while counters.writes.load(Ordering::SeqCst) < 16 {
        assert!(t.elapsed() < Duration::from_secs(10), "writes not executed");
        thread::sleep(Duration::from_millis(5));
    }
    c.0.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    let early = c.0.read(&mut b);
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
        "a reply left before its commit: {early:?}"
    );
    assert_eq!(counters.committed.load(Ordering::SeqCst), 0);
    *counters.hold.lock().unwrap() = false;
    counters.hold_cv.notify_all();
    c.0.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    for i in 0..16u64 {
        assert_eq!(c.reply(), (0, i));
    }
    assert_eq!(
        counters.commits.load(Ordering::SeqCst),
        1,
        "one commit for the pass"
    );
    assert_eq!(counters.committed.load(Ordering::SeqCst), 16);
    // Reads after it need no commit of their own.
    assert_eq!(c.read(100, 15 * 4096, 512), vec![15; 512]);
    assert_eq!(counters.commits.load(Ordering::SeqCst), 1);
}

/// A read left in flight by its handle (a read miss at the backing device) holds up
/// nothing: later reads and writes of the same client are answered first, the reactor
/// wakes on the handle's completion descriptor and sends the late reply with its data,
/// and runs `after_replies` once replies are out.
#[test]
fn a_read_in_flight_does_not_hold_the_reactor() {
    let srv = Running::start(2 << 20, 1);
    let counters = Arc::clone(&srv.target.counters);
    let mut c = Client::connect(&srv.sock, &[]);
    c.write(1, SLOW_FROM, &[0x77; 4096]);
    c.write(2, 0, &[0x11; 512]);
    counters.slow.store(true, Ordering::SeqCst);
    let mut burst = request(proto::CMD_READ, 10, SLOW_FROM, 4096).to_vec();
    burst.extend_from_slice(&request(proto::CMD_READ, 11, 0, 512));
    burst.extend_from_slice(&request(proto::CMD_WRITE, 12, 4096, 512));
    burst.extend_from_slice(&[0x22; 512]);
    c.0.write_all(&burst).unwrap();
    assert_eq!(c.reply(), (0, 11), "the later read first");
    assert_eq!(c.recv(512), vec![0x11; 512]);
    assert_eq!(c.reply(), (0, 12), "and the write");
    c.0.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(
        c.0.read(&mut b).is_err(),
        "no reply while the read is in flight"
    );
    let after = counters.after.load(Ordering::SeqCst);
    assert!(after > 0, "after_replies ran");
    counters.release.store(true, Ordering::SeqCst);
    let w = counters.waker.lock().unwrap().clone().unwrap();
    w.wake();
    c.0.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(c.reply(), (0, 10));
    assert_eq!(c.recv(4096), vec![0x77; 4096]);
    let t = Instant::now();
    while counters.after.load(Ordering::SeqCst) == after {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "after_replies not run"
        );
        thread::sleep(Duration::from_millis(5));
    }
    counters.slow.store(false, Ordering::SeqCst);
    assert_eq!(c.read(13, SLOW_FROM, 512), vec![0x77; 512]);
}

/// A write in flight (`Tried::Started`, a direct write on its way to the disk) holds
/// up nothing: later requests are answered first, and its reply leaves once the handle
/// reports it; the client then reads what it wrote.
#[test]
fn a_write_in_flight_does_not_hold_the_reactor() {
    let srv = Running::start(2 << 20, 1);
    let counters = Arc::clone(&srv.target.counters);
    let mut c = Client::connect(&srv.sock, &[]);
    c.write(1, 0, &[0x11; 512]);
    counters.slow.store(true, Ordering::SeqCst);
    let mut burst = request(proto::CMD_WRITE, 30, SLOW_FROM, 4096).to_vec();
    burst.extend_from_slice(&[0x99; 4096]);
    burst.extend_from_slice(&request(proto::CMD_READ, 31, 0, 512));
    burst.extend_from_slice(&request(proto::CMD_WRITE, 32, 4096, 512));
    burst.extend_from_slice(&[0x22; 512]);
    c.0.write_all(&burst).unwrap();
    assert_eq!(c.reply(), (0, 31), "the read passes the write in flight");
    assert_eq!(c.recv(512), vec![0x11; 512]);
    assert_eq!(c.reply(), (0, 32), "and so does a later write");
    c.0.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(c.0.read(&mut b).is_err(), "no reply while it is in flight");
    counters.release.store(true, Ordering::SeqCst);
    let w = counters.waker.lock().unwrap().clone().unwrap();
    w.wake();
    c.0.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(c.reply(), (0, 30));
    counters.slow.store(false, Ordering::SeqCst);
    assert_eq!(c.read(33, SLOW_FROM, 4096), vec![0x99; 4096]);
}

/// A write its handle hands back (a paced cache) waits on the reactor without holding
/// it: a later read of another range is answered at once, while a read of the waiting
/// range, a second write (kept in order behind the first) and a FLUSH wait; once the
/// handle takes writes again they run in order, each first tried once as a first try.
#[test]
fn a_waiting_write_holds_up_only_what_depends_on_it() {
    let srv = Running::start(1 << 20, 1);
    let counters = Arc::clone(&srv.target.counters);
    let mut c = Client::connect(&srv.sock, &[]);
    c.write(1, 0, &[0x11; 512]);
    counters.busy.store(true, Ordering::SeqCst);
    counters.first_tries.store(0, Ordering::SeqCst);
    let mut burst = request(proto::CMD_WRITE, 20, 8192, 512).to_vec();
    burst.extend_from_slice(&[0xAA; 512]);
    burst.extend_from_slice(&request(proto::CMD_WRITE, 21, 8192, 512));
    burst.extend_from_slice(&[0xBB; 512]);
    burst.extend_from_slice(&request(proto::CMD_READ, 22, 0, 512));
    burst.extend_from_slice(&request(proto::CMD_READ, 23, 8192, 512));
    burst.extend_from_slice(&request(proto::CMD_FLUSH, 24, 0, 0));
    c.0.write_all(&burst).unwrap();
    assert_eq!(c.reply(), (0, 22), "the read of another range passes");
    assert_eq!(c.recv(512), vec![0x11; 512]);
    c.0.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(c.0.read(&mut b).is_err(), "the rest waits for the writes");
    assert_eq!(counters.first_tries.load(Ordering::SeqCst), 1);
    counters.busy.store(false, Ordering::SeqCst);
    c.0.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(c.reply(), (0, 20));
    assert_eq!(c.reply(), (0, 21));
    assert_eq!(c.reply(), (0, 23));
    assert_eq!(c.recv(512), vec![0xBB; 512], "the writes ran in order");
    assert_eq!(c.reply(), (0, 24));
    assert_eq!(
        counters.first_tries.load(Ordering::SeqCst),
        2,
        "each write is routed once"
    );
}
