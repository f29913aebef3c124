//! Environments the engine runs in. The only place in the crate for `unsafe` code and
//! for OS calls: `sim` (deterministic simulator for tests and benches), `medium` (the
//! mapped medium with real flush instructions, used by both runtimes), `posix` (the
//! embedded runtime: io_uring backing device, volume, control socket) and, with feature
//! `spdk`, `spdk` (the bdev module). Imports point one way: `posix` and `spdk` use
//! `medium` and `crate::runtime`, never each other.

pub mod counting_alloc;
pub mod cpu;
pub mod medium;
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

/// Takes an exclusive `flock` on `fd`, retrying for up to two seconds: the lock of a
/// process that was just killed can outlive it briefly (its io_uring work is torn
/// down asynchronously), and an immediate restart must not be refused for that.
/// Fails with `ErrorKind::WouldBlock` when another live process keeps holding it.
pub(crate) fn flock_exclusive(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    for attempt in 0..40 {
        // SAFETY: flock on a descriptor the caller keeps open has no memory effects.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || attempt == 39 {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    unreachable!("the loop returns on its last attempt")
}
