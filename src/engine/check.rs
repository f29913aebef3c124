//! Consistency checks between the DRAM state and the on-media log, for tests after
//! every simulated step and for `pcache check`.
//!
//! They recompute from the log what the engine keeps incrementally: segment reference
//! counts, dirty bytes, segment uses; and check the index against them (no overlap, no
//! live extent pointing into a free or log segment). They take every lock in order, so
//! they are correct but slow; never call them on the I/O path.

use super::format::{KeyRec, KsetCheck, KEY_CLEAN, KEY_SIZE, KSET_HDR};
use super::open::read_kset;
use super::segs::Use;
use super::sync::lock;
use super::{Channel, Engine, Pmem};
use std::sync::atomic::Ordering::{Acquire, Relaxed};

/// What the log holds between two positions.
#[derive(Debug, Default, Clone)]
pub struct LogSummary {
    pub ksets: u64,
    pub keys: u64,
    pub dirty_bytes: u64,
    pub log_segments: Vec<u32>,
}

impl<P: Pmem> Engine<P> {
    /// Walks the closed log from key_tail to the head, calling `f` for every live key
    /// (not the unsynced keys the replay at open dropped) with a flag telling whether it
    /// is past dirty_tail.
    pub fn walk_log(&self, mut f: impl FnMut(&KeyRec, bool)) -> Result<LogSummary, String> {
        let (kt, dt) = {
            let t = lock(&self.tails);
            (t.key, t.dirty)
        };
        let head = lock(&self.head).pos;
        let mut s = LogSummary::default();
        let mut buf = vec![0u8; self.geo.kset_max_size()];
        let mut pos = kt;
        let mut dirty = pos == dt;
        s.log_segments.push(pos.seg);
        while pos != head {
            if pos.seq > head.seq {
                return Err(format!("log walk passed the head at kset {}", head.seq));
            }
            let hdr = match read_kset(&self.pmem, &self.geo, pos, &mut buf) {
                Ok(KsetCheck::Valid(h)) => h,
                Ok(KsetCheck::End) => {
                    return Err(format!(
                        "kset {} at {}:{} before the head is invalid",
                        pos.seq, pos.seg, pos.off
                    ))
                }
                Err(e) => return Err(e.to_string()),
            };
            s.ksets += 1;
            if hdr.is_last() {
                pos = pos.after(&hdr);
                s.log_segments.push(pos.seg);
            } else {
                for i in 0..hdr.count as usize {
                    let o = KSET_HDR + i * KEY_SIZE;
                    let k = KeyRec::decode(&buf[o..o + KEY_SIZE], &self.geo)
                        .map_err(|e| e.to_string())?;
                    if dirty && k.flags & KEY_CLEAN == 0 {
                        s.dirty_bytes += k.len as u64;
                    }
                    if !self.replay_kept(&k, pos.seq) {
                        continue; // dropped by the replay at open: not live
                    }
                    s.keys += 1;
                    f(&k, dirty);
                }
                pos = pos.after(&hdr);
            }
            if pos == dt {
                dirty = true;
            }
        }
        if !dirty {
            return Err("dirty_tail is not between key_tail and the head".into());
        }
        Ok(s)
    }

    /// Checks every invariant; `chans` are all live channels (their heads hold
    /// references). Must not run concurrently with I/O.
    pub fn check_invariants(&self, chans: &[&Channel]) -> Result<LogSummary, String> {
        let n = self.geo.n_segs as usize;
        let mut refs = vec![0u32; n];
        let gens: Vec<u64> = self.segs.gens.iter().map(|g| g.load(Acquire)).collect();
        let mut count = |k: &KeyRec| {
            if k.has_data() && gens[k.seg as usize] == k.gen {
                refs[k.seg as usize] += 1;
            }
        };
        let summary = self.walk_log(|k, _| count(k))?;
        let mut buffered_dirty = 0;
        for (_, slot) in self.slots.used() {
            let kb = lock(&slot.kset);
            for k in kb.keys(&self.geo) {
                count(&k);
            }
            buffered_dirty += kb.dirty_bytes;
        }
        let gc = lock(&self.gc_state);
        for c in chans.iter().copied().chain([gc.channel()]) {
            if let Some(h) = c.head() {
                refs[h.seg as usize] += 1 + h.spare;
            }
        }
        drop(gc);
        #[allow(clippy::needless_range_loop)] // s is also the segment id
        for s in 0..n {
            let have = self.segs.refs[s].load(Acquire);
            if have != refs[s] {
                return Err(format!(
                    "segment {s}: reference count {have}, log says {}",
                    refs[s]
                ));
            }
            let u = self.segs.use_of(s as u32);
            let want_data = refs[s] > 0;
            if want_data != (u == Use::Data) {
                return Err(format!("segment {s} is {u:?} with {} references", refs[s]));
            }
            if u == Use::Log && !summary.log_segments.contains(&(s as u32)) {
                return Err(format!("segment {s} is a log segment outside the log"));
            }
        }
        let closed = lock(&self.head).closed_dirty;
        if closed != summary.dirty_bytes {
            return Err(format!(
                "dirty bytes: engine counts {closed} closed (+{buffered_dirty} buffered), log holds {}",
                summary.dirty_bytes
            ));
        }
        for i in 0..self.shards.len() {
            let sh = self.shard(i);
            sh.check().map_err(|e| format!("shard {i}: {e}"))?;
            for (ks, x) in sh.iter() {
                if x.has_data()
                    && self.segs.gen32(x.seg) == x.gen
                    && self.segs.use_of(x.seg) != Use::Data
                {
                    return Err(format!(
                        "shard {i} extent at {ks} points into {:?} segment {}",
                        self.segs.use_of(x.seg),
                        x.seg
                    ));
                }
            }
            let n = sh.len();
            let data: u64 = sh
                .iter()
                .filter(|(_, x)| x.has_data())
                .map(|(_, x)| x.len as u64)
                .sum();
            if data != sh.data_bytes() {
                return Err(format!(
                    "shard {i}: extents map {data} bytes, the shard counts {}",
                    sh.data_bytes()
                ));
            }
            drop(sh);
            // What `stats` reports without locking the shard.
            let published = self.aux[i].len.load(Relaxed) as usize;
            if published != n {
                return Err(format!("shard {i}: {n} extents, {published} published"));
            }
            let published = self.aux[i].data.load(Relaxed);
            if published != data {
                return Err(format!(
                    "shard {i}: {data} data bytes, {published} published"
                ));
            }
        }
        Ok(summary)
    }
}
