//! A channel's sequential stream tracker (the sequential cutoff's detector): a fixed
//! array of the latest streams, least recently used replaced, so nothing allocates per
//! request. Used by the request paths (`io`) and consulted by routing (`policy`).

/// Sequential streams a channel tracks (least recently used is replaced).
pub const STREAMS: usize = 4;

/// One sequential stream seen on a channel.
#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// Where the next request of the stream starts; 0 = unused slot.
    end: u64,
    /// Bytes of the stream so far.
    len: u64,
    last_use: u64,
    write: bool,
}

/// A channel's stream tracker (fixed size: nothing allocates per request).
#[derive(Debug, Default)]
pub(super) struct Streams {
    s: [Stream; STREAMS],
    clock: u64,
}

impl Streams {
    /// Records a request and returns the length of the stream it continues (itself
    /// included).
    pub(super) fn note(&mut self, off: u64, len: u64, write: bool) -> u64 {
        self.clock += 1;
        let now = self.clock;
        if let Some(st) = self
            .s
            .iter_mut()
            .find(|st| st.len > 0 && st.end == off && st.write == write)
        {
            st.end = off + len;
            st.len += len;
            st.last_use = now;
            return st.len;
        }
        let lru = self
            .s
            .iter_mut()
            .min_by_key(|st| st.last_use)
            .expect("STREAMS > 0");
        *lru = Stream {
            end: off + len,
            len,
            last_use: now,
            write,
        };
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_accumulate_interleave_and_evict_the_oldest() {
        let mut s = Streams::default();
        // Two interleaved sequential writers and a reader at the same place.
        assert_eq!(s.note(0, 4096, true), 4096);
        assert_eq!(s.note(1 << 30, 8192, true), 8192);
        assert_eq!(s.note(4096, 4096, true), 8192);
        assert_eq!(s.note(4096, 4096, false), 4096); // reads are their own streams
        assert_eq!(s.note((1 << 30) + 8192, 8192, true), 16384);
        assert_eq!(s.note(8192, 4096, true), 12288);
        // Two more streams: one takes the free slot, the other the slot used longest
        // ago (the reader's).
        s.note(5 << 30, 512, true);
        s.note(7 << 30, 512, true);
        assert_eq!(s.note(12288, 4096, true), 16384, "writer 1 survived");
        assert_eq!(s.note(8192, 4096, false), 4096, "the reader was evicted");
        // A jump breaks a stream.
        assert_eq!(s.note(1 << 20, 4096, true), 4096);
    }
}
