//! Locking for the request paths, and (feature `lockcount`) counting what they share.
//!
//! `lock` takes a short engine lock by spinning on `try_lock`. Every engine lock is held
//! for a bounded, short time (never across a data copy or any I/O), so on SPDK
//! reactors, one pinned thread per core, the holder is running and the spin ends within
//! its critical section. What happens when the spin budget runs out is the
//! environment's choice (`never_park`): by default the caller falls back to a blocking
//! `lock`, which parks it in the kernel: right for threads that may outnumber the cores
//! (the embedded runtime, tests), whose lock holder may be descheduled. An SPDK
//! environment calls `never_park` once: then a reactor keeps spinning and never enters
//! the kernel for an engine lock, as SPDK's own spin locks do. The engine has no
//! `unsafe`, so this is a spin in front of `std::sync::Mutex` rather than a hand-made
//! spin lock; nobody ever waits in `lock` then, so an unlock never makes a syscall
//! either.
//!
//! With the cargo feature `lockcount` (for the engine bench's `--count` mode) every lock
//! acquisition is counted as shared or channel-own, and every read-modify-write on an
//! atomic that several channels write; `counts()` reads the totals. Without the feature
//! the counting calls are empty inline functions: nothing on the I/O path changes.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, TryLockError};

/// `try_lock` rounds before a blocking `lock` (a few microseconds at most).
const SPINS: u32 = 256;

/// Set by `never_park`: engine locks spin until they get the lock.
static NEVER_PARK: AtomicBool = AtomicBool::new(false);

/// From now on, engine locks never park the calling thread: they spin until the lock
/// is free. For environments whose every engine thread has a core of its own (SPDK
/// reactors); process-wide, and cannot be undone.
pub fn never_park() {
    NEVER_PARK.store(true, Relaxed);
}

/// Takes a lock shared between channels (an index shard, the log head, ...).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    count::shared_lock();
    spin_lock(m)
}

/// Takes a channel's own lock (its kset): besides the owner only tick, flush and a
/// writer that must order its key after this channel's take it, so it is uncontended on
/// a hit or a write.
pub(super) fn lock_own<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    count::own_lock();
    spin_lock(m)
}

fn spin_lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    let mut spins = 0u32;
    loop {
        match m.try_lock() {
            Ok(g) => return g,
            Err(TryLockError::WouldBlock) => std::hint::spin_loop(),
            Err(TryLockError::Poisoned(p)) => panic!("engine lock poisoned: {p}"),
        }
        spins += 1;
        if spins >= SPINS && !NEVER_PARK.load(Relaxed) {
            return m.lock().expect("engine lock poisoned");
        }
    }
}

/// Shared lock acquisitions, channel-own lock acquisitions and shared atomic
/// read-modify-writes counted since the process started (all zero without `lockcount`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub shared_locks: u64,
    pub own_locks: u64,
    pub shared_rmw: u64,
}

impl Counts {
    /// Counts between `earlier` and `self`.
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            shared_locks: self.shared_locks - earlier.shared_locks,
            own_locks: self.own_locks - earlier.own_locks,
            shared_rmw: self.shared_rmw - earlier.shared_rmw,
        }
    }
}

/// Whether this build counts (feature `lockcount`).
pub const COUNTING: bool = cfg!(feature = "lockcount");

/// The counts so far.
pub fn counts() -> Counts {
    count::read()
}

#[cfg(feature = "lockcount")]
pub(super) mod count {
    //! Process-wide counters: the counting build is for a single-threaded bench.
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static SHARED: AtomicU64 = AtomicU64::new(0);
    static OWN: AtomicU64 = AtomicU64::new(0);
    static RMW: AtomicU64 = AtomicU64::new(0);
    pub fn shared_lock() {
        SHARED.fetch_add(1, Relaxed);
    }
    pub fn own_lock() {
        OWN.fetch_add(1, Relaxed);
    }
    pub fn rmw() {
        RMW.fetch_add(1, Relaxed);
    }
    pub fn read() -> super::Counts {
        super::Counts {
            shared_locks: SHARED.load(Relaxed),
            own_locks: OWN.load(Relaxed),
            shared_rmw: RMW.load(Relaxed),
        }
    }
}

#[cfg(not(feature = "lockcount"))]
pub(super) mod count {
    //! Counting compiled out: empty inline functions.
    #[inline(always)]
    pub fn shared_lock() {}
    #[inline(always)]
    pub fn own_lock() {}
    #[inline(always)]
    pub fn rmw() {}
    pub fn read() -> super::Counts {
        super::Counts::default()
    }
}
