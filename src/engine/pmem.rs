//! The persistent-memory medium as the engine sees it.
//!
//! The engine reaches the medium only through this trait, so every ordering decision is
//! visible to the simulator. The contract: bytes stored with `write` are durable only
//! after `flush` of a range covering them *and* a later `fence` on the same thread.
//! Unflushed or unfenced bytes may survive a crash whole, not at all, or torn at 8-byte
//! words. Implementations must allow concurrent calls on disjoint ranges.
//!
//! Group commit: a request's data (a write, a miss fill) is flushed with `flush_data`,
//! which an environment may make durable later, for many requests at once (one `fdatasync`
//! for a whole reactor pass in `file` mode). Such a request completes only once the
//! environment has made its data durable. The engine keeps the one ordering that depends
//! on it: it calls `drain` before it stores any key into the log (kset close), so a key
//! never reaches the medium ahead of the data it points at, and at FLUSH.

/// A byte-addressable persistent medium mapped into the process.
pub trait Pmem: Send + Sync {
    /// Size of the medium in bytes.
    fn size(&self) -> u64;
    /// Copies `dst.len()` bytes at `off` into `dst`. `off + dst.len() <= size()`.
    fn read(&self, off: u64, dst: &mut [u8]);
    /// Stores `src` at `off` (the implementation may use non-temporal stores).
    fn write(&self, off: u64, src: &[u8]);
    /// Like `write`, but non-temporal stores may stay unordered until this thread's
    /// next `fence_writes`, so several requests' data streams out with one fence. The
    /// caller touches the range (and publishes it to other threads) only after that.
    /// Default: `write`.
    fn write_unordered(&self, off: u64, src: &[u8]) {
        self.write(off, src)
    }
    /// Orders every earlier `write_unordered` of this thread before what follows.
    /// Default: nothing (`write_unordered` was `write`).
    fn fence_writes(&self) {}
    /// Starts write-back of the cache lines of `[off, off + len)` (clwb/clflushopt, or
    /// msync in file mode). Durable only after the next `fence`.
    fn flush(&self, off: u64, len: u64);
    /// Orders and completes every earlier flush and non-temporal store of this thread.
    fn fence(&self);
    /// Like `flush`, for request data whose key is not in the log yet: the environment
    /// may postpone its durability until `drain` or its own group commit, and then
    /// completes the request only after that. Default: `flush`.
    fn flush_data(&self, off: u64, len: u64) {
        self.flush(off, len)
    }
    /// Makes every earlier `flush_data` range durable before returning. Called before a
    /// key is stored into the log and at FLUSH. Default: nothing was postponed.
    fn drain(&self) {}

    /// `write` + `flush` + `fence`: the common persistence point.
    fn persist(&self, off: u64, src: &[u8]) {
        self.write(off, src);
        self.flush(off, src.len() as u64);
        self.fence();
    }
}

impl<T: Pmem + ?Sized> Pmem for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read(&self, off: u64, dst: &mut [u8]) {
        (**self).read(off, dst)
    }
    fn write(&self, off: u64, src: &[u8]) {
        (**self).write(off, src)
    }
    fn write_unordered(&self, off: u64, src: &[u8]) {
        (**self).write_unordered(off, src)
    }
    fn fence_writes(&self) {
        (**self).fence_writes()
    }
    fn flush(&self, off: u64, len: u64) {
        (**self).flush(off, len)
    }
    fn fence(&self) {
        (**self).fence()
    }
    fn flush_data(&self, off: u64, len: u64) {
        (**self).flush_data(off, len)
    }
    fn drain(&self) {
        (**self).drain()
    }
}
