//! A channel's sequential stream tracker (the sequential cutoff's detector): a fixed
//! array of the latest streams, so nothing allocates per request. A request that
//! continues no stream replaces the least recently used one, but a long stream that is
//! still going (at least `LONG` bytes, used within the last `ACTIVE` requests) goes
//! last: random requests between a stream's requests (a hot set read beside a
//! sequential writer, or reads passing the writer's requests while those wait for the
//! cache) would otherwise evict it, and each of its requests would then start a new,
//! short stream the cutoff never cuts. Used by the request paths (`io`) and consulted
//! by routing (`policy`).

/// Sequential streams a channel tracks (least recently used is replaced).
pub const STREAMS: usize = 4;
/// A stream this long and used within the last `ACTIVE` requests is replaced only when
/// every slot holds one.
const LONG: u64 = 256 << 10;
const ACTIVE: u64 = 1024;

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
            .min_by_key(|st| (st.len >= LONG && now - st.last_use <= ACTIVE, st.last_use))
            .expect("STREAMS > 0");
        *lru = Stream {
            end: off + len,
            len,
            last_use: now,
            write,
        };
        len
    }

    /// The length of the stream whose last request ended at `end` (0 if none): what
    /// `note` returned for that request, if no later request continued the stream.
    pub(super) fn ending_at(&self, end: u64, write: bool) -> u64 {
        self.s
            .iter()
            .find(|st| st.len > 0 && st.end == end && st.write == write)
            .map_or(0, |st| st.len)
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

    /// A long stream survives any number of random requests between its own, until it
    /// has been idle for `ACTIVE` requests; short streams are replaced least recently
    /// used first.
    #[test]
    fn a_long_stream_outlives_random_requests_while_it_goes_on() {
        let mut s = Streams::default();
        let chunk = 128u64 << 10;
        for i in 0..4 {
            s.note(i * chunk, chunk, true);
        }
        let mut rnd = 1u64 << 40;
        for i in 4..12 {
            for _ in 0..100 {
                rnd += 3 << 20;
                assert_eq!(s.note(rnd, 4096, false), 4096);
            }
            assert_eq!(s.note(i * chunk, chunk, true), (i + 1) * chunk);
        }
        // Idle too long: random requests take its slot in the end.
        for _ in 0..=ACTIVE {
            rnd += 3 << 20;
            s.note(rnd, 4096, false);
        }
        assert_eq!(s.note(12 * chunk, chunk, true), chunk, "evicted once idle");
    }
}
