//! The POSIX environment of the embedded runtime: a memory-mapped medium with real
//! cache-line flush instructions, and a backing file or block device driven through
//! io_uring with O_DIRECT.

pub mod backing;
pub mod block;
pub mod control;
pub mod metrics;

pub mod poll;
pub mod signals;
pub mod volume;
