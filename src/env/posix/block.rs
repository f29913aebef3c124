//! The block-device interface the embedded runtime exports: a [`BlockTarget`] (the
//! device, shared by every connection) and [`BlockConn`] handles to it. The cached volume
//! (`volume`) implements it and the NBD front end (`crate::frontend::nbd`) serves it;
//! it lives here, below both, so the layers point one way (frontend -> env, never back).
//!
//! Invariant: a handle is used by one thread at a time; durability is what each method's
//! contract says (write: at the next `commit` unless FUA; flush: everything before it).

use super::poll::Waker;

/// How a read that completed at once left its buffer ([`BlockConn::start_read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The buffer holds the data.
    Data,
    /// The data is all zero and the buffer was not written (a front end can say so
    /// without sending the zeros: an NBD hole chunk).
    Zero,
}

/// What became of a write handed to [`BlockConn::try_write`].
#[derive(Debug)]
pub enum Tried {
    /// It ran; the reply says this.
    Done(std::io::Result<()>),
    /// It must wait (a full or paced cache): keep it and try again later.
    Wait,
    /// It is in flight (a write the cache policy sends to the backing device):
    /// [`BlockConn::reap`] reports it under its tag, with empty data.
    Started,
}

/// Whether every byte is zero: ORs 4 KiB at a time (which vectorises), stopping at the
/// first block holding data, so ordinary data costs one block's look.
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// A handle to the exported device. With [`BlockTarget::share_conns`] one handle serves all
/// the clients of a reactor thread, one request at a time; otherwise each client has its own.
pub trait BlockConn: Send {
    /// Fills `buf` with the device content at `off`.
    fn read(&mut self, off: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Starts a read of `buf.len()` bytes at `off` that may complete later: Some(result)
    /// when it completed at once (`buf` filled, or [`Filled::Zero`]: the range reads as
    /// zeros and `buf` was not written), None when it is in flight and
    /// [`BlockConn::reap`] reports it later under `tag` (with its data; `buf` is then not
    /// used again). Only called on a handle shared by a reactor
    /// ([`BlockTarget::share_conns`]). Default: [`BlockConn::read`], at once.
    fn start_read(
        &mut self,
        off: u64,
        buf: &mut [u8],
        tag: u64,
    ) -> Option<std::io::Result<Filled>> {
        let _ = tag;
        Some(self.read(off, buf).map(|()| Filled::Data))
    }
    /// Reports the requests started by [`BlockConn::start_read`] and
    /// [`BlockConn::try_write`] that completed since the last call (without waiting):
    /// `done(tag, result)`, a read's data valid during the call (a write's is empty).
    fn reap(&mut self, done: &mut dyn FnMut(u64, std::io::Result<&[u8]>)) {
        let _ = done;
    }
    /// Requests in flight (started, not yet reaped).
    fn in_flight(&self) -> usize {
        0
    }
    /// A descriptor that polls readable when [`BlockConn::reap`] has something to report
    /// (None: never, reads complete at once).
    fn completions_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// Completions collected already (while the handle waited for others) that
    /// [`BlockConn::reap`] will report although the descriptor may not poll readable:
    /// the caller then polls without waiting. Default: none.
    fn completions_ready(&self) -> bool {
        false
    }
    /// Deferred work the reactor runs once the replies of its pass are sent (for example
    /// caching the data of read misses already answered). Default: nothing.
    fn after_replies(&mut self) {}
    /// Writes `data` at `off`; with `fua` it is durable when this returns. Without,
    /// durability may wait for the next [`BlockConn::commit`] (group commit).
    fn write(&mut self, off: u64, data: &[u8], fua: bool) -> std::io::Result<()>;
    /// Tries a write that may have to wait for the device (a full or paced cache) or
    /// complete later (a write that goes around the cache to the backing device):
    /// [`Tried::Done`] as [`BlockConn::write`] when it ran, [`Tried::Wait`] when it would
    /// wait, [`Tried::Started`] when [`BlockConn::reap`] reports it later under `tag`
    /// (`data` is not used again). A waiting request is kept by the caller and tried
    /// again later with `waited`, how long it has been trying (None on its first try, the
    /// only one where the handle routes it), and meanwhile the caller serves other
    /// requests: a paced write then holds up no read. Only called on a handle shared by a
    /// reactor. Default: [`BlockConn::write`], at once.
    fn try_write(
        &mut self,
        off: u64,
        data: &[u8],
        fua: bool,
        waited: Option<std::time::Duration>,
        tag: u64,
    ) -> Tried {
        let _ = (waited, tag);
        Tried::Done(self.write(off, data, fua))
    }
    /// Makes every request this handle executed so far as durable as its reply promises
    /// (group commit: one sync for a whole reactor pass). The reactor calls it before it
    /// sends any reply of those requests; an error means they must not be answered (the
    /// clients using this handle are disconnected instead). Default: nothing to do.
    fn commit(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Whether [`BlockConn::commit`] has real work to do (a sync pending): the reactor then
    /// first reads and executes what else its clients already sent, so one sync covers as
    /// many writes as possible. Default: false.
    fn wants_commit(&self) -> bool {
        false
    }
    /// Makes every write completed before this call durable.
    fn flush(&mut self) -> std::io::Result<()>;
    /// Discards a range; its content becomes unspecified (the cache may read zeroes or the
    /// old data).
    fn trim(&mut self, off: u64, len: u64, fua: bool) -> std::io::Result<()>;
    /// Zeroes a range; with `may_trim` the device may deallocate it instead of writing zeroes,
    /// as long as later reads return zeroes.
    fn write_zeroes(
        &mut self,
        off: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> std::io::Result<()>;
}

/// The exported device, shared by every connection.
pub trait BlockTarget: Send + Sync + 'static {
    type Conn: BlockConn;
    /// Export size in bytes.
    fn size(&self) -> u64;
    /// Minimum/preferred I/O block size (e.g. 512 or 4096); requests not aligned to it are
    /// rejected with EINVAL. Must be a power of two no larger than 32 MiB.
    fn block_size(&self) -> u32;
    /// Opens a new handle: one per reactor when [`BlockTarget::share_conns`], else one per
    /// client (at NBD_OPT_GO / NBD_OPT_EXPORT_NAME; a failure is reported to that client).
    fn connect(&self) -> std::io::Result<Self::Conn>;
    /// Whether one handle may serve many clients, their requests interleaved one at a time
    /// on one thread (true when a handle holds per-thread resources, like an engine channel
    /// and an I/O ring, rather than per-client state). Then the server opens one handle per
    /// reactor when it starts, and fails to start if it cannot. Default: one per client.
    fn share_conns(&self) -> bool {
        false
    }
    /// Periodic work that reactor 0 runs between polls with its shared handle (only called
    /// when [`BlockTarget::share_conns`]): for example a cache's writeback and GC. Returns
    /// how long the reactor may wait before calling again at the latest (`Duration::ZERO`
    /// when there is more to do at once); `None`, the default, means there is no such work
    /// here (the target does it elsewhere) and the hook is not called again. `wake` wakes
    /// that reactor: the target may keep it to ask for an early call, for example when a
    /// request on another reactor waits for background progress. Whatever the hook blocks
    /// on delays that reactor's clients. At shutdown reactor 0 keeps calling it until every
    /// other reactor has ended, since their requests may be waiting for it.
    fn background(
        &self,
        _conn: &mut Self::Conn,
        _wake: &std::sync::Arc<Waker>,
    ) -> Option<std::time::Duration> {
        None
    }
    /// Whether a FLUSH or FUA on one connection covers writes completed on every connection
    /// (NBD's CAN_MULTI_CONN), so clients may spread I/O over several connections.
    fn can_multi_conn(&self) -> bool {
        true
    }
}
