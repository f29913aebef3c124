//! Readiness polling for the NBD reactors: a safe wrapper around poll(2), and an eventfd(2)
//! based [`Waker`] that another thread uses to interrupt a poll.
//!
//! This is the only place where the front end's event loop touches `libc`, so the front end
//! itself stays free of `unsafe`. Invariants: [`PollSet::wait`] only hands the kernel a
//! pointer to its own `pollfd` array, whose length it passes alongside; a descriptor number
//! that was closed (or even reused) after it was added cannot make poll(2) touch memory, it
//! only yields `POLLNVAL` or a spurious readiness, which callers treat like any readiness
//! (they retry a non-blocking read or write and see the real state). The waker never blocks:
//! its counter is non-blocking, and a counter that is already non-zero simply means the
//! reactor is awake already.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// What a caller wants to hear about for one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

impl Interest {
    pub const READ: Interest = Interest {
        read: true,
        write: false,
    };
}

/// What poll(2) reported for one descriptor. Errors and hang-ups count as both readable and
/// writable: the next read or write reports what actually happened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    pub read: bool,
    pub write: bool,
}

/// A reusable set of descriptors to poll. Adding and clearing never shrink the array, so a
/// loop that rebuilds the set before each wait allocates only when it grows.
#[derive(Default)]
pub struct PollSet {
    fds: Vec<libc::pollfd>,
}

impl PollSet {
    pub fn new() -> PollSet {
        PollSet::default()
    }

    /// Forgets every descriptor (keeps the allocation).
    pub fn clear(&mut self) {
        self.fds.clear();
    }

    /// Adds `fd` with `interest`; returns its index for [`PollSet::ready`]. An interest with
    /// neither read nor write still reports errors and hang-ups.
    pub fn add(&mut self, fd: BorrowedFd<'_>, interest: Interest) -> usize {
        let mut events = 0;
        if interest.read {
            events |= libc::POLLIN;
        }
        if interest.write {
            events |= libc::POLLOUT;
        }
        self.fds.push(libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        });
        self.fds.len() - 1
    }

    /// Waits until a descriptor is ready or `timeout` passed (rounded up to a millisecond, so
    /// a short non-zero wait never becomes a busy loop). Returns how many descriptors are
    /// ready; an interrupting signal returns 0, like a timeout, so the caller re-checks its
    /// flags.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<usize> {
        for p in &mut self.fds {
            p.revents = 0;
        }
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: the pointer and the count describe `self.fds`, an initialised array of
        // `pollfd` that lives (and is not otherwise borrowed) for the whole call; poll(2)
        // only writes the `revents` fields inside it.
        let n = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize)
    }

    /// Readiness of the descriptor added as number `index` (nothing for an unknown index).
    pub fn ready(&self, index: usize) -> Ready {
        let Some(p) = self.fds.get(index) else {
            return Ready::default();
        };
        let broken = p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
        Ready {
            read: broken || p.revents & libc::POLLIN != 0,
            write: broken || p.revents & libc::POLLOUT != 0,
        }
    }
}

/// Wakes a thread blocked in [`PollSet::wait`] on this waker's descriptor: an eventfd whose
/// counter becomes non-zero (readable) on [`Waker::wake`] until [`Waker::reset`].
#[derive(Debug)]
pub struct Waker {
    fd: File,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        // SAFETY: eventfd(2) takes no pointers; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor eventfd just returned to us, open and owned by
        // nobody else; the `OwnedFd` becomes its only owner and closes it once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Waker { fd: File::from(fd) })
    }

    /// Makes the descriptor readable. Never blocks; best effort (the only failure, a
    /// saturated counter, means the descriptor is readable already).
    pub fn wake(&self) {
        let _ = (&self.fd).write(&1u64.to_ne_bytes());
    }

    /// Clears the counter (call after the descriptor polled readable, before looking at
    /// what the wakers announced, so no wake-up is lost).
    pub fn reset(&self) {
        let mut b = [0u8; 8];
        let _ = (&self.fd).read(&mut b);
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn waker_wakes_and_resets() {
        let w = Waker::new().unwrap();
        let mut set = PollSet::new();
        set.add(w.as_fd(), Interest::READ);
        assert_eq!(set.wait(Duration::ZERO).unwrap(), 0);
        w.wake();
        w.wake();
        assert_eq!(set.wait(Duration::from_secs(5)).unwrap(), 1);
        assert!(set.ready(0).read);
        w.reset();
        assert_eq!(set.wait(Duration::ZERO).unwrap(), 0);
        assert!(!set.ready(0).read);
    }

    #[test]
    fn sockets_report_read_write_and_hangup() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut set = PollSet::new();
        let i = set.add(
            b.as_fd(),
            Interest {
                read: true,
                write: true,
            },
        );
        let t = Instant::now();
        assert_eq!(set.wait(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(
            set.ready(i),
            Ready {
                read: false,
                write: true
            }
        );
        a.write_all(b"x").unwrap();
        set.clear();
        let i = set.add(b.as_fd(), Interest::READ);
        set.wait(Duration::from_secs(5)).unwrap();
        assert!(set.ready(i).read);
        drop(a);
        set.wait(Duration::from_secs(5)).unwrap();
        assert!(set.ready(i).read && set.ready(i).write, "hang-up is both");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(set.ready(7), Ready::default());
    }

    #[test]
    fn timeout_is_honoured() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut set = PollSet::new();
        set.add(b.as_fd(), Interest::READ);
        let t = Instant::now();
        assert_eq!(set.wait(Duration::from_micros(1500)).unwrap(), 0);
        assert!(t.elapsed() >= Duration::from_millis(1));
    }
}
