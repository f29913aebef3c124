//! Tier 1: the engine on the simulator. Seeded random simulations over every workload,
//! and exhaustive crash-point enumeration: for each workload the run is repeated with a
//! power loss after every persistence point (fence), unfenced lines kept, dropped or
//! torn, then replayed and checked against the durability oracle. Every failure names
//! the seed (and crash point) that replays it: `PCACHE_SEED=S PCACHE_CRASH=N cargo test
//! --test sim replay_one`.

use pcache::engine::{CacheMode, Policy, SeqPolicy};
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
fn crash_points() {
    let per = env_u64("PCACHE_CRASH_SEEDS").unwrap_or(8);
    let (mut points, mut violations) = (0u64, vec![]);
    for w in Workload::ALL {
        for s in 0..per {
            let seed = 1000 + s * 7 + w as u64;
            let total = {
                let mut world = World::new(WorldCfg::new(seed, w)).unwrap();
                let start = world.fences();
                world.run().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                world.fences() - start
            };
            for p in 1..=total {
                let mode =
                    [CrashMode::Random, CrashMode::DropAll, CrashMode::KeepAll][(p % 3) as usize];
                points += 1;
                if let Err(e) = crash_at(seed, w, p, mode) {
                    violations.push(format!("seed {seed} {w:?} crash point {p} ({mode:?}): {e}"));
                }
            }
        }
    }
    println!(
        "crash points explored: {points}, violations: {}",
        violations.len()
    );
    for v in violations.iter().take(10) {
        println!("  {v}");
    }
    assert!(violations.is_empty());
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
/// 4 KiB cutoff on sequential streams for write-back), and a switch from write-back to
/// every other mode (and back) in the middle of the workload.
fn policy_cfgs(seed: u64, w: Workload) -> Vec<(String, WorldCfg)> {
    let mut v = vec![];
    for mode in CacheMode::ALL {
        let mut c = WorldCfg::new(seed, w);
        c.policy = Policy {
            mode,
            seq_cutoff_kib: if mode == CacheMode::WriteBack { 4 } else { 0 },
            seq_policy: SeqPolicy::Always,
        };
        c.seq_percent = 40;
        v.push((mode.name().to_string(), c));
    }
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
        };
        c.switch = Some((c.ops / 2, to));
        c.seq_percent = 20;
        v.push((format!("{}->{}", from.name(), to.name()), c));
    }
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

/// Crash-point enumeration in every mode and across a mode switch.
#[test]
fn policy_crash_points() {
    let per = env_u64("PCACHE_CRASH_SEEDS").unwrap_or(1);
    let (mut points, mut violations) = (0u64, vec![]);
    for w in POLICY_WORKLOADS {
        for s in 0..per {
            let seed = 2000 + s * 7 + w as u64;
            for (name, cfg) in policy_cfgs(seed, w) {
                let total = {
                    let mut world = World::new(cfg.clone()).unwrap();
                    let start = world.fences();
                    world
                        .run()
                        .unwrap_or_else(|e| panic!("seed {seed} {name}: {e}"));
                    world.fences() - start
                };
                for p in 1..=total {
                    let mode = [CrashMode::Random, CrashMode::DropAll, CrashMode::KeepAll]
                        [(p % 3) as usize];
                    points += 1;
                    let r = (|| {
                        let mut world = World::new(cfg.clone())?;
                        world.pmem.set_fence_limit(Some(world.fences() + p));
                        world.run()?;
                        world.crash_and_check(mode)?;
                        world.run()?;
                        world.crash_and_check(CrashMode::Random)
                    })();
                    if let Err(e) = r {
                        violations.push(format!(
                            "seed {seed} {w:?} {name} crash point {p} ({mode:?}): {e}"
                        ));
                    }
                }
            }
        }
    }
    println!(
        "policy crash points explored: {points}, violations: {}",
        violations.len()
    );
    for v in violations.iter().take(10) {
        println!("  {v}");
    }
    assert!(violations.is_empty());
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
