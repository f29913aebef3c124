//! Tier 1: the engine on the simulator. Seeded random simulations over every workload,
//! and exhaustive crash-point enumeration: for each workload the run is repeated with a
//! power loss after every persistence point (fence), unfenced lines kept, dropped or
//! torn, then replayed and checked against the durability oracle. Every failure names
//! the seed (and crash point) that replays it: `PCACHE_SEED=S PCACHE_CRASH=N cargo test
//! --test sim replay_one`.
//!
//! `crash_points` enumerates five families of configurations (every workload; every
//! cache mode and mode switch; reclaim on a minimal cache; other kset, channel and
//! segment geometries; write-through with the disk losing unflushed writes), about
//! 150,000 crash points per run, spread over the cores
//! (`PCACHE_THREADS`), and prints a line per family and `total crash points: N,
//! violations: V`. `PCACHE_FAMILY=policy,...` runs some families only; the
//! `PCACHE_*_SEEDS` variables scale them (a soak). A violation prints the
//! `PCACHE_JOB=family:index:point` that replays it with `job_replay_one` (with the
//! same `PCACHE_*_SEEDS`, if any were set).

use pcache::engine::{CacheMode, Policy, Promotion, SeqPolicy};
use pcache::env::sim::pmem::CrashMode;
use pcache::env::sim::world::{Workload, World, WorldCfg};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn run_seed(seed: u64, w: Workload) -> Result<u64, String> {
    let mut world = World::new(WorldCfg::new(seed, w))?;
    world.run().map_err(|e| format!("seed {seed} {w:?}: {e}"))?;
    world
        .crash_and_check(CrashMode::Random)
        .map_err(|e| format!("seed {seed} {w:?} final crash: {e}"))?;
    world
        .run()
        .map_err(|e| format!("seed {seed} {w:?} after crash: {e}"))?;
    Ok(world.fences())
}

#[test]
fn random_seeds() {
    let n = env_u64("PCACHE_SEEDS").unwrap_or(250);
    let mut fails = vec![];
    for seed in 0..n {
        let w = Workload::ALL[(seed % Workload::ALL.len() as u64) as usize];
        if let Err(e) = run_seed(seed, w) {
            fails.push(e);
        }
    }
    println!("seeds run: {n}, failures: {}", fails.len());
    assert!(
        fails.is_empty(),
        "{} failing seeds, first: {}",
        fails.len(),
        fails[0]
    );
}

/// Runs `seed` with a crash after fence number `point`, and checks the recovery.
fn crash_at(seed: u64, w: Workload, point: u64, mode: CrashMode) -> Result<(), String> {
    let mut world = World::new(WorldCfg::new(seed, w))?;
    world.pmem.set_fence_limit(Some(world.fences() + point));
    world.run()?;
    world.crash_and_check(mode)?;
    // Keep going on the recovered state and crash again: recovery of a recovery.
    world.run()?;
    world.crash_and_check(CrashMode::Random)
}

#[test]
fn replay_one() {
    let Some(seed) = env_u64("PCACHE_SEED") else {
        return;
    };
    let w = Workload::ALL[env_u64("PCACHE_WORKLOAD").unwrap_or(seed % 5) as usize];
    match env_u64("PCACHE_CRASH") {
        Some(p) => {
            let mode = [CrashMode::Random, CrashMode::DropAll, CrashMode::KeepAll]
                [env_u64("PCACHE_MODE").unwrap_or(0) as usize];
            crash_at(seed, w, p, mode).unwrap()
        }
        None => {
            run_seed(seed, w).unwrap();
        }
    }
}

/// A crash at any persistence point of `format` leaves a medium that is either blank
/// (the superblock is written last) or a complete, empty cache: never a half cache.
#[test]
fn crash_during_format() {
    use pcache::engine::{probe, BackingIdentity, Config, Engine, FormatOptions, OpenError, Probe};
    use pcache::env::sim::pmem::SimPmem;
    use pcache::env::sim::rng::Rng;
    use std::sync::Arc;
    let id = BackingIdentity {
        size: 1 << 20,
        block_size: 512,
        id: "d".into(),
    };
    let mut fo = FormatOptions::new(id.clone(), 3);
    fo.seg_size = 24 << 10;
    let cfg = Config::default();
    let size = pcache::engine::format::SEGMENTS_OFF + 12 * (24 << 10);
    let total = {
        let p = Arc::new(SimPmem::new(size));
        drop(Engine::format(p.clone(), &fo, &cfg).unwrap());
        p.persistence_points()
    };
    let (mut blank, mut whole) = (0, 0);
    for point in 0..=total {
        for mode in [CrashMode::DropAll, CrashMode::KeepAll, CrashMode::Random] {
            let p = Arc::new(SimPmem::new(size));
            p.set_fence_limit(Some(point));
            let _ = Engine::format(p.clone(), &fo, &cfg);
            let img = p.crash(&mut Rng::new(point), mode);
            let p2 = Arc::new(SimPmem::from_image(img));
            match probe(&p2) {
                Probe::Blank => blank += 1,
                Probe::Pcache(_) => {
                    let e = Engine::open(p2, &id, false, &cfg)
                        .unwrap_or_else(|e| panic!("crash at fence {point} ({mode:?}): {e}"));
                    e.check_invariants(&[]).unwrap();
                    whole += 1;
                }
                Probe::Foreign(x) => {
                    assert_eq!(
                        Engine::open(p2, &id, false, &cfg).err(),
                        Some(OpenError::Foreign)
                    );
                    panic!("crash at fence {point} ({mode:?}) left a foreign-looking medium: {x:?}")
                }
            }
        }
    }
    println!(
        "format crash points: {}, blank: {blank}, complete: {whole}",
        3 * (total + 1)
    );
    assert!(blank > 0 && whole > 0);
}

/// The policy configurations the mode tests run: every mode from the start (with a
/// 4 KiB cutoff on sequential streams for write-back, second-miss promotion for
/// write-around), write-back promoting on the second miss, and a switch from write-back
/// to every other mode (and back) in the middle of the workload.
fn policy_cfgs(seed: u64, w: Workload) -> Vec<(String, WorldCfg)> {
    let mut v = vec![];
    for mode in CacheMode::ALL {
        let mut c = WorldCfg::new(seed, w);
        c.policy = Policy {
            mode,
            seq_cutoff_kib: if mode == CacheMode::WriteBack { 4 } else { 0 },
            seq_policy: SeqPolicy::Always,
            // Write-back: writes of 8 KiB or more bypass the cache while it reclaims.
            write_bypass_kib: if mode == CacheMode::WriteBack { 8 } else { 0 },
            // Write-around: a full cache fills only on second misses.
            promotion: match mode {
                CacheMode::WriteAround => Promotion::SecondMiss,
                _ => Promotion::Always,
            },
        };
        c.seq_percent = 40;
        v.push((mode.name().to_string(), c));
    }
    // Write-back promoting on the second miss, without cutoff or bypass: every request
    // goes through the cache, and reads race fills that are declined or admitted.
    let mut c = WorldCfg::new(seed, w);
    c.policy = Policy {
        promotion: Promotion::SecondMiss,
        ..Policy::default()
    };
    c.seq_percent = 20;
    v.push(("writeback+second_miss".to_string(), c));
    for (from, to) in [
        (CacheMode::WriteBack, CacheMode::WriteThrough),
        (CacheMode::WriteBack, CacheMode::WriteAround),
        (CacheMode::WriteBack, CacheMode::PassThrough),
        (CacheMode::WriteThrough, CacheMode::WriteBack),
    ] {
        let mut c = WorldCfg::new(seed, w);
        c.policy = Policy {
            mode: from,
            seq_cutoff_kib: 0,
            seq_policy: SeqPolicy::Never,
            write_bypass_kib: 0,
            promotion: Promotion::Always,
        };
        c.switch = Some((c.ops / 2, to));
        c.seq_percent = 20;
        v.push((format!("{}->{}", from.name(), to.name()), c));
    }
    v
}

/// The write-through family's workloads: overwrites read back soon (hits on unsynced
/// keys), FUA and FLUSH between them, misses racing writes, and a cache that fills.
const WRITETHROUGH_WORKLOADS: [Workload; 4] = [
    Workload::Overwrite,
    Workload::FuaFlush,
    Workload::Mixed,
    Workload::CacheFull,
];

/// Write-through configurations: the mode from the start (its reads continuing the
/// last write half the time, so they hit the unsynced copies), with a switch to
/// write-back and back in the middle of the workload. The disk's volatile write cache
/// loses a random subset of the unflushed writes at every crash; the oracle then
/// checks that no block reads a write from pmem that eviction would turn into an older
/// one from the disk (`World::crash_and_check`).
fn writethrough_cfgs(seed: u64, w: Workload) -> Vec<(String, WorldCfg)> {
    let mut v = vec![];
    let wt = Policy {
        mode: CacheMode::WriteThrough,
        seq_cutoff_kib: 0,
        seq_policy: SeqPolicy::Never,
        write_bypass_kib: 0,
        promotion: Promotion::Always,
    };
    let mut c = WorldCfg::new(seed, w);
    c.policy = wt;
    c.seq_percent = 50;
    v.push(("writethrough".to_string(), c));
    let mut c = WorldCfg::new(seed, w);
    c.policy = wt;
    c.seq_percent = 30;
    c.switch = Some((c.ops / 2, CacheMode::WriteBack));
    v.push(("writethrough->writeback".to_string(), c));
    v
}

/// ZeroDiscard: outside write-back, write-zeroes and discards go to the disk directly.
const POLICY_WORKLOADS: [Workload; 4] = [
    Workload::Overwrite,
    Workload::Mixed,
    Workload::CacheFull,
    Workload::ZeroDiscard,
];

/// Every mode and a mode switch, with random seeds: the oracle holds, and once writes
/// stop, a cache that is not in write-back mode drains to zero dirty bytes.
#[test]
fn policy_random_seeds() {
    let n = env_u64("PCACHE_SEEDS").unwrap_or(24);
    let (mut runs, mut fails) = (0u64, vec![]);
    let mut bypassed = 0u64;
    for seed in 0..n {
        let w = POLICY_WORKLOADS[(seed % 4) as usize];
        for (name, cfg) in policy_cfgs(seed, w) {
            runs += 1;
            let r = (|| -> Result<(), String> {
                let mut world = World::new(cfg)?;
                world.run()?;
                world.crash_and_check(CrashMode::Random)?;
                world.run()?;
                bypassed += world.engine.stats().bypassed_requests;
                if world.engine.policy().mode != CacheMode::WriteBack {
                    let left = world.drain()?;
                    if left != 0 {
                        return Err(format!("{left} dirty bytes left after the drain"));
                    }
                }
                Ok(())
            })();
            if let Err(e) = r {
                fails.push(format!("seed {seed} {w:?} {name}: {e}"));
            }
        }
    }
    println!(
        "policy runs: {runs}, bypassed requests: {bypassed}, failures: {}",
        fails.len()
    );
    for f in fails.iter().take(10) {
        println!("  {f}");
    }
    assert!(fails.is_empty());
    assert!(bypassed > 0, "no request ever bypassed the cache");
}

/// Replays one policy configuration: `PCACHE_POLICY=seed,workload,config,crash_point`
/// (workload and config index into `POLICY_WORKLOADS` and `policy_cfgs`).
#[test]
fn policy_replay_one() {
    let Ok(v) = std::env::var("PCACHE_POLICY") else {
        return;
    };
    let f: Vec<u64> = v.split(',').map(|x| x.parse().unwrap()).collect();
    let w = POLICY_WORKLOADS[f[1] as usize];
    let (name, cfg) = policy_cfgs(f[0], w).swap_remove(f[2] as usize);
    println!("{name}");
    let mut world = World::new(cfg).unwrap();
    world.pmem.set_fence_limit(Some(world.fences() + f[3]));
    world.run().unwrap();
    let mode = [CrashMode::Random, CrashMode::DropAll, CrashMode::KeepAll][(f[3] % 3) as usize];
    world.crash_and_check(mode).unwrap();
    println!("second run");
    world.run().unwrap();
    world.crash_and_check(CrashMode::Random).unwrap();
}

// ---------------------------------------------------------------------------------
// Crash-point enumeration, in families, over a pool of threads.
// ---------------------------------------------------------------------------------

/// One configuration whose every persistence point is crashed at in turn.
struct Job {
    family: &'static str,
    label: String,
    cfg: WorldCfg,
}

/// The crash-point families, in a fixed order (a job is named by family and index, so
/// `PCACHE_JOB` replays it). Seeds per family come from the environment so a soak can
/// run more of the same; the defaults make about 100,000 crash points, what CI runs.
///
/// - `workload`: every workload on the default geometry (the original enumeration).
/// - `policy`: every workload in every cache mode, and across mode switches.
/// - `reclaim`: the cache-filling workloads, and Hot's reads and overwrites over
///   512 KiB (blocks read again and again, so GC moves pieces read twice and their
///   copies keep a read count: `gc::refs_kept`), on a cache of 8-9 segments (two of them
///   kept for the log, up to three held by the channels' heads), so segments are
///   written back and reclaimed over and over and a crash lands inside writeback
///   windows and GC. (6 segments with three channels and 27 KiB writes stayed full
///   for 200 retries: the heads pin the space a write needs.)
/// - `recycle`: 4 KiB writes overwriting a 32 KiB region of a 24-segment cache, a
///   FLUSH every 150 steps or so, no FUA, 1000 operations: writeback meets mostly
///   superseded windows of the current epoch and moves their live dirty data to the
///   head instead of writing it back (`Engine::recycle`), and crashes land between the
///   move, the close of its kset and dirty_tail passing the old keys; the backing
///   device alone must stay consistent.
/// - `geometry`: every workload with 1, 3 and 16 keys per kset, 1 and 5 channels and
///   16-32 KiB segments: ksets close at other places relative to segment ends.
/// - `writethrough`: write-through from the start and switched to write-back midway,
///   reads following writes: write-throughs complete without a backing FLUSH, so
///   crashes land with unsynced keys in the log and unflushed writes in the disk's
///   volatile cache (lost or kept at random), and replay must drop what no completed
///   FLUSH covered.
///
/// Every world draws its writeback window (1 to 8 ksets) and GC watermark (0-60 %)
/// from its seed, so the seeds of every family cover the writeback windows.
fn crash_jobs() -> Vec<Job> {
    let seeds = |name: &str, default: u64| env_u64(name).unwrap_or(default);
    let mut jobs = vec![];
    for w in Workload::ALL {
        for s in 0..seeds("PCACHE_CRASH_SEEDS", 14) {
            let seed = 1000 + s * 7 + w as u64;
            jobs.push(Job {
                family: "workload",
                label: format!("seed {seed} {w:?}"),
                cfg: WorldCfg::new(seed, w),
            });
        }
    }
    for w in Workload::ALL {
        for s in 0..seeds("PCACHE_POLICY_SEEDS", 6) {
            let seed = 2000 + s * 7 + w as u64;
            for (name, cfg) in policy_cfgs(seed, w) {
                jobs.push(Job {
                    family: "policy",
                    label: format!("seed {seed} {w:?} {name}"),
                    cfg,
                });
            }
        }
    }
    for w in [
        Workload::CacheFull,
        Workload::Mixed,
        Workload::Overwrite,
        Workload::Hot,
    ] {
        for s in 0..seeds("PCACHE_RECLAIM_SEEDS", 13) {
            let seed = 3000 + s * 7 + w as u64;
            let mut cfg = WorldCfg::new(seed, w);
            cfg.n_segs = 8 + s % 2;
            cfg.region_blocks = cfg.region_blocks.max(1024);
            jobs.push(Job {
                family: "reclaim",
                label: format!("seed {seed} {w:?} {} segments", cfg.n_segs),
                cfg,
            });
        }
    }
    for s in 0..seeds("PCACHE_RECYCLE_SEEDS", 10) {
        let seed = 6000 + s * 13;
        let mut cfg = WorldCfg::new(seed, Workload::Hot);
        cfg.ops = 1000;
        cfg.n_segs = 24;
        cfg.kset_keys = 4 + (s as u32 % 3) * 4;
        jobs.push(Job {
            family: "recycle",
            label: format!("seed {seed} Hot {} keys/kset", cfg.kset_keys),
            cfg,
        });
    }
    for w in Workload::ALL {
        for s in 0..seeds("PCACHE_GEOMETRY_SEEDS", 5) {
            for (v, (keys, chans, seg_kib)) in [(1, 1, 24), (3, 5, 16), (16, 2, 32)]
                .into_iter()
                .enumerate()
            {
                let seed = 4000 + s * 31 + v as u64 * 7 + w as u64;
                let mut cfg = WorldCfg::new(seed, w);
                cfg.kset_keys = keys;
                cfg.channels = chans;
                cfg.seg_size = seg_kib << 10;
                jobs.push(Job {
                    family: "geometry",
                    label: format!(
                        "seed {seed} {w:?} {keys} keys/kset, {chans} channels, {seg_kib} KiB segments"
                    ),
                    cfg,
                });
            }
        }
    }
    for w in WRITETHROUGH_WORKLOADS {
        for s in 0..seeds("PCACHE_WT_SEEDS", 5) {
            let seed = 5000 + s * 11 + w as u64;
            for (name, cfg) in writethrough_cfgs(seed, w) {
                jobs.push(Job {
                    family: "writethrough",
                    label: format!("seed {seed} {w:?} {name}"),
                    cfg,
                });
            }
        }
    }
    if let Ok(only) = std::env::var("PCACHE_FAMILY") {
        jobs.retain(|j| only.split(',').any(|f| f == j.family));
    }
    jobs
}

const CRASH_MODES: [CrashMode; 3] = [CrashMode::Random, CrashMode::DropAll, CrashMode::KeepAll];

/// How often a crash point also checks recovery of a recovery (every this many points):
/// running the rest of the workload on the recovered state and crashing again costs as
/// much as the crash itself, and neighbouring points recover near-identical states.
const RECRASH_EVERY: u64 = 4;

/// Runs `cfg` with a power loss after its `point`-th persistence point (unfenced lines
/// treated as `mode` says) and checks the recovery; at every RECRASH_EVERY-th point it
/// then keeps going on the recovered state and crashes again at the end: recovery of a
/// recovery.
fn crash_cfg_at(cfg: &WorldCfg, point: u64, mode: CrashMode) -> Result<u64, String> {
    let mut world = World::new(cfg.clone())?;
    world.pmem.set_fence_limit(Some(world.fences() + point));
    world.run()?;
    world.crash_and_check(mode)?;
    if point % RECRASH_EVERY == 0 {
        world.run()?;
        world.crash_and_check(CrashMode::Random)?;
    }
    Ok(world.unsynced_dropped)
}

/// What an uncrashed run of a job did: its persistence points, and how much writeback
/// and reclaim happened in it (so a family that is meant to reclaim can prove it did).
#[derive(Default, Clone, Copy)]
struct DryRun {
    fences: u64,
    wb_ksets: u64,
    reclaimed: u64,
    /// Bytes of read-hot clean data GC moved instead of dropping.
    relocated: u64,
    /// Segments compaction reclaimed out of log order.
    compacted: u64,
    /// Bytes of live dirty data writeback moved instead of writing back.
    recycled: u64,
}

fn dry_run(cfg: &WorldCfg) -> Result<DryRun, String> {
    let mut world = World::new(cfg.clone())?;
    let start = world.fences();
    world.run()?;
    let st = world.engine.stats();
    Ok(DryRun {
        fences: world.fences() - start,
        wb_ksets: st.writeback_ksets,
        reclaimed: st.segments_reclaimed,
        relocated: st.relocated_bytes,
        compacted: st.segments_compacted,
        recycled: st.recycled_bytes,
    })
}

/// Runs `f(i)` for every `i < n` on `threads` threads, handing out indices in order.
fn par_for(n: usize, threads: usize, f: impl Fn(usize) + Sync) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                f(i);
            });
        }
    });
}

fn crash_threads() -> usize {
    env_u64("PCACHE_THREADS")
        .map(|n| n as usize)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// Every family's crash points, spread over `PCACHE_THREADS` threads (default: the
/// cores). Prints one line per family and a total; fails on any violation, and if the
/// reclaim family never reclaimed a segment (it would then not test what it claims).
#[test]
fn crash_points() {
    let t0 = std::time::Instant::now();
    let jobs = crash_jobs();
    let threads = crash_threads();
    let dry: Vec<std::sync::Mutex<Result<DryRun, String>>> = jobs
        .iter()
        .map(|_| std::sync::Mutex::new(Ok(DryRun::default())))
        .collect();
    par_for(jobs.len(), threads, |i| {
        *dry[i].lock().unwrap() = dry_run(&jobs[i].cfg);
    });
    let dry: Vec<DryRun> = dry
        .into_iter()
        .zip(&jobs)
        .map(|(d, j)| {
            d.into_inner()
                .unwrap()
                .unwrap_or_else(|e| panic!("{} {} (uncrashed): {e}", j.family, j.label))
        })
        .collect();
    // Work items are (job, point) in chunks of 8 points, so long and short jobs share
    // the threads evenly.
    const CHUNK: u64 = 8;
    let mut items = vec![];
    for (j, d) in dry.iter().enumerate() {
        let mut p = 1;
        while p <= d.fences {
            items.push((j, p, (p + CHUNK - 1).min(d.fences)));
            p += CHUNK;
        }
    }
    let violations = std::sync::Mutex::new(vec![]);
    // Per job: crash points whose replay dropped unsynced keys, and how many keys.
    let dropped: Vec<[std::sync::atomic::AtomicU64; 2]> =
        jobs.iter().map(|_| Default::default()).collect();
    par_for(items.len(), threads, |i| {
        let (j, from, to) = items[i];
        for p in from..=to {
            let mode = CRASH_MODES[(p % 3) as usize];
            let r = crash_cfg_at(&jobs[j].cfg, p, mode);
            if let Ok(n) = r {
                use std::sync::atomic::Ordering::Relaxed;
                dropped[j][0].fetch_add((n > 0) as u64, Relaxed);
                dropped[j][1].fetch_add(n, Relaxed);
            }
            if let Err(e) = r {
                violations.lock().unwrap().push((
                    j,
                    format!(
                        "{} {} crash point {p} ({mode:?}): {e}\n    replay: PCACHE_JOB={}:{}:{p} cargo test --test sim job_replay_one -- --nocapture",
                        jobs[j].family,
                        jobs[j].label,
                        jobs[j].family,
                        jobs.iter().take(j).filter(|x| x.family == jobs[j].family).count()
                    ),
                ));
            }
        }
    });
    let violations = violations.into_inner().unwrap();
    let mut total = 0;
    let mut reclaim_ok = true;
    let mut wt_dropping = 0;
    let mut recycle_ok = true;
    for family in [
        "workload",
        "policy",
        "reclaim",
        "recycle",
        "geometry",
        "writethrough",
    ] {
        let idx: Vec<usize> = (0..jobs.len())
            .filter(|&j| jobs[j].family == family)
            .collect();
        if idx.is_empty() {
            continue;
        }
        let points: u64 = idx.iter().map(|&j| dry[j].fences).sum();
        let wb: u64 = idx.iter().map(|&j| dry[j].wb_ksets).sum();
        let reclaimed: u64 = idx.iter().map(|&j| dry[j].reclaimed).sum();
        let relocated: u64 = idx.iter().map(|&j| dry[j].relocated).sum();
        let compacted: u64 = idx.iter().map(|&j| dry[j].compacted).sum();
        let recycled: u64 = idx.iter().map(|&j| dry[j].recycled).sum();
        let v = violations.iter().filter(|(j, _)| idx.contains(j)).count();
        total += points;
        let prefix = if family == "workload" {
            String::new()
        } else {
            format!("{family} ")
        };
        println!(
            "{prefix}crash points explored: {points}, violations: {v} ({} configurations; uncrashed runs wrote back {wb} ksets, reclaimed {reclaimed} segments ({compacted} out of log order), GC moved {relocated} bytes, writeback recycled {recycled} bytes)",
            idx.len()
        );
        if family == "reclaim" && (reclaimed == 0 || relocated == 0 || compacted == 0) {
            reclaim_ok = false;
        }
        if family == "recycle" && recycled == 0 {
            recycle_ok = false;
        }
        let load = |k: usize| -> u64 {
            idx.iter()
                .map(|&j| dropped[j][k].load(std::sync::atomic::Ordering::Relaxed))
                .sum()
        };
        if family == "writethrough" {
            wt_dropping = load(0);
        }
        if load(0) > 0 {
            println!(
                "  {family}: {} crash points replayed with unsynced keys dropped ({} keys): their ksets had no completed backing FLUSH",
                load(0),
                load(1)
            );
        }
    }
    println!(
        "total crash points: {total}, violations: {} ({:.0} s on {threads} threads)",
        violations.len(),
        t0.elapsed().as_secs_f64()
    );
    for (_, v) in violations.iter().take(10) {
        println!("  {v}");
    }
    assert!(violations.is_empty(), "{} violations", violations.len());
    assert!(
        reclaim_ok,
        "the reclaim family never reclaimed a segment or never moved read-hot data"
    );
    let recycle_ran = jobs.iter().any(|j| j.family == "recycle");
    assert!(
        !recycle_ran || recycle_ok,
        "the recycle family never moved live dirty data in writeback"
    );
    let wt_ran = jobs.iter().any(|j| j.family == "writethrough");
    assert!(
        !wt_ran || wt_dropping > 0,
        "the writethrough family never dropped an unsynced key at replay"
    );
}

/// Replays one crash point of `crash_points`: `PCACHE_JOB=family:index:point`, as a
/// violation prints it (index counts the jobs of that family, in `crash_jobs` order).
#[test]
fn job_replay_one() {
    let Ok(v) = std::env::var("PCACHE_JOB") else {
        return;
    };
    let f: Vec<&str> = v.split(':').collect();
    let (family, idx, point): (&str, usize, u64) =
        (f[0], f[1].parse().unwrap(), f[2].parse().unwrap());
    let job = crash_jobs()
        .into_iter()
        .filter(|j| j.family == family)
        .nth(idx)
        .expect("no such job");
    println!("{} {}", job.family, job.label);
    let n = crash_cfg_at(&job.cfg, point, CRASH_MODES[(point % 3) as usize]).unwrap();
    println!("unsynced keys dropped at replay: {n}");
}
