//! Formatting a medium, and attaching to one: validation of every metadata object and
//! replay of the kset log from key_tail to rebuild the index.
//!
//! Nothing read from the medium is trusted: geometry comes from a CRC-checked
//! superblock and is checked against the medium's size; tails, keys and LAST links are
//! bounded by it; the walk is bounded by the number of segments (a LAST chain that
//! revisits a segment is a cycle, hence corruption). A medium is never formatted here
//! implicitly: a blank or foreign one is reported to the caller, which decides.

use super::format::{
    self, check_kset, pick_replica, CacheInfo, FlushRec, Geometry, KeyRec, KsetCheck, LogPos,
    MediaError, Superblock, DIRTY_TAIL_OFF, FLUSH_REC_OFF, FLUSH_REC_SIZE, INFO_DATA_CRC,
    INFO_INIT_DONE, INFO_OFF, INFO_SIZE, KEY_CLEAN, KEY_SIZE, KEY_TAIL_OFF, KEY_UNSYNCED,
    KIND_DIRTY_TAIL, KIND_KEY_TAIL, KSET_HDR, SB_OFF, SB_SIZE, SEGMENTS_OFF, SLOT, SUBTREE_SIZE,
    TAIL_SIZE,
};
use super::index::{Extent, Replayed, Shard, ShardLock, F_CRC, F_DIRTY, F_ZERO};
use super::log::LogHead;
use super::segs::{self, Segs, Use};
use super::{Config, Engine, Errors, FormatOptions, InfoState, OpenError, Pmem, Replica, Tails};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

/// What a medium holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// All-zero metadata area: nothing to lose.
    Blank,
    /// A pcache superblock.
    Pcache(Superblock),
    /// Something else (or pcache metadata this build cannot read: the error says).
    Foreign(Option<String>),
}

/// Looks at a medium without changing it.
pub fn probe<P: Pmem>(pmem: &P) -> Probe {
    let size = pmem.size();
    if size < SEGMENTS_OFF {
        return Probe::Foreign(Some(format!("medium of {size} bytes is too small")));
    }
    let mut b = [[0u8; SB_SIZE]; 2];
    for (i, buf) in b.iter_mut().enumerate() {
        pmem.read(SB_OFF[i], buf);
    }
    match pick_replica([
        Superblock::decode(&b[0], size),
        Superblock::decode(&b[1], size),
    ]) {
        Ok((_, _, sb)) => Probe::Pcache(sb),
        Err(e) => {
            let mut area = vec![0u8; (2 * SLOT) as usize];
            pmem.read(0, &mut area);
            if area.iter().all(|&x| x == 0) {
                Probe::Blank
            } else if b
                .iter()
                .any(|s| s[16..24] == format::SB_MAGIC.to_le_bytes())
            {
                Probe::Foreign(Some(e.to_string()))
            } else {
                Probe::Foreign(None)
            }
        }
    }
}

fn corrupt(e: impl std::fmt::Display) -> OpenError {
    OpenError::Corrupt(e.to_string())
}

/// Reads the kset at `pos` into `buf` (bounded by the segment's data area) and checks it.
pub(crate) fn read_kset<P: Pmem>(
    pmem: &P,
    geo: &Geometry,
    pos: LogPos,
    buf: &mut [u8],
) -> Result<KsetCheck, MediaError> {
    let remaining = geo.seg_data_size.saturating_sub(pos.off as u64) as usize;
    let n = remaining.min(geo.kset_max_size()).min(buf.len());
    pmem.read(geo.data_off(pos.seg, pos.off as u64), &mut buf[..n]);
    let r = check_kset(&buf[..n], geo, pos.seq)?;
    if let KsetCheck::Valid(h) = r {
        // A close always leaves room for a LAST link and a terminator after a kset; an
        // authentic kset that does not is corruption (the next close would overrun the
        // segment, and replay could never get past it).
        if !h.is_last() && remaining < h.size() + 2 * KSET_HDR {
            return Err(MediaError::Field {
                what: "kset",
                field: "size (overruns its segment)",
                value: h.size() as u64,
            });
        }
    }
    Ok(r)
}

impl<P: Pmem> Engine<P> {
    /// Formats `pmem` as a new cache, destroying whatever it held. Callers check
    /// `probe` first and refuse to overwrite anything but a blank medium unless forced.
    pub fn format(pmem: P, opts: &FormatOptions, cfg: &Config) -> Result<Self, OpenError> {
        let size = pmem.size();
        let seg_size = match opts.seg_size {
            0 => format::auto_seg_size(size),
            s => s,
        };
        format::check_seg_size(seg_size).map_err(OpenError::Invalid)?;
        if opts.kset_keys == 0 || opts.kset_keys > format::KSET_KEYS_MAX {
            return Err(OpenError::Invalid(format!(
                "kset_keys {} not in 1..128",
                opts.kset_keys
            )));
        }
        if opts.gc_percent > format::GC_PERCENT_MAX {
            return Err(OpenError::Invalid(format!(
                "gc_percent {} not in 0..={}",
                opts.gc_percent,
                format::GC_PERCENT_MAX
            )));
        }
        let bs = opts.backing.block_size;
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(OpenError::Invalid(format!("backing block size {bs}")));
        }
        if opts.backing.size == 0 || opts.backing.size % bs as u64 != 0 {
            return Err(OpenError::Invalid(format!(
                "backing size {} is not a positive multiple of its block size {bs}",
                opts.backing.size
            )));
        }
        let n_segs = size.saturating_sub(SEGMENTS_OFF) / seg_size as u64;
        let min = (cfg.log_reserve + 3) as u64;
        if n_segs < min || n_segs > u32::MAX as u64 / 2 {
            return Err(OpenError::Invalid(format!(
                "medium of {size} bytes holds {n_segs} segments of {seg_size}; need at least {min}"
            )));
        }
        let sb = Superblock {
            pmem_size: size,
            seg_size,
            n_segs: n_segs as u32,
            kset_keys: opts.kset_keys,
            format_id: opts.format_id,
            backing: opts.backing.clone(),
        };
        let geo = Geometry::from_sb(&sb);
        // The superblock goes last: a crash before it leaves a blank medium.
        let zero = vec![0u8; SEGMENTS_OFF as usize];
        pmem.write(0, &zero);
        pmem.flush(0, SEGMENTS_OFF);
        for s in 0..sb.n_segs {
            segs::format_gen(&pmem, &geo, s);
        }
        pmem.write(geo.data_off(0, 0), &[0u8; KSET_HDR]);
        pmem.flush(geo.data_off(0, 0), KSET_HDR as u64);
        let start = LogPos {
            seq: 1,
            seg: 0,
            off: 0,
        };
        pmem.write(KEY_TAIL_OFF[0], &start.encode(KIND_KEY_TAIL, 1));
        pmem.write(DIRTY_TAIL_OFF[0], &start.encode(KIND_DIRTY_TAIL, 1));
        pmem.flush(KEY_TAIL_OFF[0], 256);
        let mut flags = INFO_INIT_DONE;
        if opts.data_crc {
            flags |= INFO_DATA_CRC;
        }
        opts.policy.validate().map_err(OpenError::Invalid)?;
        let info = CacheInfo {
            gc_percent: opts.gc_percent,
            flags,
            policy: opts.policy,
        };
        pmem.write(INFO_OFF[0], &info.encode(1));
        pmem.flush(INFO_OFF[0], INFO_SIZE as u64);
        pmem.fence();
        for off in SB_OFF {
            pmem.persist(off, &sb.encode(1));
        }
        Self::open(pmem, &opts.backing, false, cfg)
    }

    /// Replays a medium without a backing device at hand (offline status and check):
    /// the identity recorded in the superblock is taken as given.
    pub fn open_offline(pmem: P, cfg: &Config) -> Result<Self, OpenError> {
        let backing = match probe(&pmem) {
            Probe::Blank => return Err(OpenError::Blank),
            Probe::Foreign(None) => return Err(OpenError::Foreign),
            Probe::Foreign(Some(e)) => return Err(corrupt(e)),
            Probe::Pcache(sb) => sb.backing,
        };
        Self::open(pmem, &backing, false, cfg)
    }

    /// Attaches to a formatted medium and replays its log. `backing` is the device the
    /// caller is about to use: a different size is always refused, a different
    /// identity unless `force`.
    pub fn open(
        pmem: P,
        backing: &format::BackingIdentity,
        force: bool,
        cfg: &Config,
    ) -> Result<Self, OpenError> {
        let sb = match probe(&pmem) {
            Probe::Blank => return Err(OpenError::Blank),
            Probe::Foreign(None) => return Err(OpenError::Foreign),
            Probe::Foreign(Some(e)) => return Err(corrupt(e)),
            Probe::Pcache(sb) => sb,
        };
        // Both refusals name the identity the cache expects, so the user can find (or
        // recreate) that device instead of discarding the cache.
        let show = |b: &format::BackingIdentity| {
            format!(
                "'{}' ({} bytes, {}-byte blocks)",
                b.id, b.size, b.block_size
            )
        };
        if sb.backing.size != backing.size || sb.backing.block_size != backing.block_size {
            return Err(OpenError::WrongBacking(format!(
                "formatted for {}, the device is {}: sizes differ",
                show(&sb.backing),
                show(backing)
            )));
        }
        if format::clip_id(&sb.backing.id) != format::clip_id(&backing.id) && !force {
            return Err(OpenError::WrongBacking(format!(
                "formatted for {}, the device is {}",
                show(&sb.backing),
                show(backing)
            )));
        }
        let geo = Geometry::from_sb(&sb);
        if geo.n_segs <= cfg.log_reserve + 2 {
            return Err(corrupt("too few segments"));
        }

        let mut ib = [[0u8; INFO_SIZE]; 2];
        let mut tb = [[0u8; TAIL_SIZE]; 4];
        for i in 0..2 {
            pmem.read(INFO_OFF[i], &mut ib[i]);
            pmem.read(KEY_TAIL_OFF[i], &mut tb[i]);
            pmem.read(DIRTY_TAIL_OFF[i], &mut tb[2 + i]);
        }
        let (islot, iseq, info) =
            pick_replica([CacheInfo::decode(&ib[0]), CacheInfo::decode(&ib[1])])
                .map_err(corrupt)?;
        if info.flags & INFO_INIT_DONE == 0 {
            return Err(corrupt("cache_info: format never completed"));
        }
        let dec = |b: &[u8], kind| LogPos::decode(b, kind, geo.n_segs, geo.seg_data_size);
        let (kslot, kseq, key_tail) =
            pick_replica([dec(&tb[0], KIND_KEY_TAIL), dec(&tb[1], KIND_KEY_TAIL)])
                .map_err(corrupt)?;
        let (dslot, dseq, dirty_tail) =
            pick_replica([dec(&tb[2], KIND_DIRTY_TAIL), dec(&tb[3], KIND_DIRTY_TAIL)])
                .map_err(corrupt)?;
        if dirty_tail.seq < key_tail.seq {
            return Err(corrupt(format!(
                "dirty_tail (kset {}) is behind key_tail (kset {})",
                dirty_tail.seq, key_tail.seq
            )));
        }
        let mut fb = [[0u8; FLUSH_REC_SIZE]; 2];
        for (i, b) in fb.iter_mut().enumerate() {
            pmem.read(FLUSH_REC_OFF[i], b);
        }
        let (fslot, fseq, frec) =
            pick_replica([FlushRec::decode(&fb[0]), FlushRec::decode(&fb[1])]).map_err(corrupt)?;
        let gens = (0..geo.n_segs)
            .map(|s| segs::load_gen(&pmem, &geo, s))
            .collect::<Result<Vec<u64>, String>>()
            .map_err(corrupt)?;

        let data_crc = info.flags & INFO_DATA_CRC != 0;
        let n_shards = geo.backing_size.div_ceil(SUBTREE_SIZE) as usize;
        let mut replayed = Replayed::new(n_shards);
        let mut uses = vec![Use::Free; geo.n_segs as usize];
        let mut refs = vec![0u32; geo.n_segs as usize];
        let mut buf = vec![0u8; geo.kset_max_size()];

        // Replay.
        let mut pos = key_tail;
        uses[pos.seg as usize] = Use::Log;
        let mut saw_dirty = pos == dirty_tail;
        let mut closed_dirty = 0u64;
        let mut unsynced_dropped = 0u64;
        loop {
            let hdr = match read_kset(&pmem, &geo, pos, &mut buf).map_err(corrupt)? {
                KsetCheck::End => break,
                KsetCheck::Valid(h) => h,
            };
            if hdr.is_last() {
                let next = hdr.count;
                if uses[next as usize] != Use::Free {
                    return Err(corrupt(format!(
                        "kset log links back to segment {next} (kset {}): cycle",
                        pos.seq
                    )));
                }
                uses[next as usize] = Use::Log;
                pos = pos.after(&hdr);
            } else {
                let keep_unsynced = frec.covers(pos.seq);
                for i in 0..hdr.count as usize {
                    let o = KSET_HDR + i * KEY_SIZE;
                    let k = KeyRec::decode(&buf[o..o + KEY_SIZE], &geo).map_err(|e| {
                        corrupt(format!(
                            "{e} (key {i} of kset {} at {}:{})",
                            pos.seq, pos.seg, pos.off
                        ))
                    })?;
                    if saw_dirty && k.flags & KEY_CLEAN == 0 {
                        closed_dirty += k.len as u64;
                    }
                    if k.flags & KEY_UNSYNCED != 0 && !keep_unsynced {
                        // Its backing copy may have been lost with the crash: the range
                        // reads from the backing device (the tombstone before it, or the
                        // older extent, stands).
                        unsynced_dropped += 1;
                        continue;
                    }
                    replay_key(&k, &gens, &mut refs, &mut replayed, data_crc, saw_dirty)?;
                }
                pos = pos.after(&hdr);
            }
            if pos == dirty_tail {
                saw_dirty = true;
            }
        }
        if !saw_dirty {
            return Err(corrupt(format!(
                "dirty_tail {}:{} (kset {}) is not in the log that ends at {}:{} (kset {})",
                dirty_tail.seg, dirty_tail.off, dirty_tail.seq, pos.seg, pos.off, pos.seq
            )));
        }
        for s in 0..geo.n_segs as usize {
            if refs[s] > 0 {
                if uses[s] == Use::Log {
                    return Err(corrupt(format!(
                        "segment {s} holds both log and cached data"
                    )));
                }
                uses[s] = Use::Data;
            }
        }
        // The unsynced keys dropped here must stay dropped once later FLUSHes move
        // `through` past their ksets: the next record update persists them as the drop
        // range (joined with a range still in the log; a hull may drop more, never less).
        let last = pos.seq - 1;
        let mut rec = frec;
        if rec.drop_hi < key_tail.seq {
            (rec.drop_lo, rec.drop_hi) = (0, 0);
        }
        if unsynced_dropped > 0 && last > rec.through {
            let lo = rec.through + 1;
            rec.drop_lo = if rec.drop_hi == 0 {
                lo
            } else {
                rec.drop_lo.min(lo)
            };
            rec.drop_hi = rec.drop_hi.max(last);
        }
        let segs = Segs::new(uses, gens, refs, cfg.log_reserve, geo.seg_data_size);
        let e = Engine {
            pmem,
            data_crc,
            align: sb.backing.block_size,
            sb,
            geo,
            shards: (0..n_shards)
                .map(|si| {
                    let mut s = Shard::default();
                    if replayed.has(si) {
                        s.set_replayed();
                    }
                    ShardLock(Mutex::new(s))
                })
                .collect(),
            unsettled: AtomicUsize::new(replayed.order.len()),
            settle_cursor: AtomicUsize::new(0),
            replayed: Mutex::new(Some(Arc::new(replayed))),
            slots: Arc::default(),
            aux: (0..n_shards).map(|_| super::ShardAux::new()).collect(),
            pend: (0..n_shards * super::PEND_PER_SHARD)
                .map(|_| AtomicU64::new(super::PEND_NONE))
                .collect(),
            head: Mutex::new(LogHead {
                pos,
                closed_dirty,
                epochs: Default::default(),
            }),
            epoch: AtomicU64::new(1),
            writes_at_tick: AtomicU64::new(0),
            idle: AtomicBool::new(true),
            pace: AtomicBool::new(false),
            credit: AtomicI64::new(0),
            over: AtomicBool::new(false),
            door: super::doorkeeper::Doorkeeper::new(geo.n_segs as u64 * geo.seg_data_size),
            tails: Mutex::new(Tails {
                key: key_tail,
                key_r: Replica {
                    slot: kslot,
                    seq: kseq,
                },
                dirty: dirty_tail,
                dirty_r: Replica {
                    slot: dslot,
                    seq: dseq,
                },
                wb_end: 0,
            }),
            info: Mutex::new(InfoState {
                info,
                r: Replica {
                    slot: islot,
                    seq: iseq,
                },
            }),
            segs,
            counters: Default::default(),
            gc_state: Default::default(),
            compact_wants_wb: AtomicBool::new(false),
            next_token: AtomicU32::new(1),
            errors: Mutex::new(Errors::default()),
            wall_clock_ms: cfg.wall_clock_ms,
            waiting: AtomicU64::new(0),
            latency: Default::default(),
            gc_pct: AtomicU32::new(info.gc_percent),
            mode_code: AtomicU32::new(info.policy.mode.code() as u32),
            seq_code: AtomicU64::new(0),
            direct_done: AtomicU64::new(0),
            direct_flushed: AtomicU64::new(0),
            unflushed: Default::default(),
            closed_seq: AtomicU64::new(last),
            unsynced_seq: AtomicU64::new(0),
            hidden_below: AtomicU64::new(0),
            invalidating: Mutex::new(()),
            flushed_through: AtomicU64::new(frec.through),
            replay_unsynced_dropped: unsynced_dropped,
            replay_rec: frec,
            replay_last: last,
            flush_rec: Mutex::new(super::FlushRecState {
                rec,
                r: Replica {
                    slot: fslot,
                    seq: fseq,
                },
            }),
        };
        e.load_policy_codes(info.policy);
        if info.policy.mode == super::CacheMode::PassThrough {
            // Replay brought the clean extents back; passthrough serves none of them.
            e.invalidate_clean();
        }
        Ok(e)
    }
}

/// Applies one replayed key: takes its segment reference and inserts it into the index
/// unless its segment was reclaimed since (generation check, before any data check).
fn replay_key(
    k: &KeyRec,
    gens: &[u64],
    refs: &mut [u32],
    replayed: &mut Replayed,
    data_crc: bool,
    dirty: bool,
) -> Result<(), OpenError> {
    let mut flags = 0;
    if dirty && k.flags & KEY_CLEAN == 0 {
        flags |= F_DIRTY;
    }
    if k.flags & super::format::KEY_INVALID != 0 {
        // A tombstone: `Shard::settle` punches the range instead of inserting.
        flags |= super::index::F_EMPTY;
    }
    if k.has_data() {
        let g = gens[k.seg as usize];
        if k.gen > g {
            return Err(corrupt(format!(
                "key at backing offset {} has generation {} but segment {} is at {}",
                k.off, k.gen, k.seg, g
            )));
        }
        if k.gen < g {
            if k.flags & KEY_UNSYNCED != 0 {
                return Ok(()); // as an unsynced key replay drops: the older extent stands
            }
            // Its segment was reclaimed out of log order (`compact`): the key's data is
            // gone, superseded by newer keys or on the backing device, so older keys of
            // the range must not show through. (GC retires keys in log order; a key it
            // reclaimed is behind key_tail and never replayed.)
            let x = Extent::without_data(k.len, super::index::F_EMPTY, 0);
            let shard = (k.off / SUBTREE_SIZE) as usize;
            if !replayed.push(shard, (k.off % SUBTREE_SIZE) as u32, x) {
                return Err(corrupt("the log holds more than 4 billion keys"));
            }
            return Ok(());
        }
        refs[k.seg as usize] += 1;
        if data_crc {
            flags |= F_CRC;
        }
    } else {
        flags |= F_ZERO;
    }
    let shard = (k.off / SUBTREE_SIZE) as usize;
    let x = Extent::of_key(k, flags);
    if !replayed.push(shard, (k.off % SUBTREE_SIZE) as u32, x) {
        return Err(corrupt("the log holds more than 4 billion keys"));
    }
    Ok(())
}
