//! NBD export of a block device: the embedded runtime's front end.
//!
//! A [`BlockTarget`] (defined in `env::posix::block`) is the device (a cached volume, or an in-memory disk in tests) and a
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
//! before it is durable. Requests of one connection are executed in order, one at a time on
//! its reactor; a read miss or a write that goes around the cache may stay in flight and
//! be answered later (NBD matches replies by cookie), and the handle makes whatever
//! overlaps it, and every FLUSH, wait for it. So a reply to FLUSH covers every write
//! answered before it, on this connection or, since the target's flush is global
//! (CAN_MULTI_CONN), on any other. No `unsafe` here: readiness polling and wake-ups come from
//! the safe wrapper in `crate::env::posix::poll`.

mod bytequeue;
mod client;
pub mod proto;
mod reactor;
mod server;
mod sockets;
#[cfg(test)]
mod tests;

/// The device an NBD server exports; defined below both this front end and the volume
/// that implements it, so the runtime never imports the front end.
pub use crate::env::posix::block::{BlockConn, BlockTarget, Filled, Tried};
pub use server::{Listener, NbdServer};
