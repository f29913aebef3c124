//! NBD export of a block device: the embedded runtime's front end.
//!
//! A [`BlockTarget`] is the device (a cached volume, or an in-memory disk in tests) and a
//! [`BlockConn`] a handle to it that one thread uses at a time. [`NbdServer`] accepts clients
//! on TCP and Unix sockets ([`Listener`]) and speaks the fixed-newstyle NBD protocol with
//! simple replies: `proto` holds the wire format, `server` the listeners, the accept loop and
//! the handshake, `reactor` the transmission phase.
//!
//! Threads: one accept loop; one short-lived thread per client for the handshake only (it
//! blocks, with a timeout, and ends when the client enters transmission); and a fixed set of
//! reactor threads (`NbdServer::reactors`, one per core by default) that serve every client
//! in transmission with non-blocking sockets and poll(2). No thread per request or per
//! connection in transmission. A target whose handles can be shared
//! ([`BlockTarget::share_conns`], the cached volume) gets one handle per reactor, opened
//! when the server starts (one engine channel and one io_uring queue per reactor, whatever
//! the number of clients); other targets get one handle per client, opened at NBD_OPT_GO.
//! Reactor 0 also runs the target's periodic background work between its polls
//! ([`BlockTarget::background`]: the cached volume's tick, writeback and GC).
//!
//! Invariants: nothing a client sends can panic the server or make it allocate beyond a fixed
//! bound (option payloads up to 64 KiB; per connection one input buffer of at most one request
//! plus a read chunk, and an output backlog that stops being filled past a few MiB); a
//! malformed request is answered with an NBD error and the connection stays up, unless the
//! byte stream can no longer be framed (bad magic), in which case only that connection is
//! closed. Replies leave only after the handles that executed their requests were committed
//! ([`BlockConn::commit`], once per reactor pass), so a group commit never answers a write
//! before it is durable. Requests of one connection are executed and answered in order, each
//! to completion before the next (of any connection on that reactor) starts, so a reply to FLUSH covers
//! every write answered before it, on this connection or, since the target's flush is global
//! (CAN_MULTI_CONN), on any other. No `unsafe` here: readiness polling and wake-ups come from
//! the safe wrapper in `crate::env::posix::poll`.

pub mod proto;
mod reactor;
mod server;
#[cfg(test)]
mod tests;

use crate::env::posix::poll::Waker;
pub use server::{Listener, NbdServer};

/// A handle to the exported device. With [`BlockTarget::share_conns`] one handle serves all
/// the clients of a reactor thread, one request at a time; otherwise each client has its own.
pub trait BlockConn: Send {
    /// Fills `buf` with the device content at `off`.
    fn read(&mut self, off: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Writes `data` at `off`; with `fua` it is durable when this returns. Without,
    /// durability may wait for the next [`BlockConn::commit`] (group commit).
    fn write(&mut self, off: u64, data: &[u8], fua: bool) -> std::io::Result<()>;
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
