//! A cached volume in the embedded runtime: the engine on a mapped medium over an
//! io_uring backing device, plus the background work that ticks, writes back and collects
//! garbage.
//!
//! Each NBD reactor thread gets one `VolumeConn` (its own engine channel and its own
//! io_uring queue) and serves all its clients with it, one request at a time, so the
//! request path takes no lock of ours beyond the engine's short ones. Requests that find
//! the cache full are deferred through a FIFO gate: the oldest waits first, and while
//! anybody waits, new writes queue behind it, so a retry never reorders writes. Writeback
//! errors back off exponentially (up to 5 s) and are counted; they never lose data, which
//! stays dirty in pmem; the runner does not sleep through a backoff, it skips writeback
//! until the retry time.
//!
//! Group commit (`file` media): [`Target::connect`] turns it on, so a write's data is
//! made durable by the reactor's [`BlockConn::commit`] at the end of its pass (one
//! `fdatasync` for every write of the pass, see `pmem`) before any reply is sent; FUA,
//! FLUSH and every kset close drain it synchronously.
//!
//! Background work (a tick every 100 ms, writeback, GC) runs on a thread started with
//! [`Volume::start_background`] (`pcache serve` does). Without one it runs on NBD reactor
//! 0, through [`BlockTarget::background`], between its polls; a step then blocks that
//! reactor for one writeback window (backing writes and a flush through its ring), which
//! with the working set larger than the cache on a busy disk held its clients for tens of
//! ms (the overload tier of `test/bench_nbd.sh`), hence the thread. Whoever waits for
//! background progress wakes the runner; a request of reactor 0 itself that waits (cache
//! full, no thread) runs the background steps inline instead, since nobody else would.
//! Above the GC watermark writes are paced by the engine against writeback's progress
//! (`IoError::Busy` from `admit`): they wait here, in the same FIFO gate, for a window.

use super::backing::{BackingFile, Op, Queue};
use super::block::{BlockConn, BlockTarget};
use super::direct::DirectBatch;
use super::poll::Waker;
use crate::engine::latency::{Class, LatencySet};
use crate::engine::{
    BackingIdentity, CacheMode, Channel, Config, Engine, IoError, OpenError, Pmem, SeqPolicy,
    Stats, WbBatch, WbKind, WbNext,
};
use crate::env::medium::{Persistence, PosixPmem};
use crate::runtime::attach::{self, Dialect, Intent, Refusal};
use crate::runtime::direct::{self as dproto, DirectOp};
use crate::runtime::options::{PolicyParams, Settings};
use crate::runtime::sched::{self, Backoff, Every};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest sleep of the background runner when it found nothing to do; a kick ends it early.
const BACKGROUND_IDLE: Duration = Duration::from_millis(100);
/// Ksets per writeback window (one backing FLUSH each): reactor 0 blocks while a window
/// is written, so its clients wait that long.
const EMBEDDED_WINDOW: u32 = 2;
/// Bytes of dirty data read from the medium per wave of writeback writes: bounds the
/// bounce buffer whatever the window holds.
const WB_WAVE: usize = 8 << 20;
/// Largest single backing write of writeback (coalesced extents).
const WB_MAX_IO: u64 = 1 << 20;
/// Pause of a background-running request that waits and found no background work either.
const INLINE_WAIT: Duration = Duration::from_millis(1);

/// How to open (or create) a cached volume.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    pub pmem: PathBuf,
    pub backing: PathBuf,
    /// Size of the medium file to create when it does not exist.
    pub pmem_size: Option<u64>,
    pub persistence: Option<Persistence>,
    /// None: as formatted (off for a new format); given, it must match the medium.
    pub data_crc: Option<bool>,
    pub gc_percent: Option<u32>,
    /// Segment size when formatting; 0 picks one for the medium's size.
    pub seg_size: u32,
    /// Overwrite foreign data / attach to a different backing device.
    pub force: bool,
    pub n_ksets: u32,
    /// Cache mode and sequential cutoff: given ones are set at format or attach.
    pub cache_mode: Option<CacheMode>,
    pub seq_cutoff_kib: Option<u32>,
    pub seq_policy: Option<SeqPolicy>,
}

impl VolumeOptions {
    pub fn new(pmem: PathBuf, backing: PathBuf) -> Self {
        VolumeOptions {
            pmem,
            backing,
            pmem_size: None,
            persistence: None,
            data_crc: None,
            gc_percent: None,
            seg_size: 0,
            force: false,
            n_ksets: 8,
            cache_mode: None,
            seq_cutoff_kib: None,
            seq_policy: None,
        }
    }
}

/// Why a volume could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Pmem(#[from] crate::env::medium::PmemError),
    #[error(transparent)]
    Backing(#[from] super::backing::BackingError),
    #[error("{}: {1}", .0.display())]
    Engine(PathBuf, OpenError),
    #[error("{0}")]
    Other(String),
}

/// The FIFO of requests deferred because the cache was full.
#[derive(Default)]
struct Gate {
    next: u64,
    serving: u64,
}

pub struct Volume {
    pub engine: Engine<PosixPmem>,
    pub backing: Arc<BackingFile>,
    stop: AtomicBool,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    /// Bumped whenever writeback or GC made progress; waiters re-try then.
    progress: Mutex<u64>,
    progress_cv: Condvar,
    /// Write everything back (set by `flush` requests), not only what GC needs.
    drain: AtomicBool,
    /// Writeback's backoff after failures (runtime::sched): a deadline rather than a
    /// sleep, since the background runner may be a reactor that also serves clients.
    backoff: Mutex<Backoff>,
    /// When the backing device was last flushed for direct writes alone.
    direct_flush: Mutex<Every>,
    /// The origin of `now_us`, the monotonic clock the runtime rules are given.
    t0: Instant,
    /// Set by [`Volume::start_background`]: the thread does the background work, reactors not.
    bg_thread: AtomicBool,
    /// Wakes the reactor that does the background work (set on its first step).
    bg_waker: OnceLock<Arc<Waker>>,
    /// Latency of writeback's backing I/O: one runner writes back at a time.
    wb_lat: Arc<LatencySet>,
    /// Why a thread the volume depends on died (`fail`): the volume stops, and every
    /// waiting request returns an error instead of waiting forever.
    fatal: Mutex<Option<String>>,
}

/// What the background runner keeps between steps.
pub struct Background {
    wb: WbBatch,
    buf: Vec<u8>,
    tick: Every,
}

impl Default for Background {
    fn default() -> Self {
        Background {
            // Small windows: reactor 0 serves no client while one is written.
            wb: WbBatch::with_window(EMBEDDED_WINDOW),
            buf: Vec::new(),
            tick: Every::default(),
        }
    }
}

/// Nanoseconds since `t0`, for the latency histograms.
fn ns_since(t0: Instant) -> u64 {
    t0.elapsed().as_nanos().min(u64::MAX as u128) as u64
}

fn identity(b: &BackingFile) -> BackingIdentity {
    BackingIdentity {
        size: b.size(),
        block_size: b.block_size(),
        id: b.identity().to_string(),
    }
}

/// A per-format id: the clock and the process id, mixed (`runtime::attach::format_id`).
fn random_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    attach::format_id(t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32))
}

impl Volume {
    fn open_parts(o: &VolumeOptions) -> Result<(PosixPmem, Arc<BackingFile>), VolumeError> {
        let backing = BackingFile::open(&o.backing)?;
        let pmem = PosixPmem::open(&o.pmem, o.pmem_size, o.persistence)?;
        Ok((pmem, backing))
    }

    fn build(engine: Engine<PosixPmem>, backing: Arc<BackingFile>) -> Arc<Volume> {
        Arc::new(Volume {
            backing,
            stop: AtomicBool::new(false),
            gate: Mutex::default(),
            gate_cv: Condvar::new(),
            progress: Mutex::new(0),
            progress_cv: Condvar::new(),
            drain: AtomicBool::new(false),
            backoff: Mutex::default(),
            direct_flush: Mutex::default(),
            t0: Instant::now(),
            bg_thread: AtomicBool::new(false),
            bg_waker: OnceLock::new(),
            fatal: Mutex::new(None),
            wb_lat: engine.latency().register(),
            engine,
        })
    }

    fn config(o: &VolumeOptions) -> Config {
        Config {
            n_ksets: o.n_ksets,
            wall_clock_ms: crate::env::unix_ms,
            ..Config::default()
        }
    }

    /// Formats the medium. Refuses a medium that holds anything unless `force`.
    pub fn format(o: &VolumeOptions) -> Result<Arc<Volume>, VolumeError> {
        let existed = o.pmem.exists();
        let r = Self::open_with(o, Intent::Format { force: o.force });
        if r.is_err() && !existed {
            // Don't leave a half-made medium behind: a retry with other options must
            // start from scratch, not silently reuse it.
            let _ = std::fs::remove_file(&o.pmem);
        }
        r
    }

    /// Attaches to a formatted medium (replaying its log); a blank medium is formatted
    /// when `format_blank`.
    pub fn attach(o: &VolumeOptions, format_blank: bool) -> Result<Arc<Volume>, VolumeError> {
        Self::open_with(
            o,
            Intent::Attach {
                format_blank,
                force_backing: o.force,
            },
        )
    }

    /// Opens the medium and the backing device and applies the attach/format rules
    /// (`runtime::attach`), refusing in the CLI's words.
    fn open_with(o: &VolumeOptions, intent: Intent) -> Result<Arc<Volume>, VolumeError> {
        let (pmem, backing) = Self::open_parts(o)?;
        let req = attach::Request {
            intent,
            data_crc: o.data_crc,
            seg_size: o.seg_size,
            settings: Settings {
                gc_percent: o.gc_percent,
                policy: PolicyParams {
                    cache_mode: o.cache_mode,
                    seq_cutoff_kib: o.seq_cutoff_kib,
                    seq_policy: o.seq_policy,
                },
            },
            format_id: random_id(),
            config: Self::config(o),
        };
        let e = attach::open(pmem, &identity(&backing), &req).map_err(|r| refusal(o, r))?;
        Ok(Self::build(e, backing))
    }

    pub fn stats(&self) -> Stats {
        self.engine.stats()
    }

    pub fn persistence(&self) -> Persistence {
        self.engine.pmem().mode()
    }

    /// Asks the background work to write back every dirty byte.
    pub fn start_drain(&self) {
        let _ = self.engine.flush();
        self.drain.store(true, Release);
        self.kick();
    }

    /// After a switch away from write-back: close the ksets so their dirty keys reach
    /// writeback, and wake the background work (progress: `dirty_bytes` in status).
    pub fn start_drain_if_needed(&self) {
        if self.engine.policy().mode != CacheMode::WriteBack && self.engine.dirty_bytes() > 0 {
            self.start_drain();
        }
    }

    /// Announces progress and wakes the background runner, wherever it runs: somebody
    /// needs it (a deferred request, a drain, shutdown).
    fn kick(&self) {
        self.progressed();
        if let Some(w) = self.bg_waker.get() {
            w.wake();
        }
    }

    /// Announces progress to whoever waits for it.
    fn progressed(&self) {
        let mut p = self.progress.lock().unwrap();
        *p += 1;
        self.progress_cv.notify_all();
    }

    /// Waits (bounded) for background progress after `seen`.
    fn wait_progress(&self, seen: u64, timeout: Duration) {
        let p = self.progress.lock().unwrap();
        if *p == seen {
            let _ = self.progress_cv.wait_timeout(p, timeout).unwrap();
        }
    }

    fn progress_seen(&self) -> u64 {
        *self.progress.lock().unwrap()
    }

    /// Starts a background thread (tick every 100 ms, writeback, GC) for embedders without
    /// NBD reactors; from then on reactors leave that work to it. Ends on `shutdown`.
    /// A panic there stops the volume ([`Volume::fail`]) rather than leaving writers
    /// waiting for space that nobody frees.
    pub fn start_background(self: &Arc<Self>) -> io::Result<JoinHandle<()>> {
        let v = Arc::clone(self);
        let mut q = self.backing.queue()?;
        self.bg_thread.store(true, Release);
        std::thread::Builder::new()
            .name("pcache-bg".into())
            .spawn(move || {
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| v.background(&mut q)));
                if let Err(p) = r {
                    v.fail(format!("background thread panicked: {}", panic_text(&*p)));
                }
            })
    }

    /// Stops the volume because something it depends on died: records why (the first
    /// reason wins), stops the background work and wakes every waiter, which then
    /// returns an error. `serve` sees it ([`Volume::failure`]) and exits non-zero.
    pub fn fail(&self, why: String) {
        eprintln!("pcache: {why}");
        self.fatal.lock().unwrap().get_or_insert(why);
        self.stop.store(true, Release);
        self.kick();
        self.gate_cv.notify_all();
    }

    /// Why the volume failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.fatal.lock().unwrap().clone()
    }

    fn background(&self, q: &mut Queue) {
        let mut st = Background::default();
        while !self.stop.load(Acquire) {
            let seen = self.progress_seen();
            if !self.background_step(q, &mut st) && !self.stop.load(Acquire) {
                self.wait_progress(seen, BACKGROUND_IDLE);
            }
        }
    }

    /// The engine's tick when due, then one round of background work. Returns true if it
    /// did something.
    pub fn background_step(&self, q: &mut Queue, st: &mut Background) -> bool {
        if st.tick.due(self.now_us(), sched::TICK_PERIOD_US) {
            self.engine.tick();
        }
        self.background_once(q, &mut st.wb, &mut st.buf)
    }

    /// Microseconds since the volume opened: the clock the runtime rules are given.
    fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// One round of background work (the rules are `runtime::sched`'s). Returns true if
    /// it did something.
    pub fn background_once(&self, q: &mut Queue, wb: &mut WbBatch, buf: &mut Vec<u8>) -> bool {
        let e = &self.engine;
        sched::before_round(e);
        let mut worked = false;
        let drain = self.drain.load(Relaxed);
        let due = {
            let b = self.backoff.lock().unwrap();
            sched::writeback_due(e, drain, &b, || self.now_us())
        };
        if due {
            match e.writeback_next(wb) {
                WbNext::Ready => {
                    worked = true;
                    match self.write_batch(q, wb, buf) {
                        Ok(()) => {
                            e.writeback_done(wb, true);
                            if self.backoff.lock().unwrap().succeeded() {
                                eprintln!("pcache: writeback recovered");
                            }
                        }
                        Err(err) => {
                            let b = self.backoff.lock().unwrap().failed(self.now_us());
                            e.writeback_failed(
                                wb,
                                &format!("{err}; retrying in {b} ms, the data stays dirty"),
                            );
                            eprintln!("pcache: writeback failed ({err}); retrying in {b} ms");
                        }
                    }
                }
                WbNext::Idle => {
                    if self.drain.load(Relaxed) && e.dirty_bytes() == 0 {
                        self.drain.store(false, Relaxed);
                    }
                }
                WbNext::Stopped(_) => {}
            }
        }
        if e.gc_wanted() && e.gc(buf).ksets > 0 {
            worked = true;
        }
        if !worked {
            let due =
                sched::direct_flush_due(e, &mut self.direct_flush.lock().unwrap(), self.now_us());
            if let Some(mark) = due {
                if q.flush().is_ok() {
                    e.direct_flushed(mark);
                }
            }
        }
        if worked {
            self.progressed();
        }
        worked
    }

    /// Writes a window's items to the backing device, then one FLUSH for all. Data
    /// extents that continue each other on the backing device go as one write
    /// (`runtime::sched::coalesce`, as in SPDK), copied from the medium into `buf` in
    /// waves of at most WB_WAVE bytes (up to WAVE_OPS writes submitted together), so the
    /// buffer stays bounded whatever the window holds; zero and discard extents become
    /// write-zeroes (discards when the whole run is discards).
    fn write_batch(&self, q: &mut Queue, wb: &WbBatch, buf: &mut Vec<u8>) -> io::Result<()> {
        const WAVE_OPS: usize = 16;
        let items = &wb.items;
        if items.is_empty() {
            // Only clean keys and tombstones: nothing written, nothing to make durable.
            return Ok(());
        }
        let mut i = 0;
        while i < items.len() {
            let len = sched::coalesce(items, i, WB_MAX_IO, false);
            if !matches!(items[i].kind, WbKind::Data { .. }) {
                let n = sched::items_in(items, i, len);
                let t0 = Instant::now();
                if items[i..i + n]
                    .iter()
                    .all(|it| matches!(it.kind, WbKind::Discard))
                {
                    q.discard(items[i].off, len)?;
                } else {
                    q.write_zeroes(items[i].off, len)?;
                }
                self.wb_lat.record(Class::Writeback, ns_since(t0));
                i += n;
                continue;
            }
            // One wave: consecutive data requests, gathered into `buf`.
            let mut reqs = [(0u64, 0usize, 0usize); WAVE_OPS];
            let (mut n, mut used) = (0, 0usize);
            while i < items.len() && n < WAVE_OPS && matches!(items[i].kind, WbKind::Data { .. }) {
                let len = sched::coalesce(items, i, WB_MAX_IO, false) as usize;
                if n > 0 && used + len > WB_WAVE {
                    break;
                }
                if buf.len() < used + len {
                    buf.resize((used + len).max(WB_WAVE.min(1 << 20)), 0);
                }
                let k = sched::items_in(items, i, len as u64);
                let mut at = used;
                for it in &items[i..i + k] {
                    if let WbKind::Data { pmem_off } = it.kind {
                        let l = it.len as usize;
                        self.engine.pmem().read(pmem_off, &mut buf[at..at + l]);
                        at += l;
                    }
                }
                reqs[n] = (items[i].off, used, len);
                n += 1;
                used += len;
                i += k;
            }
            let mut ops: [Op<'_>; WAVE_OPS] =
                std::array::from_fn(|_| Op::Write { off: 0, buf: &[] });
            for (op, &(off, at, len)) in ops.iter_mut().zip(&reqs[..n]) {
                *op = Op::Write {
                    off,
                    buf: &buf[at..at + len],
                };
            }
            // The writes go out together: each one's latency is the time until all are back.
            let t0 = Instant::now();
            q.run(&mut ops[..n])?;
            let ns = ns_since(t0);
            for _ in 0..n {
                self.wb_lat.record(Class::Writeback, ns);
            }
        }
        let t0 = Instant::now();
        // Direct writes completed before this FLUSH are durable after it too.
        let mark = self.engine.direct_mark();
        q.flush()?;
        self.engine.direct_flushed(mark);
        self.wb_lat.record(Class::Writeback, ns_since(t0));
        Ok(())
    }

    /// Writes back every dirty byte from the calling thread (offline `pcache flush`).
    /// `progress(done, total)` is called after each kset.
    pub fn writeback_all(&self, mut progress: impl FnMut(u64, u64)) -> io::Result<()> {
        self.engine
            .flush()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let total = self.engine.dirty_bytes();
        let mut q = self.backing.queue()?;
        let (mut wb, mut buf) = (WbBatch::default(), Vec::new());
        loop {
            match self.engine.writeback_next(&mut wb) {
                WbNext::Idle => break,
                WbNext::Stopped(m) => {
                    return Err(io::Error::other(format!("writeback stopped: {m}")))
                }
                WbNext::Ready => {
                    self.write_batch(&mut q, &wb, &mut buf)?;
                    self.engine.writeback_done(&wb, true);
                    progress(total - self.engine.dirty_bytes().min(total), total);
                }
            }
        }
        Ok(())
    }

    /// Stops the background thread's loop, if any (join it afterwards), and closes the ksets.
    pub fn shutdown(&self) -> io::Result<()> {
        self.stop.store(true, Release);
        self.kick();
        self.engine
            .shutdown()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut q = self.backing.queue()?;
        q.flush()
    }

    /// Runs `op` through the deferral gate: while it returns Busy, wait for background
    /// progress; while others wait, queue behind them. With `bg` (the caller is the reactor
    /// that runs the background work) it makes that progress itself while it waits.
    fn gated(
        &self,
        mut op: impl FnMut() -> Result<(), IoError>,
        mut bg: Option<(&mut Queue, &mut Background)>,
    ) -> io::Result<()> {
        {
            let g = self.gate.lock().unwrap();
            if g.next == g.serving {
                drop(g);
                match op() {
                    Err(IoError::Busy) => {}
                    r => return r.map_err(to_io),
                }
            }
        }
        // Only a request that waits reads the clock.
        let since = Instant::now();
        let mut g = self.gate.lock().unwrap();
        let ticket = g.next;
        g.next += 1;
        self.engine.waiting_inc();
        while g.serving != ticket {
            match bg.as_mut() {
                Some((q, st)) => {
                    drop(g);
                    let worked = self.background_step(q, st);
                    g = self.gate.lock().unwrap();
                    if !worked && g.serving != ticket {
                        g = self.gate_cv.wait_timeout(g, INLINE_WAIT).unwrap().0;
                    }
                }
                None => g = self.gate_cv.wait(g).unwrap(),
            }
        }
        drop(g);
        let mut overdrew = false;
        let r = loop {
            if self.stop.load(Acquire) {
                break Err(io::Error::other("shutting down"));
            }
            let seen = self.progress_seen();
            match op() {
                // Waited long for pacing credit: in on the cache's headroom, if there is
                // some (once per wait: it does not help a request waiting for space).
                Err(IoError::Busy)
                    if !overdrew
                        && sched::may_overdraw(
                            &self.engine,
                            since.elapsed().as_micros() as u64,
                        ) =>
                {
                    overdrew = true;
                }
                Err(IoError::Busy) => {
                    overdrew = false;
                    match bg.as_mut() {
                        Some((q, st)) => {
                            if !self.background_step(q, st) {
                                self.wait_progress(seen, INLINE_WAIT);
                            }
                        }
                        None => {
                            // Wake the runner, then wait for its next progress (the kick
                            // itself counts as progress: waiting from `seen` would spin),
                            // or until the request is due to overdraw.
                            if self.progress_seen() == seen {
                                self.kick();
                                let kicked = self.progress_seen();
                                let due = Duration::from_micros(sched::PACE_WAIT_MAX_US)
                                    .saturating_sub(since.elapsed());
                                let wait = if due.is_zero() {
                                    Duration::from_millis(50)
                                } else {
                                    due
                                };
                                self.wait_progress(kicked, wait);
                            }
                        }
                    }
                }
                r => break r.map_err(to_io),
            }
        };
        self.engine.waiting_dec();
        let mut g = self.gate.lock().unwrap();
        g.serving += 1;
        self.gate_cv.notify_all();
        r
    }
}

/// The message of a panic payload (a `&str` or `String`, as `panic!` makes them).
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// A refusal of the attach/format rules, in the CLI's words.
fn refusal(o: &VolumeOptions, r: Refusal) -> VolumeError {
    VolumeError::Other(r.message(Dialect::Cli {
        pmem: &o.pmem.display().to_string(),
        backing: &o.backing.display().to_string(),
        volatile: o.persistence == Some(Persistence::Volatile),
    }))
}

fn to_io(e: IoError) -> io::Error {
    match e {
        IoError::OutOfRange | IoError::Unaligned => io::Error::from_raw_os_error(libc::EINVAL),
        IoError::Busy => io::Error::from_raw_os_error(libc::EAGAIN),
        IoError::Corrupt => io::Error::from_raw_os_error(libc::EIO),
    }
}

/// A reactor's handle (shared by its clients): an engine channel, an io_uring queue, and
/// on the reactor that runs it, the background work's state.
pub struct VolumeConn {
    vol: Arc<Volume>,
    ch: Channel,
    q: Queue,
    bg: Option<Box<Background>>,
    /// A write-type request ran since the last commit. Read misses also postpone their
    /// fill's data sync, but no reply waits for it (a kset close drains it before the
    /// key), so reads alone never cost a sync.
    uncommitted: bool,
    /// This reactor's latency histograms (only this reactor records into them).
    lat: Arc<LatencySet>,
    /// Direct writes held until the next commit (direct.rs).
    held: DirectBatch,
}

impl Drop for VolumeConn {
    fn drop(&mut self) {
        // Best effort: never leave placeholders behind (nobody waits for a reply).
        let _ = self.run_held();
        self.vol.engine.latency().retire(&self.lat);
        self.vol.engine.release_channel(&mut self.ch);
    }
}

/// The NBD target: a shared volume.
pub struct Target(pub Arc<Volume>);

impl BlockTarget for Target {
    type Conn = VolumeConn;
    fn size(&self) -> u64 {
        self.0.engine.size()
    }
    fn block_size(&self) -> u32 {
        self.0.engine.block_size()
    }
    /// A handle holds an engine channel and an io_uring queue, per-thread resources with no
    /// per-client state: one per NBD reactor serves all of that reactor's clients.
    fn share_conns(&self) -> bool {
        true
    }
    /// Also turns on group commit of a `file` medium: the reactors answer a write only
    /// after [`BlockConn::commit`], one `fdatasync` per reactor pass.
    fn connect(&self) -> io::Result<VolumeConn> {
        self.0.engine.pmem().set_group_commit(true);
        Ok(VolumeConn {
            vol: Arc::clone(&self.0),
            ch: Channel::default(),
            q: self.0.backing.queue()?,
            bg: None,
            uncommitted: false,
            lat: self.0.engine.latency().register(),
            held: DirectBatch::default(),
        })
    }
    fn background(&self, conn: &mut VolumeConn, wake: &Arc<Waker>) -> Option<Duration> {
        let v = &self.0;
        if v.bg_thread.load(Acquire) {
            return None;
        }
        let _ = v.bg_waker.set(Arc::clone(wake));
        let st = conn.bg.get_or_insert_with(Box::default);
        Some(if v.background_step(&mut conn.q, st) {
            Duration::ZERO
        } else {
            BACKGROUND_IDLE
        })
    }
}

impl VolumeConn {
    /// Reads several miss ranges of one request (in order, disjoint), up to `BATCH` at
    /// a time in one ring submission, from a stack array: nothing allocates.
    fn read_misses(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        const BATCH: usize = 8;
        let mut ops: [Op<'_>; BATCH] = std::array::from_fn(|_| Op::Read {
            off: 0,
            buf: &mut [],
        });
        let mut n = 0;
        let mut rest: &mut [u8] = buf;
        let mut base = 0usize;
        for m in self.ch.misses() {
            let (_, tail) = rest.split_at_mut(m.at - base);
            let (mid, tail) = tail.split_at_mut(m.len);
            ops[n] = Op::Read {
                off: off + m.at as u64,
                buf: mid,
            };
            n += 1;
            if n == BATCH {
                self.q.run(&mut ops[..n])?;
                n = 0;
            }
            rest = tail;
            base = m.at + m.len;
        }
        if n == 0 {
            return Ok(());
        }
        self.q.run(&mut ops[..n])
    }
}

impl VolumeConn {
    /// Writes the held direct writes to the backing device and ends them.
    fn run_held(&mut self) -> io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        self.held.run(&self.vol.engine, &mut self.ch, &mut self.q)
    }

    /// Runs the held direct writes first when one overlaps `[off, off + len)`.
    fn settle(&mut self, off: u64, len: u64) -> io::Result<()> {
        if !self.held.is_empty() && self.held.overlaps(off, len) {
            return self.run_held();
        }
        Ok(())
    }

    /// A write the policy sends to the backing device (`runtime::direct`): None when it
    /// goes through the cache after all. Held until the commit (direct.rs), so a pass's
    /// writes reach the disk together; a FUA write goes at once.
    fn write_direct(&mut self, off: u64, data: &[u8], fua: bool) -> Option<io::Result<()>> {
        let len = data.len() as u64;
        // Older overlapping writes first: held writes never overlap each other.
        if !self.held.is_empty()
            && (fua || self.held.overlaps(off, len) || self.held.full_for(data.len()))
        {
            if let Err(x) = self.run_held() {
                return Some(Err(x));
            }
        }
        let op = match dproto::start_write(&self.vol.engine, &mut self.ch, off, len, fua) {
            Ok(Some(op)) => op,
            Ok(None) => return None,
            Err(x) => return Some(Err(to_io(x))),
        };
        if !fua {
            self.held.push(data, op);
            return Some(Ok(()));
        }
        let r = self.q.write(off, data);
        Some(self.finish_direct(op, data, r))
    }

    /// A write-zeroes or trim outside write-back (`runtime::direct::start_zeroes`): done
    /// on the backing device, the cached copy invalidated. None: write-back, or dirty
    /// data overlaps; it goes through the cache as a zero extent.
    fn zeroes_direct(
        &mut self,
        off: u64,
        len: u64,
        discard: bool,
        fua: bool,
    ) -> Option<io::Result<()>> {
        let op = match dproto::start_zeroes(&self.vol.engine, off, len, discard, fua) {
            Ok(Some(op)) => op,
            Ok(None) => return None,
            Err(x) => return Some(Err(to_io(x))),
        };
        let r = if discard {
            self.q.discard(off, len)
        } else {
            self.q.write_zeroes(off, len)
        };
        Some(self.finish_direct(op, &[], r))
    }

    /// The rest of the direct-write protocol after the backing command returned `r`:
    /// the backing FLUSH it owes (FUA, write-through) and its end in the engine, before
    /// that FLUSH unless it is a write-through.
    fn finish_direct(&mut self, op: DirectOp, data: &[u8], r: io::Result<()>) -> io::Result<()> {
        let e = &self.vol.engine;
        if r.is_err() || !op.needs_flush() {
            op.end(e, &mut self.ch, data, r.is_ok());
            return r;
        }
        if op.ends_before_flush() {
            op.end(e, &mut self.ch, data, true);
            return self.flush_direct();
        }
        let r = self.q.flush();
        op.end(e, &mut self.ch, data, r.is_ok());
        r
    }

    /// After a FLUSH: the writes that went around the cache must be durable too.
    fn flush_direct(&mut self) -> io::Result<()> {
        if let Some(mark) = dproto::flush_owed(&self.vol.engine) {
            self.q.flush()?;
            self.vol.engine.direct_flushed(mark);
        }
        Ok(())
    }
}

impl BlockConn for VolumeConn {
    fn read(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let t0 = Instant::now();
        self.settle(off, buf.len() as u64)?;
        let missed = self
            .vol
            .engine
            .read(&mut self.ch, off, buf)
            .map_err(to_io)?;
        if missed == 0 {
            self.lat.record(Class::ReadHit, ns_since(t0));
            return Ok(());
        }
        // The common case is one miss: read it directly, allocating nothing.
        let mut misses = self.ch.misses();
        let first = misses.next().expect("missed > 0 means a miss");
        let r = if misses.next().is_none() {
            drop(misses);
            self.q.read(
                off + first.at as u64,
                &mut buf[first.at..first.at + first.len],
            )
        } else {
            drop(misses);
            self.read_misses(off, buf)
        };
        self.vol.engine.fill(&mut self.ch, off, buf, r.is_ok());
        match &r {
            Ok(()) => self.lat.record(Class::ReadMiss, ns_since(t0)),
            Err(e) => self.vol.engine.io_error(format!(
                "read of {} bytes at offset {off} from the backing device failed: {e}",
                buf.len()
            )),
        }
        r
    }

    fn write(&mut self, off: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.uncommitted = true;
        let t0 = Instant::now();
        if let Some(r) = self.write_direct(off, data, fua) {
            if r.is_ok() {
                self.lat.record(Class::Write, ns_since(t0));
            }
            return r;
        }
        let (vol, ch) = (&self.vol, &mut self.ch);
        let bg = self.bg.as_deref_mut().map(|b| (&mut self.q, b));
        let r = vol.gated(|| vol.engine.write(ch, off, data, fua), bg);
        if r.is_ok() {
            self.lat.record(Class::Write, ns_since(t0));
        }
        r
    }

    fn wants_commit(&self) -> bool {
        !self.held.is_empty() || (self.uncommitted && self.vol.engine.pmem().pending())
    }

    fn commit(&mut self) -> io::Result<()> {
        let held = self.run_held();
        if !std::mem::take(&mut self.uncommitted) {
            return held;
        }
        let r = self
            .vol
            .engine
            .pmem()
            .commit()
            .map_err(|e| io::Error::other(e.to_string()));
        held.and(r)
    }

    fn flush(&mut self) -> io::Result<()> {
        let t0 = Instant::now();
        self.run_held()?;
        let vol = &self.vol;
        let bg = self.bg.as_deref_mut().map(|b| (&mut self.q, b));
        let r = vol
            .gated(|| vol.engine.flush(), bg)
            .and_then(|()| self.flush_direct());
        if r.is_ok() {
            self.lat.record(Class::Flush, ns_since(t0));
        }
        r
    }

    fn trim(&mut self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        self.settle(off, len)?;
        self.uncommitted = true;
        if let Some(r) = self.zeroes_direct(off, len, true, fua) {
            return r;
        }
        let vol = &self.vol;
        let bg = self.bg.as_deref_mut().map(|b| (&mut self.q, b));
        vol.gated(|| vol.engine.write_zeroes(off, len, true, fua), bg)
    }

    fn write_zeroes(&mut self, off: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.settle(off, len)?;
        self.uncommitted = true;
        // Kept allocated (ZERO_RANGE), as a write-zeroes asks, even when it may trim.
        if let Some(r) = self.zeroes_direct(off, len, false, fua) {
            return r;
        }
        let vol = &self.vol;
        let bg = self.bg.as_deref_mut().map(|b| (&mut self.q, b));
        vol.gated(|| vol.engine.write_zeroes(off, len, may_trim, fua), bg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64 MiB file medium over a 64 MiB backing file in a fresh directory, formatted
    /// (in `mode`, if given): (directory, backing path, volume).
    fn test_volume(tag: &str, mode: Option<CacheMode>) -> (PathBuf, PathBuf, Arc<Volume>) {
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let backing = dir.join("backing");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let mut o = VolumeOptions::new(dir.join("cache"), backing.clone());
        o.pmem_size = Some(64 << 20);
        o.seg_size = 1 << 20;
        o.cache_mode = mode;
        (dir, backing, Volume::format(&o).unwrap())
    }

    /// Group commit on a `file` medium through the NBD handle: writes postpone their data
    /// sync to `commit`, one sync covers them all, and FUA, FLUSH and kset closes (the
    /// engine's `drain`) never leave postponed data behind a key.
    #[test]
    fn file_medium_group_commit_through_the_target() {
        let (dir, _, vol) = test_volume("pcache-vol-gc", None);
        let pm = vol.engine.pmem();
        assert_eq!(pm.mode(), Persistence::File);
        let t = Target(Arc::clone(&vol));
        let mut c = t.connect().unwrap();
        assert!(pm.group_commit());

        let syncs = pm.syncs();
        for i in 0..32u64 {
            c.write(i * 4096, &[i as u8; 4096], false).unwrap();
        }
        assert!(pm.pending(), "data syncs postponed to the commit");
        assert_eq!(pm.syncs(), syncs, "no sync per write");
        c.commit().unwrap();
        assert!(!pm.pending());
        assert_eq!(pm.syncs(), syncs + 1, "32 writes, one sync");

        // FLUSH drains before it closes the ksets.
        c.write(0, &[9; 4096], false).unwrap();
        assert!(pm.pending());
        c.flush().unwrap();
        assert!(!pm.pending());
        // FUA closes the write's kset, which drains first: durable on return.
        c.write(8192, &[7; 4096], true).unwrap();
        assert!(!pm.pending());
        // A kset closed by ticks (two of them) drains too.
        c.write(4096, &[5; 4096], false).unwrap();
        assert!(pm.pending());
        vol.engine.tick();
        vol.engine.tick();
        assert!(!pm.pending());
        let mut b = vec![0; 4096];
        c.read(4096, &mut b).unwrap();
        assert_eq!(b, vec![5; 4096]);
        // A read miss fills the cache without asking its reply to wait for a sync.
        c.commit().unwrap();
        let before = pm.syncs();
        c.read(32 << 20, &mut b).unwrap();
        c.commit().unwrap();
        assert_eq!(pm.syncs(), before, "reads alone never sync");
        assert!(pm.pending(), "the fill's data waits for the next drain");
        c.flush().unwrap();
        assert!(!pm.pending());
        drop(c);
        drop(t);
        drop(vol);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Outside write-back, write-zeroes and trims go to the backing file: they read
    /// back as zeros, the file has the zeros, nothing is left dirty, and they count as
    /// bypassed. Data cached clean (written in write-through) is invalidated.
    #[test]
    fn zeroes_and_trims_bypass_the_cache_outside_writeback() {
        let (dir, backing, vol) = test_volume("pcache-vol-zero", Some(CacheMode::WriteThrough));
        let t = Target(Arc::clone(&vol));
        let mut c = t.connect().unwrap();
        let mb = 1u64 << 20;
        for (i, mode) in [
            CacheMode::WriteThrough,
            CacheMode::WriteAround,
            CacheMode::PassThrough,
        ]
        .into_iter()
        .enumerate()
        {
            let p = vol.engine.policy().with(Some(mode), None, None);
            vol.engine.set_policy(p).unwrap();
            let base = i as u64 * 4 * mb;
            c.write(base, &vec![0xab; 4 * mb as usize], false).unwrap();
            let hits = vol.engine.stats().hits;
            let mut b = vec![0u8; 4096];
            c.read(base, &mut b).unwrap();
            let before = vol.engine.stats();
            c.write_zeroes(base + mb, mb, true, false).unwrap();
            c.trim(base + 2 * mb, mb, true).unwrap();
            let st = vol.engine.stats();
            assert_eq!(
                st.bypassed_requests,
                before.bypassed_requests + 2,
                "{mode:?}"
            );
            assert_eq!(st.write_zeroes, before.write_zeroes + 1);
            assert_eq!(st.discards, before.discards + 1);
            assert_eq!(vol.engine.dirty_bytes(), 0, "{mode:?} left dirty data");
            c.flush().unwrap();
            let mut got = vec![0u8; 4 * mb as usize];
            c.read(base, &mut got).unwrap();
            let file = std::fs::read(&backing).unwrap();
            let file = &file[base as usize..(base + 4 * mb) as usize];
            for (what, data) in [("read", &got[..]), ("backing file", file)] {
                let m = mb as usize;
                assert!(data[..m].iter().all(|&x| x == 0xab), "{mode:?} {what}");
                assert!(data[m..3 * m].iter().all(|&x| x == 0), "{mode:?} {what}");
                assert!(data[3 * m..].iter().all(|&x| x == 0xab), "{mode:?} {what}");
            }
            if mode == CacheMode::WriteThrough {
                assert!(
                    hits < vol.engine.stats().hits,
                    "write-through cached the data"
                );
            }
        }
        drop(c);
        drop(t);
        drop(vol);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Direct writes are held until the commit and then written together; a read or
    /// a zeroing of their range, a FLUSH, a FUA write or an overlapping write runs them
    /// first, so the handle always reads what it wrote and the newest write wins.
    #[test]
    fn direct_writes_are_held_until_the_commit() {
        let (dir, backing, vol) = test_volume("pcache-vol-held", Some(CacheMode::WriteAround));
        let t = Target(Arc::clone(&vol));
        let mut c = t.connect().unwrap();
        let on_disk = |off: usize| std::fs::read(&backing).unwrap()[off];
        for i in 0..8u64 {
            c.write(i * 65536, &[i as u8 + 1; 65536], false).unwrap();
        }
        assert!(c.wants_commit(), "held writes want the commit");
        assert_eq!(on_disk(7 * 65536), 0, "not written before the commit");
        c.commit().unwrap();
        assert!(!c.wants_commit());
        assert_eq!(on_disk(7 * 65536), 8);
        // Overlapping writes: the newer one wins on the disk and in reads.
        c.write(0, &[0x11; 8192], false).unwrap();
        c.write(4096, &[0x22; 4096], false).unwrap();
        let mut b = vec![0u8; 8192];
        c.read(0, &mut b).unwrap();
        assert_eq!((b[0], b[4096]), (0x11, 0x22), "reads see held writes");
        c.write(65536, &[0x33; 4096], false).unwrap();
        c.flush().unwrap();
        assert_eq!(on_disk(65536), 0x33, "FLUSH wrote the held writes");
        assert_eq!((on_disk(0), on_disk(4096)), (0x11, 0x22));
        c.write(131072, &[0x44; 4096], false).unwrap();
        c.write_zeroes(131072, 4096, false, false).unwrap();
        c.read(131072, &mut b[..4096]).unwrap();
        assert_eq!(b[..4096], [0u8; 4096][..], "zeroes after the held write");
        assert_eq!(vol.engine.dirty_bytes(), 0);
        let st = vol.engine.stats();
        assert!(st.bypassed_requests >= 12, "{}", st.bypassed_requests);
        drop(c);
        drop(t);
        drop(vol);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
