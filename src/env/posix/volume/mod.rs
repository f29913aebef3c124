//! A cached volume in the embedded runtime: the engine on a mapped medium over an
//! io_uring backing device, plus the background work that ticks, writes back and collects
//! garbage.
//!
//! Each NBD reactor thread gets one `VolumeConn` (its own engine channel and its own
//! io_uring queue) and serves all its clients with it, one request at a time, so the
//! request path takes no lock of ours beyond the engine's short ones. Read misses are the
//! exception: their base reads go to the handle's read ring and complete later
//! (`BlockConn::start_read`, `reap`), each holding an engine channel of its own, and are
//! cached after their reply (`after_replies`); meanwhile writeback keeps few writes in
//! flight (`fg_reads`). Requests that find
//! the cache full are deferred through a FIFO gate: the oldest waits first, and while
//! anybody waits, new writes queue behind it, so a retry never reorders writes. Writeback
//! errors back off exponentially (up to 5 s) and are counted; they never lose data, which
//! stays dirty in pmem; the runner does not sleep through a backoff, it skips writeback
//! until the retry time.
//!
//! Files: this one (options, opening, drain, shutdown), `background` (the runner:
//! tick, writeback windows, GC, the idle direct FLUSH), `conn` (the reactors' handles:
//! the NBD block target, the deferral gate, direct writes), `tests`.
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

use super::backing::{AsyncRing, BackingFile, Op, Queue, RING_SLOTS, STREAM_SLOTS};
use super::block::{is_zero, BlockConn, BlockTarget, Filled, Tried};
use super::poll::Waker;
use crate::engine::latency::{Class, LatencySet};
use crate::engine::{
    BackingIdentity, CacheMode, Channel, Config, Engine, IoError, OpenError, Pmem, Promotion,
    SeqPolicy, Stats, WbBatch, WbKind, WbNext,
};
use crate::env::medium::{Persistence, PosixPmem};
use crate::runtime::attach::{self, Dialect, Intent, Refusal};
use crate::runtime::direct::{self as dproto, DirectOp};
use crate::runtime::options::{PolicyParams, Settings};
use crate::runtime::sched::{self, Backoff, Every, FlushPacer};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest sleep of the background runner when it found nothing to do; a kick ends it early.
const BACKGROUND_IDLE: Duration = Duration::from_millis(100);
/// Ksets per writeback window (one backing FLUSH each): reactor 0 blocks while a window
/// is written, so its clients wait that long.
const EMBEDDED_WINDOW: u32 = 2;
/// Largest single backing write of writeback (coalesced extents; a longer extent goes
/// in parts); also the size of each of the STREAM_SLOTS slots of the background
/// queue's buffer (16 MiB in all).
const WB_MAX_IO: u64 = 512 << 10;
/// Writeback's writes in flight at once while read misses wait for the backing device
/// (`Volume::fg_reads`): foreground reads go first.
const WB_BUSY_OPS: usize = 2;
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
    /// Cache mode and sequential cutoff: given ones are set at format or attach.
    pub cache_mode: Option<CacheMode>,
    pub seq_cutoff_kib: Option<u32>,
    pub seq_policy: Option<SeqPolicy>,
    pub write_bypass_kib: Option<u32>,
    pub promotion: Option<Promotion>,
    /// Rebuild a medium in RAM into 2 MiB pages (default on; see
    /// `PosixPmem::start_huge_pages`).
    pub huge_pages: bool,
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
            cache_mode: None,
            seq_cutoff_kib: None,
            seq_policy: None,
            write_bypass_kib: None,
            promotion: None,
            huge_pages: true,
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
    /// The period of the backing FLUSH for direct writes alone, from what FLUSHes cost.
    direct_flush: Mutex<FlushPacer>,
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
    /// Read misses whose base reads are in flight (all reactors): while there are any,
    /// writeback keeps few writes in flight, so they do not queue behind many of them.
    fg_reads: AtomicUsize,
}

/// One backing write of a writeback window: `len` bytes at `off`, which are bytes
/// `skip..skip + len` of the run of data items starting at item `first`.
struct WbReq {
    off: u64,
    len: usize,
    first: usize,
    skip: usize,
}

/// What the background runner keeps between steps.
pub struct Background {
    wb: WbBatch,
    /// GC's scratch.
    buf: Vec<u8>,
    /// Writeback's requests of a window (`write_batch`).
    reqs: Vec<WbReq>,
    tick: Every,
}

impl Default for Background {
    fn default() -> Self {
        Background {
            // Small windows: reactor 0 serves no client while one is written.
            wb: WbBatch::with_window(EMBEDDED_WINDOW),
            buf: Vec::new(),
            reqs: Vec::new(),
            tick: Every::default(),
        }
    }
}

/// Nanoseconds since `t0`, for the latency histograms.
fn ns_since(t0: Instant) -> u64 {
    ns(t0.elapsed())
}

/// A duration in nanoseconds, saturating (for the latency histograms).
fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
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
        let mut pmem = PosixPmem::open(&o.pmem, o.pmem_size, o.persistence)?;
        if o.huge_pages {
            pmem.start_huge_pages();
        }
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
            fg_reads: AtomicUsize::new(0),
            wb_lat: engine.latency().register(),
            engine,
        })
    }

    /// The engine's run-time parameters: its errors are dated by the wall clock.
    fn config() -> Config {
        Config {
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
                    write_bypass_kib: o.write_bypass_kib,
                    promotion: o.promotion,
                },
            },
            format_id: random_id(),
            config: Self::config(),
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

    /// Stops the background thread's loop, if any (join it afterwards), closes the ksets
    /// and flushes the backing device (recording it: unsynced keys stay valid).
    pub fn shutdown(&self) -> io::Result<()> {
        self.stop.store(true, Release);
        self.kick();
        self.engine
            .shutdown()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut q = self.backing.queue()?;
        // Covers every closed kset: write-throughs stay cached across the restart.
        let mark = self.engine.direct_mark();
        q.flush()?;
        self.engine.direct_flushed(mark);
        Ok(())
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

mod background;
mod conn;
#[cfg(test)]
mod tests;

pub use conn::{Target, VolumeConn};
