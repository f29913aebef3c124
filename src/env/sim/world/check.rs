//! The crash half of the simulated world: power loss at any point, then the checks
//! that the backing device alone and the replayed cache hold what the durability
//! contract promises (a child of `world` so it can read the world's bookkeeping).

use super::*;

impl World {
    /// Power loss now: crash pmem and disk, check the backing device alone, replay, and
    /// check every block. The world then continues on the recovered state.
    pub fn crash_and_check(&mut self, mode: CrashMode) -> Result<(), String> {
        self.crashes += 1;
        let mut crng = self.rng.fork();
        let img = self.pmem.crash(&mut crng, mode);
        self.disk.crash(&mut crng);
        self.check_backing()?;
        let pmem = Arc::new(SimPmem::from_image(img));
        let size = self.disk.size();
        let engine = Engine::open(
            pmem.clone(),
            &identity(size),
            false,
            &Self::config(&self.cfg),
        )
        .map_err(|e| format!("replay failed: {e}"))?;
        self.engine = engine;
        self.pmem = pmem;
        self.chans = (0..self.cfg.channels).map(|_| Channel::default()).collect();
        self.wb_inflight = None;
        self.engine
            .check_invariants(&[])
            .map_err(|e| format!("invariant after replay: {e}"))?;
        let inflight = std::mem::take(&mut self.inflight_ids);
        let n = self.cfg.region_blocks;
        let mut buf = vec![0u8; n as usize * BS];
        self.engine
            .read(&mut self.chans[0], self.base, &mut buf)
            .map_err(|e| format!("read after replay: {e}"))?;
        let misses: Vec<_> = self.chans[0].misses().collect();
        for m in misses {
            self.disk
                .read(self.base + m.at as u64, &mut buf[m.at..m.at + m.len])
                .map_err(|e| format!("{e:?}"))?;
        }
        self.engine.fill(&mut self.chans[0], self.base, &buf, true);
        for b in 0..n {
            let got = decode(b, &buf[b as usize * BS..(b as usize + 1) * BS])?;
            let blk = &mut self.blocks[b as usize];
            let allowed = &blk.hist[blk.floor..];
            let in_flight = inflight.iter().any(|&(ib, id)| ib == b && id == got);
            if !allowed.contains(&got) && !in_flight {
                return Err(format!(
                    "after crash block {b} reads write {got}; durable is {} (newer completed: {:?})",
                    blk.hist[blk.floor],
                    &blk.hist[blk.floor + 1..]
                ));
            }
            // What replay shows is durable from now on; the writes after it are lost.
            match blk.hist[blk.floor..].iter().rposition(|&h| h == got) {
                Some(p) => blk.hist.truncate(blk.floor + p + 1),
                None => blk.hist.push(got), // the write in flight made it
            }
            blk.floor = blk.hist.len() - 1;
        }
        let refs: Vec<&Channel> = self.chans.iter().collect();
        self.engine
            .check_invariants(&refs)
            .map_err(|e| format!("invariant after recovery read: {e}"))?;
        self.unsynced_dropped += self.engine.replay_unsynced_dropped();
        self.check_clean_matches_backing(&buf)
    }

    /// After the recovery read `first`: clean cached data must be what the backing
    /// device durably holds, so evicting it changes nothing a read returns. (A clean
    /// key over a write the disk lost with the crash, say an unflushed write-through,
    /// would show the newer write now and the older one after eviction.)
    fn check_clean_matches_backing(&mut self, first: &[u8]) -> Result<(), String> {
        self.engine.invalidate_clean();
        let n = self.cfg.region_blocks;
        let mut buf = vec![0u8; n as usize * BS];
        self.engine
            .read(&mut self.chans[0], self.base, &mut buf)
            .map_err(|e| format!("read after eviction: {e}"))?;
        let misses: Vec<_> = self.chans[0].misses().collect();
        for m in misses {
            self.disk
                .read(self.base + m.at as u64, &mut buf[m.at..m.at + m.len])
                .map_err(|e| format!("{e:?}"))?;
        }
        self.engine.fill(&mut self.chans[0], self.base, &buf, true);
        for b in 0..n as usize {
            let r = b * BS..(b + 1) * BS;
            if buf[r.clone()] != first[r.clone()] {
                return Err(format!(
                    "after crash block {b} read write {} from the cache, then write {} from the backing device once the clean copy was evicted",
                    decode(b as u64, &first[r.clone()])?,
                    decode(b as u64, &buf[r])?
                ));
            }
        }
        Ok(())
    }

    /// The backing device alone must look like a disk with a volatile write cache
    /// that lost some unflushed writes: no write from after the k-th FLUSH without
    /// everything from before it.
    fn check_backing(&mut self) -> Result<(), String> {
        let img = self.disk.durable_image();
        let n = self.cfg.region_blocks as usize;
        let mut ids = Vec::with_capacity(n);
        let mut epoch = 0u64;
        for b in 0..n {
            let at = self.base as usize + b * BS;
            let id = decode(b as u64, &img[at..at + BS]).map_err(|e| format!("backing: {e}"))?;
            if id != 0 && !self.direct[id as usize] {
                epoch = epoch.max(self.write_epoch[id as usize]);
            }
            ids.push(id);
        }
        if epoch == 0 {
            return Ok(());
        }
        let snap = &self.flush_snap[epoch as usize - 1];
        for b in 0..n {
            let need = snap[b];
            let have = ids[b];
            // Every write id is unique and increasing per block, except zeros (id 0):
            // a zero block satisfies the cut if a zero write is at or after `need`.
            let hist = &self.blocks[b].hist;
            // The operation in flight may have reached the disk durably (a FUA's FLUSH
            // completed, then the power failed before it completed to the client).
            let in_flight = self
                .inflight_ids
                .iter()
                .any(|&(ib, id)| ib == b as u64 && id == have);
            let ok = have == need
                || in_flight
                || (need != 0 && have > need)
                || (have == 0 && hist.iter().skip_while(|&&h| h != need).any(|&h| h == 0))
                || (need == 0 && have != 0);
            if !ok {
                return Err(format!(
                    "backing block {b} holds write {have} but writes up to FLUSH {epoch} reached the backing and it should hold at least {need}"
                ));
            }
        }
        Ok(())
    }
}
