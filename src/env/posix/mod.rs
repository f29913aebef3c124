//! The POSIX environment of the embedded runtime: a memory-mapped medium with real
//! cache-line flush instructions, and a backing file or block device driven through
//! io_uring with O_DIRECT.

pub mod backing;
pub mod control;
mod direct;
pub mod metrics;
pub mod pmem;
pub mod poll;
pub mod signals;
pub mod volume;

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
