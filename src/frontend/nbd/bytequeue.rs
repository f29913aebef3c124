//! The byte FIFO the reactor keeps per client for its input (requests and WRITE
//! payloads) and output (replies): one buffer that only grows (amortised doubling up to
//! a limit, exact past it) and is compacted in place, so the hot path neither allocates
//! nor clears.

/// A byte FIFO over one buffer: data lives in `buf[start..end]`. The buffer never shrinks
/// and is zeroed only when it grows, so steady-state use neither allocates nor clears.
pub(super) struct ByteQueue {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Growth past this is exact (no doubling), keeping the bound the reactor promises.
    limit: usize,
}

impl ByteQueue {
    pub(super) fn new(limit: usize) -> ByteQueue {
        ByteQueue::from_vec(Vec::new(), limit)
    }

    pub(super) fn from_vec(buf: Vec<u8>, limit: usize) -> ByteQueue {
        ByteQueue {
            end: buf.len(),
            buf,
            start: 0,
            limit,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// The free space after the data, at least `n` bytes: the data moves to the front, or
    /// the buffer grows, only when the tail is too short.
    pub(super) fn spare(&mut self, n: usize) -> &mut [u8] {
        if self.buf.len() - self.end < n {
            let len = self.len();
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.start = 0;
                self.end = len;
            }
            let need = len + n;
            if self.buf.len() < need {
                let doubled = (self.buf.len() * 2).min(self.limit);
                self.buf.resize(need.max(doubled), 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Appends `n` bytes written into [`ByteQueue::spare`].
    pub(super) fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    pub(super) fn put(&mut self, bytes: &[u8]) {
        self.spare(bytes.len())[..bytes.len()].copy_from_slice(bytes);
        self.commit(bytes.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_queue_compacts_and_grows_only_when_needed() {
        let mut q = ByteQueue::new(1 << 20);
        q.put(b"hello");
        assert_eq!(q.data(), b"hello");
        q.consume(2);
        assert_eq!(q.data(), b"llo");
        let cap = q.buf.len();
        // Room at the tail: nothing moves.
        q.spare(cap - 5);
        assert_eq!((q.start, q.data()), (2, &b"llo"[..]));
        // Not enough at the tail but enough overall: the data moves to the front.
        q.spare(cap - 3);
        assert_eq!((q.start, q.buf.len(), q.data()), (0, cap, &b"llo"[..]));
        // Not enough at all: grows (doubling), keeping the data.
        q.spare(cap);
        assert!(q.buf.len() >= 2 * cap);
        assert_eq!(q.data(), b"llo");
        q.consume(100);
        assert!(q.is_empty());
        assert_eq!((q.start, q.end), (0, 0));
        // Past the limit growth is exact.
        let mut q = ByteQueue::new(16);
        q.spare(10);
        q.commit(10);
        q.spare(30);
        assert_eq!(q.buf.len(), 40);
    }
}
