//! Environments the engine runs in. The only place in the crate for `unsafe` code and
//! for OS calls: `sim` (deterministic simulator for tests and benches) and `posix` (the
//! embedded runtime: mmap'd pmem, io_uring backing device).

pub mod counting_alloc;
pub mod cpu;
pub mod posix;
pub mod sim;
#[cfg(feature = "spdk")]
pub mod spdk;

/// Milliseconds since the Unix epoch: the wall clock that dates counted errors
/// (`engine::Config::wall_clock_ms`). A vDSO read, only on error paths.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
