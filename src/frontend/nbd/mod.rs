//! NBD export of a block device: the embedded runtime's front end.
//!
//! A [`BlockTarget`] is the device (a cached volume, or an in-memory disk in tests); each
//! client connection gets its own [`BlockConn`] from [`BlockTarget::connect`], so a connection
//! owns an engine channel and never shares it with another thread. [`NbdServer`] accepts
//! clients on TCP and Unix sockets ([`Listener`]) and speaks the fixed-newstyle NBD protocol
//! with simple replies (`proto` holds the wire format, `server` the sockets and threads).
//!
//! Invariants: nothing a client sends can panic the server or make it allocate beyond a fixed
//! bound (option payloads up to 64 KiB, one request buffer of at most 32 MiB per connection);
//! a malformed request is answered with an NBD error and the connection stays up, unless the
//! byte stream can no longer be framed (bad magic), in which case only that connection is
//! closed. Requests of one connection are executed and answered in order, so a reply to
//! FLUSH covers every write answered before it. No `unsafe` here: the front end only uses
//! std sockets and threads.

pub mod proto;
mod server;

pub use server::{Listener, NbdServer};

/// One client's view of the exported device; each connection gets its own (owns an engine
/// channel).
pub trait BlockConn: Send {
    /// Fills `buf` with the device content at `off`.
    fn read(&mut self, off: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Writes `data` at `off`; with `fua` it is durable when this returns.
    fn write(&mut self, off: u64, data: &[u8], fua: bool) -> std::io::Result<()>;
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
    /// Opens a new per-connection handle.
    fn connect(&self) -> std::io::Result<Self::Conn>;
    /// Whether a FLUSH or FUA on one connection covers writes completed on every connection
    /// (NBD's CAN_MULTI_CONN), so clients may spread I/O over several connections.
    fn can_multi_conn(&self) -> bool {
        true
    }
}
