//! Environments the engine runs in. The only place in the crate for `unsafe` code and
//! for OS calls: `sim` (deterministic simulator for tests and benches) and `posix` (the
//! embedded runtime: mmap'd pmem, io_uring backing device).

pub mod counting_alloc;
pub mod cpu;
pub mod posix;
pub mod sim;
#[cfg(feature = "spdk")]
pub mod spdk;
